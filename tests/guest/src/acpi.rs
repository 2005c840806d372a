//! Just enough ACPI to count processors and find the PM timer: RSDP (from
//! hvm_start_info or the BIOS-area scan) -> XSDT or RSDT -> MADT or FADT,
//! every checksum validated.

use crate::phys;

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
/// ACPI 1.0 RSDP (checksum covers these bytes).
const RSDP_V1_BYTES: u64 = 20;
/// The BIOS read-only area that is scanned for the RSDP, on 16-byte boundaries.
const RSDP_SCAN_START: u64 = 0xe_0000;
const RSDP_SCAN_END: u64 = 0x10_0000;
const RSDP_SCAN_STEP: u64 = 16;
/// System description table header: signature, length, revision, checksum, ...
const SDT_HEADER_BYTES: u64 = 36;
/// Larger tables are taken for garbage rather than walked.
const SDT_MAX_BYTES: u64 = 1 << 20;
const MADT_SIGNATURE: &[u8; 4] = b"APIC";
/// MADT: header, local APIC address (u32), flags (u32), then the entries.
const MADT_ENTRIES_OFFSET: u64 = SDT_HEADER_BYTES + 8;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_X2APIC: u8 = 9;
/// Processor Local APIC / x2APIC flags: bit 0 = enabled.
const MADT_FLAG_ENABLED: u32 = 1;
const FADT_SIGNATURE: &[u8; 4] = b"FACP";
/// FADT fields (ACPI 6.5 table 5.9): PM_TMR_BLK (u32 port), PM_TMR_LEN (u8),
/// Flags (u32), X_PM_TMR_BLK (generic address structure, 12 bytes).
const FADT_PM_TMR_BLK: u64 = 76;
const FADT_PM_TMR_LEN: u64 = 91;
const FADT_FLAGS: u64 = 112;
const FADT_X_PM_TMR_BLK: u64 = 208;
const GAS_BYTES: u64 = 12;
/// Generic address structure: address space ID 1 = system I/O; address at +4.
const GAS_SPACE_SYSTEM_IO: u8 = 1;
const GAS_ADDRESS: u64 = 4;
/// FADT flag TMR_VAL_EXT: the PM timer counts 32 bits rather than 24.
const FADT_FLAG_TMR_VAL_EXT: u32 = 1 << 8;
/// PM_TMR_LEN of a PM timer that exists.
const PM_TMR_LEN: u8 = 4;

/// The root of the ACPI tables.
struct Rsdp {
    rsdt: u64,
    /// Only from a revision >= 2 RSDP with a valid extended checksum.
    xsdt: Option<u64>,
}

/// Number of enabled processors in the MADT (Local APIC and Local x2APIC
/// entries), or `None` if no valid RSDP/root table/MADT was found.
/// `rsdp_hint` is hvm_start_info's rsdp_paddr (0 = not given).
pub fn enabled_cpus(rsdp_hint: u64) -> Option<u32> {
    let rsdp = find_rsdp(rsdp_hint)?;
    let madt = find_table(&rsdp, MADT_SIGNATURE)?;
    Some(madt_enabled_cpus(madt))
}

/// The ACPI PM timer: a free-running 3.579545 MHz counter read from an I/O port.
pub struct PmTimer {
    pub port: u16,
    /// 24 or 32.
    pub bits: u32,
}

/// The PM timer the FADT describes, if there is one in I/O space.
pub fn pm_timer(rsdp_hint: u64) -> Option<PmTimer> {
    let rsdp = find_rsdp(rsdp_hint)?;
    let fadt = find_table(&rsdp, FADT_SIGNATURE)?;
    let len = table_len(fadt, None)?;
    let extended = FADT_X_PM_TMR_BLK + GAS_BYTES <= len
        && phys::read_u8(fadt + FADT_X_PM_TMR_BLK) == Some(GAS_SPACE_SYSTEM_IO);
    let x_port = if extended {
        phys::read_u64(fadt + FADT_X_PM_TMR_BLK + GAS_ADDRESS)?
    } else {
        0
    };
    let port = match x_port {
        0 => u64::from(phys::read_u32(fadt + FADT_PM_TMR_BLK)?),
        x => x,
    };
    if port == 0 || phys::read_u8(fadt + FADT_PM_TMR_LEN)? != PM_TMR_LEN {
        return None;
    }
    let flags = if FADT_FLAGS + 4 <= len {
        phys::read_u32(fadt + FADT_FLAGS)?
    } else {
        0
    };
    Some(PmTimer {
        port: u16::try_from(port).ok()?,
        bits: if flags & FADT_FLAG_TMR_VAL_EXT != 0 {
            32
        } else {
            24
        },
    })
}

fn find_rsdp(hint: u64) -> Option<Rsdp> {
    if hint != 0 {
        if let Some(rsdp) = parse_rsdp(hint) {
            return Some(rsdp);
        }
    }
    (RSDP_SCAN_START..RSDP_SCAN_END)
        .step_by(RSDP_SCAN_STEP as usize)
        .find_map(parse_rsdp)
}

fn parse_rsdp(addr: u64) -> Option<Rsdp> {
    if phys::read::<8>(addr)? != *RSDP_SIGNATURE || phys::byte_sum(addr, RSDP_V1_BYTES)? != 0 {
        return None;
    }
    let revision = phys::read_u8(addr + 15)?;
    let rsdt = u64::from(phys::read_u32(addr + 16)?);
    let xsdt = if revision >= 2 {
        phys::read_u32(addr + 20)
            .filter(|&len| u64::from(len) >= RSDP_V1_BYTES + 16)
            .filter(|&len| phys::byte_sum(addr, u64::from(len)) == Some(0))
            .and_then(|_| phys::read_u64(addr + 24))
            .filter(|&xsdt| xsdt != 0)
    } else {
        None
    };
    Some(Rsdp { rsdt, xsdt })
}

/// Length of the valid table at `addr` (signature `signature` if given,
/// checksum correct), or `None`.
fn table_len(addr: u64, signature: Option<&[u8; 4]>) -> Option<u64> {
    if signature.is_some_and(|sig| phys::read::<4>(addr) != Some(*sig)) {
        return None;
    }
    let len = u64::from(phys::read_u32(addr + 4)?);
    if !(SDT_HEADER_BYTES..=SDT_MAX_BYTES).contains(&len) || phys::byte_sum(addr, len)? != 0 {
        return None;
    }
    Some(len)
}

/// Address of the first valid table with `signature`, through the XSDT if
/// there is a valid one, else through the RSDT.
fn find_table(rsdp: &Rsdp, signature: &[u8; 4]) -> Option<u64> {
    let (root, entry_bytes) = match rsdp.xsdt.filter(|&x| table_len(x, Some(b"XSDT")).is_some()) {
        Some(xsdt) => (xsdt, 8),
        None => (rsdp.rsdt, 4),
    };
    let root_len = table_len(root, Some(if entry_bytes == 8 { b"XSDT" } else { b"RSDT" }))?;
    let entries = (root_len - SDT_HEADER_BYTES) / entry_bytes;
    (0..entries).find_map(|i| {
        let at = root + SDT_HEADER_BYTES + i * entry_bytes;
        let table = if entry_bytes == 8 {
            phys::read_u64(at)?
        } else {
            u64::from(phys::read_u32(at)?)
        };
        table_len(table, Some(signature)).map(|_| table)
    })
}

/// Counts the enabled processors of a MADT already validated by `table_len`.
fn madt_enabled_cpus(madt: u64) -> u32 {
    let Some(len) = table_len(madt, None) else {
        return 0;
    };
    let end = madt + len;
    let mut at = madt + MADT_ENTRIES_OFFSET;
    let mut cpus = 0;
    while at + 2 <= end {
        let (Some(kind), Some(entry_len)) = (phys::read_u8(at), phys::read_u8(at + 1)) else {
            break;
        };
        let entry_len = u64::from(entry_len);
        if entry_len < 2 || at + entry_len > end {
            break;
        }
        let flags_offset = match kind {
            MADT_LOCAL_APIC if entry_len >= 8 => Some(4),
            MADT_LOCAL_X2APIC if entry_len >= 16 => Some(8),
            _ => None,
        };
        if let Some(flags) = flags_offset.and_then(|off| phys::read_u32(at + off)) {
            if flags & MADT_FLAG_ENABLED != 0 {
                cpus += 1;
            }
        }
        at += entry_len;
    }
    cpus
}
