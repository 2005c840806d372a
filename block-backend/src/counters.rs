//! What the device did, as relaxed atomics: one [`QueueCounters`] per
//! virtqueue (each written by its own worker thread only, so the hot path
//! never shares a cache line between queues), summed into a
//! [`CountersSnapshot`] when read: at exit, on SIGUSR1, and by tests.
//!
//! The snapshot prints as `name=value` pairs (`ringvm-backend`'s
//! [`CountersSnapshot`]); README.md lists the names.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub use ringvm_backend::counters::{add, inc, CountersSnapshot};
use ringvm_backend::counters::{DaemonCounters, FrontendCounters};

use crate::image::qcow2::ImageCounters;
use crate::request::BadRequestKind;

/// The counters of one virtqueue. They outlive connections: a backend that
/// keeps listening keeps counting.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueCounters {
    /// Wakeups to serve the available ring: kick eventfd signals, and the
    /// queue being enabled.
    pub kicks: AtomicU64,
    /// Completion eventfd wakeups.
    pub completion_events: AtomicU64,
    /// Batches handed to the engine: one io_uring_enter each.
    pub submits: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub get_ids: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Requests answered IOERR because the host I/O failed.
    pub io_errors: AtomicU64,
    /// Bad requests, by kind (indexed like `BadRequestKind::ALL`).
    pub bad: [AtomicU64; BadRequestKind::ALL.len()],
    /// Chains put in the used ring with length 0 (no status byte to write).
    pub chains_returned_unused: AtomicU64,
    /// Chains that could not even be returned: head index out of range, or
    /// already in flight.
    pub chains_dropped: AtomicU64,
    /// Call eventfd signals, and batches whose signal EVENT_IDX suppressed.
    pub notifications: AtomicU64,
    pub notifications_suppressed: AtomicU64,
    /// `--direct` requests served through the page cache (not aligned to the
    /// file's O_DIRECT alignment, or refused by O_DIRECT).
    pub direct_fallbacks: AtomicU64,
    /// WRITE_ZEROES served by punch hole + allocate because the file system
    /// has no FALLOC_FL_ZERO_RANGE.
    pub zero_range_fallbacks: AtomicU64,
}

impl QueueCounters {
    pub fn bad_request(&self, kind: BadRequestKind) {
        let index = BadRequestKind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("ALL lists every kind");
        self.bad[index].fetch_add(1, Ordering::Relaxed);
    }
}

/// The counters of all queues, plus the daemon's own.
#[derive(Debug, Default)]
pub struct Counters {
    pub queues: Vec<Arc<QueueCounters>>,
    /// Frontends served, and frontends refused while one was connected.
    pub daemon: FrontendCounters,
    /// The image format's own counters (qcow2), printed after the others.
    pub image: OnceLock<Arc<ImageCounters>>,
}

impl Counters {
    pub fn new(num_queues: usize) -> Self {
        Counters {
            queues: (0..num_queues).map(|_| Arc::default()).collect(),
            ..Counters::default()
        }
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        let mut values = Vec::with_capacity(32);
        let sum = |field: fn(&QueueCounters) -> &AtomicU64| -> u64 {
            self.queues
                .iter()
                .map(|q| field(q).load(Ordering::Relaxed))
                .sum()
        };
        let mut push = |name: &'static str, value: u64| values.push((name, value));
        push("reads", sum(|q| &q.reads));
        push("writes", sum(|q| &q.writes));
        push("flushes", sum(|q| &q.flushes));
        push("discards", sum(|q| &q.discards));
        push("write_zeroes", sum(|q| &q.write_zeroes));
        push("get_ids", sum(|q| &q.get_ids));
        push("bytes_read", sum(|q| &q.bytes_read));
        push("bytes_written", sum(|q| &q.bytes_written));
        push("io_errors", sum(|q| &q.io_errors));
        for (index, kind) in BadRequestKind::ALL.iter().enumerate() {
            let total = self
                .queues
                .iter()
                .map(|q| q.bad[index].load(Ordering::Relaxed))
                .sum();
            push(kind.name(), total);
        }
        push("chains_returned_unused", sum(|q| &q.chains_returned_unused));
        push("chains_dropped", sum(|q| &q.chains_dropped));
        push("kicks", sum(|q| &q.kicks));
        push("completion_events", sum(|q| &q.completion_events));
        push("submits", sum(|q| &q.submits));
        push("notifications", sum(|q| &q.notifications));
        push(
            "notifications_suppressed",
            sum(|q| &q.notifications_suppressed),
        );
        push("direct_fallbacks", sum(|q| &q.direct_fallbacks));
        push("zero_range_fallbacks", sum(|q| &q.zero_range_fallbacks));
        for (name, value) in self.daemon.values() {
            push(name, value);
        }
        if let Some(image) = self.image.get() {
            for (name, value) in image.values() {
                push(name, value);
            }
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
    fn snapshot_sums_the_queues() {
        let counters = Counters::new(2);
        inc(&counters.queues[0].reads);
        add(&counters.queues[1].reads, 2);
        add(&counters.queues[1].bytes_read, 4096);
        counters.queues[0].bad_request(BadRequestKind::ReservedFlags);
        counters.queues[1].bad_request(BadRequestKind::ReservedFlags);
        inc(&counters.daemon.frontends_refused);
        let snapshot = counters.snapshot();
        assert_eq!(snapshot.get("reads"), Some(3));
        assert_eq!(snapshot.get("bytes_read"), Some(4096));
        assert_eq!(snapshot.get("bad_flags"), Some(2));
        assert_eq!(snapshot.get("frontends_refused"), Some(1));
        assert_eq!(snapshot.get("writes"), Some(0));
        assert_eq!(snapshot.get("nonsense"), None);
    }

    #[test]
    fn snapshot_prints_name_value_pairs() {
        let counters = Counters::new(1);
        add(&counters.queues[0].writes, 5);
        let text = counters.snapshot().to_string();
        assert!(text.starts_with("reads=0 writes=5 flushes=0 "), "{text}");
        assert!(text.contains(" bad_no_status=0 "), "{text}");
        assert!(text.ends_with(" frontends_refused=0"), "{text}");
        let names: Vec<_> = counters.snapshot().iter().map(|(n, _)| n).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }
}
