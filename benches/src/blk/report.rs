//! The storage benchmark's numbers: each run normalised to one shape
//! ([`Measurement`]), its processes' cost, the ratios between the runs of a
//! case, the tables printed and the JSON report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ringvm_tests::harness::{self, ExitOutcome};
use serde::Serialize;
use serde_json::Value;

use super::parse::{FioDirection, FioResult, GuestDirection, GuestLatency, GuestResult};
use super::{BlkOptions, Case, Completion, ToolPlan, Work};
use crate::host::HostInfo;
use crate::process::Finished;
use crate::tsc::TscRate;

pub const FIO_LABEL: &str = "host fio";
pub const RINGVM_BLK_LABEL: &str = "ringvm+ringvm-blk";
pub const QSD_LABEL: &str = "ringvm+qsd";
pub const PROBE_LABEL: &str = "probe (ringvm+ringvm-blk)";

/// Bound on `fio --version` and `qemu-storage-daemon --version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Latency of one direction, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LatencyNs {
    pub mean: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p99_9: Option<f64>,
    pub max: f64,
}

/// Totals and rates of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DirectionStats {
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub bytes_per_sec: f64,
    pub lat_ns: Option<LatencyNs>,
}

/// One run's result, whichever tool measured it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Measurement {
    /// The time the I/O took (the guest: first submission to last
    /// completion; fio: its runtime).
    pub seconds: f64,
    pub read: DirectionStats,
    pub write: DirectionStats,
}

impl Measurement {
    /// The guest's result; cycles become time at `tsc`'s rate.
    pub fn from_guest(guest: &GuestResult, tsc: &TscRate) -> Measurement {
        let khz = tsc.khz.max(1) as f64;
        let seconds = guest.elapsed_cycles as f64 / (khz * 1000.0);
        let ns = |cycles: u64| cycles as f64 * 1e6 / khz;
        let direction = |d: &GuestDirection| {
            let lat_ns = match (d.lat_ns, d.lat_cycles) {
                (Some(lat), _) => Some(latency(lat, |v| v as f64)),
                (None, Some(lat)) => Some(latency(lat, ns)),
                (None, None) => None,
            };
            DirectionStats {
                ios: d.ios,
                bytes: d.bytes,
                iops: per_second(d.ios, seconds),
                bytes_per_sec: per_second(d.bytes, seconds),
                lat_ns,
            }
        };
        Measurement {
            seconds,
            read: direction(&guest.read),
            write: direction(&guest.write),
        }
    }

    /// fio's group report.
    pub fn from_fio(fio: &FioResult) -> Measurement {
        let direction = |d: &FioDirection| DirectionStats {
            ios: d.total_ios,
            bytes: d.io_bytes,
            iops: d.iops,
            bytes_per_sec: d.bw_bytes as f64,
            lat_ns: (d.total_ios > 0).then(|| LatencyNs {
                mean: d.lat_ns.mean,
                p50: d.p50_ns().map(|v| v as f64),
                p99: d.p99_ns().map(|v| v as f64),
                p99_9: d.p99_9_ns().map(|v| v as f64),
                max: d.lat_ns.max as f64,
            }),
        };
        Measurement {
            seconds: fio.read.runtime.max(fio.write.runtime) as f64 / 1000.0,
            read: direction(&fio.read),
            write: direction(&fio.write),
        }
    }

    pub fn ios(&self) -> u64 {
        self.read.ios + self.write.ios
    }

    /// Reads and writes per second.
    pub fn iops(&self) -> f64 {
        self.read.iops + self.write.iops
    }

    pub fn bytes_per_sec(&self) -> f64 {
        self.read.bytes_per_sec + self.write.bytes_per_sec
    }

    /// The p99 latency in µs of the direction that did I/O, or `read/write`
    /// when both did.
    pub fn p99_label(&self) -> String {
        let p99 = |d: &DirectionStats| {
            (d.ios > 0).then(|| fmt_opt(d.lat_ns.and_then(|l| l.p99).map(|ns| ns / 1000.0), 1))
        };
        match (p99(&self.read), p99(&self.write)) {
            (Some(r), Some(w)) => format!("{r}/{w}"),
            (Some(one), None) | (None, Some(one)) => one,
            (None, None) => "-".to_string(),
        }
    }
}

fn latency(lat: GuestLatency, to_ns: impl Fn(u64) -> f64) -> LatencyNs {
    LatencyNs {
        mean: to_ns(lat.mean),
        p50: Some(to_ns(lat.p50)),
        p99: Some(to_ns(lat.p99)),
        p99_9: Some(to_ns(lat.p99_9)),
        max: to_ns(lat.max),
    }
}

fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// What one process of a run used.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessCost {
    pub name: String,
    pub command: String,
    pub status: String,
    pub wall_s: f64,
    pub user_s: f64,
    pub system_s: f64,
    /// User+system time over the I/Os of the run.
    pub cpu_us_per_io: Option<f64>,
    pub peak_rss_kib: u64,
}

impl ProcessCost {
    pub fn of(done: &Finished, ios: Option<u64>) -> ProcessCost {
        ProcessCost {
            name: done.name.clone(),
            command: done.command.clone(),
            status: done.status.to_string(),
            wall_s: done.elapsed.as_secs_f64(),
            user_s: done.cpu.user_s,
            system_s: done.cpu.system_s,
            cpu_us_per_io: ios
                .filter(|&ios| ios > 0)
                .map(|ios| done.cpu.total_s() * 1e6 / ios as f64),
            peak_rss_kib: done.peak_rss_kib,
        }
    }
}

/// Notifications per I/O on both sides of a guest run: each guest notify is
/// an ioeventfd write (an exit on PVM), each backend notification an irqfd
/// signal (which the polling guest has suppressed unless completion=irq).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PerIo {
    pub guest_notifies: f64,
    pub guest_interrupts: f64,
    pub backend_kicks: Option<f64>,
    pub backend_submits: Option<f64>,
    pub backend_completion_events: Option<f64>,
    pub backend_notifications: Option<f64>,
}

impl PerIo {
    pub fn of(guest: &GuestResult, counters: Option<&BTreeMap<String, u64>>) -> Option<PerIo> {
        let ios = guest.read.ios + guest.write.ios;
        if ios == 0 {
            return None;
        }
        let per_io = |count: u64| count as f64 / ios as f64;
        let counter = |name: &str| counters.and_then(|c| c.get(name)).copied().map(per_io);
        Some(PerIo {
            guest_notifies: per_io(guest.notifies),
            guest_interrupts: per_io(guest.interrupts),
            backend_kicks: counter("kicks"),
            backend_submits: counter("submits"),
            backend_completion_events: counter("completion_events"),
            backend_notifications: counter("notifications"),
        })
    }

    fn summary(&self) -> String {
        let mut out = format!(
            "guest notifies {:.3}, interrupts {:.3}",
            self.guest_notifies, self.guest_interrupts
        );
        let backend = [
            ("kicks", self.backend_kicks),
            ("submits", self.backend_submits),
            ("completion events", self.backend_completion_events),
            ("notifications", self.backend_notifications),
        ];
        let backend: Vec<String> = backend
            .iter()
            .filter_map(|(name, value)| value.map(|v| format!("{name} {v:.3}")))
            .collect();
        if !backend.is_empty() {
            let _ = write!(out, "; ringvm-blk {}", backend.join(", "));
        }
        out
    }
}

/// One run of a case.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub label: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Kept even when the run failed afterwards (e.g. a backend that did not
    /// exit cleanly), but not used for ratios then.
    pub measurement: Option<Measurement>,
    pub processes: Vec<ProcessCost>,
    /// The rate that turned the guest's cycles into time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tsc: Option<TscRate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_io: Option<PerIo>,
    /// The guest's result line, as printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_counters: Option<BTreeMap<String, u64>>,
    /// fio's job report without its latency histograms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fio: Option<Value>,
}

impl RunRecord {
    pub fn failed(label: &'static str, error: String) -> RunRecord {
        RunRecord {
            label,
            ok: false,
            error: Some(error),
            measurement: None,
            processes: Vec::new(),
            tsc: None,
            per_io: None,
            guest: None,
            backend_counters: None,
            fio: None,
        }
    }

    pub(super) fn cost(&self, name: &str) -> Option<f64> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.cpu_us_per_io)
    }

    pub(super) fn cost_label(&self) -> String {
        self.processes
            .iter()
            .map(|p| format!("{} {}", p.name, fmt_opt(p.cpu_us_per_io, 2)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A run, or why it was not made.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum RunSlot {
    Done(Box<RunRecord>),
    Skipped { skipped: String },
}

impl RunSlot {
    pub fn done(record: RunRecord) -> RunSlot {
        RunSlot::Done(Box::new(record))
    }

    /// The measurement of a run that succeeded.
    pub fn ok_measurement(&self) -> Option<&Measurement> {
        match self {
            RunSlot::Done(record) if record.ok => record.measurement.as_ref(),
            _ => None,
        }
    }

    pub(super) fn record(&self) -> Option<&RunRecord> {
        match self {
            RunSlot::Done(record) => Some(record),
            RunSlot::Skipped { .. } => None,
        }
    }

    fn failed(&self) -> bool {
        matches!(self, RunSlot::Done(record) if !record.ok)
    }
}

/// IOPS ratios between the runs of a case (for one block size, bandwidth
/// ratios are the same). Absent when either run is missing or failed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Ratios {
    pub ringvm_blk_over_fio: Option<f64>,
    pub qsd_over_fio: Option<f64>,
    pub ringvm_blk_over_qsd: Option<f64>,
}

impl Ratios {
    pub fn of(ringvm_blk: &RunSlot, qsd: &RunSlot, fio: &RunSlot) -> Ratios {
        let ratio = |a: &RunSlot, b: &RunSlot| {
            let (a, b) = (a.ok_measurement()?.iops(), b.ok_measurement()?.iops());
            (b > 0.0).then(|| a / b)
        };
        Ratios {
            ringvm_blk_over_fio: ratio(ringvm_blk, fio),
            qsd_over_fio: ratio(qsd, fio),
            ringvm_blk_over_qsd: ratio(ringvm_blk, qsd),
        }
    }
}

/// /proc/loadavg's first three fields around a case.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoadAverage {
    pub before: String,
    pub after: String,
}

/// One case: its three runs and their ratios.
#[derive(Clone, Debug, Serialize)]
pub struct CaseReport {
    pub case: Case,
    pub label: String,
    pub queue_size: u32,
    /// None when the probe that sizes a `size=` run failed.
    pub work: Option<Work>,
    /// `--runtime`: fio's run time, and the guest's unless `work` is `size`.
    pub runtime_s: u32,
    pub fio: RunSlot,
    pub ringvm_blk: RunSlot,
    pub qsd: RunSlot,
    pub ratios: Ratios,
    pub load_average: LoadAverage,
}

/// Guest runs shorter than this part of `--runtime` get a note under the
/// table: a `size=` run covers the image at most once per job.
const SHORT_RUN_FRACTION: f64 = 0.5;

impl CaseReport {
    pub fn new(
        case: Case,
        work: Work,
        runtime_s: u32,
        ringvm_blk: RunSlot,
        qsd: RunSlot,
        fio: RunSlot,
        load_average: LoadAverage,
    ) -> CaseReport {
        CaseReport {
            label: case.label(),
            queue_size: case.queue_size(),
            case,
            work: Some(work),
            runtime_s,
            ratios: Ratios::of(&ringvm_blk, &qsd, &fio),
            fio,
            ringvm_blk,
            qsd,
            load_average,
        }
    }

    /// A case whose `size=` probe failed: nothing else was run.
    pub fn failed_probe(
        case: Case,
        runtime_s: u32,
        probe: Box<RunRecord>,
        load_average: String,
    ) -> CaseReport {
        let not_run = || RunSlot::Skipped {
            skipped: "not run: the probe failed".to_string(),
        };
        let ringvm_blk = RunSlot::Done(probe);
        CaseReport {
            label: case.label(),
            queue_size: case.queue_size(),
            case,
            work: None,
            runtime_s,
            ratios: Ratios::of(&ringvm_blk, &not_run(), &not_run()),
            fio: not_run(),
            ringvm_blk,
            qsd: not_run(),
            load_average: LoadAverage {
                before: load_average.clone(),
                after: load_average,
            },
        }
    }

    pub fn all_ok(&self) -> bool {
        ![&self.fio, &self.ringvm_blk, &self.qsd]
            .iter()
            .any(|slot| slot.failed())
    }

    fn work_label(&self) -> String {
        match self.work {
            Some(Work::Runtime { seconds }) => format!("runtime {seconds} s"),
            Some(Work::Size { region_bytes }) => {
                format!("guest size={region_bytes} per job (fio time-based on the same region)")
            }
            None => "not run".to_string(),
        }
    }

    /// The case's table: one row per run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} ({}, queue size {})",
            self.label,
            self.work_label(),
            self.queue_size
        );
        let _ = writeln!(
            out,
            "{:<19}{:>7}{:>10}{:>10}{:>16}{:>8}{:>8}  CPU µs per I/O",
            "run", "time s", "IOPS", "MB/s", "p99 µs", "vs fio", "vs qsd"
        );
        let rows = [
            (FIO_LABEL, &self.fio, None, None),
            (
                RINGVM_BLK_LABEL,
                &self.ringvm_blk,
                self.ratios.ringvm_blk_over_fio,
                self.ratios.ringvm_blk_over_qsd,
            ),
            (QSD_LABEL, &self.qsd, self.ratios.qsd_over_fio, None),
        ];
        for (label, slot, vs_fio, vs_qsd) in rows {
            let record = match slot {
                RunSlot::Skipped { skipped } => {
                    let _ = writeln!(out, "{label:<19}skipped: {skipped}");
                    continue;
                }
                RunSlot::Done(record) => record,
            };
            match (&record.measurement, record.ok) {
                (Some(m), ok) => {
                    let row = format!(
                        "{label:<19}{:>7.2}{:>10.0}{:>10.1}{:>16}{:>8}{:>8}  {}",
                        m.seconds,
                        m.iops(),
                        m.bytes_per_sec() / 1e6,
                        m.p99_label(),
                        fmt_opt(vs_fio, 2),
                        fmt_opt(vs_qsd, 2),
                        record.cost_label()
                    );
                    let _ = writeln!(out, "{}", row.trim_end());
                    if !ok {
                        let error = record.error.as_deref().unwrap_or("");
                        let _ = writeln!(out, "{:<19}FAILED after measuring: {error}", "");
                    }
                }
                (None, _) => {
                    let error = record.error.as_deref().unwrap_or("unknown");
                    let _ = writeln!(out, "{:<19}FAILED: {error}", record.label);
                }
            }
        }
        for slot in [&self.ringvm_blk, &self.qsd] {
            if let Some(record) = slot.record() {
                if let Some(per_io) = &record.per_io {
                    let _ = writeln!(out, "per I/O, {}: {}", record.label, per_io.summary());
                }
            }
        }
        if let Some(Work::Size { region_bytes }) = self.work {
            let short = [&self.ringvm_blk, &self.qsd].iter().any(|slot| {
                slot.ok_measurement()
                    .is_some_and(|m| m.seconds < f64::from(self.runtime_s) * SHORT_RUN_FRACTION)
            });
            if short {
                let _ = writeln!(
                    out,
                    "note: guest runs shorter than --runtime {} s: each job moved the region \
                     of {region_bytes} bytes once; a larger --size makes them longer",
                    self.runtime_s
                );
            }
        }
        out
    }
}

/// Where the programs came from.
#[derive(Clone, Debug, Serialize)]
pub struct Tools {
    pub ringvm: PathBuf,
    pub ringvm_blk: PathBuf,
    pub fio: Option<PathBuf>,
    pub fio_version: Option<String>,
    pub qsd: Option<PathBuf>,
    pub qsd_version: Option<String>,
}

impl Tools {
    pub fn probe(options: &BlkOptions) -> Tools {
        let path = |plan: &ToolPlan| match plan {
            ToolPlan::Run(path) => Some(path.clone()),
            ToolPlan::Skip(_) => None,
        };
        let (fio, qsd) = (path(&options.fio), path(&options.qsd));
        Tools {
            ringvm: options.ringvm.clone(),
            ringvm_blk: options.ringvm_blk.clone(),
            fio_version: fio.as_deref().and_then(version),
            fio,
            qsd_version: qsd.as_deref().and_then(version),
            qsd,
        }
    }
}

/// The first line of `program --version`.
fn version(program: &Path) -> Option<String> {
    let mut cmd = Command::new(program);
    cmd.arg("--version");
    let out = harness::run_bounded(cmd, VERSION_TIMEOUT, None).ok()?;
    if out.status != ExitOutcome::Exited(0) {
        return None;
    }
    out.stdout
        .lines()
        .next()
        .map(|line| line.trim().to_string())
}

/// Everything one `ringvm-bench blk` measured; serialised as its JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct BlkReport {
    pub runtime_s: u32,
    pub image_bytes: u64,
    pub image_dir: PathBuf,
    pub page_cache: &'static str,
    pub direct: bool,
    pub completion: Completion,
    pub guest_memory: &'static str,
    pub guest_cpus: &'static str,
    /// `runtime`, or how `size=` runs were made (see the blk module doc).
    pub guest_timing: &'static str,
    pub host_tsc: TscRate,
    pub tools: Tools,
    pub host: HostInfo,
    pub load_average_start: String,
    pub load_average_end: String,
    pub cases: Vec<CaseReport>,
}

impl BlkReport {
    pub fn all_ok(&self) -> bool {
        self.cases.iter().all(CaseReport::all_ok)
    }

    /// One line per case: IOPS of each run, the ratios, p99 and the
    /// backends' CPU per I/O.
    pub fn summary_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<34}{:>10}{:>10}{:>10}{:>9}{:>8}{:>8}{:>26}{:>16}",
            "case",
            "fio IOPS",
            "blk IOPS",
            "qsd IOPS",
            "blk MB/s",
            "blk/fio",
            "blk/qsd",
            "p99 µs fio/blk/qsd",
            "CPU µs blk/qsd"
        );
        for case in &self.cases {
            let iops = |slot: &RunSlot| slot.ok_measurement().map(Measurement::iops);
            let p99 = |slot: &RunSlot| {
                slot.ok_measurement()
                    .map_or("-".to_string(), Measurement::p99_label)
            };
            let cost = |slot: &RunSlot, name: &str| slot.record().and_then(|r| r.cost(name));
            let row = format!(
                "{:<34}{:>10}{:>10}{:>10}{:>9}{:>8}{:>8}{:>26}{:>16}",
                case.label,
                fmt_opt(iops(&case.fio), 0),
                fmt_opt(iops(&case.ringvm_blk), 0),
                fmt_opt(iops(&case.qsd), 0),
                fmt_opt(
                    case.ringvm_blk
                        .ok_measurement()
                        .map(|m| m.bytes_per_sec() / 1e6),
                    1
                ),
                fmt_opt(case.ratios.ringvm_blk_over_fio, 2),
                fmt_opt(case.ratios.ringvm_blk_over_qsd, 2),
                format!(
                    "{} / {} / {}",
                    p99(&case.fio),
                    p99(&case.ringvm_blk),
                    p99(&case.qsd)
                ),
                format!(
                    "{} / {}",
                    fmt_opt(cost(&case.ringvm_blk, "ringvm-blk"), 2),
                    fmt_opt(cost(&case.qsd, "qsd"), 2)
                ),
            );
            let _ = writeln!(out, "{}", row.trim_end());
        }
        out
    }

    /// What the columns mean and what the machine was doing.
    pub fn footer(&self) -> String {
        format!(
            "IOPS and MB/s (10^6 bytes/s) count reads and writes; p99 is submission-to-completion \
             latency (guest: rdtsc; fio: lat_ns); vs fio / vs qsd are IOPS ratios; CPU µs per \
             I/O is each process's user+system time (wait4) over the run's I/Os; ringvm's holds \
             the guest's vCPU, which polls whenever it is scheduled.\n\
             guest timing: {}; page cache: {}; host TSC {} kHz; load average {} at start, {} \
             at end.",
            self.guest_timing,
            self.page_cache,
            self.host_tsc.khz,
            self.load_average_start,
            self.load_average_end
        )
    }
}

/// `value` with `decimals`, or `-`.
pub(super) fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::parse;
    use crate::blk::Rw;

    const CASE: Case = Case {
        rw: Rw::Randread,
        bs: 4096,
        iodepth: 32,
        queues: 1,
        rwmixread: None,
    };

    fn measurement(iops: f64, p99_ns: f64) -> Measurement {
        let seconds = 10.0;
        let ios = (iops * seconds) as u64;
        Measurement {
            seconds,
            read: DirectionStats {
                ios,
                bytes: ios * 4096,
                iops,
                bytes_per_sec: iops * 4096.0,
                lat_ns: Some(LatencyNs {
                    mean: p99_ns / 2.0,
                    p50: Some(p99_ns / 2.0),
                    p99: Some(p99_ns),
                    p99_9: Some(p99_ns * 2.0),
                    max: p99_ns * 4.0,
                }),
            },
            write: DirectionStats {
                ios: 0,
                bytes: 0,
                iops: 0.0,
                bytes_per_sec: 0.0,
                lat_ns: None,
            },
        }
    }

    fn cost(name: &str, cpu_s: f64, ios: u64) -> ProcessCost {
        ProcessCost {
            name: name.to_string(),
            command: name.to_string(),
            status: "exited with status 0".to_string(),
            wall_s: 10.0,
            user_s: cpu_s / 2.0,
            system_s: cpu_s / 2.0,
            cpu_us_per_io: Some(cpu_s * 1e6 / ios as f64),
            peak_rss_kib: 1000,
        }
    }

    fn ok_run(label: &'static str, iops: f64, p99_ns: f64, costs: &[(&str, f64)]) -> RunSlot {
        let m = measurement(iops, p99_ns);
        RunSlot::done(RunRecord {
            label,
            ok: true,
            error: None,
            processes: costs
                .iter()
                .map(|&(name, cpu_s)| cost(name, cpu_s, m.ios()))
                .collect(),
            measurement: Some(m),
            tsc: None,
            per_io: None,
            guest: None,
            backend_counters: None,
            fio: None,
        })
    }

    fn case_report(fio: RunSlot, ringvm_blk: RunSlot, qsd: RunSlot) -> CaseReport {
        CaseReport::new(
            CASE,
            Work::Runtime { seconds: 10 },
            10,
            ringvm_blk,
            qsd,
            fio,
            LoadAverage {
                before: "1.00 1.00 1.00".to_string(),
                after: "1.10 1.00 1.00".to_string(),
            },
        )
    }

    #[test]
    fn ratios_divide_iops_of_ok_runs_only() {
        let fio = ok_run(FIO_LABEL, 200_000.0, 100_000.0, &[("fio", 5.0)]);
        let blk = ok_run(RINGVM_BLK_LABEL, 160_000.0, 200_000.0, &[]);
        let qsd = ok_run(QSD_LABEL, 100_000.0, 400_000.0, &[]);
        let ratios = Ratios::of(&blk, &qsd, &fio);
        assert_eq!(ratios.ringvm_blk_over_fio, Some(0.8));
        assert_eq!(ratios.qsd_over_fio, Some(0.5));
        assert_eq!(ratios.ringvm_blk_over_qsd, Some(1.6));

        let skipped = RunSlot::Skipped {
            skipped: "fio not found".to_string(),
        };
        let failed = RunSlot::done(RunRecord {
            ok: false,
            error: Some("qsd exited with status 1".to_string()),
            ..match qsd {
                RunSlot::Done(r) => *r,
                RunSlot::Skipped { .. } => unreachable!(),
            }
        });
        let ratios = Ratios::of(&blk, &failed, &skipped);
        assert_eq!(
            ratios,
            Ratios {
                ringvm_blk_over_fio: None,
                qsd_over_fio: None,
                ringvm_blk_over_qsd: None
            }
        );
    }

    #[test]
    fn guest_cycles_become_time_at_the_tsc_rate() {
        let stdout = "testguest: result {\"rw\":\"randrw\",\"bs\":4096,\"iodepth\":4,\
            \"numjobs\":1,\"size\":1048576,\"time_based\":false,\"elapsed_cycles\":2000000000,\
            \"read\":{\"ios\":3000,\"bytes\":12288000,\"iops\":null,\"bytes_per_sec\":null,\
            \"lat_cycles\":{\"min\":1000,\"mean\":20000,\"p50\":10000,\"p99\":100000,\
            \"p99.9\":200000,\"max\":400000}},\"write\":{\"ios\":1000,\"bytes\":4096000,\
            \"iops\":null,\"bytes_per_sec\":null,\"lat_cycles\":{\"min\":1000,\"mean\":30000,\
            \"p50\":20000,\"p99\":300000,\"p99.9\":400000,\"max\":500000}},\"errors\":0,\
            \"notifies\":400,\"interrupts\":0,\"queue_size\":256,\"queue_depth\":4,\
            \"indirect\":false,\"tsc_khz\":null,\"tsc_source\":null}";
        let guest = parse::guest_result(stdout).unwrap();
        let tsc = TscRate {
            khz: 2_000_000,
            source: "host-measured".to_string(),
        };
        let m = Measurement::from_guest(&guest, &tsc);
        // 2e9 cycles at 2 GHz: one second.
        assert!((m.seconds - 1.0).abs() < 1e-12);
        assert_eq!(m.ios(), 4000);
        assert!((m.iops() - 4000.0).abs() < 1e-9);
        assert!((m.bytes_per_sec() - 16_384_000.0).abs() < 1e-6);
        // 100000 cycles at 2 GHz: 50 µs.
        assert_eq!(m.read.lat_ns.unwrap().p99, Some(50_000.0));
        assert_eq!(m.p99_label(), "50.0/150.0");

        let per_io = PerIo::of(&guest, None).unwrap();
        assert!((per_io.guest_notifies - 0.1).abs() < 1e-12);
        assert_eq!(per_io.backend_kicks, None);
        let counters = BTreeMap::from([("kicks".to_string(), 800), ("submits".to_string(), 400)]);
        let per_io = PerIo::of(&guest, Some(&counters)).unwrap();
        assert_eq!(per_io.backend_kicks, Some(0.2));
        assert_eq!(
            per_io.summary(),
            "guest notifies 0.100, interrupts 0.000; ringvm-blk kicks 0.200, submits 0.100"
        );
    }

    #[test]
    fn cpu_per_io_divides_cpu_time_by_ios() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("true");
        cmd.arg("x");
        let done = crate::process::Process::spawn("true", cmd, dir.path())
            .unwrap()
            .wait(Duration::from_secs(10))
            .unwrap();
        let cost = ProcessCost::of(&done, Some(1000));
        let expected = (done.cpu.user_s + done.cpu.system_s) * 1e6 / 1000.0;
        assert_eq!(cost.cpu_us_per_io, Some(expected));
        assert_eq!(cost.command, "true x");
        assert_eq!(ProcessCost::of(&done, Some(0)).cpu_us_per_io, None);
        assert_eq!(ProcessCost::of(&done, None).cpu_us_per_io, None);
    }

    #[test]
    fn case_table_rows_ratios_and_costs() {
        let report = case_report(
            ok_run(FIO_LABEL, 200_000.0, 100_000.0, &[("fio", 4.0)]),
            ok_run(
                RINGVM_BLK_LABEL,
                160_000.0,
                200_000.0,
                &[("ringvm", 10.0), ("ringvm-blk", 3.2)],
            ),
            ok_run(
                QSD_LABEL,
                100_000.0,
                400_000.0,
                &[("ringvm", 10.0), ("qsd", 5.0)],
            ),
        );
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "4k randread iodepth=32 queues=1 (runtime 10 s, queue size 256)"
        );
        assert_eq!(
            lines[2],
            "host fio             10.00    200000     819.2           100.0       -       -  fio 2.00"
        );
        assert_eq!(
            lines[3],
            "ringvm+ringvm-blk    10.00    160000     655.4           200.0    0.80    1.60  \
             ringvm 6.25, ringvm-blk 2.00"
        );
        assert_eq!(
            lines[4],
            "ringvm+qsd           10.00    100000     409.6           400.0    0.50       -  \
             ringvm 10.00, qsd 5.00"
        );
        assert!(report.all_ok());
    }

    #[test]
    fn short_size_runs_get_a_note() {
        let load = LoadAverage {
            before: "1".to_string(),
            after: "1".to_string(),
        };
        let make = |runtime_s| {
            CaseReport::new(
                CASE,
                Work::Size {
                    region_bytes: 1 << 30,
                },
                runtime_s,
                ok_run(RINGVM_BLK_LABEL, 160_000.0, 200_000.0, &[]),
                RunSlot::Skipped {
                    skipped: "--no-qsd".to_string(),
                },
                RunSlot::Skipped {
                    skipped: "--no-fio".to_string(),
                },
                load.clone(),
            )
        };
        // The guest runs take 10 s (see measurement()).
        let table = make(30).table();
        assert!(
            table.contains(
                "note: guest runs shorter than --runtime 30 s: each job moved the region of \
                 1073741824 bytes once"
            ),
            "{table}"
        );
        assert!(table.starts_with(
            "4k randread iodepth=32 queues=1 (guest size=1073741824 per job (fio time-based on \
             the same region), queue size 256)"
        ));
        assert!(!make(20).table().contains("note:"));
        let json = serde_json::to_value(make(20)).unwrap();
        assert_eq!(json["work"]["size"]["region_bytes"], 1u64 << 30);
        assert_eq!(json["runtime_s"], 20);
        assert_eq!(json["load_average"]["before"], "1");
    }

    #[test]
    fn skipped_and_failed_runs_in_table_json_and_status() {
        let failed = RunSlot::done(RunRecord::failed(
            QSD_LABEL,
            "qsd did not listen on /x/qsd.sock (exited with status 1)".to_string(),
        ));
        let report = case_report(
            RunSlot::Skipped {
                skipped: "fio not found on PATH (install fio, or pass --fio)".to_string(),
            },
            ok_run(RINGVM_BLK_LABEL, 160_000.0, 200_000.0, &[]),
            failed,
        );
        let table = report.table();
        assert!(
            table.contains("host fio           skipped: fio not found on PATH"),
            "{table}"
        );
        assert!(
            table.contains("ringvm+qsd         FAILED: qsd did not listen"),
            "{table}"
        );
        assert!(!report.all_ok());
        assert_eq!(report.ratios.ringvm_blk_over_fio, None);

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["fio"]["skipped"],
            "fio not found on PATH (install fio, or pass --fio)"
        );
        assert_eq!(json["qsd"]["ok"], false);
        assert_eq!(json["ringvm_blk"]["ok"], true);
        assert_eq!(json["ringvm_blk"]["measurement"]["read"]["iops"], 160_000.0);
        assert_eq!(json["case"]["rw"], "randread");
        assert_eq!(json["work"]["runtime"]["seconds"], 10);
        assert_eq!(json["ratios"]["ringvm_blk_over_fio"], Value::Null);
    }

    #[test]
    fn summary_has_one_line_per_case() {
        let report = BlkReport {
            runtime_s: 10,
            image_bytes: 1 << 30,
            image_dir: PathBuf::from("/dev/shm"),
            page_cache: "buffered",
            direct: false,
            completion: Completion::Poll,
            guest_memory: "512M",
            guest_cpus: "1",
            guest_timing: "runtime",
            host_tsc: TscRate {
                khz: 2_445_422,
                source: "host-measured".to_string(),
            },
            tools: Tools {
                ringvm: PathBuf::from("ringvm"),
                ringvm_blk: PathBuf::from("ringvm-blk"),
                fio: None,
                fio_version: None,
                qsd: None,
                qsd_version: None,
            },
            host: HostInfo {
                kvm: "kvm_pvm".to_string(),
                kernel: "6.18".to_string(),
                qemu_version: None,
            },
            load_average_start: "1.00 1.00 1.00".to_string(),
            load_average_end: "2.00 1.00 1.00".to_string(),
            cases: vec![
                case_report(
                    ok_run(FIO_LABEL, 200_000.0, 100_000.0, &[("fio", 4.0)]),
                    ok_run(
                        RINGVM_BLK_LABEL,
                        160_000.0,
                        200_000.0,
                        &[("ringvm-blk", 3.2)],
                    ),
                    ok_run(QSD_LABEL, 100_000.0, 400_000.0, &[("qsd", 5.0)]),
                ),
                case_report(
                    RunSlot::Skipped {
                        skipped: "--no-fio".to_string(),
                    },
                    ok_run(RINGVM_BLK_LABEL, 50_000.0, 20_000.0, &[("ringvm-blk", 1.0)]),
                    RunSlot::Skipped {
                        skipped: "--no-qsd".to_string(),
                    },
                ),
            ],
        };
        let summary = report.summary_table();
        let lines: Vec<&str> = summary.lines().collect();
        assert_eq!(lines.len(), 3, "{summary}");
        assert!(lines[0].starts_with("case "), "{summary}");
        assert_eq!(
            lines[1],
            "4k randread iodepth=32 queues=1       200000    160000    100000    655.4    \
             0.80    1.60     100.0 / 200.0 / 400.0     2.00 / 5.00"
        );
        assert_eq!(
            lines[2],
            "4k randread iodepth=32 queues=1            -     50000         -    204.8       \
             -       -              - / 20.0 / -        2.00 / -"
        );
        assert!(report.all_ok());
        assert!(report
            .footer()
            .contains("load average 1.00 1.00 1.00 at start"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["cases"].as_array().unwrap().len(), 2);
        assert_eq!(json["host_tsc"]["khz"], 2_445_422);
        assert_eq!(json["completion"], "poll");
    }
}
