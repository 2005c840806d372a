//! Loading a kernel, its initramfs and command line into guest RAM, and the
//! boot information each protocol hands over (PVH start info or Linux
//! boot_params).

pub mod acpi;
pub mod layout;
pub mod linux;
pub mod pvh;
pub mod testimage;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use std::path::{Path, PathBuf};
use vm_memory::ReadVolatile;

use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;
use layout::{CMDLINE_MAX_BYTES, CMDLINE_START, EBDA_START, HIMEM_START};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// "HdrS" at offset 0x202 marks a Linux image with a boot protocol header.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// Initramfs placement alignment (a page, as the boot protocol wants).
const INITRAMFS_ALIGN: u64 = 4096;

/// E820 / PVH memory map types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read kernel {path}")]
    ReadKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0} is neither an ELF with a PVH entry note nor a Linux bzImage")]
    UnknownKernelFormat(PathBuf),
    #[error("kernel {0} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); ringvm boots ELF kernels through PVH only")]
    ElfWithoutPvh(PathBuf),
    #[error("kernel {path} is a malformed ELF: {reason}")]
    BadElf { path: PathBuf, reason: String },
    #[error("kernel {path} is a Linux image ringvm cannot boot: {reason}")]
    BadBzImage { path: PathBuf, reason: String },
    #[error("kernel {path} needs guest memory up to {needed_bytes:#x}, but --memory gives RAM up to {available_bytes:#x} below the MMIO hole; raise --memory")]
    MemoryTooSmall {
        path: PathBuf,
        needed_bytes: u64,
        available_bytes: u64,
    },
    #[error("loading kernel {path} failed")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initramfs {path}")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size_bytes} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}; raise --memory")]
    InitramfsTooLarge {
        path: PathBuf,
        size_bytes: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("--cmdline is {len} bytes, longer than the {max} bytes this kernel accepts")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("--cmdline contains a NUL byte")]
    CmdlineHasNul,
    #[error("writing boot data into guest memory failed")]
    WriteGuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("writing the boot parameters failed")]
    Configurator(#[source] linux_loader::configurator::Error),
    #[error("guest memory map has {0} entries, more than the boot area holds")]
    MemoryMapTooLarge(usize),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh { entry: GuestAddress },
    /// 64-bit mode with identity page tables, RSI = boot_params.
    Linux64 { entry: GuestAddress },
}

/// The kernel format found in the file.
enum KernelKind {
    Elf,
    BzImage,
}

/// A loaded kernel.
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// End (exclusive) of the memory the kernel occupies, including what a
    /// bzImage needs to decompress itself (init_size).
    pub kernel_end: GuestAddress,
    /// The bzImage setup header, to be completed into boot_params.
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// An initramfs placed in guest RAM.
#[derive(Clone, Copy, Debug)]
pub struct LoadedInitramfs {
    pub addr: GuestAddress,
    pub size_bytes: u64,
}

/// One entry of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// A kernel image being loaded: a file, or bytes in memory (fuzzing, tests).
pub trait KernelImage: Read + ReadVolatile + Seek {}
impl<T: Read + ReadVolatile + Seek> KernelImage for T {}

fn detect(path: &Path, file: &mut impl KernelImage) -> Result<KernelKind, BootError> {
    let read_err = |source| BootError::ReadKernel {
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    let len = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if len >= 4 {
        file.read_exact(&mut magic).map_err(read_err)?;
        if &magic == ELF_MAGIC {
            return Ok(KernelKind::Elf);
        }
    }
    if len >= BZIMAGE_MAGIC_OFFSET + 4 {
        file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
            .map_err(read_err)?;
        file.read_exact(&mut magic).map_err(read_err)?;
        if &magic == BZIMAGE_MAGIC {
            return Ok(KernelKind::BzImage);
        }
    }
    Err(BootError::UnknownKernelFormat(path.to_owned()))
}

/// The guest-physical ranges (start, end exclusive) of an ELF's loadable
/// segments, read from its program headers before anything is written.
fn elf_segments(path: &Path, file: &mut impl KernelImage) -> Result<Vec<(u64, u64)>, BootError> {
    const PT_LOAD: u32 = 1;
    let bad = |reason: &str| BootError::BadElf {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let read_err = |source| BootError::ReadKernel {
        path: path.to_owned(),
        source,
    };
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    file.read_exact(&mut ehdr)
        .map_err(|_| bad("file is shorter than an ELF64 header"))?;
    if ehdr[4] != 2 {
        return Err(bad("not a 64-bit ELF"));
    }
    if ehdr[5] != 1 {
        return Err(bad("not little-endian"));
    }
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().expect("8 bytes"));
    let phentsize = u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]);
    let phnum = u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]);
    if phentsize != 56 {
        return Err(bad("program header size is not 56"));
    }
    let mut segments = Vec::new();
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        let at = phoff
            .checked_add(i * 56)
            .ok_or_else(|| bad("program header offset overflows"))?;
        file.seek(SeekFrom::Start(at)).map_err(read_err)?;
        file.read_exact(&mut ph)
            .map_err(|_| bad("program header table runs past the end of the file"))?;
        if u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes")) != PT_LOAD {
            continue;
        }
        let paddr = u64::from_le_bytes(ph[0x18..0x20].try_into().expect("8 bytes"));
        let memsz = u64::from_le_bytes(ph[0x28..0x30].try_into().expect("8 bytes"));
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad("segment end overflows"))?;
        if paddr < HIMEM_START.0 {
            return Err(bad(&format!(
                "segment at {paddr:#x} lies below 1 MiB, where ringvm keeps boot data"
            )));
        }
        segments.push((paddr, seg_end));
    }
    if segments.is_empty() {
        return Err(bad("no loadable segment"));
    }
    Ok(segments)
}

/// Loads the kernel at `path` into guest RAM.
pub fn load_kernel(ram: &GuestRam, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    load_kernel_image(ram, path, &mut file)
}

/// Loads a kernel image into guest RAM; `path` only names it in errors.
pub fn load_kernel_image(
    ram: &GuestRam,
    path: &Path,
    file: &mut impl KernelImage,
) -> Result<LoadedKernel, BootError> {
    let low_end = ram.low_ram_end().0;
    let too_small = |needed_bytes| BootError::MemoryTooSmall {
        path: path.to_owned(),
        needed_bytes,
        available_bytes: low_end,
    };
    let load_err = |source| BootError::LoadKernel {
        path: path.to_owned(),
        source,
    };
    match detect(path, file)? {
        KernelKind::Elf => {
            let segments = elf_segments(path, file)?;
            let end = segments
                .iter()
                .map(|s| s.1)
                .max()
                .expect("at least one segment");
            if end > low_end {
                return Err(too_small(end));
            }
            file.seek(SeekFrom::Start(0))
                .map_err(|source| BootError::ReadKernel {
                    path: path.to_owned(),
                    source,
                })?;
            let r =
                Elf::load(ram.memory(), None, file, Some(HIMEM_START)).map_err(|e| match e {
                    linux_loader::loader::Error::Elf(
                        linux_loader::loader::elf::Error::InvalidPvhNote,
                    ) => BootError::BadElf {
                        path: path.to_owned(),
                        reason: "invalid PVH note".into(),
                    },
                    e => load_err(e),
                })?;
            let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap else {
                return Err(BootError::ElfWithoutPvh(path.to_owned()));
            };
            if entry.0 >= u64::from(u32::MAX) {
                return Err(BootError::BadElf {
                    path: path.to_owned(),
                    reason: format!("PVH entry {:#x} is not a 32-bit address", entry.0),
                });
            }
            if !segments
                .iter()
                .any(|&(start, end)| (start..end).contains(&entry.0))
            {
                return Err(BootError::BadElf {
                    path: path.to_owned(),
                    reason: format!(
                        "PVH entry {:#x} lies outside every loadable segment",
                        entry.0
                    ),
                });
            }
            Ok(LoadedKernel {
                entry: EntryPoint::Pvh { entry },
                kernel_end: GuestAddress(end),
                setup_header: None,
            })
        }
        KernelKind::BzImage => linux::load_bzimage(ram, path, file),
    }
    .and_then(|k| {
        if k.kernel_end.0 > low_end {
            Err(too_small(k.kernel_end.0))
        } else {
            Ok(k)
        }
    })
}

/// Places the initramfs at the top of the RAM below `limit` (page aligned),
/// above the kernel.
pub fn load_initramfs(
    ram: &GuestRam,
    path: &Path,
    kernel_end: GuestAddress,
    limit: u64,
) -> Result<LoadedInitramfs, BootError> {
    let read_err = |source| BootError::ReadInitramfs {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size_bytes = file.metadata().map_err(read_err)?.len();
    let limit = limit.min(ram.low_ram_end().0);
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_owned(),
        size_bytes,
        kernel_end: kernel_end.0,
        limit,
    };
    let addr = limit
        .checked_sub(size_bytes)
        .map(|a| a & !(INITRAMFS_ALIGN - 1))
        .filter(|a| *a >= kernel_end.0)
        .ok_or_else(too_large)?;
    let len = usize::try_from(size_bytes).map_err(|_| too_large())?;
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => read_err(source),
            other => BootError::WriteGuestMemory(other),
        })?;
    Ok(LoadedInitramfs {
        addr: GuestAddress(addr),
        size_bytes,
    })
}

/// Writes the NUL-terminated command line at CMDLINE_START; `max_len` is the
/// longest the kernel accepts (NUL excluded).
pub fn write_cmdline(
    ram: &GuestRam,
    cmdline: &str,
    max_len: usize,
) -> Result<GuestAddress, BootError> {
    let max = max_len.min(CMDLINE_MAX_BYTES - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineHasNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.memory()
        .write_slice(&bytes, CMDLINE_START)
        .map_err(BootError::WriteGuestMemory)?;
    Ok(CMDLINE_START)
}

/// The guest's memory map: low RAM up to 640 KiB, the legacy area reserved
/// (it holds the ACPI tables), RAM from 1 MiB to the MMIO hole, RAM above 4 GiB.
pub fn memory_map(ram: &GuestRam) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START.0,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: EBDA_START.0,
            size: HIMEM_START.0 - EBDA_START.0,
            kind: E820_RESERVED,
        },
    ];
    for r in ram.ranges() {
        let start = r.guest_addr.0.max(HIMEM_START.0);
        let end = r.guest_addr.0 + r.len_bytes;
        if end > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn memory_map_covers_ram_and_reserves_legacy_area() {
        let ram = GuestRam::new(256 << 20).unwrap();
        let map = memory_map(&ram);
        let ram_total: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram_total, (256 << 20) - (HIMEM_START.0 - EBDA_START.0));
        assert_eq!(
            map.last().unwrap().addr + map.last().unwrap().size,
            256 << 20
        );
    }

    #[test]
    fn unknown_format_is_named() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x55; 4096]).unwrap();
        let err = load_kernel(&ram, f.path()).err().unwrap();
        assert!(matches!(err, BootError::UnknownKernelFormat(_)), "{err}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            load_kernel(&ram, empty.path()).err().unwrap(),
            BootError::UnknownKernelFormat(_)
        ));
    }

    #[test]
    fn truncated_elf_is_refused() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF\x02\x01\x01").unwrap();
        let err = load_kernel(&ram, f.path()).err().unwrap();
        assert!(matches!(err, BootError::BadElf { .. }), "{err}");
    }

    fn load_bytes(ram: &GuestRam, bytes: &[u8]) -> Result<LoadedKernel, BootError> {
        load_kernel_image(
            ram,
            Path::new("test-image"),
            &mut std::io::Cursor::new(bytes),
        )
    }

    #[test]
    fn pvh_elf_loads_with_its_entry() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let k = load_bytes(&ram, &testimage::elf(0x10_0000, Some(0x10_0008))).unwrap();
        assert_eq!(
            k.entry,
            EntryPoint::Pvh {
                entry: GuestAddress(0x10_0008)
            }
        );
        assert_eq!(k.kernel_end, GuestAddress(0x10_0010));
    }

    /// Regression (fuzz target boot_image): a PVH entry outside the loaded
    /// segments would start the guest in zeroed memory.
    #[test]
    fn pvh_entry_outside_the_segments_is_refused() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let err = load_bytes(&ram, &testimage::elf(0x10_0000, Some(0x20_0000)))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("outside every loadable segment"),
            "{err}"
        );
    }

    #[test]
    fn bzimage_loads_with_the_64bit_entry() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let k = load_bytes(&ram, &testimage::bzimage(0x1000, 0x8000)).unwrap();
        assert_eq!(
            k.entry,
            EntryPoint::Linux64 {
                entry: GuestAddress(0x10_0200)
            }
        );
        assert_eq!(
            k.kernel_end,
            GuestAddress(0x10_8000),
            "init_size is reserved"
        );
    }

    /// Regression (fuzz target boot_image): a bzImage whose protected-mode
    /// part ends before +0x200 has no 64-bit entry to jump to.
    #[test]
    fn bzimage_too_short_for_its_entry_is_refused() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let err = load_bytes(&ram, &testimage::bzimage(0x100, 0))
            .err()
            .unwrap();
        assert!(matches!(err, BootError::BadBzImage { .. }), "{err}");
        assert!(err.to_string().contains("too short"), "{err}");
    }

    #[test]
    fn bzimage_needing_more_than_ram_is_refused() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let err = load_bytes(&ram, &testimage::bzimage(0x1000, 8 << 20))
            .err()
            .unwrap();
        assert!(matches!(err, BootError::MemoryTooSmall { .. }), "{err}");
    }

    #[test]
    fn cmdline_limits() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(write_cmdline(&ram, "console=ttyS0", 100).is_ok());
        assert!(matches!(
            write_cmdline(&ram, &"x".repeat(101), 100),
            Err(BootError::CmdlineTooLong { len: 101, max: 100 })
        ));
        assert!(matches!(
            write_cmdline(&ram, "a\0b", 100),
            Err(BootError::CmdlineHasNul)
        ));
        let mut buf = [0u8; 14];
        ram.memory().read_slice(&mut buf, CMDLINE_START).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn initramfs_goes_to_the_top_and_must_fit() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0xab; 10000]).unwrap();
        let i = load_initramfs(&ram, f.path(), GuestAddress(2 << 20), u64::MAX).unwrap();
        assert_eq!(i.addr.0 % INITRAMFS_ALIGN, 0);
        assert!(i.addr.0 + 10000 <= 16 << 20);
        assert_eq!(ram.memory().read_obj::<u8>(i.addr).unwrap(), 0xab);
        let err = load_initramfs(&ram, f.path(), GuestAddress((16 << 20) - 4096), u64::MAX)
            .err()
            .unwrap();
        assert!(matches!(err, BootError::InitramfsTooLarge { .. }), "{err}");
    }
}
