//! The Linux x86 boot protocol for bzImage kernels: load the protected-mode
//! part, fill `boot_params` (setup header, e820, command line, initramfs,
//! RSDP) and build the identity page tables for the 64-bit entry.

use std::io::SeekFrom;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START};
use super::{BootError, EntryPoint, KernelImage, LoadedInitramfs, LoadedKernel, MemoryMapEntry};
use crate::memory::GuestRam;

/// Boot protocol 2.12 added xloadflags, which tells whether there is a 64-bit entry.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// xloadflags: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// loadflags: the protected-mode code is loaded at 1 MiB (bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// Offset of the 64-bit entry point from the load address.
const STARTUP_64_OFFSET: u64 = 0x200;
/// type_of_loader: "undefined" boot loader, as the protocol asks of loaders without an id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// 0xAA55 boot flag.
const BOOT_FLAG: u16 = 0xaa55;
/// Entries of the identity map: 4 page directories of 2 MiB pages = 4 GiB.
const IDENTITY_MAP_PDS: u64 = 4;
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_HUGE: u64 = 0x80;

/// Loads the protected-mode kernel of a bzImage at 1 MiB.
pub fn load_bzimage(
    ram: &GuestRam,
    path: &Path,
    file: &mut impl KernelImage,
) -> Result<LoadedKernel, BootError> {
    let bad = |reason: String| BootError::BadBzImage {
        path: path.to_owned(),
        reason,
    };
    let image_len = file
        .seek(SeekFrom::End(0))
        .map_err(|source| BootError::ReadKernel {
            path: path.to_owned(),
            source,
        })?;
    let r =
        BzImage::load(ram.memory(), None, file, Some(super::layout::HIMEM_START)).map_err(|e| {
            match e {
                linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
                ) => BootError::MemoryTooSmall {
                    path: path.to_owned(),
                    needed_bytes: image_len + super::layout::HIMEM_START.0,
                    available_bytes: ram.low_ram_end().0,
                },
                e => BootError::LoadKernel {
                    path: path.to_owned(),
                    source: e,
                },
            }
        })?;
    let hdr = r
        .setup_header
        .expect("BzImage::load always returns the setup header");
    if hdr.version < MIN_BOOT_PROTOCOL {
        return Err(bad(format!(
            "boot protocol {}.{} is older than 2.12",
            hdr.version >> 8,
            hdr.version & 0xff
        )));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(bad("not a bzImage (zImage loads low)".into()));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad("no 64-bit entry point (XLF_KERNEL_64 is clear)".into()));
    }
    let entry = r.kernel_load.0 + STARTUP_64_OFFSET;
    if r.kernel_end <= entry {
        return Err(bad(format!(
            "the protected-mode kernel is {} bytes, too short to hold the 64-bit entry at +{STARTUP_64_OFFSET:#x}",
            r.kernel_end - r.kernel_load.0
        )));
    }
    // The kernel decompresses in place and needs init_size bytes from its load address.
    let kernel_end = r.kernel_end.max(r.kernel_load.0 + u64::from(hdr.init_size));
    Ok(LoadedKernel {
        entry: EntryPoint::Linux64 {
            entry: GuestAddress(entry),
        },
        kernel_end: GuestAddress(kernel_end),
        setup_header: Some(hdr),
    })
}

/// The highest address (exclusive) an initramfs may end at for this kernel.
pub fn initramfs_limit(hdr: &setup_header) -> u64 {
    u64::from(hdr.initrd_addr_max) + 1
}

/// Fills and writes boot_params (the zero page); returns its address.
pub fn write_boot_params(
    ram: &GuestRam,
    mut hdr: setup_header,
    cmdline: GuestAddress,
    cmdline_len: usize,
    memory_map: &[MemoryMapEntry],
    initramfs: Option<LoadedInitramfs>,
    rsdp: GuestAddress,
) -> Result<GuestAddress, BootError> {
    let mut params = boot_params::default();
    if memory_map.len() > params.e820_table.len() {
        return Err(BootError::MemoryMapTooLarge(memory_map.len()));
    }
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.cmd_line_ptr = cmdline.0 as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initramfs {
        hdr.ramdisk_image = i.addr.0 as u32;
        hdr.ramdisk_size = i.size_bytes as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = rsdp.0;
    for (slot, e) in params.e820_table.iter_mut().zip(memory_map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = memory_map.len() as u8;
    let bp = BootParams::new(&params, ZERO_PAGE_START);
    LinuxBootConfigurator::write_bootparams(&bp, ram.memory()).map_err(BootError::Configurator)?;
    Ok(ZERO_PAGE_START)
}

/// Writes page tables identity-mapping the first 4 GiB with 2 MiB pages;
/// returns the PML4 address for CR3.
pub fn write_identity_page_tables(ram: &GuestRam) -> Result<GuestAddress, BootError> {
    let mem = ram.memory();
    let w = |v: u64, at: GuestAddress| mem.write_obj(v, at).map_err(BootError::WriteGuestMemory);
    w(PDPTE_START.0 | PTE_PRESENT_RW, PML4_START)?;
    for pd in 0..IDENTITY_MAP_PDS {
        let pd_addr = PDE_START.0 + pd * 0x1000;
        w(
            pd_addr | PTE_PRESENT_RW,
            GuestAddress(PDPTE_START.0 + pd * 8),
        )?;
        for i in 0..512u64 {
            let phys = ((pd * 512 + i) << 21) | PTE_PRESENT_RW | PTE_HUGE;
            w(phys, GuestAddress(pd_addr + i * 8))?;
        }
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::memory_map;

    #[test]
    fn identity_map_translates_4g() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let pml4 = write_identity_page_tables(&ram).unwrap();
        let walk = |va: u64| -> u64 {
            let m = ram.memory();
            let e4: u64 = m
                .read_obj(GuestAddress(pml4.0 + ((va >> 39) & 511) * 8))
                .unwrap();
            let e3: u64 = m
                .read_obj(GuestAddress((e4 & !0xfff) + ((va >> 30) & 511) * 8))
                .unwrap();
            let e2: u64 = m
                .read_obj(GuestAddress((e3 & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(e2 & PTE_HUGE, PTE_HUGE);
            (e2 & !0x1f_ffff & !PTE_HUGE & !0xfff) | (va & 0x1f_ffff)
        };
        for va in [0x1000, 0x100_0000, 0xfee0_0000, 0xffff_f000] {
            assert_eq!(walk(va), va);
        }
    }

    #[test]
    fn boot_params_carry_e820_cmdline_and_rsdp() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let map = memory_map(&ram);
        let hdr = setup_header {
            version: 0x20f,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        let init = LoadedInitramfs {
            addr: GuestAddress(0x300_0000),
            size_bytes: 99,
        };
        let at = write_boot_params(
            &ram,
            hdr,
            GuestAddress(0x20000),
            12,
            &map,
            Some(init),
            GuestAddress(0xe0000),
        )
        .unwrap();
        let p: boot_params = ram.memory().read_obj(at).unwrap();
        assert_eq!(p.e820_entries as usize, map.len());
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 99);
        assert_eq!({ p.hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
    }
}
