//! `ringvm-bench blk --format qcow2`: ringvm-blk serving qcow2 images, side
//! by side with ringvm-blk serving raw images and with qemu-storage-daemon's
//! qcow2 driver (`aio=io_uring`), with the same guest job and the same
//! settings (block size, iodepth, queues, runtime, page cache).
//!
//! Four cases, in this order:
//!
//! - warm randwrite, warm randread: every cluster of the qcow2 image is
//!   allocated before the runs (`qemu-img convert` of the filled raw image,
//!   so the qcow2 holds the same bytes, not timed); the raw run uses the
//!   filled raw image. One warm qcow2 serves both backends, as one raw image
//!   serves every run of the raw benchmark: writes to allocated clusters
//!   keep it fully allocated.
//! - cold randwrite, cold randread: every run gets a fresh image, a thin
//!   qcow2 from `qemu-img create -o cluster_size=64K` (for the raw run, a
//!   sparse file of the same size), so writes allocate and reads hit
//!   unallocated clusters. The cold images are large enough that a write
//!   seldom lands in a cluster an earlier write allocated (see
//!   [`cold_virtual_bytes`]), and the report says how many writes did
//!   allocate: qemu-img check's allocated clusters over the guest's writes.
//!
//! After every run on a qcow2 image, `qemu-img check` must find no corruption
//! (else the run fails; leaks are reported only), and every run records its
//! image's allocated bytes (st_blocks * 512). Cold images are removed after
//! their run. Host fio does not run: it would see the qcow2 file, not the
//! disk in it.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringvm_tests::harness::{self, ExitOutcome};
use serde_json::Value;

use super::qcow2_report::{
    ImageUsage, Qcow2Case, Qcow2CaseReport, Qcow2Check, Qcow2Report, Qcow2Run, Warmth,
};
use super::report::{LoadAverage, RunSlot, Tools};
use super::{
    commands, load_average, write_json, Backend, BlkError, BlkOptions, ImageFormat, Session,
    Target, ToolPlan, Work,
};
use crate::host::HostInfo;

/// The qcow2 cluster size of every image: QEMU's default.
pub const CLUSTER_BYTES: u64 = 64 << 10;
/// Clusters in a cold image per write the run is expected to make. With
/// uniform offsets a write lands in an allocated cluster with the allocated
/// fraction as probability: at most 1/16 at the end of the run, about 3% on
/// average.
const COLD_CLUSTERS_PER_WRITE: u64 = 16;
/// A cold run may move more than the fastest warm randwrite (a sparse raw
/// file has nothing to read back); the expected writes allow for twice that.
const COLD_RATE_SLACK: f64 = 2.0;
/// Cold images are sized in whole GiB.
const COLD_SIZE_STEP_BYTES: u64 = 1 << 30;
/// Cold images are thin, so their virtual size costs only the qcow2 tables
/// (an L1 entry per 512 MiB with 64 KiB clusters: 64 KiB of L1 at 4 TiB).
const MAX_COLD_VIRTUAL_BYTES: u64 = 4 << 40;
/// Bound on each qemu-img command (converting --size bytes in tmpfs).
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(600);
/// Goals printed beside the ratios (the benchmark never fails on them).
pub const WARM_GOAL_QCOW2_OVER_RAW: f64 = 0.9;
pub const COLD_WRITE_GOAL_BLK_OVER_QSD: f64 = 1.5;

pub const BLK_QCOW2_LABEL: &str = "ringvm-blk qcow2";
pub const BLK_RAW_LABEL: &str = "ringvm-blk raw";
pub const QSD_QCOW2_LABEL: &str = "qsd qcow2";

pub fn run(options: &BlkOptions) -> Result<Qcow2Report, BlkError> {
    let qemu_img = options.qemu_img.clone().ok_or(BlkError::NoQemuImg)?;
    let load_start = load_average();
    let mut session = Session::open(options, &load_start)?;
    let warm_path = session.workdir.path().join("warm.qcow2");
    let started = Instant::now();
    let convert = commands::qemu_img_convert(&qemu_img, &session.image, &warm_path, CLUSTER_BYTES);
    run_qemu_img(convert).map_err(|detail| BlkError::WarmImage {
        path: warm_path.clone(),
        detail,
    })?;
    let warm_image = image_usage(
        &qemu_img,
        &warm_path,
        ImageFormat::Qcow2,
        options.image_bytes,
    );
    println!(
        "blk: warm qcow2 {} (qemu-img convert of the raw image in {:.1} s): {}",
        warm_path.display(),
        started.elapsed().as_secs_f64(),
        warm_image.summary()
    );
    if let Some(problem) = warm_image.problem() {
        return Err(BlkError::WarmImage {
            path: warm_path,
            detail: problem,
        });
    }

    let cases = Qcow2Case::all(options.cases[0]);
    let mut reports: Vec<Qcow2CaseReport> = Vec::new();
    let mut cold_bytes = None;
    for (index, case) in cases.iter().enumerate() {
        eprintln!("blk: case {}/{}: {}", index + 1, cases.len(), case.label());
        let virtual_bytes = match case.warmth {
            Warmth::Warm => options.image_bytes,
            Warmth::Cold => *cold_bytes.get_or_insert_with(|| {
                let bytes = cold_virtual_bytes(
                    options.image_bytes,
                    options.runtime_s,
                    fastest_warm_write_iops(&reports),
                );
                eprintln!("blk: cold images: {bytes} bytes virtual, thin");
                bytes
            }),
        };
        let report = session.run_qcow2_case(&qemu_img, case, &warm_path, virtual_bytes);
        println!();
        print!("{}", report.table());
        reports.push(report);
    }

    let report = Qcow2Report {
        format: ImageFormat::Qcow2,
        cluster_bytes: CLUSTER_BYTES,
        runtime_s: options.runtime_s,
        image_bytes: options.image_bytes,
        cold_virtual_bytes: cold_bytes,
        image_dir: options.dir.clone(),
        page_cache: options.page_cache(),
        direct: options.direct,
        completion: options.completion,
        guest_memory: commands::GUEST_MEMORY,
        guest_cpus: commands::GUEST_CPUS,
        guest_timing: session.guest_timing(),
        host_tsc: session.host_tsc.clone(),
        tools: Tools::probe(options),
        qemu_img,
        host: HostInfo::probe(None),
        load_average_start: load_start,
        load_average_end: load_average(),
        warm_image,
        cases: reports,
    };
    println!();
    print!("{}", report.summary_table());
    println!();
    println!("{}", report.footer());
    write_json(&options.json, &report)?;
    println!("JSON report: {}", options.json.display());
    Ok(report)
}

/// The virtual size of the cold images: room for [`COLD_CLUSTERS_PER_WRITE`]
/// clusters per write the run is expected to make (the fastest warm
/// randwrite rate, with slack, over the runtime), at least `image_bytes`,
/// at most [`MAX_COLD_VIRTUAL_BYTES`] (also when no warm rate is known).
pub fn cold_virtual_bytes(image_bytes: u64, runtime_s: u32, warm_write_iops: Option<f64>) -> u64 {
    let Some(iops) = warm_write_iops.filter(|iops| *iops > 0.0) else {
        return MAX_COLD_VIRTUAL_BYTES.max(image_bytes);
    };
    let writes = (iops * COLD_RATE_SLACK * f64::from(runtime_s)).ceil() as u64;
    let wanted = writes
        .saturating_mul(COLD_CLUSTERS_PER_WRITE)
        .saturating_mul(CLUSTER_BYTES);
    let rounded = wanted
        .div_ceil(COLD_SIZE_STEP_BYTES)
        .saturating_mul(COLD_SIZE_STEP_BYTES);
    rounded.min(MAX_COLD_VIRTUAL_BYTES).max(image_bytes)
}

/// The highest IOPS of the warm randwrite runs that succeeded.
fn fastest_warm_write_iops(reports: &[Qcow2CaseReport]) -> Option<f64> {
    reports
        .iter()
        .filter(|r| r.warmth == Warmth::Warm && r.case.rw == super::Rw::Randwrite)
        .flat_map(|r| [&r.blk_qcow2.run, &r.blk_raw.run, &r.qsd_qcow2.run])
        .filter_map(|slot| slot.ok_measurement().map(|m| m.iops()))
        .reduce(f64::max)
}

impl Session<'_> {
    fn run_qcow2_case(
        &mut self,
        qemu_img: &Path,
        case: &Qcow2Case,
        warm_path: &Path,
        virtual_bytes: u64,
    ) -> Qcow2CaseReport {
        let load_before = load_average();
        let mut work = if self.size_based {
            match self.size_region(&case.case) {
                Ok(region_bytes) => Work::Size { region_bytes },
                Err(failed) => {
                    return Qcow2CaseReport::failed_probe(
                        *case,
                        self.options.runtime_s,
                        virtual_bytes,
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
        let plans = [
            (Backend::RingvmBlk, ImageFormat::Qcow2, BLK_QCOW2_LABEL),
            (Backend::RingvmBlk, ImageFormat::Raw, BLK_RAW_LABEL),
            (Backend::Qsd, ImageFormat::Qcow2, QSD_QCOW2_LABEL),
        ];
        let mut runs = Vec::new();
        for (backend, format, label) in plans {
            if let (Backend::Qsd, ToolPlan::Skip(reason)) = (backend, &self.options.qsd) {
                runs.push(Qcow2Run::skipped(reason.clone()));
                continue;
            }
            let image = match (case.warmth, format) {
                (Warmth::Warm, ImageFormat::Qcow2) => Ok(warm_path.to_path_buf()),
                (Warmth::Warm, ImageFormat::Raw) => Ok(self.image.clone()),
                (Warmth::Cold, _) => self.fresh_image(qemu_img, format, virtual_bytes),
            };
            let image = match image {
                Ok(image) => image,
                Err(error) => {
                    let error = format!("preparing the cold {} image: {error}", format.name());
                    eprintln!("blk: {label} FAILED: {error}");
                    runs.push(Qcow2Run::failed(label, error));
                    continue;
                }
            };
            let target = Target {
                backend,
                image: image.clone(),
                format: Some(format),
                label,
            };
            let mut record = self.guest_run(&target, &case.case, &mut work);
            let usage = image_usage(qemu_img, &image, format, virtual_bytes);
            if let Some(problem) = usage.problem() {
                eprintln!("blk: {label} FAILED: {problem}");
                record.ok = false;
                record.error = Some(match record.error.take() {
                    Some(earlier) => format!("{earlier}; {problem}"),
                    None => problem,
                });
            }
            if case.warmth == Warmth::Cold {
                // Cold images live in tmpfs: give the memory back.
                if let Err(err) = fs::remove_file(&image) {
                    eprintln!("blk: removing {}: {err}", image.display());
                }
            }
            runs.push(Qcow2Run {
                run: RunSlot::done(record),
                image: Some(usage),
                allocating_writes: None,
            });
        }
        let [blk_qcow2, blk_raw, qsd_qcow2]: [Qcow2Run; 3] = runs
            .try_into()
            .unwrap_or_else(|_| unreachable!("one run per plan"));
        Qcow2CaseReport::new(
            *case,
            Some(work),
            self.options.runtime_s,
            virtual_bytes,
            blk_qcow2,
            blk_raw,
            qsd_qcow2,
            LoadAverage {
                before: load_before,
                after: load_average(),
            },
        )
    }

    /// A new cold image in the working directory: a thin qcow2, or a sparse
    /// raw file, of `virtual_bytes`.
    fn fresh_image(
        &self,
        qemu_img: &Path,
        format: ImageFormat,
        virtual_bytes: u64,
    ) -> Result<PathBuf, String> {
        let path = self.workdir.path().join(format!("cold.{}", format.name()));
        let _ = fs::remove_file(&path);
        match format {
            ImageFormat::Qcow2 => run_qemu_img(commands::qemu_img_create(
                qemu_img,
                &path,
                virtual_bytes,
                CLUSTER_BYTES,
            ))?,
            ImageFormat::Raw => File::create_new(&path)
                .and_then(|file| file.set_len(virtual_bytes))
                .map_err(|err| format!("creating {}: {err}", path.display()))?,
        }
        Ok(path)
    }
}

/// Runs a qemu-img command to its end; its output when it failed.
fn run_qemu_img(cmd: std::process::Command) -> Result<(), String> {
    let line = harness::command_line(&cmd);
    let out = harness::run_bounded(cmd, QEMU_IMG_TIMEOUT, None)
        .map_err(|err| format!("running `{line}`: {err}"))?;
    if out.status == ExitOutcome::Exited(0) {
        Ok(())
    } else {
        Err(format!(
            "`{line}` {}: {}{}",
            out.status,
            out.stdout.trim(),
            out.stderr.trim()
        ))
    }
}

/// The image's allocated bytes and, for qcow2, `qemu-img check`'s verdict.
fn image_usage(
    qemu_img: &Path,
    image: &Path,
    format: ImageFormat,
    virtual_bytes: u64,
) -> ImageUsage {
    let allocated = fs::metadata(image)
        .map(|meta| meta.blocks() * 512)
        .map_err(|err| format!("stat {}: {err}", image.display()));
    let check = (format == ImageFormat::Qcow2).then(|| qcow2_check(qemu_img, image));
    ImageUsage {
        file: image
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format,
        virtual_bytes,
        allocated_bytes: allocated.as_ref().ok().copied(),
        stat_error: allocated.err(),
        check,
    }
}

fn qcow2_check(qemu_img: &Path, image: &Path) -> Qcow2Check {
    let cmd = commands::qemu_img_check(qemu_img, image);
    let line = harness::command_line(&cmd);
    match harness::run_bounded(cmd, QEMU_IMG_TIMEOUT, None) {
        Ok(out) => Qcow2Check::from_output(&out.status, &out.stdout, &out.stderr),
        Err(err) => Qcow2Check {
            status: format!("could not run `{line}`: {err}"),
            exit_code: None,
            report: Value::Null,
            stderr: String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_images_hold_sixteen_clusters_per_expected_write() {
        // 10000 IOPS x 2 (slack) x 10 s = 200000 writes x 16 x 64 KiB
        // = 195.3 GiB, rounded up to 196 GiB.
        assert_eq!(cold_virtual_bytes(1 << 30, 10, Some(10_000.0)), 196 << 30);
        // Never below the warm image.
        assert_eq!(cold_virtual_bytes(8 << 30, 1, Some(10.0)), 8 << 30);
        // Capped, and the cap without a rate.
        assert_eq!(
            cold_virtual_bytes(1 << 30, 3600, Some(1e6)),
            MAX_COLD_VIRTUAL_BYTES
        );
        assert_eq!(
            cold_virtual_bytes(1 << 30, 10, None),
            MAX_COLD_VIRTUAL_BYTES
        );
        assert_eq!(
            cold_virtual_bytes(1 << 30, 10, Some(0.0)),
            MAX_COLD_VIRTUAL_BYTES
        );
    }

    #[test]
    fn fresh_images_are_thin_and_checked() {
        let Some(qemu_img) = harness::find_on_path("qemu-img") else {
            eprintln!("SKIPPED: qemu-img not on PATH");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        run_qemu_img(commands::qemu_img_create(
            &qemu_img,
            &path,
            1 << 40,
            CLUSTER_BYTES,
        ))
        .unwrap();
        let usage = image_usage(&qemu_img, &path, ImageFormat::Qcow2, 1 << 40);
        assert_eq!(usage.problem(), None, "{usage:?}");
        let check = usage.check.as_ref().unwrap();
        assert_eq!(check.allocated_clusters(), Some(0));
        assert_eq!(check.total_clusters(), Some((1 << 40) / CLUSTER_BYTES));
        assert!(usage.allocated_bytes.unwrap() < 1 << 20, "{usage:?}");

        // A file that is not qcow2 fails the check, and says so.
        let raw = dir.path().join("r.img");
        fs::write(&raw, vec![1u8; 1 << 16]).unwrap();
        let usage = image_usage(&qemu_img, &raw, ImageFormat::Qcow2, 1 << 16);
        let problem = usage.problem().unwrap();
        assert!(problem.contains("qemu-img check"), "{problem}");
        let err = run_qemu_img(commands::qemu_img_create(
            &qemu_img,
            &dir.path().join("no/such/dir.qcow2"),
            1 << 20,
            CLUSTER_BYTES,
        ))
        .unwrap_err();
        assert!(err.contains("qemu-img create"), "{err}");
    }
}
