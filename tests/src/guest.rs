//! The test guest (tests/guest), built by build.rs: a PVH ELF that ringvm and
//! QEMU (`-kernel`) boot. The command line picks what it does (`job=hello
//! exit=7`); it prints `testguest: ...` lines on COM1 and ends by writing the
//! `exit=` code to the debug-exit port 0xf4.

/// The guest ELF, for a VMM that loads a kernel image from memory.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("RINGVM_TEST_GUEST_ELF"));

/// Path of the guest ELF, for `qemu-system-x86_64 -kernel` and `ringvm --kernel`.
pub const GUEST_ELF_PATH: &str = env!("RINGVM_TEST_GUEST_ELF");

#[cfg(test)]
mod tests {
    use super::GUEST_ELF;

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const EM_X86_64: u16 = 62;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    /// Where ringvm and QEMU load kernels; linux-loader refuses segments below it.
    const HIMEM_START: u64 = 0x10_0000;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    struct Phdr {
        p_type: u32,
        offset: usize,
        paddr: u64,
        filesz: u64,
        memsz: u64,
        align: u64,
    }

    fn program_headers(elf: &[u8]) -> Vec<Phdr> {
        let phoff = usize::try_from(u64_at(elf, 0x20)).unwrap();
        let phentsize = usize::from(u16_at(elf, 0x36));
        let phnum = usize::from(u16_at(elf, 0x38));
        assert_eq!(phentsize, 56, "ELF64 program header size");
        (0..phnum)
            .map(|i| {
                let ph = &elf[phoff + i * phentsize..][..phentsize];
                Phdr {
                    p_type: u32_at(ph, 0),
                    offset: usize::try_from(u64_at(ph, 8)).unwrap(),
                    paddr: u64_at(ph, 0x18),
                    filesz: u64_at(ph, 0x20),
                    memsz: u64_at(ph, 0x28),
                    align: u64_at(ph, 0x30),
                }
            })
            .collect()
    }

    /// The PVH entry point from the first `Xen` note of type 18 in a PT_NOTE.
    fn pvh_entry(elf: &[u8], notes: &Phdr) -> Option<u64> {
        let seg = &elf[notes.offset..notes.offset + usize::try_from(notes.filesz).unwrap()];
        let mut at = 0;
        while at + 12 <= seg.len() {
            let namesz = u32_at(seg, at) as usize;
            let descsz = u32_at(seg, at + 4) as usize;
            let kind = u32_at(seg, at + 8);
            let name_at = at + 12;
            let desc_at = name_at + namesz.next_multiple_of(4);
            let next = desc_at + descsz.next_multiple_of(4);
            assert!(
                next <= seg.len(),
                "note at {at} runs past its PT_NOTE segment"
            );
            if &seg[name_at..name_at + namesz] == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                return Some(match descsz {
                    4 => u64::from(u32_at(seg, desc_at)),
                    8 => u64_at(seg, desc_at),
                    _ => panic!("PVH note descriptor of {descsz} bytes"),
                });
            }
            at = next;
        }
        None
    }

    #[test]
    fn guest_is_a_pvh_elf64_x86_64() {
        let elf = GUEST_ELF;
        assert_eq!(&elf[..4], b"\x7fELF", "ELF magic");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(elf[5], 1, "little endian");
        assert_eq!(u16_at(elf, 0x12), EM_X86_64, "e_machine");

        let phdrs = program_headers(elf);
        let loads: Vec<&Phdr> = phdrs.iter().filter(|p| p.p_type == PT_LOAD).collect();
        assert!(!loads.is_empty(), "no PT_LOAD segment");
        for load in &loads {
            assert!(
                load.paddr >= HIMEM_START,
                "PT_LOAD at {:#x}, below 1 MiB",
                load.paddr
            );
            assert!(load.memsz >= load.filesz);
            assert!(
                load.offset as u64 + load.filesz <= elf.len() as u64,
                "PT_LOAD past end of file"
            );
        }

        let entries: Vec<u64> = phdrs
            .iter()
            .filter(|p| p.p_type == PT_NOTE)
            .inspect(|p| {
                assert_eq!(
                    p.align, 4,
                    "QEMU needs PT_NOTE p_align 4 to find the descriptor"
                )
            })
            .filter_map(|p| pvh_entry(elf, p))
            .collect();
        let [entry] = entries[..] else {
            panic!("expected one Xen PHYS32_ENTRY note, found entries {entries:x?}");
        };
        assert!(
            entry < 1 << 32,
            "PVH entry {entry:#x} is not a 32-bit address"
        );
        assert!(
            loads
                .iter()
                .any(|l| (l.paddr..l.paddr + l.filesz).contains(&entry)),
            "PVH entry {entry:#x} is not inside the file bytes of a PT_LOAD segment"
        );
    }
}
