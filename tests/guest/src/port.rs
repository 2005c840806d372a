//! x86 port I/O. It works at CPL3 because start.S gives the TSS an I/O
//! permission bitmap that allows every port.
//!
//! The asm blocks are not `nomem`: a port write may tell a device to read
//! memory the guest has just written (a virtio notify), so the compiler must
//! not move memory accesses across it.

use core::arch::asm;

/// Writes a byte to `port`.
///
/// # Safety
/// A device behind `port` may act on the write: read or write guest memory
/// (DMA), stop the VM, reset the machine. The caller knows what `port` is and
/// that the effect cannot break memory the program uses.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` has no effect on this program's memory or stack by itself;
    // the device's side effects are the caller's contract (see above).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) }
}

/// Writes a 16-bit word to `port`.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: as in outb: only the device's side effects matter, the caller's contract.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nostack, preserves_flags)) }
}

/// Writes a 32-bit word to `port`.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: as in outb: only the device's side effects matter, the caller's contract.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// Reads a byte from `port`.
///
/// # Safety
/// Reading a device register can have side effects too (clear an interrupt
/// status, pop a FIFO); the caller knows what `port` is.
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` writes only AL; the device's side effects are the caller's contract.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) };
    value
}

/// Reads a 16-bit word from `port`.
///
/// # Safety
/// As for [`inb`].
#[allow(dead_code, reason = "for the pci/virtio modules")]
pub unsafe fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: `in` writes only AX; the device's side effects are the caller's contract.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") value, options(nostack, preserves_flags)) };
    value
}

/// Reads a 32-bit word from `port`.
///
/// # Safety
/// As for [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` writes only EAX; the device's side effects are the caller's contract.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
    };
    value
}
