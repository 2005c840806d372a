//! The numbers of `ringvm-bench blk --format qcow2` (see [`super::qcow2`]):
//! the cases, each run with its image's state, the ratios and goals, the
//! tables printed and the JSON report.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use ringvm_tests::harness::ExitOutcome;
use serde::Serialize;
use serde_json::Value;

use super::case::size_label;
use super::qcow2::{
    BLK_QCOW2_LABEL, BLK_RAW_LABEL, CLUSTER_BYTES, COLD_WRITE_GOAL_BLK_OVER_QSD, QSD_QCOW2_LABEL,
    WARM_GOAL_QCOW2_OVER_RAW,
};
use super::report::{fmt_opt, LoadAverage, Measurement, RunRecord, RunSlot, Tools};
use super::{Case, Completion, ImageFormat, Rw, Work};
use crate::host::HostInfo;
use crate::tsc::TscRate;

/// Whether the qcow2 clusters the guest touches are allocated before the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Warmth {
    Warm,
    Cold,
}

impl fmt::Display for Warmth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Warmth::Warm => "warm",
            Warmth::Cold => "cold",
        })
    }
}

/// One case of the qcow2 comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Qcow2Case {
    pub warmth: Warmth,
    pub case: Case,
}

impl Qcow2Case {
    /// Warm randwrite, warm randread, cold randwrite, cold randread, with the
    /// block size, iodepth and queues of `settings`.
    pub fn all(settings: Case) -> [Qcow2Case; 4] {
        let with = |warmth, rw| Qcow2Case {
            warmth,
            case: Case {
                rw,
                rwmixread: None,
                ..settings
            },
        };
        [
            with(Warmth::Warm, Rw::Randwrite),
            with(Warmth::Warm, Rw::Randread),
            with(Warmth::Cold, Rw::Randwrite),
            with(Warmth::Cold, Rw::Randread),
        ]
    }

    /// `cold randwrite`.
    pub fn label(&self) -> String {
        format!("{} {}", self.warmth, self.case.rw.name())
    }

    fn goal(&self, ratios: &Qcow2Ratios) -> Option<Goal> {
        match (self.warmth, self.case.rw) {
            (Warmth::Warm, _) => Some(Goal::new(
                "qcow2/raw",
                WARM_GOAL_QCOW2_OVER_RAW,
                ratios.qcow2_over_raw,
            )),
            (Warmth::Cold, Rw::Randwrite) => Some(Goal::new(
                "blk/qsd",
                COLD_WRITE_GOAL_BLK_OVER_QSD,
                ratios.blk_over_qsd,
            )),
            (Warmth::Cold, _) => None,
        }
    }
}

/// `qemu-img check --output=json` of a qcow2 image after its run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Qcow2Check {
    /// How qemu-img ended: 0 clean, 2 corruptions, 3 leaks only, 1 no check.
    pub status: String,
    pub exit_code: Option<i32>,
    /// qemu-img's JSON report (`allocated-clusters`, `total-clusters`, ...).
    pub report: Value,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stderr: String,
}

/// qemu-img check's exit status for an image with leaked clusters only,
/// which waste space but do not corrupt data.
const CHECK_LEAKS_ONLY: i32 = 3;

impl Qcow2Check {
    pub fn from_output(status: &ExitOutcome, stdout: &str, stderr: &str) -> Qcow2Check {
        Qcow2Check {
            status: status.to_string(),
            exit_code: match status {
                ExitOutcome::Exited(code) => Some(*code),
                _ => None,
            },
            report: serde_json::from_str(stdout).unwrap_or(Value::Null),
            stderr: stderr.trim().to_string(),
        }
    }

    fn field(&self, name: &str) -> Option<u64> {
        self.report.get(name).and_then(Value::as_u64)
    }

    /// A count qemu-img leaves out of its report when it is zero
    /// (`allocated-clusters`, `corruptions`, `leaks`, ...).
    fn count(&self, name: &str) -> Option<u64> {
        self.report
            .is_object()
            .then(|| self.field(name).unwrap_or(0))
    }

    pub fn allocated_clusters(&self) -> Option<u64> {
        self.count("allocated-clusters")
    }

    pub fn total_clusters(&self) -> Option<u64> {
        self.field("total-clusters")
    }

    /// Why the image is not sound, if it is not (leaks alone are fine).
    pub fn problem(&self) -> Option<String> {
        match self.exit_code {
            Some(0 | CHECK_LEAKS_ONLY) if self.report.is_object() => None,
            _ => Some(format!(
                "qemu-img check {}: corruptions {}, check errors {}{}",
                self.status,
                fmt_count(self.count("corruptions")),
                fmt_count(self.count("check-errors")),
                if self.stderr.is_empty() {
                    String::new()
                } else {
                    format!("; {}", self.stderr)
                }
            )),
        }
    }

    fn summary(&self) -> String {
        if let Some(problem) = self.problem() {
            return problem;
        }
        let leaks = self.count("leaks").unwrap_or(0);
        format!(
            "qemu-img check {}, {}/{} clusters allocated",
            if leaks > 0 {
                format!("found {leaks} leaked clusters")
            } else {
                "clean".to_string()
            },
            fmt_count(self.allocated_clusters()),
            fmt_count(self.total_clusters())
        )
    }
}

fn fmt_count(value: Option<u64>) -> String {
    value.map_or("?".to_string(), |v| v.to_string())
}

/// A run's image after the run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageUsage {
    /// The file name in the working directory.
    pub file: String,
    pub format: ImageFormat,
    pub virtual_bytes: u64,
    /// st_blocks * 512.
    pub allocated_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stat_error: Option<String>,
    /// qcow2 images only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Qcow2Check>,
}

impl ImageUsage {
    pub fn problem(&self) -> Option<String> {
        self.check.as_ref().and_then(Qcow2Check::problem)
    }

    pub fn summary(&self) -> String {
        let mut out = match (self.allocated_bytes, &self.stat_error) {
            (Some(bytes), _) => format!(
                "{bytes} bytes allocated (st_blocks*512) of {} virtual",
                size_label(self.virtual_bytes)
            ),
            (None, error) => error.clone().unwrap_or_default(),
        };
        if let Some(check) = &self.check {
            let _ = write!(out, "; {}", check.summary());
        }
        out
    }
}

/// One run of a case, with its image after the run.
#[derive(Clone, Debug, Serialize)]
pub struct Qcow2Run {
    pub run: RunSlot,
    pub image: Option<ImageUsage>,
    /// Clusters allocated over the writes the guest made (a qcow2 image
    /// that started empty, block size up to a cluster): how many of the
    /// writes went to unallocated clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocating_writes: Option<f64>,
}

impl Qcow2Run {
    pub fn skipped(reason: String) -> Qcow2Run {
        Qcow2Run {
            run: RunSlot::Skipped { skipped: reason },
            image: None,
            allocating_writes: None,
        }
    }

    pub fn failed(label: &'static str, error: String) -> Qcow2Run {
        Qcow2Run {
            run: RunSlot::done(RunRecord::failed(label, error)),
            image: None,
            allocating_writes: None,
        }
    }

    fn iops(&self) -> Option<f64> {
        self.run.ok_measurement().map(Measurement::iops)
    }

    fn backend_cost(&self) -> Option<f64> {
        let record = self.run.record()?;
        record.cost("ringvm-blk").or_else(|| record.cost("qsd"))
    }
}

/// IOPS ratios of a case's runs (absent when a run is missing or failed).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Qcow2Ratios {
    /// ringvm-blk on qcow2 over ringvm-blk on raw.
    pub qcow2_over_raw: Option<f64>,
    /// ringvm-blk on qcow2 over qemu-storage-daemon on qcow2.
    pub blk_over_qsd: Option<f64>,
}

/// A goal printed beside a ratio; never a reason to fail.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Goal {
    pub ratio: &'static str,
    pub at_least: f64,
    pub met: Option<bool>,
}

impl Goal {
    fn new(ratio: &'static str, at_least: f64, value: Option<f64>) -> Goal {
        Goal {
            ratio,
            at_least,
            met: value.map(|v| v >= at_least),
        }
    }

    fn label(&self) -> String {
        let verdict = match self.met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "unknown",
        };
        format!("{} >= {:.2}: {verdict}", self.ratio, self.at_least)
    }
}

/// What ringvm-blk's counters say about writes on the qcow2 run.
const WA_ABSENT: &str = "n/a (ringvm-blk's counters have no host_bytes_written)";

/// One case: three runs, their images, ratios and goal.
#[derive(Clone, Debug, Serialize)]
pub struct Qcow2CaseReport {
    pub label: String,
    pub warmth: Warmth,
    pub case: Case,
    pub queue_size: u32,
    /// None when the probe that sizes a `size=` run failed.
    pub work: Option<Work>,
    pub runtime_s: u32,
    /// The images' virtual size (the guest's disk).
    pub virtual_bytes: u64,
    pub blk_qcow2: Qcow2Run,
    pub blk_raw: Qcow2Run,
    pub qsd_qcow2: Qcow2Run,
    pub ratios: Qcow2Ratios,
    pub goal: Option<Goal>,
    /// host_bytes_written / bytes_written of the ringvm-blk qcow2 run, when
    /// its counters have both.
    pub write_amplification: Option<f64>,
    pub load_average: LoadAverage,
}

impl Qcow2CaseReport {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        case: Qcow2Case,
        work: Option<Work>,
        runtime_s: u32,
        virtual_bytes: u64,
        mut blk_qcow2: Qcow2Run,
        blk_raw: Qcow2Run,
        mut qsd_qcow2: Qcow2Run,
        load_average: LoadAverage,
    ) -> Qcow2CaseReport {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let ratios = Qcow2Ratios {
            qcow2_over_raw: ratio(blk_qcow2.iops(), blk_raw.iops()),
            blk_over_qsd: ratio(blk_qcow2.iops(), qsd_qcow2.iops()),
        };
        if case.warmth == Warmth::Cold && case.case.bs <= CLUSTER_BYTES {
            for run in [&mut blk_qcow2, &mut qsd_qcow2] {
                run.allocating_writes = allocating_writes(run);
            }
        }
        let write_amplification = blk_qcow2
            .run
            .record()
            .and_then(|r| r.backend_counters.as_ref())
            .and_then(|c| Some((*c.get("host_bytes_written")?, *c.get("bytes_written")?)))
            .filter(|&(_, guest)| guest > 0)
            .map(|(host, guest)| host as f64 / guest as f64);
        Qcow2CaseReport {
            label: case.label(),
            warmth: case.warmth,
            case: case.case,
            queue_size: case.case.queue_size(),
            work,
            runtime_s,
            virtual_bytes,
            goal: case.goal(&ratios),
            ratios,
            blk_qcow2,
            blk_raw,
            qsd_qcow2,
            write_amplification,
            load_average,
        }
    }

    /// A case whose `size=` probe failed: nothing else was run.
    pub fn failed_probe(
        case: Qcow2Case,
        runtime_s: u32,
        virtual_bytes: u64,
        probe: Box<RunRecord>,
        load_average: String,
    ) -> Qcow2CaseReport {
        let not_run = || Qcow2Run::skipped("not run: the probe failed".to_string());
        let probe = Qcow2Run {
            run: RunSlot::Done(probe),
            image: None,
            allocating_writes: None,
        };
        Qcow2CaseReport::new(
            case,
            None,
            runtime_s,
            virtual_bytes,
            probe,
            not_run(),
            not_run(),
            LoadAverage {
                before: load_average.clone(),
                after: load_average,
            },
        )
    }

    fn runs(&self) -> [(&'static str, &Qcow2Run); 3] {
        [
            (BLK_QCOW2_LABEL, &self.blk_qcow2),
            (BLK_RAW_LABEL, &self.blk_raw),
            (QSD_QCOW2_LABEL, &self.qsd_qcow2),
        ]
    }

    pub fn all_ok(&self) -> bool {
        !self
            .runs()
            .iter()
            .any(|(_, run)| matches!(&run.run, RunSlot::Done(r) if !r.ok))
    }

    fn write_amplification_label(&self) -> String {
        self.write_amplification
            .map_or(WA_ABSENT.to_string(), |wa| format!("{wa:.2}"))
    }

    /// The case's table: one row per run, then the ratios, the goal and,
    /// for cold randwrite, what the run allocated.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let work = match self.work {
            Some(Work::Runtime { seconds }) => format!("runtime {seconds} s"),
            Some(Work::Size { region_bytes }) => format!("guest size={region_bytes} per job"),
            None => "not run".to_string(),
        };
        let _ = writeln!(
            out,
            "{}: {} bs, iodepth={} queues={} ({work}, queue size {}, disk {})",
            self.label,
            size_label(self.case.bs),
            self.case.iodepth,
            self.case.queues,
            self.queue_size,
            size_label(self.virtual_bytes)
        );
        let _ = writeln!(
            out,
            "{:<18}{:>7}{:>10}{:>10}{:>16}  CPU µs per I/O",
            "run", "time s", "IOPS", "MB/s", "p99 µs"
        );
        for (label, run) in self.runs() {
            match &run.run {
                RunSlot::Skipped { skipped } => {
                    let _ = writeln!(out, "{label:<18}skipped: {skipped}");
                }
                RunSlot::Done(record) => match &record.measurement {
                    Some(m) => {
                        let row = format!(
                            "{label:<18}{:>7.2}{:>10.0}{:>10.1}{:>16}  {}",
                            m.seconds,
                            m.iops(),
                            m.bytes_per_sec() / 1e6,
                            m.p99_label(),
                            record.cost_label()
                        );
                        let _ = writeln!(out, "{}", row.trim_end());
                        if !record.ok {
                            let error = record.error.as_deref().unwrap_or("");
                            let _ = writeln!(out, "{:<18}FAILED after measuring: {error}", "");
                        }
                    }
                    None => {
                        let error = record.error.as_deref().unwrap_or("unknown");
                        let _ = writeln!(out, "{label:<18}FAILED: {error}");
                    }
                },
            }
        }
        let _ = writeln!(
            out,
            "qcow2/raw {}, blk/qsd {}{}",
            fmt_opt(self.ratios.qcow2_over_raw, 2),
            fmt_opt(self.ratios.blk_over_qsd, 2),
            self.goal
                .as_ref()
                .map_or(String::new(), |g| format!("; goal {}", g.label()))
        );
        if self.warmth == Warmth::Cold && self.case.rw == Rw::Randwrite {
            for (label, run) in self.runs() {
                let Some(image) = &run.image else { continue };
                let mut line = format!("{label} image after the run: {}", image.summary());
                if let Some(fraction) = run.allocating_writes {
                    let _ = write!(
                        line,
                        "; {:.1}% of the writes allocated a cluster",
                        fraction * 100.0
                    );
                }
                let _ = writeln!(out, "{line}");
            }
            let _ = writeln!(
                out,
                "write amplification, ringvm-blk qcow2 (host_bytes_written/bytes_written): {}",
                self.write_amplification_label()
            );
        }
        out
    }
}

/// Allocated clusters over the guest's writes, at most 1.
fn allocating_writes(run: &Qcow2Run) -> Option<f64> {
    let writes = run.run.ok_measurement()?.write.ios;
    let clusters = run.image.as_ref()?.check.as_ref()?.allocated_clusters()?;
    (writes > 0).then(|| (clusters as f64 / writes as f64).min(1.0))
}

/// Everything `ringvm-bench blk --format qcow2` measured; its JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct Qcow2Report {
    pub format: ImageFormat,
    pub cluster_bytes: u64,
    pub runtime_s: u32,
    /// The raw image and the warm qcow2's virtual size (`--size`).
    pub image_bytes: u64,
    /// The cold images' virtual size (see qcow2::cold_virtual_bytes).
    pub cold_virtual_bytes: Option<u64>,
    pub image_dir: PathBuf,
    pub page_cache: &'static str,
    pub direct: bool,
    pub completion: Completion,
    pub guest_memory: &'static str,
    pub guest_cpus: &'static str,
    pub guest_timing: &'static str,
    pub host_tsc: TscRate,
    pub tools: Tools,
    pub qemu_img: PathBuf,
    pub host: HostInfo,
    pub load_average_start: String,
    pub load_average_end: String,
    /// The warm qcow2 before the runs.
    pub warm_image: ImageUsage,
    pub cases: Vec<Qcow2CaseReport>,
}

impl Qcow2Report {
    pub fn all_ok(&self) -> bool {
        self.cases.iter().all(Qcow2CaseReport::all_ok)
    }

    /// One line per case: IOPS of each run, the ratios, the backends' CPU
    /// per I/O, the goal.
    pub fn summary_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16}{:>16}{:>14}{:>16}{:>11}{:>9}{:>30}  goal",
            "case",
            "blk qcow2 IOPS",
            "blk raw IOPS",
            "qsd qcow2 IOPS",
            "qcow2/raw",
            "blk/qsd",
            "CPU µs/IO blk qcow2/raw/qsd"
        );
        for case in &self.cases {
            let cost = format!(
                "{} / {} / {}",
                fmt_opt(case.blk_qcow2.backend_cost(), 2),
                fmt_opt(case.blk_raw.backend_cost(), 2),
                fmt_opt(case.qsd_qcow2.backend_cost(), 2)
            );
            let row = format!(
                "{:<16}{:>16}{:>14}{:>16}{:>11}{:>9}{:>30}  {}",
                case.label,
                fmt_opt(case.blk_qcow2.iops(), 0),
                fmt_opt(case.blk_raw.iops(), 0),
                fmt_opt(case.qsd_qcow2.iops(), 0),
                fmt_opt(case.ratios.qcow2_over_raw, 2),
                fmt_opt(case.ratios.blk_over_qsd, 2),
                cost,
                case.goal.as_ref().map_or("-".to_string(), Goal::label)
            );
            let _ = writeln!(out, "{}", row.trim_end());
        }
        out
    }

    pub fn footer(&self) -> String {
        format!(
            "qcow2 images with {} clusters. warm: every cluster allocated before the runs \
             (qemu-img convert of the filled raw image; the raw run uses that raw image). cold: \
             a fresh thin qcow2 per run (qemu-img create), and a fresh sparse raw file for the \
             raw run, {} virtual. qcow2/raw and blk/qsd are IOPS ratios of ringvm-blk on qcow2 \
             to ringvm-blk on raw and to qemu-storage-daemon on qcow2 (aio=io_uring); CPU µs \
             per I/O is the backend process's user+system time over the run's I/Os. Goals: warm \
             qcow2/raw >= {WARM_GOAL_QCOW2_OVER_RAW:.2}, cold randwrite blk/qsd >= \
             {COLD_WRITE_GOAL_BLK_OVER_QSD:.2}.\n\
             guest timing: {}; page cache: {}; host TSC {} kHz; load average {} at start, {} \
             at end.",
            size_label(self.cluster_bytes),
            self.cold_virtual_bytes.map_or("-".to_string(), size_label),
            self.guest_timing,
            self.page_cache,
            self.host_tsc.khz,
            self.load_average_start,
            self.load_average_end
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::report::{DirectionStats, ProcessCost};
    use std::collections::BTreeMap;

    const SETTINGS: Case = Case {
        rw: Rw::Randread,
        bs: 4096,
        iodepth: 32,
        queues: 1,
        rwmixread: None,
    };

    fn stats(ios: u64, iops: f64) -> DirectionStats {
        DirectionStats {
            ios,
            bytes: ios * 4096,
            iops,
            bytes_per_sec: iops * 4096.0,
            lat_ns: None,
        }
    }

    fn run(
        label: &'static str,
        backend: &str,
        write: bool,
        iops: f64,
        image: Option<ImageUsage>,
        counters: Option<BTreeMap<String, u64>>,
    ) -> Qcow2Run {
        let ios = (iops * 10.0) as u64;
        let (read, written) = if write {
            (stats(0, 0.0), stats(ios, iops))
        } else {
            (stats(ios, iops), stats(0, 0.0))
        };
        Qcow2Run {
            run: RunSlot::done(RunRecord {
                label,
                ok: true,
                error: None,
                measurement: Some(Measurement {
                    seconds: 10.0,
                    read,
                    write: written,
                }),
                processes: vec![ProcessCost {
                    name: backend.to_string(),
                    command: backend.to_string(),
                    status: "exited with status 0".to_string(),
                    wall_s: 10.0,
                    user_s: 1.0,
                    system_s: 1.0,
                    cpu_us_per_io: Some(2e6 / ios as f64),
                    peak_rss_kib: 1000,
                }],
                tsc: None,
                per_io: None,
                guest: None,
                backend_counters: counters,
                fio: None,
            }),
            image,
            allocating_writes: None,
        }
    }

    fn qcow2_image(allocated_clusters: u64, exit_code: i32) -> ImageUsage {
        let json = format!(
            "{{\"image-end-offset\": 1, \"total-clusters\": 16777216, \"check-errors\": 0, \
             \"allocated-clusters\": {allocated_clusters}, \"filename\": \"cold.qcow2\", \
             \"format\": \"qcow2\"}}"
        );
        ImageUsage {
            file: "cold.qcow2".to_string(),
            format: ImageFormat::Qcow2,
            virtual_bytes: 1 << 40,
            allocated_bytes: Some(allocated_clusters * 4096 + 327_680),
            stat_error: None,
            check: Some(Qcow2Check::from_output(
                &ExitOutcome::Exited(exit_code),
                &json,
                "",
            )),
        }
    }

    fn load() -> LoadAverage {
        LoadAverage {
            before: "1".to_string(),
            after: "1".to_string(),
        }
    }

    #[test]
    fn the_four_cases_keep_the_settings() {
        let labels: Vec<String> = Qcow2Case::all(SETTINGS)
            .iter()
            .map(Qcow2Case::label)
            .collect();
        assert_eq!(
            labels,
            [
                "warm randwrite",
                "warm randread",
                "cold randwrite",
                "cold randread"
            ]
        );
        assert!(Qcow2Case::all(SETTINGS)
            .iter()
            .all(|c| c.case.bs == 4096 && c.case.iodepth == 32 && c.case.queues == 1));
    }

    #[test]
    fn warm_case_ratios_and_goal() {
        let [warm_write, ..] = Qcow2Case::all(SETTINGS);
        let report = Qcow2CaseReport::new(
            warm_write,
            Some(Work::Runtime { seconds: 10 }),
            10,
            1 << 30,
            run(BLK_QCOW2_LABEL, "ringvm-blk", true, 95_000.0, None, None),
            run(BLK_RAW_LABEL, "ringvm-blk", true, 100_000.0, None, None),
            run(QSD_QCOW2_LABEL, "qsd", true, 50_000.0, None, None),
            load(),
        );
        assert_eq!(report.ratios.qcow2_over_raw, Some(0.95));
        assert_eq!(report.ratios.blk_over_qsd, Some(1.9));
        assert_eq!(report.goal.as_ref().unwrap().met, Some(true));
        let table = report.table();
        assert!(
            table.contains("qcow2/raw 0.95, blk/qsd 1.90; goal qcow2/raw >= 0.90: met"),
            "{table}"
        );
        assert!(!table.contains("write amplification"), "{table}");
        assert!(report.all_ok());
    }

    #[test]
    fn cold_write_reports_allocation_and_write_amplification() {
        let [_, _, cold_write, cold_read] = Qcow2Case::all(SETTINGS);
        let counters = BTreeMap::from([("bytes_written".to_string(), 4096 * 100_000)]);
        let report = Qcow2CaseReport::new(
            cold_write,
            Some(Work::Runtime { seconds: 10 }),
            10,
            1 << 40,
            // 100000 writes, 95000 clusters allocated.
            run(
                BLK_QCOW2_LABEL,
                "ringvm-blk",
                true,
                10_000.0,
                Some(qcow2_image(95_000, 0)),
                Some(counters.clone()),
            ),
            run(BLK_RAW_LABEL, "ringvm-blk", true, 20_000.0, None, None),
            run(
                QSD_QCOW2_LABEL,
                "qsd",
                true,
                8_000.0,
                Some(qcow2_image(80_000, 3)),
                None,
            ),
            load(),
        );
        assert_eq!(report.blk_qcow2.allocating_writes, Some(0.95));
        assert_eq!(report.qsd_qcow2.allocating_writes, Some(1.0));
        assert_eq!(report.ratios.blk_over_qsd, Some(1.25));
        assert_eq!(report.goal.as_ref().unwrap().met, Some(false));
        assert_eq!(report.write_amplification, None);
        let table = report.table();
        assert!(table.contains("goal blk/qsd >= 1.50: not met"), "{table}");
        assert!(
            table.contains(
                "ringvm-blk qcow2 image after the run: 389447680 bytes allocated \
                 (st_blocks*512) of 1024G virtual; qemu-img check clean, 95000/16777216 clusters \
                 allocated; 95.0% of the writes allocated a cluster"
            ),
            "{table}"
        );
        assert!(
            table.contains("qsd qcow2 image after the run: 328007680 bytes allocated"),
            "{table}"
        );
        assert!(
            table.contains(
                "write amplification, ringvm-blk qcow2 (host_bytes_written/bytes_written): \
                 n/a (ringvm-blk's counters have no host_bytes_written)"
            ),
            "{table}"
        );
        assert!(report.all_ok());

        let mut with_host = counters;
        with_host.insert("host_bytes_written".to_string(), 4096 * 150_000);
        let report = Qcow2CaseReport::new(
            cold_write,
            Some(Work::Runtime { seconds: 10 }),
            10,
            1 << 40,
            run(
                BLK_QCOW2_LABEL,
                "ringvm-blk",
                true,
                10_000.0,
                None,
                Some(with_host),
            ),
            Qcow2Run::skipped("x".to_string()),
            Qcow2Run::skipped("--no-qsd".to_string()),
            load(),
        );
        assert_eq!(report.write_amplification, Some(1.5));
        assert!(report
            .table()
            .contains("(host_bytes_written/bytes_written): 1.50"));
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["write_amplification"], 1.5);
        assert_eq!(json["qsd_qcow2"]["run"]["skipped"], "--no-qsd");
        assert_eq!(json["goal"]["met"], Value::Null);
        assert_eq!(json["warmth"], "cold");

        let read = Qcow2CaseReport::new(
            cold_read,
            Some(Work::Runtime { seconds: 10 }),
            10,
            1 << 40,
            run(BLK_QCOW2_LABEL, "ringvm-blk", false, 10_000.0, None, None),
            run(BLK_RAW_LABEL, "ringvm-blk", false, 10_000.0, None, None),
            run(QSD_QCOW2_LABEL, "qsd", false, 10_000.0, None, None),
            load(),
        );
        assert_eq!(read.goal, None);
        assert!(!read.table().contains("goal"));
    }

    #[test]
    fn a_corrupt_image_is_a_problem_and_leaks_are_not() {
        assert_eq!(qcow2_image(1, 0).problem(), None);
        assert_eq!(qcow2_image(1, 3).problem(), None);
        let corrupt = qcow2_image(1, 2);
        let problem = corrupt.problem().unwrap();
        assert!(
            problem.starts_with("qemu-img check exited with status 2"),
            "{problem}"
        );
        let unreadable = Qcow2Check::from_output(
            &ExitOutcome::Exited(1),
            "",
            "qemu-img: Could not open 'x': Image is not in qcow2 format",
        );
        assert!(unreadable
            .problem()
            .unwrap()
            .contains("Image is not in qcow2 format"));
    }
}
