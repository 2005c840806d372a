//! The CPL0 stub (start.S: PVH entry, long mode, GDT/TSS/IDT, LAPIC, then
//! `iretq` to [`crate::guest_main`] at CPL3) and the state it shares with the
//! Rust side.

use core::sync::atomic::{AtomicU64, Ordering};

core::arch::global_asm!(include_str!("start.S"), options(att_syntax));

/// Interrupts taken, per vector. Incremented by `irq_common` in start.S (at
/// CPL0, interrupts disabled, one CPU), read here with atomic loads.
#[no_mangle]
static IRQ_COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// How many interrupts with `vector` the guest has taken (and acknowledged
/// with a LAPIC EOI) so far. Vector 255 (spurious) is never counted.
pub fn interrupt_count(vector: u8) -> u64 {
    IRQ_COUNTS[usize::from(vector)].load(Ordering::Relaxed)
}

/// The local APIC ID of the CPU the guest runs on (the destination of its
/// MSIs), as start.S read it from the LAPIC.
pub fn lapic_id() -> u8 {
    // SAFETY: start.S writes boot_lapic_id once at CPL0, before any Rust code
    // runs, and nothing writes it afterwards; a u32 read of it is in bounds.
    unsafe { (&raw const boot_lapic_id).read_volatile() as u8 }
}

/// The TSC rate in kHz from CPUID 0x40000010 as start.S read it at CPL0,
/// if the hypervisor has that leaf.
pub fn hypervisor_tsc_khz() -> Option<u64> {
    // SAFETY: start.S writes boot_tsc_khz at most once at CPL0, before any
    // Rust code runs, and nothing writes it afterwards.
    let khz = unsafe { (&raw const boot_tsc_khz).read_volatile() };
    (khz != 0).then_some(u64::from(khz))
}

extern "C" {
    /// Written by start.S from the LAPIC ID register (bits 31:24 moved down).
    static boot_lapic_id: u32;
    /// Written by start.S from CPUID 0x40000010 EAX (0 when absent).
    static boot_tsc_khz: u32;
    /// First byte of the loaded image (link.ld).
    static __image_start: u8;
    /// First byte after the image, .bss included (link.ld).
    static __image_end: u8;
}

/// Guest-physical range `[start, end)` the guest image occupies (code, data,
/// stacks, the stack guard page); identity-mapped, so addresses are physical.
pub fn image_range() -> (u64, u64) {
    let start = (&raw const __image_start).addr() as u64;
    let end = (&raw const __image_end).addr() as u64;
    (start, end)
}
