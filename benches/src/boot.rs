//! Boot benchmark: ringvm and QEMU boot the same test guest with `job=hello`
//! in one run; for each run it measures the time from process spawn to the
//! guest's first serial output and to process exit, and the VMM's peak RSS.
//!
//! "First serial output" is the first appearance of
//! [`GUEST_SERIAL_MARKER`] on the VMM's stdout, not its first byte: QEMU's
//! firmware prints to the same serial port before the guest starts.
//!
//! A run counts only when the VMM exited with the status that means "guest
//! exited 0" and the guest's hello line was printed; a failed run is reported
//! with its reason and left out of the statistics.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ringvm_tests::harness::{self, RunOutput, GUEST_HELLO_LINE, GUEST_SERIAL_MARKER};
use serde::Serialize;
use thiserror::Error;

use crate::guest::ExportedGuest;
use crate::host::HostInfo;
use crate::stats::Summary;

/// The test guest job: print a hello line and exit 0.
const GUEST_CMDLINE: &str = "job=hello";
const GUEST_MEMORY: &str = "512M";

/// Bounds one ringvm boot. The hello job needs no firmware and a few thousand
/// guest instructions; this only stops a hung run.
const RINGVM_TIMEOUT: Duration = Duration::from_secs(60);

/// Bounds one QEMU boot. QEMU's firmware runs at CPL0, which is instruction-
/// emulated on PVM hosts: about 5-20 s pass before the guest's first
/// instruction (DESIGN.md, Environment).
const QEMU_TIMEOUT: Duration = Duration::from_secs(180);

/// isa-debug-exit makes QEMU exit with `(value << 1) | 1`; the guest writes 0.
const QEMU_EXIT_FOR_GUEST_SUCCESS: i32 = 1;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("writing the test guest to a temporary directory")]
    ExportGuest(#[source] io::Error),
    #[error("writing the JSON report to {path}")]
    WriteJson {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Vmm {
    Ringvm,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ringvm => "ringvm",
            Vmm::Qemu => "qemu",
        }
    }

    /// Exit status of the VMM process when the guest exited 0.
    fn expected_exit(self) -> i32 {
        match self {
            Vmm::Ringvm => 0,
            Vmm::Qemu => QEMU_EXIT_FOR_GUEST_SUCCESS,
        }
    }

    fn timeout(self) -> Duration {
        match self {
            Vmm::Ringvm => RINGVM_TIMEOUT,
            Vmm::Qemu => QEMU_TIMEOUT,
        }
    }

    fn command(self, program: &Path, guest: &Path) -> Command {
        let mut cmd = Command::new(program);
        match self {
            Vmm::Ringvm => {
                cmd.arg("--kernel")
                    .arg(guest)
                    .args(["--cmdline", GUEST_CMDLINE])
                    .args(["--memory", GUEST_MEMORY])
                    .args(["--serial", "stdio"]);
            }
            Vmm::Qemu => {
                cmd.args(["-accel", "kvm", "-M", "pc", "-m", GUEST_MEMORY])
                    .args(["-nographic", "-nodefaults", "-serial", "stdio"])
                    .arg("-kernel")
                    .arg(guest)
                    .args(["-append", GUEST_CMDLINE])
                    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
            }
        }
        cmd
    }
}

/// Whether and how to run QEMU.
#[derive(Clone, Debug)]
pub enum QemuPlan {
    Run { path: PathBuf, runs: u32 },
    Skip { reason: String },
}

#[derive(Clone, Debug)]
pub struct BootOptions {
    pub ringvm: PathBuf,
    pub ringvm_runs: u32,
    pub qemu: QemuPlan,
    pub json: PathBuf,
}

/// One boot. Times and RSS are present only when the run was ok.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunRecord {
    pub vmm: Vmm,
    /// 1-based, per VMM.
    pub run: u32,
    pub ok: bool,
    pub first_serial_ms: Option<f64>,
    pub exit_ms: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunRecord {
    fn from_output(vmm: Vmm, run: u32, out: &RunOutput) -> RunRecord {
        match check_run(vmm, out) {
            Ok(first_serial) => RunRecord {
                vmm,
                run,
                ok: true,
                first_serial_ms: Some(millis(first_serial)),
                exit_ms: Some(millis(out.elapsed)),
                peak_rss_kib: Some(out.peak_rss_kib),
                error: None,
            },
            Err(error) => RunRecord::failed(vmm, run, error),
        }
    }

    fn failed(vmm: Vmm, run: u32, error: String) -> RunRecord {
        RunRecord {
            vmm,
            run,
            ok: false,
            first_serial_ms: None,
            exit_ms: None,
            peak_rss_kib: None,
            error: Some(error),
        }
    }
}

/// The time of the guest's first serial output if the run succeeded, else
/// what went wrong.
fn check_run(vmm: Vmm, out: &RunOutput) -> Result<Duration, String> {
    let mut problems = Vec::new();
    if !out.exited_with(vmm.expected_exit()) {
        problems.push(format!(
            "{} after {:.1} s, expected exit status {}",
            out.status,
            out.elapsed.as_secs_f64(),
            vmm.expected_exit()
        ));
    }
    if !out.stdout.contains(GUEST_HELLO_LINE) {
        problems.push(format!("no `{GUEST_HELLO_LINE}` on stdout"));
    }
    match out.first_match {
        Some(first_serial) if problems.is_empty() => Ok(first_serial),
        // The hello line holds the marker, so a match exists once it is seen.
        _ => Err(problems.join("; ")),
    }
}

/// Milliseconds with microsecond resolution (and no float noise in the JSON).
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmmSummary {
    pub ok_runs: usize,
    pub failed_runs: usize,
    pub first_serial_ms: Option<Summary>,
    pub exit_ms: Option<Summary>,
    pub peak_rss_kib: Option<Summary>,
}

impl VmmSummary {
    fn of(vmm: Vmm, runs: &[RunRecord]) -> VmmSummary {
        let ok: Vec<&RunRecord> = runs.iter().filter(|r| r.vmm == vmm && r.ok).collect();
        let failed_runs = runs.iter().filter(|r| r.vmm == vmm && !r.ok).count();
        let summarize = |metric: fn(&RunRecord) -> Option<f64>| {
            Summary::of(&ok.iter().filter_map(|r| metric(r)).collect::<Vec<_>>())
        };
        VmmSummary {
            ok_runs: ok.len(),
            failed_runs,
            first_serial_ms: summarize(|r| r.first_serial_ms),
            exit_ms: summarize(|r| r.exit_ms),
            peak_rss_kib: summarize(|r| r.peak_rss_kib.map(|kib| kib as f64)),
        }
    }

    /// Name, summary and decimals to print, per metric.
    fn metrics(&self) -> [(&'static str, Option<Summary>, usize); 3] {
        [
            ("first_serial_ms", self.first_serial_ms, 1),
            ("exit_ms", self.exit_ms, 1),
            ("peak_rss_kib", self.peak_rss_kib, 0),
        ]
    }
}

/// QEMU's median divided by ringvm's, per metric (above 1: ringvm is faster
/// or smaller).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ratios {
    pub first_serial_ms: Option<f64>,
    pub exit_ms: Option<f64>,
    pub peak_rss_kib: Option<f64>,
}

impl Ratios {
    fn of(qemu: &VmmSummary, ringvm: &VmmSummary) -> Ratios {
        let ratio = |q: Option<Summary>, r: Option<Summary>| Some(q?.median / r?.median);
        Ratios {
            first_serial_ms: ratio(qemu.first_serial_ms, ringvm.first_serial_ms),
            exit_ms: ratio(qemu.exit_ms, ringvm.exit_ms),
            peak_rss_kib: ratio(qemu.peak_rss_kib, ringvm.peak_rss_kib),
        }
    }

    /// In the order of [`VmmSummary::metrics`].
    fn in_metric_order(&self) -> [Option<f64>; 3] {
        [self.first_serial_ms, self.exit_ms, self.peak_rss_kib]
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BootSummary {
    pub ringvm: VmmSummary,
    /// `None` when QEMU was not run; `qemu_skipped` says why.
    pub qemu: Option<VmmSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_skipped: Option<String>,
    pub qemu_over_ringvm: Option<Ratios>,
}

impl BootSummary {
    fn of(runs: &[RunRecord], qemu_skipped: Option<String>) -> BootSummary {
        let ringvm = VmmSummary::of(Vmm::Ringvm, runs);
        let qemu = qemu_skipped
            .is_none()
            .then(|| VmmSummary::of(Vmm::Qemu, runs));
        let qemu_over_ringvm = qemu.as_ref().map(|qemu| Ratios::of(qemu, &ringvm));
        BootSummary {
            ringvm,
            qemu,
            qemu_skipped,
            qemu_over_ringvm,
        }
    }
}

/// Everything one `ringvm-bench boot` measured; serialised as its JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct BootReport {
    pub guest_elf_bytes: u64,
    pub guest_cmdline: &'static str,
    pub first_serial_marker: &'static str,
    pub runs: Vec<RunRecord>,
    pub summary: BootSummary,
    pub host: HostInfo,
}

impl BootReport {
    pub fn all_ok(&self) -> bool {
        self.runs.iter().all(|r| r.ok)
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<8}{:<18}{:>12}{:>12}{:>12}{:>14}",
            "vmm", "metric", "min", "median", "max", "qemu/ringvm"
        );
        let vmms = [
            (Vmm::Ringvm, Some(&self.summary.ringvm)),
            (Vmm::Qemu, self.summary.qemu.as_ref()),
        ];
        for (vmm, summary) in vmms {
            let Some(summary) = summary else {
                let reason = self.summary.qemu_skipped.as_deref().unwrap_or("not run");
                let _ = writeln!(out, "{:<8}skipped: {reason}", vmm.name());
                continue;
            };
            if summary.ok_runs == 0 {
                let _ = writeln!(
                    out,
                    "{:<8}no successful run ({} failed)",
                    vmm.name(),
                    summary.failed_runs
                );
                continue;
            }
            let ratios = match (vmm, &self.summary.qemu_over_ringvm) {
                (Vmm::Qemu, Some(ratios)) => ratios.in_metric_order(),
                _ => [None; 3],
            };
            for ((metric, stats, decimals), ratio) in summary.metrics().into_iter().zip(ratios) {
                let stats = stats.expect("a VMM with ok runs has every metric");
                let ratio = ratio.map_or(String::new(), |ratio| format!("{ratio:.2}x"));
                let row = format!(
                    "{:<8}{:<18}{:>12.decimals$}{:>12.decimals$}{:>12.decimals$}{:>14}",
                    vmm.name(),
                    metric,
                    stats.min,
                    stats.median,
                    stats.max,
                    ratio
                );
                let _ = writeln!(out, "{}", row.trim_end());
            }
            if summary.failed_runs > 0 {
                let _ = writeln!(
                    out,
                    "{:<8}{} of {} runs failed and are not in the statistics",
                    vmm.name(),
                    summary.failed_runs,
                    summary.failed_runs + summary.ok_runs
                );
            }
        }
        for run in self.runs.iter().filter(|r| !r.ok) {
            let _ = writeln!(
                out,
                "failed: {} run {}: {}",
                run.vmm.name(),
                run.run,
                run.error.as_deref().unwrap_or("unknown")
            );
        }
        out
    }
}

/// Runs the benchmark, prints progress (stderr) and the table (stdout), and
/// writes the JSON report.
pub fn run(options: &BootOptions) -> Result<BootReport, BootError> {
    let guest = ExportedGuest::new().map_err(BootError::ExportGuest)?;
    let (qemu_path, qemu_runs, qemu_skipped) = match &options.qemu {
        QemuPlan::Run { path, runs } => (Some(path.as_path()), *runs, None),
        QemuPlan::Skip { reason } => (None, 0, Some(reason.clone())),
    };
    println!(
        "boot: test guest {} bytes, cmdline `{GUEST_CMDLINE}`, {GUEST_MEMORY}; \
         {} ringvm runs ({}), {}",
        guest.len_bytes,
        options.ringvm_runs,
        options.ringvm.display(),
        match qemu_path {
            Some(path) => format!("{qemu_runs} QEMU runs ({})", path.display()),
            None => format!("QEMU skipped: {}", qemu_skipped.as_deref().unwrap_or("")),
        }
    );
    println!(
        "first_serial_ms: spawn to the first `{GUEST_SERIAL_MARKER}` on the VMM's stdout \
         (QEMU's firmware prints before the guest); exit_ms: spawn to VMM exit; \
         peak_rss_kib: the VMM's ru_maxrss"
    );

    let mut runs = Vec::new();
    let plan = [
        (
            Vmm::Ringvm,
            Some(options.ringvm.as_path()),
            options.ringvm_runs,
        ),
        (Vmm::Qemu, qemu_path, qemu_runs),
    ];
    for (vmm, program, count) in plan {
        let Some(program) = program else { continue };
        for run in 1..=count {
            let record = measure(vmm, program, &guest.path, run, count);
            runs.push(record);
        }
    }

    let summary = BootSummary::of(&runs, qemu_skipped);
    let report = BootReport {
        guest_elf_bytes: guest.len_bytes,
        guest_cmdline: GUEST_CMDLINE,
        first_serial_marker: GUEST_SERIAL_MARKER,
        runs,
        summary,
        host: HostInfo::probe(qemu_path),
    };
    println!();
    print!("{}", report.table());
    write_json(&options.json, &report)?;
    println!("JSON report: {}", options.json.display());
    Ok(report)
}

fn measure(vmm: Vmm, program: &Path, guest: &Path, run: u32, count: u32) -> RunRecord {
    let cmd = vmm.command(program, guest);
    let command_line = harness::command_line(&cmd);
    let (record, output) = match harness::run_bounded(cmd, vmm.timeout(), Some(GUEST_SERIAL_MARKER))
    {
        Ok(out) => (RunRecord::from_output(vmm, run, &out), Some(out)),
        Err(err) => (
            RunRecord::failed(vmm, run, format!("could not start: {err}")),
            None,
        ),
    };
    match (
        &record.first_serial_ms,
        &record.exit_ms,
        &record.peak_rss_kib,
    ) {
        (Some(first_serial), Some(exit), Some(rss)) => eprintln!(
            "{} run {run}/{count}: first serial {first_serial:.1} ms, exit {exit:.1} ms, \
             peak RSS {rss} KiB",
            vmm.name()
        ),
        _ => {
            eprintln!(
                "{} run {run}/{count}: FAILED: {}\n$ {command_line}",
                vmm.name(),
                record.error.as_deref().unwrap_or("unknown")
            );
            if let Some(out) = output {
                eprintln!("{out}");
            }
        }
    }
    record
}

/// Writes through a temporary file so that a reader never sees half a report.
fn write_json(path: &Path, report: &BootReport) -> Result<(), BootError> {
    crate::json::write_atomic(path, report).map_err(|source| BootError::WriteJson {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringvm_tests::harness::ExitOutcome;

    fn output(status: ExitOutcome, stdout: &str, first_match_ms: Option<u64>) -> RunOutput {
        RunOutput {
            status,
            stdout: stdout.to_string(),
            stderr: String::new(),
            elapsed: Duration::from_millis(40),
            first_stdout_byte: first_match_ms.map(Duration::from_millis),
            first_match: first_match_ms.map(Duration::from_millis),
            peak_rss_kib: 2048,
        }
    }

    const HELLO: &str = "testguest: hello\n";

    fn ok_record(vmm: Vmm, run: u32, first_serial_ms: f64, exit_ms: f64, rss: u64) -> RunRecord {
        RunRecord {
            vmm,
            run,
            ok: true,
            first_serial_ms: Some(first_serial_ms),
            exit_ms: Some(exit_ms),
            peak_rss_kib: Some(rss),
            error: None,
        }
    }

    #[test]
    fn hello_line_is_the_one_the_runs_look_for() {
        assert!(HELLO.contains(GUEST_HELLO_LINE));
        assert!(GUEST_HELLO_LINE.starts_with(GUEST_SERIAL_MARKER));
    }

    #[test]
    fn ok_run_is_timed_from_the_marker() {
        let record = RunRecord::from_output(
            Vmm::Ringvm,
            1,
            &output(ExitOutcome::Exited(0), HELLO, Some(12)),
        );
        assert_eq!(record, ok_record(Vmm::Ringvm, 1, 12.0, 40.0, 2048));
    }

    #[test]
    fn qemu_succeeds_with_exit_status_one() {
        let out = output(ExitOutcome::Exited(1), HELLO, Some(5000));
        assert!(RunRecord::from_output(Vmm::Qemu, 1, &out).ok);
        let record = RunRecord::from_output(Vmm::Ringvm, 1, &out);
        assert!(!record.ok);
        assert_eq!(
            record.error.as_deref(),
            Some("exited with status 1 after 0.0 s, expected exit status 0")
        );
    }

    #[test]
    fn failed_run_is_not_timed() {
        let record = RunRecord::from_output(
            Vmm::Ringvm,
            2,
            &output(ExitOutcome::Exited(0), "testguest: boot\n", Some(3)),
        );
        assert_eq!(
            record,
            RunRecord::failed(
                Vmm::Ringvm,
                2,
                "no `testguest: hello` on stdout".to_string()
            )
        );
        assert_eq!(record.first_serial_ms, None);
    }

    #[test]
    fn timeout_and_missing_hello_are_both_reported() {
        let record = RunRecord::from_output(Vmm::Qemu, 1, &output(ExitOutcome::TimedOut, "", None));
        assert_eq!(
            record.error.as_deref(),
            Some(
                "timed out and was killed after 0.0 s, expected exit status 1; \
                 no `testguest: hello` on stdout"
            )
        );
    }

    #[test]
    fn summary_leaves_failed_runs_out_and_divides_medians() {
        let runs = vec![
            ok_record(Vmm::Ringvm, 1, 10.0, 20.0, 1000),
            RunRecord::failed(Vmm::Ringvm, 2, "boom".to_string()),
            ok_record(Vmm::Ringvm, 3, 30.0, 40.0, 3000),
            ok_record(Vmm::Qemu, 1, 4000.0, 6000.0, 200_000),
        ];
        let summary = BootSummary::of(&runs, None);
        assert_eq!(summary.ringvm.ok_runs, 2);
        assert_eq!(summary.ringvm.failed_runs, 1);
        assert_eq!(
            summary.ringvm.first_serial_ms,
            Some(Summary {
                min: 10.0,
                median: 20.0,
                max: 30.0
            })
        );
        let ratios = summary.qemu_over_ringvm.expect("both VMMs ran");
        assert_eq!(ratios.first_serial_ms, Some(200.0));
        assert_eq!(ratios.exit_ms, Some(200.0));
        assert_eq!(ratios.peak_rss_kib, Some(100.0));
    }

    #[test]
    fn skipped_qemu_is_null_with_a_reason_in_json_and_table() {
        let runs = vec![ok_record(Vmm::Ringvm, 1, 10.0, 20.0, 1000)];
        let report = BootReport {
            guest_elf_bytes: 4096,
            guest_cmdline: GUEST_CMDLINE,
            first_serial_marker: GUEST_SERIAL_MARKER,
            summary: BootSummary::of(&runs, Some("--no-qemu".to_string())),
            runs,
            host: HostInfo {
                kvm: "kvm_intel".to_string(),
                kernel: "6.1.0".to_string(),
                qemu_version: None,
            },
        };
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["summary"]["qemu"], serde_json::Value::Null);
        assert_eq!(json["summary"]["qemu_skipped"], "--no-qemu");
        assert_eq!(json["summary"]["ringvm"]["exit_ms"]["median"], 20.0);
        assert_eq!(json["runs"][0]["vmm"], "ringvm");
        assert_eq!(json["runs"][0]["ok"], true);
        assert_eq!(json["guest_elf_bytes"], 4096);
        assert_eq!(json["host"]["kvm"], "kvm_intel");

        let table = report.table();
        assert!(table.contains("qemu    skipped: --no-qemu"), "{table}");
        assert!(table.contains("ringvm  exit_ms"), "{table}");
        assert!(report.all_ok());
    }

    #[test]
    fn table_shows_ratio_on_qemu_rows_and_lists_failures() {
        let runs = vec![
            ok_record(Vmm::Ringvm, 1, 10.0, 20.0, 1000),
            ok_record(Vmm::Qemu, 1, 4000.0, 6000.0, 200_000),
            RunRecord::failed(Vmm::Qemu, 2, "timed out".to_string()),
        ];
        let report = BootReport {
            guest_elf_bytes: 4096,
            guest_cmdline: GUEST_CMDLINE,
            first_serial_marker: GUEST_SERIAL_MARKER,
            summary: BootSummary::of(&runs, None),
            runs,
            host: HostInfo {
                kvm: "kvm_pvm".to_string(),
                kernel: "6.1.0".to_string(),
                qemu_version: Some("QEMU emulator version 7.2.22".to_string()),
            },
        };
        let table = report.table();
        let qemu_first_serial = table
            .lines()
            .find(|line| line.starts_with("qemu    first_serial_ms"))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(qemu_first_serial.ends_with("400.00x"), "{table}");
        assert!(table.contains("qemu    1 of 2 runs failed"), "{table}");
        assert!(table.contains("failed: qemu run 2: timed out"), "{table}");
        assert!(!report.all_ok());
    }

    #[test]
    fn commands_match_the_documented_invocations() {
        let guest = Path::new("/tmp/g.elf");
        let ringvm = harness::command_line(&Vmm::Ringvm.command(Path::new("ringvm"), guest));
        assert_eq!(
            ringvm,
            "ringvm --kernel /tmp/g.elf --cmdline job=hello --memory 512M --serial stdio"
        );
        let qemu =
            harness::command_line(&Vmm::Qemu.command(Path::new("qemu-system-x86_64"), guest));
        assert_eq!(
            qemu,
            "qemu-system-x86_64 -accel kvm -M pc -m 512M -nographic -nodefaults -serial stdio \
             -kernel /tmp/g.elf -append job=hello -device isa-debug-exit,iobase=0xf4,iosize=4"
        );
    }
}
