//! PVH boot: the `hvm_start_info` block (command line, memory map, modules,
//! RSDP) that an ELF kernel with a XEN_ELFNOTE_PHYS32_ENTRY note finds in EBX.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::layout::{PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START};
use super::{BootError, LoadedInitramfs, MemoryMapEntry};
use crate::memory::GuestRam;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Version 1 of the start info carries the memory map.
const HVM_START_INFO_VERSION: u32 = 1;

/// Writes the start info and everything it points to; returns its address
/// (the value for EBX).
pub fn write_start_info(
    ram: &GuestRam,
    cmdline: GuestAddress,
    memory_map: &[MemoryMapEntry],
    initramfs: Option<LoadedInitramfs>,
    rsdp: GuestAddress,
) -> Result<GuestAddress, BootError> {
    if memory_map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::MemoryMapTooLarge(memory_map.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = memory_map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initramfs
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr.0,
            size: i.size_bytes,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: HVM_START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START.0
        },
        cmdline_paddr: cmdline.0,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START.0,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut params = BootParams::new(&info, PVH_INFO_START);
    params.set_sections(&memmap, PVH_MEMMAP_START);
    if !modules.is_empty() {
        params.set_modules(&modules, PVH_MODLIST_START);
    }
    PvhBootConfigurator::write_bootparams(&params, ram.memory())
        .map_err(BootError::Configurator)?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::memory_map;
    use vm_memory::Bytes;

    #[test]
    fn start_info_points_at_its_parts() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let map = memory_map(&ram);
        let initramfs = LoadedInitramfs {
            addr: GuestAddress(0x200_0000),
            size_bytes: 1234,
        };
        let at = write_start_info(
            &ram,
            GuestAddress(0x20000),
            &map,
            Some(initramfs),
            GuestAddress(0xe0000),
        )
        .unwrap();
        let info: hvm_start_info = ram.memory().read_obj(at).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = ram
            .memory()
            .read_obj(GuestAddress(info.modlist_paddr))
            .unwrap();
        assert_eq!((m.paddr, m.size), (0x200_0000, 1234));
        let last: hvm_memmap_table_entry = ram
            .memory()
            .read_obj(GuestAddress(
                info.memmap_paddr + 24 * (map.len() as u64 - 1),
            ))
            .unwrap();
        assert_eq!(last.addr + last.size, 64 << 20);
    }
}
