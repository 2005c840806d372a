//! What the device did, as relaxed atomics: one [`PairCounters`] per RX/TX
//! queue pair (written by that pair's worker thread only), summed into a
//! [`CountersSnapshot`] when read: at exit, on SIGUSR1, and by tests.
//!
//! The snapshot prints as `name=value` pairs (`ringvm-backend`'s
//! [`CountersSnapshot`]); README.md lists the names.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use ringvm_backend::counters::{add, inc, CountersSnapshot};
use ringvm_backend::counters::{DaemonCounters, FrontendCounters};

use crate::tx::BadFrame;

/// The counters of one queue pair.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct PairCounters {
    /// Frames and bytes (virtio-net header included) written to the tap.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames and bytes (header included) read from the tap into the guest.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// TX kicks, RX kicks, and tap-readable wakeups.
    pub tx_kicks: AtomicU64,
    pub rx_kicks: AtomicU64,
    pub tap_wakeups: AtomicU64,
    /// Times the guest had no receive buffers and the tap was left unread.
    pub rx_no_buffers: AtomicU64,
    /// Frames longer than the receive buffers offered for them.
    pub rx_truncated: AtomicU64,
    /// Receive chains returned unused: a device-readable buffer or one
    /// outside guest memory.
    pub rx_bad_chains: AtomicU64,
    /// readv/writev on the tap failed (the frame is dropped).
    pub rx_errors: AtomicU64,
    pub tx_errors: AtomicU64,
    /// Dropped TX frames, by kind (indexed like `BadFrame::ALL`).
    pub tx_bad: [AtomicU64; BadFrame::ALL.len()],
    /// Call eventfd signals, and batches whose signal EVENT_IDX suppressed.
    pub notifications: AtomicU64,
    pub notifications_suppressed: AtomicU64,
    /// The pair's tap queue attached (the frontend enabled the pair) and
    /// detached (disabled, stopped, or the frontend gone).
    pub tap_attaches: AtomicU64,
    pub tap_detaches: AtomicU64,
}

/// The counters of all pairs, plus the daemon's own.
#[derive(Debug, Default)]
pub struct Counters {
    pub pairs: Vec<Arc<PairCounters>>,
    /// Frontends served, and frontends refused while one was connected.
    pub daemon: FrontendCounters,
}

impl Counters {
    pub fn new(num_pairs: usize) -> Self {
        Counters {
            pairs: (0..num_pairs).map(|_| Arc::default()).collect(),
            ..Counters::default()
        }
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        let mut values = Vec::with_capacity(32);
        let sum = |field: &dyn Fn(&PairCounters) -> &AtomicU64| -> u64 {
            self.pairs
                .iter()
                .map(|p| field(p).load(Ordering::Relaxed))
                .sum()
        };
        let mut push = |name: &'static str, value: u64| values.push((name, value));
        push("tx_frames", sum(&|p| &p.tx_frames));
        push("tx_bytes", sum(&|p| &p.tx_bytes));
        push("rx_frames", sum(&|p| &p.rx_frames));
        push("rx_bytes", sum(&|p| &p.rx_bytes));
        for kind in BadFrame::ALL {
            push(kind.name(), sum(&|p| &p.tx_bad[kind.index()]));
        }
        push("tx_errors", sum(&|p| &p.tx_errors));
        push("rx_errors", sum(&|p| &p.rx_errors));
        push("rx_truncated", sum(&|p| &p.rx_truncated));
        push("rx_bad_chains", sum(&|p| &p.rx_bad_chains));
        push("rx_no_buffers", sum(&|p| &p.rx_no_buffers));
        push("tx_kicks", sum(&|p| &p.tx_kicks));
        push("rx_kicks", sum(&|p| &p.rx_kicks));
        push("tap_wakeups", sum(&|p| &p.tap_wakeups));
        push("notifications", sum(&|p| &p.notifications));
        push(
            "notifications_suppressed",
            sum(&|p| &p.notifications_suppressed),
        );
        push("tap_attaches", sum(&|p| &p.tap_attaches));
        push("tap_detaches", sum(&|p| &p.tap_detaches));
        for (name, value) in self.daemon.values() {
            push(name, value);
        }
        CountersSnapshot::new(values)
    }
}

impl DaemonCounters for Counters {
    fn frontend_counters(&self) -> &FrontendCounters {
        &self.daemon
    }

    fn snapshot(&self) -> CountersSnapshot {
        Counters::snapshot(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_the_pairs_and_prints_pairs() {
        let counters = Counters::new(2);
        inc(&counters.pairs[0].tx_frames);
        add(&counters.pairs[1].tx_frames, 2);
        inc(&counters.pairs[1].tx_bad[BadFrame::TooLong.index()]);
        let snapshot = counters.snapshot();
        assert_eq!(snapshot.get("tx_frames"), Some(3));
        assert_eq!(snapshot.get("tx_bad_too_long"), Some(1));
        assert_eq!(snapshot.get("tx_bad_short"), Some(0));
        assert_eq!(snapshot.get("nonsense"), None);
        let text = snapshot.to_string();
        assert!(text.starts_with("tx_frames=3 tx_bytes=0 "), "{text}");
        assert!(text.ends_with(" frontends_refused=0"), "{text}");
    }
}
