//! Reads of guest-physical memory the firmware or VMM handed us (boot info,
//! memory map, command line, ACPI tables), through start.S's identity map.
//!
//! Every access is bounds-checked against what CPL3 can read: page 0 is not
//! mapped, the LAPIC page and everything above it are supervisor-only, and the
//! guest's own image is refused (a pointer into it is never firmware data, and
//! Rust owns that memory). A bad pointer gives `None`, not a page fault.

/// Start of the supervisor-only LAPIC mapping; nothing at or above it is
/// readable from CPL3.
const READABLE_END: u64 = 0xfee0_0000;

/// Whether `[addr, addr + len)` is mapped for CPL3 and outside the image.
pub fn readable(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let (image_start, image_end) = crate::start::image_range();
    end <= READABLE_END && (end <= image_start || addr >= image_end)
}

/// Reads `N` bytes at `addr`.
pub fn read<const N: usize>(addr: u64) -> Option<[u8; N]> {
    if !readable(addr, N as u64) {
        return None;
    }
    let mut bytes = [0u8; N];
    for (i, byte) in bytes.iter_mut().enumerate() {
        let ptr = core::ptr::with_exposed_provenance::<u8>((addr + i as u64) as usize);
        // SAFETY: `readable` checked that the whole range is identity-mapped
        // and readable at CPL3 and lies outside the image, so no Rust object
        // is read through this pointer; byte reads need no alignment.
        *byte = unsafe { core::ptr::read_volatile(ptr) };
    }
    Some(bytes)
}

pub fn read_u8(addr: u64) -> Option<u8> {
    read::<1>(addr).map(|b| b[0])
}

pub fn read_u32(addr: u64) -> Option<u32> {
    read(addr).map(u32::from_le_bytes)
}

pub fn read_u64(addr: u64) -> Option<u64> {
    read(addr).map(u64::from_le_bytes)
}

/// Sum of the `len` bytes at `addr`, modulo 256 (ACPI checksums).
pub fn byte_sum(addr: u64, len: u64) -> Option<u8> {
    if !readable(addr, len) {
        return None;
    }
    (addr..addr + len).try_fold(0u8, |sum, a| read_u8(a).map(|b| sum.wrapping_add(b)))
}
