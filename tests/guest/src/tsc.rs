//! Time: the TSC (rdtsc works at CPL3 and the guest's TSC is the host's) and
//! its frequency.
//!
//! The frequency comes, in this order, from the hypervisor timing leaf
//! (CPUID 0x40000010 EAX, in kHz: ringvm fills it in; QEMU/KVM does with an
//! invariant TSC of known rate), from CPUID 0x15 (TSC/crystal ratio, on some
//! Intel hosts), or from timing the TSC against the ACPI PM timer (FADT) for
//! [`CALIBRATION_PM_TICKS`]. Without any of them the rate is unknown and the
//! jobs report cycles.

use core::arch::x86_64::{__cpuid, CpuidResult};

use crate::acpi;
use crate::port::inl;

/// CPUID leaf 1 ECX bit 31: running under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Hypervisor leaves: 0x40000000 EAX = highest hypervisor leaf.
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
/// Hypervisor timing leaf (VMware's convention, used by KVM/QEMU): EAX = TSC kHz.
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
/// Time stamp counter and core crystal clock leaf.
const LEAF_TSC_CRYSTAL: u32 = 0x15;
/// The ACPI PM timer's rate, in Hz.
const PM_TIMER_HZ: u64 = 3_579_545;
/// PM timer ticks to calibrate over: 50 ms. Each PM timer read is an exit to
/// the VMM (~16 µs on PVM), so the error is a few parts in 10^4.
const CALIBRATION_PM_TICKS: u64 = PM_TIMER_HZ / 20;
/// TSC cycles after which a PM timer that has not counted enough is taken
/// for broken: 2^34, several seconds at any plausible TSC rate.
const CALIBRATION_GIVE_UP_CYCLES: u64 = 1 << 34;

/// The TSC now.
pub fn now() -> u64 {
    // SAFETY: rdtsc reads a counter; it has no memory effects (and CR4.TSD is
    // clear, so it works at CPL3).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A TSC frequency and where it came from.
#[derive(Clone, Copy)]
pub struct TscRate {
    pub khz: u64,
    /// "cpuid", "cpuid15" or "pmtimer".
    pub source: &'static str,
}

impl TscRate {
    /// `cycles` in nanoseconds.
    pub fn ns(&self, cycles: u64) -> u64 {
        (u128::from(cycles) * 1_000_000 / u128::from(self.khz)) as u64
    }

    /// `cycles` in milliseconds.
    pub fn ms(&self, cycles: u64) -> u64 {
        cycles / self.khz
    }

    /// How many cycles `ms` milliseconds take.
    pub fn cycles_in_ms(&self, ms: u64) -> u64 {
        ms.saturating_mul(self.khz)
    }

    /// `count` events over `cycles`, per second.
    pub fn per_sec(&self, count: u64, cycles: u64) -> u64 {
        if cycles == 0 {
            return 0;
        }
        (u128::from(count) * u128::from(self.khz) * 1000 / u128::from(cycles)) as u64
    }
}

fn cpuid(leaf: u32) -> CpuidResult {
    __cpuid(leaf)
}

/// The TSC frequency, if any source gives it (see the module doc).
/// `rsdp_hint` is hvm_start_info's rsdp_paddr, for finding the PM timer.
pub fn rate(rsdp_hint: u64) -> Option<TscRate> {
    from_hypervisor_leaf()
        .map(|khz| TscRate {
            khz,
            source: "cpuid",
        })
        .or_else(|| {
            from_crystal_leaf().map(|khz| TscRate {
                khz,
                source: "cpuid15",
            })
        })
        .or_else(|| {
            calibrate_pm_timer(rsdp_hint).map(|khz| TscRate {
                khz,
                source: "pmtimer",
            })
        })
}

fn from_hypervisor_leaf() -> Option<u64> {
    if let Some(khz) = crate::start::hypervisor_tsc_khz() {
        return Some(khz);
    }
    if cpuid(1).ecx & CPUID_1_ECX_HYPERVISOR == 0 {
        return None;
    }
    if cpuid(LEAF_HYPERVISOR_BASE).eax < LEAF_HYPERVISOR_TIMING {
        return None;
    }
    Some(u64::from(cpuid(LEAF_HYPERVISOR_TIMING).eax)).filter(|&khz| khz != 0)
}

fn from_crystal_leaf() -> Option<u64> {
    if cpuid(0).eax < LEAF_TSC_CRYSTAL {
        return None;
    }
    let leaf = cpuid(LEAF_TSC_CRYSTAL);
    let (denominator, numerator, crystal_hz) = (leaf.eax, leaf.ebx, leaf.ecx);
    if denominator == 0 || numerator == 0 || crystal_hz == 0 {
        return None;
    }
    Some(u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator) / 1000)
}

fn calibrate_pm_timer(rsdp_hint: u64) -> Option<u64> {
    let timer = acpi::pm_timer(rsdp_hint)?;
    let mask = if timer.bits == 32 {
        u64::from(u32::MAX)
    } else {
        (1 << 24) - 1
    };
    // SAFETY: the FADT names this port as the PM timer; reading it returns
    // the counter and has no other effect.
    let read = || u64::from(unsafe { inl(timer.port) }) & mask;
    let pm_start = read();
    let tsc_start = now();
    let (pm_ticks, cycles) = loop {
        let pm_ticks = read().wrapping_sub(pm_start) & mask;
        let cycles = now() - tsc_start;
        if pm_ticks >= CALIBRATION_PM_TICKS {
            break (pm_ticks, cycles);
        }
        if cycles > CALIBRATION_GIVE_UP_CYCLES {
            return None;
        }
    };
    Some((u128::from(cycles) * u128::from(PM_TIMER_HZ) / (u128::from(pm_ticks) * 1000)) as u64)
}
