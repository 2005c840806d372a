//! The PVH `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h),
//! its memory map, and the kernel command line.

use core::fmt;

use crate::phys;

/// `hvm_start_info.magic`.
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` version 1 (the memory map fields came with it).
const START_INFO_V1_BYTES: usize = 56;
/// Size of one `hvm_memmap_table_entry`: addr u64, size u64, type u32, reserved u32.
const MEMMAP_ENTRY_BYTES: u64 = 24;
/// `hvm_memmap_table_entry.type` of usable RAM (E820 type 1).
const MEMMAP_TYPE_RAM: u32 = 1;
/// Command line bytes kept (longer ones are cut here, see [`CmdLine::truncated`]).
const CMDLINE_MAX_BYTES: usize = 4096;

/// What the guest needs from `hvm_start_info`.
pub struct StartInfo {
    pub cmdline_paddr: u64,
    /// 0 when the VMM leaves the RSDP to be found by scanning (QEMU does).
    pub rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
}

pub enum StartInfoError {
    Unreadable(u64),
    BadMagic(u32),
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartInfoError::Unreadable(paddr) => {
                write!(f, "hvm_start_info at {paddr:#x} is not readable")
            }
            StartInfoError::BadMagic(magic) => write!(f, "bad hvm_start_info magic {magic:#x}"),
        }
    }
}

impl StartInfo {
    /// Reads the structure the PVH entry found in EBX.
    pub fn read(paddr: u64) -> Result<Self, StartInfoError> {
        let raw: [u8; START_INFO_V1_BYTES] =
            phys::read(paddr).ok_or(StartInfoError::Unreadable(paddr))?;
        let u32_at =
            |off: usize| u32::from_le_bytes(raw[off..off + 4].try_into().expect("4 bytes"));
        let u64_at =
            |off: usize| u64::from_le_bytes(raw[off..off + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic != HVM_START_MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let version = u32_at(4);
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            (u64_at(40), u32_at(48))
        } else {
            (0, 0)
        };
        Ok(StartInfo {
            cmdline_paddr: u64_at(24),
            rsdp_paddr: u64_at(32),
            memmap_paddr,
            memmap_entries,
        })
    }

    /// Total bytes of the memory map's RAM entries (0 without a memory map).
    pub fn ram_bytes(&self) -> u64 {
        (0..u64::from(self.memmap_entries))
            .map_while(|i| {
                let entry = self.memmap_paddr.checked_add(i * MEMMAP_ENTRY_BYTES)?;
                let size = phys::read_u64(entry + 8)?;
                let kind = phys::read_u32(entry + 16)?;
                Some(if kind == MEMMAP_TYPE_RAM { size } else { 0 })
            })
            .fold(0, u64::saturating_add)
    }

    /// The memory map's RAM entry that contains `paddr`, as `[start, end)`.
    pub fn ram_range_containing(&self, paddr: u64) -> Option<(u64, u64)> {
        (0..u64::from(self.memmap_entries)).find_map(|i| {
            let entry = self.memmap_paddr.checked_add(i * MEMMAP_ENTRY_BYTES)?;
            let start = phys::read_u64(entry)?;
            let end = start.checked_add(phys::read_u64(entry + 8)?)?;
            let kind = phys::read_u32(entry + 16)?;
            (kind == MEMMAP_TYPE_RAM && (start..end).contains(&paddr)).then_some((start, end))
        })
    }

    /// The command line (empty if there is none or it cannot be read).
    pub fn cmdline(&self) -> CmdLine {
        let mut cmdline = CmdLine {
            bytes: [0; CMDLINE_MAX_BYTES],
            len: 0,
            truncated: false,
        };
        if self.cmdline_paddr == 0 {
            return cmdline;
        }
        for i in 0..=CMDLINE_MAX_BYTES {
            let Some(byte) = phys::read_u8(self.cmdline_paddr + i as u64) else {
                break;
            };
            if byte == 0 {
                break;
            }
            if i == CMDLINE_MAX_BYTES {
                cmdline.truncated = true;
                break;
            }
            // Keep it printable ASCII so that it is always a valid &str.
            cmdline.bytes[i] = match byte {
                b' '..=b'~' => byte,
                b'\t' | b'\n' | b'\r' => b' ',
                _ => b'?',
            };
            cmdline.len = i + 1;
        }
        cmdline
    }
}

/// The kernel command line: `key=value` words separated by spaces; words
/// without `=` are ignored.
pub struct CmdLine {
    bytes: [u8; CMDLINE_MAX_BYTES],
    len: usize,
    /// The command line was longer than the guest keeps.
    pub truncated: bool,
}

impl CmdLine {
    pub fn as_str(&self) -> &str {
        // Only printable ASCII is stored (see StartInfo::cmdline).
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }

    /// The value of the last `key=value` word with this key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.as_str()
            .split(' ')
            .rev()
            .filter_map(|word| word.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, value)| value)
    }
}
