//! `ringvm-bench blk`: the storage benchmark. One image in tmpfs, three ways
//! to do the same I/O on it, in one run:
//!
//! 1. ringvm + ringvm-blk: the test guest's `job=blk-bench` (a fio-like job,
//!    tests/guest/src/jobs/blk_bench.rs) on a virtio-blk disk that
//!    `ringvm-blk` serves from the image;
//! 2. ringvm + qemu-storage-daemon: the same guest and VMM, with
//!    qemu-storage-daemon's vhost-user-blk export (`aio=io_uring`) serving
//!    the same image;
//! 3. host fio: `fio --ioengine=io_uring` on the image file itself, the
//!    near-native ceiling.
//!
//! The three use the same rw, block size, iodepth, jobs (one per queue:
//! guest `numjobs` = virtqueues = backend queues = fio `numjobs`), runtime and
//! page-cache mode (buffered unless `--direct`). Each run's numbers come from
//! the workload itself (the guest's TSC timing, fio's report), and the CPU
//! time of every process from wait4(2).
//!
//! Timing: the guest runs `runtime=` when it knows its TSC rate. When it
//! does not (it says `runtime= needs the TSC rate`), the benchmark falls back
//! to `size=` runs: a probe through ringvm-blk measures the rate, the region
//! is sized so that a run takes about `--runtime` (at most the image), all
//! three runs use that region (fio with `--size` and still time-based), and
//! the guest's cycles are converted with the host's TSC rate, which is the
//! guest's (DESIGN.md, Environment). The report says which happened.

mod case;
mod commands;
pub(crate) mod parse;
pub mod qcow2;
mod qcow2_report;
pub(crate) mod report;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::guest::ExportedGuest;
use crate::host::HostInfo;
use crate::process::{Finished, Process};
use crate::tsc::{self, TscRate};
pub use case::{Case, Completion, ImageFormat, Rw, Work};
use commands::{GUEST_CPUS, GUEST_MEMORY};
use parse::GuestResult;
pub use report::BlkReport;
use report::{CaseReport, LoadAverage, Measurement, ProcessCost, RunRecord, RunSlot};

/// From spawning a backend to its socket appearing.
const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(10);
/// From ringvm's exit to the backend's (it finishes the I/O in flight).
const BACKEND_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Beyond the run time: boot (well under a second) and a slow machine. A
/// guest run may take longer than `--runtime` when it is sized by a probe
/// (qemu-storage-daemon slower than the probe), hence the factor.
const RUN_TIMEOUT_FACTOR: u32 = 4;
const RUN_TIMEOUT_MARGIN: Duration = Duration::from_secs(60);
/// The region of the probe run that sizes `size=` runs (see the module doc):
/// 64 MiB takes well under a second at 4k and queue depth 1 on PVM.
const PROBE_REGION_BYTES: u64 = 64 << 20;
/// Bytes written per call when the image is filled.
const FILL_CHUNK_BYTES: usize = 1 << 20;
/// The qemu-storage-daemon export's socket, and ringvm-blk's.
const QSD_SOCKET: &str = "qsd.sock";
const RINGVM_BLK_SOCKET: &str = "ringvm-blk.sock";

#[derive(Debug, Error)]
pub enum BlkError {
    #[error("writing the test guest to a temporary directory")]
    ExportGuest(#[source] io::Error),
    #[error("creating a working directory in {dir} (pass --dir)")]
    WorkDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the {len_bytes}-byte image {path} (less --size, or another --dir)")]
    CreateImage {
        path: PathBuf,
        len_bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("--format qcow2 needs qemu-img to make and check the images (install qemu-utils)")]
    NoQemuImg,
    #[error("making the warm qcow2 image {path}: {detail}")]
    WarmImage { path: PathBuf, detail: String },
    #[error("writing the JSON report to {path}")]
    WriteJson {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether and how to run a baseline.
#[derive(Clone, Debug)]
pub enum ToolPlan {
    Run(PathBuf),
    Skip(String),
}

#[derive(Clone, Debug)]
pub struct BlkOptions {
    pub cases: Vec<Case>,
    pub runtime_s: u32,
    pub image_bytes: u64,
    pub dir: PathBuf,
    pub direct: bool,
    pub completion: Completion,
    pub json: PathBuf,
    pub ringvm: PathBuf,
    pub ringvm_blk: PathBuf,
    pub fio: ToolPlan,
    pub qsd: ToolPlan,
    /// `--format`: raw runs the cases as above; qcow2 runs [`qcow2::run`].
    pub format: ImageFormat,
    /// qemu-img, which makes and checks the qcow2 images (`--format qcow2`).
    pub qemu_img: Option<PathBuf>,
}

impl BlkOptions {
    fn page_cache(&self) -> &'static str {
        if self.direct {
            "O_DIRECT (ringvm-blk --direct, qsd cache.direct=on, fio --direct=1)"
        } else {
            "buffered (no O_DIRECT: ringvm-blk without --direct, qsd cache.direct=off, \
             fio --direct=0)"
        }
    }
}

/// Which backend serves the guest's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    RingvmBlk,
    Qsd,
}

impl Backend {
    fn process_name(self) -> &'static str {
        match self {
            Backend::RingvmBlk => "ringvm-blk",
            Backend::Qsd => "qsd",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Backend::RingvmBlk => report::RINGVM_BLK_LABEL,
            Backend::Qsd => report::QSD_LABEL,
        }
    }

    fn socket(self) -> &'static str {
        match self {
            Backend::RingvmBlk => RINGVM_BLK_SOCKET,
            Backend::Qsd => QSD_SOCKET,
        }
    }
}

/// What one guest run is served from: a backend, the image and its format,
/// and the run's label in the report.
#[derive(Clone, Debug)]
struct Target {
    backend: Backend,
    image: PathBuf,
    /// ringvm-blk's `--format` (absent: it reads the image's header) and
    /// qemu-storage-daemon's format driver (absent: raw).
    format: Option<ImageFormat>,
    label: &'static str,
}

/// A guest run that did not happen because the guest cannot time runtime=.
struct RuntimeRefused;

/// Everything one `ringvm-bench blk` run shares: the guest, the image, the
/// timing mode the guest supports.
struct Session<'a> {
    options: &'a BlkOptions,
    guest: ExportedGuest,
    workdir: tempfile::TempDir,
    image: PathBuf,
    host_tsc: TscRate,
    /// Set once the guest has refused `runtime=` (see the module doc).
    size_based: bool,
}

pub fn run(options: &BlkOptions) -> Result<BlkReport, BlkError> {
    let load_start = load_average();
    let mut session = Session::open(options, &load_start)?;
    let mut cases = Vec::new();
    for (index, case) in options.cases.iter().enumerate() {
        eprintln!(
            "blk: case {}/{}: {}",
            index + 1,
            options.cases.len(),
            case.label()
        );
        let report = session.run_case(case);
        println!();
        print!("{}", report.table());
        cases.push(report);
    }

    let report = BlkReport {
        runtime_s: options.runtime_s,
        image_bytes: options.image_bytes,
        image_dir: options.dir.clone(),
        page_cache: options.page_cache(),
        direct: options.direct,
        completion: options.completion,
        guest_memory: GUEST_MEMORY,
        guest_cpus: GUEST_CPUS,
        guest_timing: session.guest_timing(),
        host_tsc: session.host_tsc.clone(),
        tools: report::Tools::probe(options),
        host: HostInfo::probe(None),
        load_average_start: load_start,
        load_average_end: load_average(),
        cases,
    };
    if report.cases.len() > 1 {
        println!();
        print!("{}", report.summary_table());
    }
    println!();
    println!("{}", report.footer());
    write_json(&options.json, &report)?;
    println!("JSON report: {}", options.json.display());
    Ok(report)
}

impl<'a> Session<'a> {
    /// Exports the guest, creates the working directory and the filled raw
    /// image, and prints what the runs share.
    fn open(options: &'a BlkOptions, load_start: &str) -> Result<Session<'a>, BlkError> {
        let guest = ExportedGuest::new().map_err(BlkError::ExportGuest)?;
        let host_tsc = tsc::measure_host();
        let workdir = tempfile::Builder::new()
            .prefix("ringvm-bench-blk-")
            .tempdir_in(&options.dir)
            .map_err(|source| BlkError::WorkDir {
                dir: options.dir.clone(),
                source,
            })?;
        let image = workdir.path().join("disk.img");
        let fill_start = Instant::now();
        create_image(&image, options.image_bytes).map_err(|source| BlkError::CreateImage {
            path: image.clone(),
            len_bytes: options.image_bytes,
            source,
        })?;
        println!(
            "blk: image {} ({} bytes, filled in {:.1} s), page cache: {}",
            image.display(),
            options.image_bytes,
            fill_start.elapsed().as_secs_f64(),
            options.page_cache()
        );
        println!(
            "blk: guest {} vCPU, {GUEST_MEMORY}, completion={}; runtime {} s per run; \
             host TSC {} kHz; load average {load_start}",
            GUEST_CPUS,
            options.completion.name(),
            options.runtime_s,
            host_tsc.khz
        );
        for (name, plan) in [("host fio", &options.fio), ("ringvm+qsd", &options.qsd)] {
            if let ToolPlan::Skip(reason) = plan {
                println!("blk: {name} skipped: {reason}");
            }
        }

        Ok(Session {
            options,
            guest,
            workdir,
            image,
            host_tsc,
            size_based: false,
        })
    }

    /// How the guest's runs were timed, for the report.
    fn guest_timing(&self) -> &'static str {
        if self.size_based {
            "size: the guest could not read its TSC rate, so runs were sized by a probe and \
             its cycles converted with the host-measured TSC rate"
        } else {
            "runtime"
        }
    }
}

impl Session<'_> {
    fn run_case(&mut self, case: &Case) -> CaseReport {
        let load_before = load_average();
        let mut work = if self.size_based {
            match self.size_region(case) {
                Ok(region_bytes) => Work::Size { region_bytes },
                Err(failed) => {
                    return CaseReport::failed_probe(
                        *case,
                        self.options.runtime_s,
                        failed,
                        load_before,
                    )
                }
            }
        } else {
            Work::Runtime {
                seconds: self.options.runtime_s,
            }
        };
        let ringvm_blk = self.guest_run(&self.raw_target(Backend::RingvmBlk), case, &mut work);
        let qsd = match &self.options.qsd {
            ToolPlan::Run(_) => {
                RunSlot::done(self.guest_run(&self.raw_target(Backend::Qsd), case, &mut work))
            }
            ToolPlan::Skip(reason) => RunSlot::Skipped {
                skipped: reason.clone(),
            },
        };
        let fio = match &self.options.fio {
            ToolPlan::Run(fio) => RunSlot::done(self.fio_run(fio, case, work)),
            ToolPlan::Skip(reason) => RunSlot::Skipped {
                skipped: reason.clone(),
            },
        };
        CaseReport::new(
            *case,
            work,
            self.options.runtime_s,
            RunSlot::done(ringvm_blk),
            qsd,
            fio,
            LoadAverage {
                before: load_before,
                after: load_average(),
            },
        )
    }

    /// The raw-mode run of `backend`: the session's image, format from its
    /// header.
    fn raw_target(&self, backend: Backend) -> Target {
        Target {
            backend,
            image: self.image.clone(),
            format: None,
            label: backend.label(),
        }
    }

    /// A guest run; switches the session to `size=` runs when the guest
    /// refuses `runtime=`, and updates `work` for the rest of the case.
    fn guest_run(&mut self, target: &Target, case: &Case, work: &mut Work) -> RunRecord {
        loop {
            match self.guest_attempt(target, case, *work) {
                Ok(record) => return record,
                Err(RuntimeRefused) if !self.size_based => {
                    self.size_based = true;
                    eprintln!(
                        "blk: NOTE: the guest cannot time runtime= (it does not know its TSC \
                         rate): runs are sized by a probe and its cycles converted with the \
                         host's TSC rate ({} kHz, measured)",
                        self.host_tsc.khz
                    );
                    match self.size_region(case) {
                        Ok(region_bytes) => *work = Work::Size { region_bytes },
                        Err(failed) => return *failed,
                    }
                }
                Err(RuntimeRefused) => {
                    return RunRecord::failed(
                        target.label,
                        "the guest refused runtime= on a size= run".to_string(),
                    )
                }
            }
        }
    }

    /// The region for `size=` runs of `case`: what ringvm+ringvm-blk moves
    /// in `--runtime` seconds, from a probe run (see the module doc).
    fn size_region(&mut self, case: &Case) -> Result<u64, Box<RunRecord>> {
        let round = |bytes: u64| bytes / case.bs * case.bs;
        let probe_bytes = round(PROBE_REGION_BYTES.min(self.options.image_bytes));
        let work = Work::Size {
            region_bytes: probe_bytes,
        };
        let probe = match self.guest_attempt(&self.raw_target(Backend::RingvmBlk), case, work) {
            Ok(record) => record,
            Err(RuntimeRefused) => {
                return Err(Box::new(RunRecord::failed(
                    report::PROBE_LABEL,
                    "the guest refused runtime= on a size= run".to_string(),
                )))
            }
        };
        let Some(measurement) = probe.measurement.as_ref().filter(|_| probe.ok) else {
            let error = probe.error.clone().unwrap_or_default();
            return Err(Box::new(RunRecord::failed(
                report::PROBE_LABEL,
                format!("probe run failed: {error}"),
            )));
        };
        let per_job_bytes_per_sec = measurement.bytes_per_sec() / f64::from(case.queues);
        let wanted = per_job_bytes_per_sec * f64::from(self.options.runtime_s);
        let region = round((wanted as u64).clamp(probe_bytes, self.options.image_bytes));
        eprintln!(
            "blk: probe: {:.0} IOPS; size= region {} bytes",
            measurement.iops(),
            region
        );
        Ok(region)
    }

    fn guest_attempt(
        &self,
        target: &Target,
        case: &Case,
        work: Work,
    ) -> Result<RunRecord, RuntimeRefused> {
        let (backend, label) = (target.backend, target.label);
        let dir = self.workdir.path();
        let socket = dir.join(backend.socket());
        let _ = fs::remove_file(&socket);
        let backend_cmd = self.backend_command(target, case, &socket);
        let server = match Process::spawn(backend.process_name(), backend_cmd, dir) {
            Ok(process) => process,
            Err(err) => {
                return Ok(RunRecord::failed(
                    label,
                    format!("could not start {}: {err}", backend.process_name()),
                ))
            }
        };
        let listening = server.wait_for_socket(&socket, BACKEND_START_TIMEOUT);
        if !matches!(listening, Ok(true)) {
            let done = server.terminate(BACKEND_EXIT_TIMEOUT);
            let why = match (&listening, &done) {
                (Err(err), _) => format!("waiting for {}: {err}", socket.display()),
                (_, Ok(done)) => {
                    eprint!("{}", done.transcript());
                    format!(
                        "{} did not listen on {} ({})",
                        backend.process_name(),
                        socket.display(),
                        done.status
                    )
                }
                (_, Err(err)) => format!("reaping {}: {err}", backend.process_name()),
            };
            return Ok(RunRecord::failed(label, why));
        }

        let cmdline = case.guest_cmdline(work, self.options.completion);
        let vmm_cmd = commands::ringvm(
            &self.options.ringvm,
            &self.guest.path,
            &socket,
            case,
            &cmdline,
        );
        let vmm = Process::spawn("ringvm", vmm_cmd, dir);
        let vmm_done = vmm.and_then(|vmm| vmm.wait(self.run_timeout()));
        let server_done = match backend {
            // ringvm-blk exits 0 when its frontend disconnects.
            Backend::RingvmBlk => server.wait(BACKEND_EXIT_TIMEOUT),
            // qemu-storage-daemon serves until SIGTERM, then exits 0.
            Backend::Qsd => server.terminate(BACKEND_EXIT_TIMEOUT),
        };
        let (vmm_done, server_done) = match (vmm_done, server_done) {
            (Ok(vmm), Ok(server)) => (vmm, server),
            (Err(err), _) => return Ok(RunRecord::failed(label, format!("running ringvm: {err}"))),
            (_, Err(err)) => {
                return Ok(RunRecord::failed(
                    label,
                    format!("reaping {}: {err}", backend.process_name()),
                ))
            }
        };
        if parse::guest_failure(&vmm_done.stdout)
            .is_some_and(|line| line.contains(parse::GUEST_RUNTIME_REFUSED))
        {
            return Err(RuntimeRefused);
        }
        let record = self.guest_record(target, case, work, &vmm_done, &server_done);
        if !record.ok {
            eprintln!(
                "blk: {label} FAILED: {}",
                record.error.as_deref().unwrap_or("")
            );
            eprint!("{}{}", vmm_done.transcript(), server_done.transcript());
        } else if let Some(m) = &record.measurement {
            eprintln!(
                "blk: {label}: {:.0} IOPS, {:.1} MB/s over {:.2} s",
                m.iops(),
                m.bytes_per_sec() / 1e6,
                m.seconds
            );
        }
        Ok(record)
    }

    /// The record of a guest run that ended: what the guest measured, what
    /// each process cost, and whether anything went wrong.
    fn guest_record(
        &self,
        target: &Target,
        case: &Case,
        work: Work,
        vmm: &Finished,
        server: &Finished,
    ) -> RunRecord {
        let mut problems = Vec::new();
        if !vmm.exited_with(0) {
            problems.push(format!("ringvm {}, expected exit status 0", vmm.status));
        }
        if !server.exited_with(0) {
            problems.push(format!(
                "{} {}, expected exit status 0",
                server.name, server.status
            ));
        }
        if let Some(failure) = parse::guest_failure(&vmm.stdout) {
            problems.push(format!("the guest says `{failure}`"));
        }
        let (measurement, tsc, guest_result) = match parse::guest_result(&vmm.stdout) {
            Ok(result) => {
                if result.errors > 0 {
                    problems.push(format!("the guest counted {} I/O errors", result.errors));
                }
                problems.extend(mismatches(&result, case, work));
                let tsc = match (result.tsc_khz, &result.tsc_source) {
                    (Some(khz), source) => TscRate {
                        khz,
                        source: source.clone().unwrap_or_else(|| "guest".to_string()),
                    },
                    (None, _) => self.host_tsc.clone(),
                };
                let measurement = Measurement::from_guest(&result, &tsc);
                (Some(measurement), Some(tsc), Some(result))
            }
            Err(err) => {
                problems.push(err.to_string());
                (None, None, None)
            }
        };
        let ios = measurement.as_ref().map(Measurement::ios);
        let counters = match target.backend {
            Backend::RingvmBlk => parse::backend_counters(&server.stderr),
            Backend::Qsd => None,
        };
        let per_io = guest_result
            .as_ref()
            .and_then(|g| report::PerIo::of(g, counters.as_ref()));
        RunRecord {
            label: target.label,
            ok: problems.is_empty(),
            error: (!problems.is_empty()).then(|| problems.join("; ")),
            measurement,
            processes: vec![ProcessCost::of(vmm, ios), ProcessCost::of(server, ios)],
            tsc,
            per_io,
            guest: guest_result.map(|g| g.raw),
            backend_counters: counters,
            fio: None,
        }
    }

    fn fio_run(&self, fio: &Path, case: &Case, work: Work) -> RunRecord {
        let label = report::FIO_LABEL;
        let cmd = commands::fio(
            fio,
            &self.image,
            case,
            work,
            self.options.runtime_s,
            self.options.direct,
        );
        let done = Process::spawn("fio", cmd, self.workdir.path())
            .and_then(|process| process.wait(self.run_timeout()));
        let done = match done {
            Ok(done) => done,
            Err(err) => return RunRecord::failed(label, format!("running fio: {err}")),
        };
        let mut problems = Vec::new();
        if !done.exited_with(0) {
            problems.push(format!("fio {}, expected exit status 0", done.status));
        }
        let parsed = parse::fio_result(&done.stdout);
        let measurement = match &parsed {
            Ok(fio) => Some(Measurement::from_fio(fio)),
            Err(err) => {
                problems.push(err.to_string());
                None
            }
        };
        let ios = measurement.as_ref().map(Measurement::ios);
        let record = RunRecord {
            label,
            ok: problems.is_empty(),
            error: (!problems.is_empty()).then(|| problems.join("; ")),
            measurement,
            processes: vec![ProcessCost::of(&done, ios)],
            tsc: None,
            per_io: None,
            guest: None,
            backend_counters: None,
            fio: parsed.ok().map(|fio| fio.raw),
        };
        match (&record.error, &record.measurement) {
            (Some(error), _) => {
                eprintln!("blk: {label} FAILED: {error}");
                eprint!("{}", done.transcript());
            }
            (None, Some(m)) => eprintln!(
                "blk: {label}: {:.0} IOPS, {:.1} MB/s over {:.2} s",
                m.iops(),
                m.bytes_per_sec() / 1e6,
                m.seconds
            ),
            (None, None) => {}
        }
        record
    }

    fn run_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.options.runtime_s) * u64::from(RUN_TIMEOUT_FACTOR))
            + RUN_TIMEOUT_MARGIN
    }

    fn backend_command(&self, target: &Target, case: &Case, socket: &Path) -> Command {
        match target.backend {
            Backend::RingvmBlk => commands::ringvm_blk(
                &self.options.ringvm_blk,
                &target.image,
                target.format,
                socket,
                case,
                self.options.direct,
            ),
            Backend::Qsd => {
                let ToolPlan::Run(qsd) = &self.options.qsd else {
                    unreachable!("qsd runs are only made with ToolPlan::Run")
                };
                commands::qsd(
                    qsd,
                    &target.image,
                    target.format.unwrap_or(ImageFormat::Raw),
                    socket,
                    case,
                    self.options.direct,
                )
            }
        }
    }
}

/// Where the guest's result says it ran something else than was asked.
fn mismatches(result: &GuestResult, case: &Case, work: Work) -> Vec<String> {
    let (time_based, size) = match work {
        Work::Runtime { .. } => (true, None),
        Work::Size { region_bytes } => (false, Some(region_bytes)),
    };
    let checks = [
        ("rw", result.rw.clone(), case.rw.name().to_string()),
        ("bs", result.bs.to_string(), case.bs.to_string()),
        (
            "numjobs",
            result.numjobs.to_string(),
            case.queues.to_string(),
        ),
        (
            "iodepth",
            result.iodepth.to_string(),
            case.iodepth.to_string(),
        ),
        (
            "requests in flight per queue",
            result.queue_depth.to_string(),
            case.iodepth.to_string(),
        ),
        (
            "time_based",
            result.time_based.to_string(),
            time_based.to_string(),
        ),
        (
            "size",
            result.size.to_string(),
            size.map_or(result.size.to_string(), |s| s.to_string()),
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, got, wanted)| got != wanted)
        .map(|(what, got, wanted)| format!("the guest ran {what}={got}, asked for {wanted}"))
        .collect()
}

/// Allocates the image and writes every byte once, so that reads hit data
/// and writes never allocate.
fn create_image(path: &Path, len_bytes: u64) -> io::Result<()> {
    let mut file = File::create_new(path)?;
    let len = libc::off_t::try_from(len_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "image size too large"))?;
    // SAFETY: fallocate(2) on a file descriptor we own; it takes no pointers.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if ret != 0 {
        let err = io::Error::last_os_error();
        // A file system without fallocate still gets the write pass.
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(err);
        }
    }
    let mut chunk = vec![0u8; FILL_CHUNK_BYTES];
    let mut written = 0u64;
    while written < len_bytes {
        // Not zeros (which a backend could skip) and different per chunk.
        let seed = written / FILL_CHUNK_BYTES as u64 + 1;
        for (i, word) in chunk.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&(seed << 32 | i as u64).to_le_bytes());
        }
        let len = usize::try_from((len_bytes - written).min(FILL_CHUNK_BYTES as u64))
            .expect("a chunk fits in usize");
        file.write_all(&chunk[..len])?;
        written += len as u64;
    }
    file.sync_all()
}

/// The first three fields of /proc/loadavg.
pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|err| format!("unknown ({err})"))
}

/// Writes through a temporary file so that a reader never sees half a report.
fn write_json<T: serde::Serialize>(path: &Path, report: &T) -> Result<(), BlkError> {
    crate::json::write_atomic(path, report).map_err(|source| BlkError::WriteJson {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANDREAD: Case = Case {
        rw: Rw::Randread,
        bs: 4096,
        iodepth: 32,
        queues: 1,
        rwmixread: None,
    };

    fn options(direct: bool) -> BlkOptions {
        BlkOptions {
            cases: vec![RANDREAD],
            runtime_s: 10,
            image_bytes: 1 << 30,
            dir: PathBuf::from("/dev/shm"),
            direct,
            completion: Completion::Poll,
            json: PathBuf::from("r.json"),
            ringvm: PathBuf::from("ringvm"),
            ringvm_blk: PathBuf::from("ringvm-blk"),
            fio: ToolPlan::Run(PathBuf::from("fio")),
            qsd: ToolPlan::Skip("--no-qsd".to_string()),
            format: ImageFormat::Raw,
            qemu_img: None,
        }
    }

    #[test]
    fn guest_result_must_match_the_request() {
        let stdout = "testguest: result {\"rw\":\"randread\",\"bs\":4096,\"iodepth\":32,\
            \"numjobs\":1,\"size\":1073741824,\"time_based\":true,\"elapsed_cycles\":1,\
            \"read\":{\"ios\":1,\"bytes\":4096,\"iops\":1,\"bytes_per_sec\":1,\"lat_ns\":null},\
            \"write\":{\"ios\":0,\"bytes\":0,\"iops\":0,\"bytes_per_sec\":0,\"lat_ns\":null},\
            \"errors\":0,\"notifies\":1,\"interrupts\":0,\"queue_depth\":16,\
            \"tsc_khz\":1,\"tsc_source\":\"cpuid\"}";
        let result = parse::guest_result(stdout).unwrap();
        assert_eq!(
            mismatches(&result, &RANDREAD, Work::Runtime { seconds: 10 }),
            ["the guest ran requests in flight per queue=16, asked for 32"]
        );
        let write = Case {
            rw: Rw::Randwrite,
            ..RANDREAD
        };
        assert_eq!(
            mismatches(&result, &write, Work::Size { region_bytes: 4096 }),
            [
                "the guest ran rw=randread, asked for randwrite",
                "the guest ran requests in flight per queue=16, asked for 32",
                "the guest ran time_based=true, asked for false",
                "the guest ran size=1073741824, asked for 4096",
            ]
        );
    }

    #[test]
    fn image_is_filled_with_nonzero_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let len_bytes = 3 * FILL_CHUNK_BYTES as u64 + 4096;
        create_image(&path, len_bytes).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len_bytes);
        // Every 4k block holds data, and chunks differ.
        assert!(bytes
            .chunks(4096)
            .all(|block| block.iter().any(|&b| b != 0)));
        assert_ne!(
            bytes[..4096],
            bytes[FILL_CHUNK_BYTES..FILL_CHUNK_BYTES + 4096]
        );
        let err = create_image(&path, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn page_cache_mode_is_named_for_all_three() {
        assert!(options(false).page_cache().starts_with("buffered"));
        assert!(options(true).page_cache().contains("cache.direct=on"));
    }
}
