//! Device registers in the 32-bit MMIO hole, accessed from CPL3.
//!
//! start.S maps 0xc000_0000..0xfee0_0000 user-accessible and uncached
//! (PCD|PWT); the LAPIC page and what follows it are supervisor-only, so an
//! [`Mmio`] window must lie below them. Every access is one `mov` of the
//! register's width (each one an exit to the VMM, about 16 µs on PVM), so
//! hot paths touch registers as rarely as they can.

use core::ptr;

/// First address of the MMIO hole mapped for CPL3 (start.S, MMIO_HOLE_LARGE_PAGE).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// The LAPIC page: it and everything above it are not accessible from CPL3.
pub const MMIO_CPL3_END: u64 = 0xfee0_0000;

/// A window of device registers: `len` bytes at guest-physical `base`.
#[derive(Clone, Copy, Debug)]
pub struct Mmio {
    base: u64,
    len: u64,
}

impl Mmio {
    /// The registers at `[base, base + len)`, if that range lies in the part
    /// of the MMIO hole that CPL3 can reach.
    ///
    /// # Safety
    /// The range holds the registers of a device that the caller drives:
    /// writes through the window can make that device read or write guest
    /// memory (DMA), which must only ever be memory the caller handed to it.
    pub unsafe fn new(base: u64, len: u64) -> Option<Self> {
        let end = base.checked_add(len)?;
        (base >= MMIO_HOLE_START && end <= MMIO_CPL3_END).then_some(Mmio { base, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether `[offset, offset + bytes)` lies inside the window.
    pub fn contains(&self, offset: u64, bytes: u64) -> bool {
        offset.checked_add(bytes).is_some_and(|end| end <= self.len)
    }

    /// The sub-window at `offset`, `len` bytes long, if it fits.
    pub fn sub(&self, offset: u64, len: u64) -> Option<Mmio> {
        self.contains(offset, len).then_some(Mmio {
            base: self.base + offset,
            len,
        })
    }

    fn ptr<T>(&self, offset: u64) -> *mut T {
        let bytes = size_of::<T>() as u64;
        assert!(
            self.contains(offset, bytes) && offset.is_multiple_of(bytes),
            "register access {offset:#x}+{bytes} outside the {:#x}-byte window at {:#x}",
            self.len,
            self.base
        );
        ptr::with_exposed_provenance_mut((self.base + offset) as usize)
    }

    pub fn read8(&self, offset: u64) -> u8 {
        // SAFETY: `ptr` checked that the byte is inside the window, which
        // `new` checked is mapped for CPL3 and holds no Rust object (it is
        // MMIO); a read has no memory side effect.
        unsafe { ptr::read_volatile(self.ptr(offset)) }
    }

    pub fn read16(&self, offset: u64) -> u16 {
        // SAFETY: as in read8; `ptr` also checked the natural alignment.
        unsafe { ptr::read_volatile(self.ptr(offset)) }
    }

    pub fn read32(&self, offset: u64) -> u32 {
        // SAFETY: as in read16.
        unsafe { ptr::read_volatile(self.ptr(offset)) }
    }

    pub fn write8(&self, offset: u64, value: u8) {
        // SAFETY: inside the mapped window (checked by `ptr`); what the device
        // does with the write is the contract of `new`'s caller.
        unsafe { ptr::write_volatile(self.ptr(offset), value) }
    }

    pub fn write16(&self, offset: u64, value: u16) {
        // SAFETY: as in write8; naturally aligned (checked by `ptr`).
        unsafe { ptr::write_volatile(self.ptr(offset), value) }
    }

    pub fn write32(&self, offset: u64, value: u32) {
        // SAFETY: as in write16.
        unsafe { ptr::write_volatile(self.ptr(offset), value) }
    }

    /// A 64-bit register as two 32-bit writes, low half first (virtio 1.2
    /// 4.1.3.1: drivers may access 64-bit fields as two 32-bit ones, and
    /// QEMU only accepts that).
    pub fn write64_split(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}
