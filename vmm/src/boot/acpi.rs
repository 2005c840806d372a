//! ACPI tables for an x86 guest: RSDP, XSDT, FADT, FACS, DSDT and MADT.
//!
//! Everything lives in `[layout::ACPI_START, layout::ACPI_END)`, in this order:
//!
//! ```text
//! RSDP  (16-byte aligned, first, so a scan of 0xE0000..0xFFFFF finds it)
//! FACS  (64-byte aligned, required by the spec; no firmware waking vector)
//! DSDT  \_S5_, \_SB_.COM1, \_SB_.KBD_, and \_SB_.PCI0 when AcpiConfig::pci
//! MADT  one Local APIC per vCPU, the IOAPIC, IRQ0 -> GSI 2, the SCI, LINT1 NMI
//! FADT  full (not hardware-reduced) PC: PM1a event and control blocks, SCI,
//!       reset through the i8042, no SMI command port (always in ACPI mode)
//! XSDT  FADT, MADT
//! ```
//!
//! What the guest can do with them: power off by writing `SLP_TYP = S5_SLP_TYP`
//! with `SLP_EN` to PM1a_CNT (`ports::ACPI_PM1A_CNT`), and reset by writing
//! 0xFE to the i8042 command port (the FADT reset register).

use acpi_tables::aml::{self, AddressSpace as AmlAddressSpace, AddressSpaceCacheable};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{self, ports};

/// SLP_TYP value of `\_S5_` (soft off). The guest writes it with SLP_EN to
/// PM1a_CNT to power off; the PM1 device compares against this value.
pub const S5_SLP_TYP: u8 = 5;

/// What the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, 1..=255: APIC ids and processor UIDs are 0..num_cpus
    /// (APIC id 0xff would be the xAPIC broadcast id, so 255 CPUs is the limit).
    pub num_cpus: u8,
    /// Declare the PCI root bridge `\_SB_.PCI0` (config mechanism #1 at 0xCF8).
    pub pci: bool,
}

/// Why the ACPI tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// `AcpiConfig::num_cpus` is 0.
    #[error("cannot describe a guest with 0 vCPUs in the MADT (1 to 255 are accepted)")]
    NoCpus,
    /// The tables would run past the end of the ACPI area.
    #[error(
        "ACPI table {table} ({len_bytes} bytes) does not fit in the ACPI area {start:#x}..{end:#x}",
        start = .start.raw_value(),
        end = .end.raw_value()
    )]
    TableAreaFull {
        table: &'static str,
        len_bytes: usize,
        start: GuestAddress,
        end: GuestAddress,
    },
    /// Guest memory does not cover where a table goes.
    #[error(
        "cannot write ACPI table {table} ({len_bytes} bytes) to guest memory at {addr:#x}",
        addr = .addr.raw_value()
    )]
    WriteTable {
        table: &'static str,
        addr: GuestAddress,
        len_bytes: usize,
        #[source]
        source: GuestMemoryError,
    },
}

/// OEM fields of every table header (and of the RSDP).
const OEM_ID: [u8; 6] = *b"RINGVM";
const OEM_TABLE_ID: [u8; 8] = *b"RINGVM  ";
const OEM_REVISION: u32 = 1;

/// The RSDP must sit on a 16-byte boundary (ACPI 6.5, 5.2.5.1). Other tables
/// need no alignment; 16 keeps them on the boundaries firmware uses.
const TABLE_ALIGN: u64 = 16;
/// The FACS must be 64-byte aligned (ACPI 6.5, 5.2.10).
const FACS_ALIGN: u64 = 64;
/// Where an OS without a pointer from its boot protocol scans for the RSDP
/// (the BIOS read-only area, ACPI 6.5, 5.2.5.1).
const RSDP_SCAN_START: u64 = 0xe0000;
const RSDP_SCAN_END: u64 = 0x100000;

/// Header revisions. DSDT revision 2 gives the AML 64-bit integers; MADT
/// revision 5 is the one of ACPI 6.3 and later (same structures we use).
const DSDT_REVISION: u8 = 2;
const MADT_REVISION: u8 = 5;

/// Length of the MADT before its interrupt controller structures: the SDT
/// header (36), Local Interrupt Controller Address (4) and Flags (4).
const MADT_HEADER_LEN: u32 = 44;
const MADT_LOCAL_APIC_ADDRESS_OFFSET: usize = 36;
const MADT_FLAGS_OFFSET: usize = 40;
/// MADT flag: the machine also has dual 8259 PICs (KVM's irqchip does).
const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// MADT structure types acpi_tables 0.2 does not provide (ACPI 6.5, table 5.21).
const MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
const MADT_INTERRUPT_SOURCE_OVERRIDE_LEN: u8 = 10;
const MADT_LOCAL_APIC_NMI_LEN: u8 = 6;
/// Interrupt Source Override bus: ISA is the only one defined.
const MADT_BUS_ISA: u8 = 0;
/// MPS INTI flags (ACPI 6.5, table 5.26): polarity in bits 0-1, trigger
/// mode in bits 2-3; 0 in a field means "conforms to the bus".
const MPS_INTI_POLARITY_ACTIVE_HIGH: u16 = 0b01;
const MPS_INTI_TRIGGER_EDGE: u16 = 0b01 << 2;
const MPS_INTI_TRIGGER_LEVEL: u16 = 0b11 << 2;
/// Processor UID meaning "all processors" in a Local APIC NMI structure.
const MADT_ALL_PROCESSORS_UID: u8 = 0xff;
/// Local APIC input the NMI is wired to on PCs.
const LAPIC_LINT1: u8 = 1;
/// IOAPIC id: KVM's in-kernel IOAPIC resets its id register to 0, and Cloud
/// Hypervisor and Firecracker announce 0 too (Linux accepts the overlap with
/// APIC id 0 of the BSP).
const IOAPIC_ID: u8 = 0;
/// First GSI of the (only) IOAPIC.
const IOAPIC_GSI_BASE: u32 = 0;
/// ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2 on PCs, KVM's irqchip included.
const PIT_ISA_IRQ: u8 = 0;
const PIT_GSI: u32 = 2;

/// IA-PC boot architecture flags of the FADT (ACPI 6.5, table 5.11).
const IAPC_BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// P_LVL2_LAT above 100 and P_LVL3_LAT above 1000 mean "C2/C3 not supported".
const P_LVL2_LAT_NOT_SUPPORTED: u16 = 0x0fff;
const P_LVL3_LAT_NOT_SUPPORTED: u16 = 0x0fff;
/// RESET_VALUE: the i8042 "pulse output line 0" command, which ringvm's i8042
/// turns into a VM reset when written to its command port.
const I8042_RESET_VALUE: u8 = 0xfe;

/// ISA IRQ of the i8042 keyboard port (fixed by the PC/AT architecture).
const I8042_KBD_IRQ: u32 = 1;
/// Number of 8250 UART registers (COM1 decodes 8 ports).
const SERIAL_COM1_LEN: u8 = 8;
/// PCI configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at
/// 0xCFC, 8 ports consumed by the host bridge itself.
const PCI_CONFIG_IO_START: u16 = 0xcf8;
const PCI_CONFIG_IO_LEN: u8 = 8;
/// I/O windows the root bridge forwards: everything but 0xCF8..0xCFF, rounded
/// to the 0xD00 boundary as PC firmware does.
const PCI_IO_WINDOW_LOW_END: u16 = PCI_CONFIG_IO_START - 1;
const PCI_IO_WINDOW_HIGH_START: u16 = 0x0d00;

// The 32-bit fields below hold these addresses, and the RSDP must be where
// the legacy scan looks.
const _: () = assert!(layout::ACPI_END.0 <= 1 << 32);
const _: () = assert!(layout::ACPI_START.0 >= RSDP_SCAN_START);
const _: () = assert!(layout::ACPI_START.0 % TABLE_ALIGN == 0);
const _: () = assert!(layout::ACPI_START.0 + 36 <= RSDP_SCAN_END);
const _: () = assert!(layout::APIC_START.0 <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START.0 <= u32::MAX as u64);
const _: () = assert!(layout::MMIO_HOLE_START.0 < layout::IOAPIC_START.0);
const _: () = assert!(ports::ACPI_SCI_IRQ < 16);
const APIC_START_U32: u32 = layout::APIC_START.0 as u32;
const IOAPIC_START_U32: u32 = layout::IOAPIC_START.0 as u32;
const SCI_ISA_IRQ: u8 = ports::ACPI_SCI_IRQ as u8;
const SCI_GSI: u32 = ports::ACPI_SCI_IRQ as u32;
/// The PCI 32-bit memory window: the MMIO hole up to the IOAPIC.
const PCI_MMIO32_MIN: u32 = layout::MMIO_HOLE_START.0 as u32;
const PCI_MMIO32_MAX: u32 = IOAPIC_START_U32 - 1;

/// Writes RSDP, XSDT, FADT, FACS, DSDT and MADT into guest memory at
/// `layout::ACPI_START..` (RSDP first, 16-byte aligned, so a scan of
/// 0xE0000-0xFFFFF finds it), and returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    create_acpi_tables_in(mem, cfg, layout::ACPI_START, layout::ACPI_END)
}

/// `create_acpi_tables` over `[start, end)`, so tests can shrink the area.
fn create_acpi_tables_in(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
    start: GuestAddress,
    end: GuestAddress,
) -> Result<GuestAddress, AcpiError> {
    if cfg.num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let mut area = TableArea {
        mem,
        start,
        next: start,
        end,
    };

    // Tables are placed so that each one's address is known before the table
    // that points at it is built; only the RSDP, which must come first, is
    // reserved before its content is known.
    let rsdp_addr = area.reserve("RSDP", Rsdp::len(), TABLE_ALIGN)?;
    let facs_addr = area.add("FACS", &FACS::new(), FACS_ALIGN)?;
    let dsdt_addr = area.add("DSDT", &dsdt(cfg), TABLE_ALIGN)?;
    let madt_addr = area.add("MADT", &madt(cfg.num_cpus), TABLE_ALIGN)?;
    let fadt_addr = area.add("FADT", &fadt(dsdt_addr, facs_addr), TABLE_ALIGN)?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr.raw_value());
    xsdt.add_entry(madt_addr.raw_value());
    let xsdt_addr = area.add("XSDT", &xsdt, TABLE_ALIGN)?;

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr.raw_value()));
    area.write("RSDP", rsdp_addr, &rsdp)?;

    tracing::debug!(
        rsdp = format_args!("{:#x}", rsdp_addr.raw_value()),
        xsdt = format_args!("{:#x}", xsdt_addr.raw_value()),
        fadt = format_args!("{:#x}", fadt_addr.raw_value()),
        dsdt = format_args!("{:#x}", dsdt_addr.raw_value()),
        madt = format_args!("{:#x}", madt_addr.raw_value()),
        used_bytes = area.next.unchecked_offset_from(start),
        num_cpus = cfg.num_cpus,
        pci = cfg.pci,
        "ACPI tables written"
    );
    Ok(rsdp_addr)
}

/// Bump allocator over the ACPI area that writes tables as it places them.
struct TableArea<'a> {
    mem: &'a GuestMemoryMmap,
    start: GuestAddress,
    next: GuestAddress,
    end: GuestAddress,
}

impl TableArea<'_> {
    /// Places `len_bytes` at the next `align` boundary.
    fn reserve(
        &mut self,
        table: &'static str,
        len_bytes: usize,
        align: u64,
    ) -> Result<GuestAddress, AcpiError> {
        let addr = self.next.checked_align_up(align);
        let table_end = addr.and_then(|addr| addr.checked_add(len_bytes as u64));
        match (addr, table_end) {
            (Some(addr), Some(table_end)) if table_end <= self.end => {
                self.next = table_end;
                Ok(addr)
            }
            _ => Err(AcpiError::TableAreaFull {
                table,
                len_bytes,
                start: self.start,
                end: self.end,
            }),
        }
    }

    fn write(
        &self,
        table: &'static str,
        addr: GuestAddress,
        bytes: &[u8],
    ) -> Result<(), AcpiError> {
        self.mem
            .write_slice(bytes, addr)
            .map_err(|source| AcpiError::WriteTable {
                table,
                addr,
                len_bytes: bytes.len(),
                source,
            })
    }

    /// Places `aml` at the next `align` boundary and writes it there.
    fn add(
        &mut self,
        table: &'static str,
        aml: &dyn Aml,
        align: u64,
    ) -> Result<GuestAddress, AcpiError> {
        let bytes = to_bytes(aml);
        let addr = self.reserve(table, bytes.len(), align)?;
        self.write(table, addr, &bytes)?;
        Ok(addr)
    }
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn fadt(dsdt_addr: GuestAddress, facs_addr: GuestAddress) -> impl Aml {
    // The ACPI area is below 4 GiB (asserted above), so the 32-bit fields hold
    // these addresses.
    let dsdt_u32 = u32::try_from(dsdt_addr.raw_value()).expect("the ACPI area is below 4 GiB");
    let facs_u32 = u32::try_from(facs_addr.raw_value()).expect("the ACPI area is below 4 GiB");

    // firmware_ctrl_32 leaves X_FIRMWARE_CTRL zero, as the spec requires when
    // FIRMWARE_CTRL is set. SMI_CMD, ACPI_ENABLE and ACPI_DISABLE stay 0: there
    // is no SMM, the machine is always in ACPI mode.
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_32(facs_u32)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    // dsdt_32()/dsdt_64() each clear the other field; the spec allows both
    // (X_DSDT wins) and ACPICA only warns when they differ, so set both.
    fadt.dsdt = dsdt_u32.into();
    fadt.x_dsdt = dsdt_addr.raw_value().into();

    fadt.sci_int = ports::ACPI_SCI_IRQ.into();
    fadt.pm1a_evt_blk = u32::from(ports::ACPI_PM1A_EVT).into();
    fadt.pm1a_cnt_blk = u32::from(ports::ACPI_PM1A_CNT).into();
    fadt.pm1_evt_len = ports::ACPI_PM1A_EVT_LEN;
    fadt.pm1_cnt_len = ports::ACPI_PM1A_CNT_LEN;
    // PM1 status/enable and control are 16-bit registers: word access.
    fadt.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        ports::ACPI_PM1A_EVT_LEN * 8,
        0,
        AccessSize::WordAccess,
        u64::from(ports::ACPI_PM1A_EVT),
    );
    fadt.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        ports::ACPI_PM1A_CNT_LEN * 8,
        0,
        AccessSize::WordAccess,
        u64::from(ports::ACPI_PM1A_CNT),
    );
    fadt.p_lvl2_lat = P_LVL2_LAT_NOT_SUPPORTED.into();
    fadt.p_lvl3_lat = P_LVL3_LAT_NOT_SUPPORTED.into();
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_8042).into();
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ports::I8042_COMMAND),
    );
    fadt.reset_value = I8042_RESET_VALUE;
    fadt.finalize()
}

fn madt(num_cpus: u8) -> Sdt {
    // acpi_tables' MADT builder has no way to set the flags (PCAT_COMPAT) and
    // only takes zerocopy structures, so the table is built as a plain SDT from
    // the crate's LAPIC/IOAPIC structures and local encoders for the rest.
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(MADT_LOCAL_APIC_ADDRESS_OFFSET, APIC_START_U32);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);

    let mut entries = Vec::new();
    for id in 0..num_cpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(IOAPIC_ID, IOAPIC_START_U32, IOAPIC_GSI_BASE).to_aml_bytes(&mut entries);
    entries.extend_from_slice(&interrupt_source_override(
        PIT_ISA_IRQ,
        PIT_GSI,
        MPS_INTI_TRIGGER_EDGE,
    ));
    // Level, active high, as QEMU announces its SCI.
    entries.extend_from_slice(&interrupt_source_override(
        SCI_ISA_IRQ,
        SCI_GSI,
        MPS_INTI_POLARITY_ACTIVE_HIGH | MPS_INTI_TRIGGER_LEVEL,
    ));
    entries.extend_from_slice(&local_apic_nmi(MADT_ALL_PROCESSORS_UID, 0, LAPIC_LINT1));
    madt.append_slice(&entries);
    madt
}

/// MADT Interrupt Source Override structure (ACPI 6.5, 5.2.12.5).
fn interrupt_source_override(isa_irq: u8, gsi: u32, inti_flags: u16) -> [u8; 10] {
    let mut entry = [0u8; MADT_INTERRUPT_SOURCE_OVERRIDE_LEN as usize];
    entry[0] = MADT_TYPE_INTERRUPT_SOURCE_OVERRIDE;
    entry[1] = MADT_INTERRUPT_SOURCE_OVERRIDE_LEN;
    entry[2] = MADT_BUS_ISA;
    entry[3] = isa_irq;
    entry[4..8].copy_from_slice(&gsi.to_le_bytes());
    entry[8..10].copy_from_slice(&inti_flags.to_le_bytes());
    entry
}

/// MADT Local APIC NMI structure (ACPI 6.5, 5.2.12.7).
fn local_apic_nmi(processor_uid: u8, inti_flags: u16, lint: u8) -> [u8; 6] {
    let mut entry = [0u8; MADT_LOCAL_APIC_NMI_LEN as usize];
    entry[0] = MADT_TYPE_LOCAL_APIC_NMI;
    entry[1] = MADT_LOCAL_APIC_NMI_LEN;
    entry[2] = processor_uid;
    entry[3..5].copy_from_slice(&inti_flags.to_le_bytes());
    entry[5] = lint;
    entry
}

fn dsdt(cfg: &AcpiConfig) -> Sdt {
    let mut body = Vec::new();
    // Package {SLP_TYPa, SLP_TYPb, reserved, reserved}.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);

    let mut sb = Vec::new();
    com1(&mut sb);
    i8042(&mut sb);
    pvpanic(&mut sb);
    if cfg.pci {
        pci_root_bridge(&mut sb);
    }
    body.extend_from_slice(&aml::Scope::raw("\\_SB_".into(), sb));

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt
}

/// `Device (COM1)`: the 8250 UART at `ports::SERIAL_COM1`.
fn com1(sink: &mut dyn AmlSink) {
    const IRQ: IrqNoFlags = IrqNoFlags::new(ports::SERIAL_COM1_IRQ);
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(ports::SERIAL_COM1, ports::SERIAL_COM1, 1, SERIAL_COM1_LEN),
                    &IRQ,
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// `Device (KBD_)`: the i8042 keyboard controller (data and command ports).
fn i8042(sink: &mut dyn AmlSink) {
    const IRQ: IrqNoFlags = IrqNoFlags::new(I8042_KBD_IRQ);
    aml::Device::new(
        "KBD_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(ports::I8042_DATA, ports::I8042_DATA, 1, 1),
                    &aml::IO::new(ports::I8042_COMMAND, ports::I8042_COMMAND, 1, 1),
                    &IRQ,
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// `Device (PEVT)`: the pvpanic device (QEMU's ACPI id), one I/O port.
fn pvpanic(sink: &mut dyn AmlSink) {
    aml::Device::new(
        "PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_STA".into(), &0x0fu8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    ports::PVPANIC,
                    ports::PVPANIC,
                    1,
                    1,
                )]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// `Device (PCI0)`: the PCI root bridge, segment 0, bus 0 only, configured
/// through mechanism #1 at 0xCF8, forwarding all I/O ports but its own and the
/// 32-bit MMIO hole below the IOAPIC. Emitted when `AcpiConfig::pci` is set.
///
/// Not described yet (add them with the host bridge if needed): `_PRT` for
/// INTx routing (devices are expected to use MSI-X), `_OSC`, and a 64-bit
/// memory window.
fn pci_root_bridge(sink: &mut dyn AmlSink) {
    aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &AmlAddressSpace::<u16>::new_bus_number(0, 0),
                    &aml::IO::new(
                        PCI_CONFIG_IO_START,
                        PCI_CONFIG_IO_START,
                        1,
                        PCI_CONFIG_IO_LEN,
                    ),
                    &AmlAddressSpace::<u16>::new_io(0, PCI_IO_WINDOW_LOW_END, None),
                    &AmlAddressSpace::<u16>::new_io(PCI_IO_WINDOW_HIGH_START, u16::MAX, None),
                    &AmlAddressSpace::<u32>::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        PCI_MMIO32_MIN,
                        PCI_MMIO32_MAX,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(sink);
}

/// `IRQNoFlags () {n}`: the short IRQ descriptor (ACPI 6.5, 6.4.2.1), ISA
/// semantics (edge, active high, exclusive). acpi_tables 0.2 only has the
/// Extended Interrupt descriptor.
struct IrqNoFlags {
    mask: u16,
}

impl IrqNoFlags {
    /// Small resource item 0x04 (IRQ) with 2 bytes of data: no flags byte.
    const TAG: u8 = (0x04 << 3) | 2;

    /// Panics (at compile time when used in a const) if `irq` is not an ISA IRQ.
    const fn new(irq: u32) -> Self {
        assert!(irq < 16, "IRQNoFlags describes ISA IRQs 0-15 only");
        Self { mask: 1 << irq }
    }
}

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(Self::TAG);
        sink.word(self.mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest RAM covering the ACPI area.
    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn cfg(num_cpus: u8, pci: bool) -> AcpiConfig {
        AcpiConfig { num_cpus, pci }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// A whole SDT (length from its header), after checking it lies in the
    /// ACPI area and its checksum is right.
    fn read_sdt(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len = u32_at(&read(mem, addr, 36), 4) as usize;
        assert!(addr >= layout::ACPI_START.0, "table at {addr:#x}");
        assert!(
            addr + len as u64 <= layout::ACPI_END.0,
            "table at {addr:#x}"
        );
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "checksum of {:?}", &table[..4]);
        table
    }

    /// What an OS without a boot-protocol pointer does: scan the BIOS area.
    fn scan_for_rsdp(mem: &GuestMemoryMmap) -> Option<u64> {
        (RSDP_SCAN_START..RSDP_SCAN_END)
            .step_by(16)
            .find(|&addr| read(mem, addr, 8) == b"RSD PTR ")
    }

    /// The tables the XSDT points at, by signature.
    fn xsdt_tables(mem: &GuestMemoryMmap, rsdp: GuestAddress) -> Vec<([u8; 4], u64, Vec<u8>)> {
        let rsdp = read(mem, rsdp.0, 36);
        let xsdt = read_sdt(mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        xsdt[36..]
            .chunks(8)
            .map(|entry| {
                let addr = u64_at(entry, 0);
                let table = read_sdt(mem, addr);
                (table[..4].try_into().unwrap(), addr, table)
            })
            .collect()
    }

    fn table(mem: &GuestMemoryMmap, rsdp: GuestAddress, sig: &[u8; 4]) -> (u64, Vec<u8>) {
        let (_, addr, table) = xsdt_tables(mem, rsdp)
            .into_iter()
            .find(|(s, _, _)| s == sig)
            .unwrap_or_else(|| panic!("no {} in the XSDT", String::from_utf8_lossy(sig)));
        (addr, table)
    }

    /// (type, bytes) of each MADT interrupt controller structure.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut off = MADT_HEADER_LEN as usize;
        while off < madt.len() {
            let len = madt[off + 1] as usize;
            assert!(len >= 2 && off + len <= madt.len(), "MADT entry at {off}");
            entries.push((madt[off], madt[off + 2..off + len].to_vec()));
            off += len;
        }
        entries
    }

    // FADT field offsets (ACPI 6.5, table 5.9).
    const FADT_FIRMWARE_CTRL: usize = 36;
    const FADT_DSDT: usize = 40;
    const FADT_SCI_INT: usize = 46;
    const FADT_SMI_CMD: usize = 48;
    const FADT_PM1A_EVT_BLK: usize = 56;
    const FADT_PM1A_CNT_BLK: usize = 64;
    const FADT_PM1_EVT_LEN: usize = 88;
    const FADT_PM1_CNT_LEN: usize = 89;
    const FADT_IAPC_BOOT_ARCH: usize = 109;
    const FADT_FLAGS: usize = 112;
    const FADT_RESET_REG: usize = 116;
    const FADT_RESET_VALUE: usize = 128;
    const FADT_X_FIRMWARE_CTRL: usize = 132;
    const FADT_X_DSDT: usize = 140;
    const FADT_X_PM1A_EVT_BLK: usize = 148;
    const FADT_X_PM1A_CNT_BLK: usize = 172;
    const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;

    #[test]
    fn rsdp_is_found_by_a_bios_area_scan_and_checksums_are_right() {
        for num_cpus in [1, 64] {
            let mem = guest_memory();
            let rsdp_addr = create_acpi_tables(&mem, &cfg(num_cpus, false)).unwrap();
            assert_eq!(scan_for_rsdp(&mem), Some(rsdp_addr.0));
            assert_eq!(rsdp_addr, layout::ACPI_START);

            let rsdp = read(&mem, rsdp_addr.0, 36);
            assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
            assert_eq!(sum(&rsdp), 0, "extended checksum");
            assert_eq!(&rsdp[9..15], b"RINGVM");
            assert_eq!(rsdp[15], 2, "revision");
            assert_eq!(u32_at(&rsdp, 20), 36, "length");
            assert_ne!(u64_at(&rsdp, 24), 0, "XSDT address");
        }
    }

    #[test]
    fn xsdt_points_at_fadt_and_madt_and_fadt_at_dsdt() {
        for num_cpus in [1, 64] {
            let mem = guest_memory();
            let rsdp = create_acpi_tables(&mem, &cfg(num_cpus, false)).unwrap();
            let sigs: Vec<[u8; 4]> = xsdt_tables(&mem, rsdp).into_iter().map(|t| t.0).collect();
            assert_eq!(sigs, [*b"FACP", *b"APIC"]);

            let (_, fadt) = table(&mem, rsdp, b"FACP");
            let dsdt_addr = u64_at(&fadt, FADT_X_DSDT);
            assert_eq!(u64::from(u32_at(&fadt, FADT_DSDT)), dsdt_addr);
            let dsdt = read_sdt(&mem, dsdt_addr);
            assert_eq!(&dsdt[..4], b"DSDT");
            assert_eq!(&dsdt[10..16], b"RINGVM");
        }
    }

    #[test]
    fn madt_lists_every_vcpu_the_ioapic_overrides_and_nmi() {
        for num_cpus in [1, 64, 255] {
            let mem = guest_memory();
            let rsdp = create_acpi_tables(&mem, &cfg(num_cpus, false)).unwrap();
            let (_, madt) = table(&mem, rsdp, b"APIC");
            assert_eq!(u32_at(&madt, 36) as u64, layout::APIC_START.0);
            assert_eq!(u32_at(&madt, 40) & MADT_PCAT_COMPAT, MADT_PCAT_COMPAT);

            let entries = madt_entries(&madt);
            // Processor Local APIC: uid, APIC id, flags (bit 0 enabled).
            let lapics: Vec<(u8, u8)> = entries
                .iter()
                .filter(|(ty, _)| *ty == 0)
                .map(|(_, e)| {
                    assert_eq!(u32_at(e, 2) & 1, 1, "LAPIC {} enabled", e[1]);
                    (e[0], e[1])
                })
                .collect();
            let expected: Vec<(u8, u8)> = (0..num_cpus).map(|i| (i, i)).collect();
            assert_eq!(lapics, expected);

            // I/O APIC: id, reserved, address, GSI base.
            let ioapics: Vec<&Vec<u8>> = entries
                .iter()
                .filter(|(ty, _)| *ty == 1)
                .map(|(_, e)| e)
                .collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!(ioapics[0][0], 0, "IOAPIC id");
            assert_eq!(u32_at(ioapics[0], 2) as u64, layout::IOAPIC_START.0);
            assert_eq!(u32_at(ioapics[0], 6), 0, "GSI base");

            // Interrupt Source Override: bus, source, GSI, flags.
            let overrides: Vec<(u8, u8, u32, u16)> = entries
                .iter()
                .filter(|(ty, _)| *ty == 2)
                .map(|(_, e)| (e[0], e[1], u32_at(e, 2), u16_at(e, 6)))
                .collect();
            assert_eq!(
                overrides,
                [
                    (0, 0, 2, 0b0100),
                    (
                        0,
                        ports::ACPI_SCI_IRQ as u8,
                        ports::ACPI_SCI_IRQ as u32,
                        0b1101
                    ),
                ]
            );

            // Local APIC NMI: uid, flags, LINT#.
            let nmis: Vec<&Vec<u8>> = entries
                .iter()
                .filter(|(ty, _)| *ty == 4)
                .map(|(_, e)| e)
                .collect();
            assert_eq!(nmis, [&vec![0xff, 0, 0, 1]]);
            assert_eq!(entries.len(), num_cpus as usize + 4);
        }
    }

    #[test]
    fn fadt_describes_pm1_registers_reset_and_facs() {
        let mem = guest_memory();
        let rsdp = create_acpi_tables(&mem, &cfg(2, false)).unwrap();
        let (_, fadt) = table(&mem, rsdp, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "FADT major revision");

        assert_eq!(u16_at(&fadt, FADT_SCI_INT), ports::ACPI_SCI_IRQ);
        assert_eq!(u32_at(&fadt, FADT_SMI_CMD), 0);
        assert_eq!(
            u32_at(&fadt, FADT_PM1A_EVT_BLK),
            ports::ACPI_PM1A_EVT as u32
        );
        assert_eq!(
            u32_at(&fadt, FADT_PM1A_CNT_BLK),
            ports::ACPI_PM1A_CNT as u32
        );
        assert_eq!(fadt[FADT_PM1_EVT_LEN], ports::ACPI_PM1A_EVT_LEN);
        assert_eq!(fadt[FADT_PM1_CNT_LEN], ports::ACPI_PM1A_CNT_LEN);

        // GAS: space id (1 = system I/O), bit width, bit offset, access size, address.
        let evt = &fadt[FADT_X_PM1A_EVT_BLK..FADT_X_PM1A_EVT_BLK + 12];
        assert_eq!(evt[..4], [1, ports::ACPI_PM1A_EVT_LEN * 8, 0, 2]);
        assert_eq!(u64_at(evt, 4), ports::ACPI_PM1A_EVT as u64);
        let cnt = &fadt[FADT_X_PM1A_CNT_BLK..FADT_X_PM1A_CNT_BLK + 12];
        assert_eq!(cnt[..4], [1, ports::ACPI_PM1A_CNT_LEN * 8, 0, 2]);
        assert_eq!(u64_at(cnt, 4), ports::ACPI_PM1A_CNT as u64);

        let reset = &fadt[FADT_RESET_REG..FADT_RESET_REG + 12];
        assert_eq!(reset[..4], [1, 8, 0, 1]);
        assert_eq!(u64_at(reset, 4), ports::I8042_COMMAND as u64);
        assert_eq!(fadt[FADT_RESET_VALUE], 0xfe);

        let flags = u32_at(&fadt, FADT_FLAGS);
        assert_eq!(flags & FADT_HW_REDUCED_ACPI, 0);
        let wbinvd_c1_slpbutton_resetreg = (1 << 0) | (1 << 2) | (1 << 5) | (1 << 10);
        assert_eq!(flags, wbinvd_c1_slpbutton_resetreg);
        assert_eq!(u16_at(&fadt, FADT_IAPC_BOOT_ARCH), 0b11);

        let facs_addr = u32_at(&fadt, FADT_FIRMWARE_CTRL) as u64;
        assert_eq!(u64_at(&fadt, FADT_X_FIRMWARE_CTRL), 0);
        assert_eq!(facs_addr % 64, 0);
        let facs = read(&mem, facs_addr, 64);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(&facs, 4), 64);
        assert!(facs_addr >= layout::ACPI_START.0 && facs_addr + 64 <= layout::ACPI_END.0);
    }

    fn dsdt_of(num_cpus: u8, pci: bool) -> Vec<u8> {
        let mem = guest_memory();
        let rsdp = create_acpi_tables(&mem, &cfg(num_cpus, pci)).unwrap();
        let (_, fadt) = table(&mem, rsdp, b"FACP");
        read_sdt(&mem, u64_at(&fadt, FADT_X_DSDT))
    }

    #[test]
    fn dsdt_declares_s5_com1_and_i8042() {
        let dsdt = dsdt_of(1, false);
        // Name (_S5_, Package (4) {5, 5, 0, 0})
        assert!(contains(
            &dsdt,
            &[b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0]
        ));
        // _HID EisaId ("PNP0501"), IO (Decode16, 0x3F8, 0x3F8, 1, 8), IRQNoFlags () {4}
        assert!(contains(&dsdt, b"COM1"));
        assert!(contains(&dsdt, b"_HID\x0c\x41\xd0\x05\x01"));
        assert!(contains(
            &dsdt,
            &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8, 0x22, 1 << 4, 0]
        ));
        // _HID EisaId ("PNP0303"), IO 0x60, IO 0x64, IRQNoFlags () {1}
        assert!(contains(&dsdt, b"_HID\x0c\x41\xd0\x03\x03"));
        assert!(contains(
            &dsdt,
            &[
                0x47,
                1,
                0x60,
                0,
                0x60,
                0,
                1,
                1,
                0x47,
                1,
                0x64,
                0,
                0x64,
                0,
                1,
                1,
                0x22,
                1 << 1,
                0
            ]
        ));
        assert!(!contains(&dsdt, b"PCI0"));
    }

    #[test]
    fn dsdt_declares_pci0_only_when_asked() {
        let dsdt = dsdt_of(1, true);
        assert!(contains(&dsdt, b"PCI0"));
        assert!(contains(&dsdt, b"_HID\x0c\x41\xd0\x0a\x08"));
        assert!(contains(&dsdt, b"_CID\x0c\x41\xd0\x0a\x03"));
        // DWordMemory window: min, max of the hole below the IOAPIC.
        let mut window = layout::MMIO_HOLE_START.0.to_le_bytes()[..4].to_vec();
        window.extend_from_slice(&(layout::IOAPIC_START.0 as u32 - 1).to_le_bytes());
        assert!(contains(&dsdt, &window));
        // Still has the rest.
        assert!(contains(&dsdt, b"_S5_"));
        assert!(contains(&dsdt, b"COM1"));
    }

    #[test]
    fn zero_cpus_is_an_error() {
        let err = create_acpi_tables(&guest_memory(), &cfg(0, false)).unwrap_err();
        assert!(matches!(err, AcpiError::NoCpus), "{err}");
    }

    #[test]
    fn tables_that_do_not_fit_are_an_error_not_a_panic() {
        let mem = guest_memory();
        let end = layout::ACPI_START.unchecked_add(0x100);
        let err =
            create_acpi_tables_in(&mem, &cfg(64, false), layout::ACPI_START, end).unwrap_err();
        assert!(matches!(err, AcpiError::TableAreaFull { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "ACPI table DSDT ({} bytes) does not fit in the ACPI area {:#x}..{:#x}",
                dsdt(&cfg(64, false)).len(),
                layout::ACPI_START.0,
                end.0
            )
        );
    }

    #[test]
    fn guest_memory_without_the_acpi_area_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let err = create_acpi_tables(&mem, &cfg(1, false)).unwrap_err();
        assert!(
            matches!(err, AcpiError::WriteTable { table: "FACS", .. }),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }
}
