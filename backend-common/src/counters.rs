//! What both backends' counters have in common: relaxed increments, the
//! daemon's own counters, and the snapshot that prints as `name=value` pairs
//! (at exit, on SIGUSR1, and for tests). Each backend keeps its own counter
//! structs and the names README.md lists.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Increments a counter; relaxed, as nothing is ordered by counters.
pub fn inc(counter: &AtomicU64) {
    add(counter, 1);
}

pub fn add(counter: &AtomicU64, value: u64) {
    counter.fetch_add(value, Ordering::Relaxed);
}

/// The counters the daemon loop keeps itself. They outlive connections.
#[derive(Debug, Default)]
pub struct FrontendCounters {
    /// Frontends served.
    pub frontends: AtomicU64,
    /// Frontends refused while one was connected.
    pub frontends_refused: AtomicU64,
}

impl FrontendCounters {
    /// Their snapshot names and values, in the order they print in.
    pub fn values(&self) -> [(&'static str, u64); 2] {
        [
            ("frontends", self.frontends.load(Ordering::Relaxed)),
            (
                "frontends_refused",
                self.frontends_refused.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// What the daemon loop needs from a backend's counters: its own, and the
/// snapshot it logs on SIGUSR1.
pub trait DaemonCounters: Sync {
    fn frontend_counters(&self) -> &FrontendCounters;
    fn snapshot(&self) -> CountersSnapshot;
}

/// Counter values at one moment, in a fixed order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountersSnapshot {
    values: Vec<(&'static str, u64)>,
}

impl CountersSnapshot {
    /// The values in the order they print in.
    pub fn new(values: Vec<(&'static str, u64)>) -> Self {
        CountersSnapshot { values }
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.values.iter().copied()
    }
}

impl fmt::Display for CountersSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.values.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_prints_name_value_pairs_in_order() {
        let counter = AtomicU64::new(0);
        inc(&counter);
        add(&counter, 2);
        let snapshot = CountersSnapshot::new(vec![
            ("reads", counter.load(Ordering::Relaxed)),
            ("writes", 0),
        ]);
        assert_eq!(snapshot.get("reads"), Some(3));
        assert_eq!(snapshot.get("nonsense"), None);
        assert_eq!(snapshot.to_string(), "reads=3 writes=0");
        assert_eq!(
            snapshot.iter().collect::<Vec<_>>(),
            [("reads", 3), ("writes", 0)]
        );
    }
}
