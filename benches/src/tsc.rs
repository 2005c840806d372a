//! The host's TSC rate, measured against the monotonic clock.
//!
//! The test guest times its requests with rdtsc, and its TSC is the host's
//! (DESIGN.md, Environment). When the guest cannot learn the TSC rate it
//! reports cycles, and the benchmark converts them with this measurement.

use std::arch::x86_64::_rdtsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long to count TSC cycles: long enough that the few microseconds of
/// uncertainty at each end (a preemption between the two reads is caught by
/// taking the tightest of several samples) stay below 10^-4.
const MEASURE_INTERVAL: Duration = Duration::from_millis(50);
/// Clock/TSC samples taken at each end; the one whose clock reads bracket the
/// TSC read most tightly is used.
const SAMPLES_PER_END: usize = 5;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc reads a counter and has no memory effects; x86_64 Linux
    // lets user space execute it (CR4.TSD clear). Newer compilers declare the
    // intrinsic safe, hence the allow.
    #[allow(unused_unsafe)]
    unsafe {
        _rdtsc()
    }
}

/// A point in time on both clocks.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    tsc: u64,
}

/// The TSC read between two clock reads that are closest together, placed at
/// the midpoint of those reads.
fn tight_sample() -> Sample {
    (0..SAMPLES_PER_END)
        .map(|_| {
            let before = Instant::now();
            let tsc = rdtsc();
            let after = Instant::now();
            (after - before, before + (after - before) / 2, tsc)
        })
        .min_by_key(|&(width, _, _)| width)
        .map(|(_, at, tsc)| Sample { at, tsc })
        .expect("SAMPLES_PER_END is not zero")
}

/// A TSC rate and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TscRate {
    pub khz: u64,
    /// The guest's `tsc_source` ("cpuid", "pmtimer", ...) or "host-measured".
    pub source: String,
}

/// Measures the host's TSC rate over [`MEASURE_INTERVAL`].
pub fn measure_host() -> TscRate {
    let start = tight_sample();
    thread::sleep(MEASURE_INTERVAL);
    let end = tight_sample();
    let nanos = (end.at - start.at).as_nanos().max(1);
    let cycles = u128::from(end.tsc.wrapping_sub(start.tsc));
    TscRate {
        khz: u64::try_from(cycles * 1_000_000 / nanos).unwrap_or(u64::MAX),
        source: HOST_MEASURED.to_string(),
    }
}

/// [`TscRate::source`] of [`measure_host`].
pub const HOST_MEASURED: &str = "host-measured";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rate_is_a_plausible_cpu_clock_and_repeatable() {
        let first = measure_host();
        let second = measure_host();
        assert_eq!(first.source, "host-measured");
        assert!(
            (100_000..20_000_000).contains(&first.khz),
            "{} kHz",
            first.khz
        );
        // Two measurements agree to 1%, even on a loaded machine.
        let diff = first.khz.abs_diff(second.khz);
        assert!(diff * 100 < first.khz, "{first:?} vs {second:?}");
    }
}
