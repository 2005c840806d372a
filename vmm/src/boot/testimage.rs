//! Minimal kernel images built in memory, for tests and fuzz seeds: an ELF64
//! with one loadable segment and optionally a PVH entry note, and a bzImage
//! with a boot-protocol header and a protected-mode part of a given size.

/// XEN_ELFNOTE_PHYS32_ENTRY.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// An ELF64 x86-64 executable with one PT_LOAD of 16 bytes at `load_paddr`
/// and, when `pvh_entry` is given, a PT_NOTE with the Xen PVH entry note.
pub fn elf(load_paddr: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let note_off = EHDR + PHDR * usize::from(phnum);
    let code_off = note_off + 24;
    let mut b = vec![0u8; code_off + 16];
    b[0..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little-endian
    b[6] = 1; // EV_CURRENT
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&load_paddr.to_le_bytes()); // e_entry
    b[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    b[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    b[56..58].copy_from_slice(&phnum.to_le_bytes());
    let mut phdr = |i: usize, p_type: u32, off: u64, paddr: u64, size: u64, align: u64| {
        let p = EHDR + PHDR * i;
        b[p..p + 4].copy_from_slice(&p_type.to_le_bytes());
        b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
        b[p + 16..p + 24].copy_from_slice(&paddr.to_le_bytes());
        b[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&size.to_le_bytes());
        b[p + 40..p + 48].copy_from_slice(&size.to_le_bytes());
        b[p + 48..p + 56].copy_from_slice(&align.to_le_bytes());
    };
    phdr(0, 1, code_off as u64, load_paddr, 16, 16);
    if let Some(entry) = pvh_entry {
        phdr(1, 4, note_off as u64, 0, 24, 4);
        let n = note_off;
        b[n..n + 4].copy_from_slice(&4u32.to_le_bytes()); // namesz: "Xen\0"
        b[n + 4..n + 8].copy_from_slice(&8u32.to_le_bytes()); // descsz
        b[n + 8..n + 12].copy_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        b[n + 12..n + 16].copy_from_slice(b"Xen\0");
        b[n + 16..n + 20].copy_from_slice(&entry.to_le_bytes());
    }
    b
}

/// A bzImage: 4 setup sectors plus the boot sector, boot protocol 2.15 with
/// a 64-bit entry, then `kernel_bytes` of protected-mode code (zeros).
pub fn bzimage(kernel_bytes: usize, init_size: u32) -> Vec<u8> {
    const SETUP_SECTS: u8 = 4;
    let setup_bytes = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut b = vec![0u8; setup_bytes + kernel_bytes];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    b[0x1f1] = SETUP_SECTS;
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    put32(&mut b, 0x202, 0x5372_6448); // "HdrS"
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    b[0x211] = 1; // loadflags: LOADED_HIGH
    put32(&mut b, 0x214, 0x10_0000); // code32_start
    put32(&mut b, 0x22c, 0x7fff_ffff); // initrd_addr_max
    b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put32(&mut b, 0x238, 2048); // cmdline_size
    put32(&mut b, 0x260, init_size);
    b
}
