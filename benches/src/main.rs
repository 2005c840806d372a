//! `ringvm-bench`: measures ringvm and its baselines side by side in one run
//! and prints the numbers; it never fails on speed, only when a run did not
//! do what it should.

mod blk;
mod boot;
mod guest;
mod host;
mod json;
mod net;
mod process;
mod quickstart;
mod stats;
mod tsc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ringvm_tests::harness;

#[derive(Debug, Parser)]
#[command(name = "ringvm-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Write the test guest ELF to PATH.
    ExportGuest {
        /// Where to write the ELF.
        path: PathBuf,
    },
    /// Boot the test guest once under ringvm (job=hello), show its serial
    /// console and report exit status, wall time and peak RSS.
    Quickstart {
        /// The ringvm binary (default: the one built beside ringvm-bench).
        #[arg(long, value_name = "PATH")]
        ringvm: Option<PathBuf>,
    },
    /// Boot time and peak RSS of ringvm vs QEMU booting the same test guest.
    Boot(BootArgs),
    /// Storage: the test guest's fio-like job through ringvm + ringvm-blk, vs
    /// the same through ringvm + qemu-storage-daemon, vs host fio, on one
    /// image in tmpfs.
    Blk(BlkArgs),
    /// Network: packets/s (64 B) and Gbit/s (1500 B, 64 KiB TSO), guest to
    /// host and host to guest, through ringvm + ringvm-net vs QEMU's
    /// virtio-net vs the tap's own ceiling, in a network namespace of its
    /// own (needs root and /dev/net/tun).
    Net(NetArgs),
}

#[derive(Debug, Args)]
struct NetArgs {
    /// Seconds per run (each case runs once per VMM and once for the
    /// ceiling).
    #[arg(long, default_value_t = 3, value_name = "SECONDS",
          value_parser = clap::value_parser!(u32).range(1..=600))]
    runtime: u32,
    /// The cases: comma-separated SIZE or SIZE-DIR, SIZE one of 64, 1500,
    /// tso and DIR tx (guest to host) or rx (host to guest); SIZE alone is
    /// both directions.
    #[arg(long, value_name = "LIST", default_value = "64,1500,tso")]
    cases: net::CaseList,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH", default_value = "ringvm-bench-net.json")]
    json: PathBuf,
    /// Leave out the QEMU runs.
    #[arg(long)]
    no_qemu: bool,
    /// Leave out the tap ceiling.
    #[arg(long)]
    no_ceiling: bool,
    /// The ringvm binary (default: the one built beside ringvm-bench).
    #[arg(long, value_name = "PATH")]
    ringvm: Option<PathBuf>,
    /// The ringvm-net binary (default: the one built beside ringvm-bench).
    #[arg(long, value_name = "PATH")]
    ringvm_net: Option<PathBuf>,
    /// The QEMU binary (default: qemu-system-x86_64 on PATH).
    #[arg(long, value_name = "PATH", conflicts_with = "no_qemu")]
    qemu: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BlkArgs {
    /// The workload (fio's rw=).
    #[arg(
        long,
        value_enum,
        default_value = "randread",
        conflicts_with_all = ["matrix", "format"]
    )]
    rw: blk::Rw,
    /// Block size: bytes, or with k/M suffix (powers of 1024): 4k, 64k, 1M.
    #[arg(long, default_value = "4k", value_parser = parse_bs, conflicts_with = "matrix")]
    bs: u64,
    /// Requests in flight per queue (fio's iodepth=).
    #[arg(long, default_value_t = 32, value_name = "N", conflicts_with = "matrix",
          value_parser = clap::value_parser!(u32).range(1..=MAX_IODEPTH))]
    iodepth: u32,
    /// Queues: guest jobs = virtqueues = backend queues = host fio jobs.
    #[arg(long, default_value_t = 1, value_name = "N", conflicts_with = "matrix",
          value_parser = clap::value_parser!(u32).range(1..=MAX_QUEUES))]
    queues: u32,
    /// Percent of reads, for --rw randrw (default 50).
    #[arg(long, value_name = "PCT", conflicts_with_all = ["matrix", "format"],
          value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmixread: Option<u32>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    runtime: u32,
    /// Image size (created in --dir, filled once, removed at the end).
    #[arg(long, default_value = "1G", value_parser = parse_image_size)]
    size: u64,
    /// How the guest sees completions: poll the used rings, or MSI-X.
    #[arg(long, value_enum, default_value = "poll")]
    completion: blk::Completion,
    /// O_DIRECT for all three (ringvm-blk --direct, qsd cache.direct=on,
    /// fio --direct=1); default: the page cache for all three.
    #[arg(long)]
    direct: bool,
    /// Directory for the image and sockets (tmpfs keeps the disk out).
    #[arg(long, default_value = "/dev/shm", value_name = "DIR")]
    dir: PathBuf,
    /// Run the report's cases: 4k randread and randwrite at iodepth 1, 32,
    /// 128 with 1 and 2 queues, then 1M read and write at iodepth 8.
    #[arg(long, conflicts_with = "format")]
    matrix: bool,
    /// raw: the cases above. qcow2: warm and cold randwrite and randread
    /// (--bs, --iodepth, --queues) through ringvm-blk on qcow2, ringvm-blk on
    /// raw and qemu-storage-daemon on qcow2; no host fio.
    #[arg(long, value_enum, default_value = "raw")]
    format: blk::ImageFormat,
    /// The qemu-img binary, for --format qcow2 (default: on PATH).
    #[arg(long, value_name = "PATH")]
    qemu_img: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH", default_value = "ringvm-bench-blk.json")]
    json: PathBuf,
    /// Leave out the ringvm + qemu-storage-daemon run.
    #[arg(long)]
    no_qsd: bool,
    /// Leave out the host fio run.
    #[arg(long)]
    no_fio: bool,
    /// The ringvm binary (default: the one built beside ringvm-bench).
    #[arg(long, value_name = "PATH")]
    ringvm: Option<PathBuf>,
    /// The ringvm-blk binary (default: the one built beside ringvm-bench).
    #[arg(long, value_name = "PATH")]
    ringvm_blk: Option<PathBuf>,
    /// The fio binary (default: fio on PATH).
    #[arg(long, value_name = "PATH", conflicts_with = "no_fio")]
    fio: Option<PathBuf>,
    /// The qemu-storage-daemon binary (default: on PATH).
    #[arg(long, value_name = "PATH", conflicts_with = "no_qsd")]
    qsd: Option<PathBuf>,
}

/// The guest's queues are up to 64, as are ringvm-blk's.
const MAX_QUEUES: i64 = 64;
/// Keeps the queue (3 descriptors per request) at most 4096 entries.
const MAX_IODEPTH: i64 = 1024;
/// The guest job's largest block.
const MAX_BS: u64 = 16 << 20;

/// Bytes: a number with an optional k/M/G suffix (powers of 1024, `K`/`KiB`
/// spelled either way), as fio reads them.
fn parse_bytes(text: &str) -> Option<u64> {
    let lower = text.to_ascii_lowercase();
    let trimmed = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .filter(|rest| rest.ends_with(['k', 'm', 'g']))
        .unwrap_or(&lower);
    let (digits, shift) = match trimmed.as_bytes().last()? {
        b'k' => (&trimmed[..trimmed.len() - 1], 10),
        b'm' => (&trimmed[..trimmed.len() - 1], 20),
        b'g' => (&trimmed[..trimmed.len() - 1], 30),
        _ => (trimmed, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_bs(text: &str) -> Result<u64, String> {
    parse_bytes(text)
        .filter(|&bs| bs > 0 && bs % 512 == 0 && bs <= MAX_BS)
        .ok_or_else(|| {
            format!("expected a multiple of 512 bytes up to 16M, e.g. 4k, 64k, 1M; got `{text}`")
        })
}

fn parse_image_size(text: &str) -> Result<u64, String> {
    parse_bytes(text)
        .filter(|&size| size >= 1 << 20 && size % 4096 == 0)
        .ok_or_else(|| {
            format!("expected at least 1M and a multiple of 4k, e.g. 256M, 1G; got `{text}`")
        })
}

#[derive(Debug, Args)]
struct BootArgs {
    /// ringvm boots to measure.
    #[arg(long, default_value_t = 5, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// QEMU boots to measure (each takes seconds: QEMU runs its firmware).
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    qemu_runs: u32,
    /// The ringvm binary (default: the one built beside ringvm-bench).
    #[arg(long, value_name = "PATH")]
    ringvm: Option<PathBuf>,
    /// The QEMU binary (default: qemu-system-x86_64 on PATH).
    #[arg(long, value_name = "PATH", conflicts_with = "no_qemu")]
    qemu: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH", default_value = "ringvm-bench-boot.json")]
    json: PathBuf,
    /// Measure ringvm only.
    #[arg(long)]
    no_qemu: bool,
}

fn ringvm_binary(explicit: Option<PathBuf>) -> Result<PathBuf> {
    match explicit {
        Some(path) => Ok(path),
        None => {
            harness::try_binary("ringvm").context("finding the ringvm binary (or pass --ringvm)")
        }
    }
}

fn boot_options(args: BootArgs) -> Result<boot::BootOptions> {
    let qemu = if args.no_qemu {
        boot::QemuPlan::Skip {
            reason: "--no-qemu".to_string(),
        }
    } else {
        match args.qemu.or_else(harness::qemu_path) {
            Some(path) => boot::QemuPlan::Run {
                path,
                runs: args.qemu_runs,
            },
            None => boot::QemuPlan::Skip {
                reason: "qemu-system-x86_64 not found on PATH (pass --qemu)".to_string(),
            },
        }
    };
    Ok(boot::BootOptions {
        ringvm: ringvm_binary(args.ringvm)?,
        ringvm_runs: args.runs,
        qemu,
        json: args.json,
    })
}

/// A baseline tool: the explicit path, else `name` on PATH, else skipped
/// with the reason.
fn tool_plan(skip: bool, flag: &str, explicit: Option<PathBuf>, name: &str) -> blk::ToolPlan {
    if skip {
        return blk::ToolPlan::Skip(format!("--no-{flag}"));
    }
    match explicit.or_else(|| harness::find_on_path(name)) {
        Some(path) => blk::ToolPlan::Run(path),
        None => blk::ToolPlan::Skip(format!(
            "{name} not found on PATH (install it, or pass --{flag} PATH)"
        )),
    }
}

fn blk_options(args: BlkArgs) -> Result<blk::BlkOptions> {
    let cases = if args.matrix {
        blk::Case::matrix()
    } else {
        if args.rwmixread.is_some() && args.rw != blk::Rw::Randrw {
            bail!(
                "--rwmixread {}: applies to --rw randrw only (got --rw {})",
                args.rwmixread.unwrap_or_default(),
                args.rw.name()
            );
        }
        vec![blk::Case {
            rw: args.rw,
            bs: args.bs,
            iodepth: args.iodepth,
            queues: args.queues,
            rwmixread: args.rw.is_mixed().then(|| args.rwmixread.unwrap_or(50)),
        }]
    };
    if let Some(case) = cases.iter().find(|case| case.bs > args.size) {
        bail!(
            "--size {}: smaller than the block size {} of `{}`",
            args.size,
            case.bs,
            case.label()
        );
    }
    // ringvm's --disk and qemu-storage-daemon's options are comma-separated.
    if args.dir.to_string_lossy().contains(',') {
        bail!(
            "--dir {}: a path with a comma cannot be passed in ringvm's --disk socket=;              choose another directory",
            args.dir.display()
        );
    }
    let qcow2 = args.format == blk::ImageFormat::Qcow2;
    let qemu_img = if qcow2 {
        let found = args.qemu_img.or_else(|| harness::find_on_path("qemu-img"));
        Some(found.context(
            "--format qcow2: qemu-img not found on PATH (install qemu-utils, or pass --qemu-img)",
        )?)
    } else {
        None
    };
    let fio = if qcow2 {
        blk::ToolPlan::Skip(
            "not run with --format qcow2 (fio would see the qcow2 file, not the disk in it)"
                .to_string(),
        )
    } else {
        tool_plan(args.no_fio, "fio", args.fio, "fio")
    };
    let ringvm_blk = match args.ringvm_blk {
        Some(path) => path,
        None => harness::try_binary("ringvm-blk")
            .context("finding the ringvm-blk binary (or pass --ringvm-blk)")?,
    };
    Ok(blk::BlkOptions {
        cases,
        runtime_s: args.runtime,
        image_bytes: args.size,
        dir: args.dir,
        direct: args.direct,
        completion: args.completion,
        json: args.json,
        ringvm: ringvm_binary(args.ringvm)?,
        ringvm_blk,
        fio,
        qsd: tool_plan(args.no_qsd, "qsd", args.qsd, "qemu-storage-daemon"),
        format: args.format,
        qemu_img,
    })
}

fn net_options(args: NetArgs) -> Result<net::NetOptions> {
    let qemu = if args.no_qemu {
        net::QemuPlan::Skip("--no-qemu".to_string())
    } else {
        match args.qemu.or_else(harness::qemu_path) {
            Some(path) => net::QemuPlan::Run(path),
            None => net::QemuPlan::Skip(
                "qemu-system-x86_64 not found on PATH (install it, or pass --qemu PATH)"
                    .to_string(),
            ),
        }
    };
    if args.cases.0.is_empty() {
        bail!("--cases: no case selected");
    }
    let ringvm_net = match args.ringvm_net {
        Some(path) => path,
        None => harness::try_binary("ringvm-net")
            .context("finding the ringvm-net binary (or pass --ringvm-net)")?,
    };
    Ok(net::NetOptions {
        cases: args.cases.0,
        runtime_s: args.runtime,
        json: args.json,
        ringvm: ringvm_binary(args.ringvm)?,
        ringvm_net,
        qemu,
        ceiling: !args.no_ceiling,
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        BenchCommand::ExportGuest { path } => {
            harness::write_guest_elf(&path)
                .with_context(|| format!("writing the test guest to {}", path.display()))?;
            let len_bytes = path.metadata()?.len();
            println!("{} ({len_bytes} bytes)", path.display());
        }
        BenchCommand::Quickstart { ringvm } => {
            quickstart::run(&ringvm_binary(ringvm)?).context("quickstart failed")?;
        }
        BenchCommand::Boot(args) => {
            let report = boot::run(&boot_options(args)?)?;
            if !report.all_ok() {
                bail!("some boots failed (listed above); their times are not in the report");
            }
        }
        BenchCommand::Blk(args) => {
            let options = blk_options(args)?;
            let all_ok = match options.format {
                blk::ImageFormat::Raw => blk::run(&options)?.all_ok(),
                blk::ImageFormat::Qcow2 => blk::qcow2::run(&options)?.all_ok(),
            };
            if !all_ok {
                bail!("some runs failed (listed above; their output was printed to stderr)");
            }
        }
        BenchCommand::Net(args) => {
            let options = net_options(args)?;
            net::check_privileges().context("ringvm-bench net")?;
            if !net::run(&options)?.all_ok() {
                bail!("some runs failed (listed above; their output was printed to stderr)");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ringvm-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn boot_defaults() {
        let cli = Cli::try_parse_from(["ringvm-bench", "boot"]).unwrap();
        let BenchCommand::Boot(args) = cli.command else {
            panic!("parsed as {cli:?}")
        };
        assert_eq!((args.runs, args.qemu_runs), (5, 3));
        assert_eq!(args.json, PathBuf::from("ringvm-bench-boot.json"));
        assert!(!args.no_qemu);
    }

    #[test]
    fn no_qemu_excludes_qemu_and_skips_with_a_reason() {
        let err = Cli::try_parse_from([
            "ringvm-bench",
            "boot",
            "--no-qemu",
            "--qemu",
            "/usr/bin/qemu",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let cli =
            Cli::try_parse_from(["ringvm-bench", "boot", "--no-qemu", "--ringvm", "/x/ringvm"])
                .unwrap();
        let BenchCommand::Boot(args) = cli.command else {
            panic!("parsed as {cli:?}")
        };
        let options = boot_options(args).unwrap();
        assert!(matches!(options.qemu, boot::QemuPlan::Skip { reason } if reason == "--no-qemu"));
    }

    #[test]
    fn zero_runs_is_rejected() {
        let err = Cli::try_parse_from(["ringvm-bench", "boot", "--runs", "0"]).unwrap_err();
        assert!(err.to_string().contains("--runs"), "{err}");
    }

    fn blk_args(args: &[&str]) -> Result<BlkArgs, clap::Error> {
        let cli = Cli::try_parse_from(["ringvm-bench", "blk"].iter().chain(args))?;
        let BenchCommand::Blk(args) = cli.command else {
            panic!("parsed as {cli:?}")
        };
        Ok(args)
    }

    #[test]
    fn blk_defaults_are_the_issues_example() {
        let args = blk_args(&[]).unwrap();
        assert_eq!(args.rw, blk::Rw::Randread);
        assert_eq!(
            (args.bs, args.iodepth, args.queues, args.runtime),
            (4096, 32, 1, 10)
        );
        assert_eq!(args.size, 1 << 30);
        assert_eq!(args.completion, blk::Completion::Poll);
        assert_eq!(args.dir, PathBuf::from("/dev/shm"));
        assert_eq!(args.json, PathBuf::from("ringvm-bench-blk.json"));
        assert!(!args.direct && !args.matrix && !args.no_fio && !args.no_qsd);
    }

    #[test]
    fn blk_sizes_take_fio_suffixes() {
        let args = blk_args(&["--bs", "1M", "--size", "256MiB"]).unwrap();
        assert_eq!((args.bs, args.size), (1 << 20, 256 << 20));
        assert_eq!(blk_args(&["--bs", "64k"]).unwrap().bs, 65536);
        assert_eq!(blk_args(&["--bs", "4KB"]).unwrap().bs, 4096);
        assert_eq!(blk_args(&["--bs", "512"]).unwrap().bs, 512);
        for bad in ["100", "0", "32M", "4x", ""] {
            let err = blk_args(&["--bs", bad]).unwrap_err();
            assert!(
                err.to_string()
                    .contains("expected a multiple of 512 bytes up to 16M"),
                "{bad}: {err}"
            );
        }
        let err = blk_args(&["--size", "4k"]).unwrap_err();
        assert!(err.to_string().contains("expected at least 1M"), "{err}");
    }

    #[test]
    fn blk_matrix_excludes_single_case_flags() {
        let err = blk_args(&["--matrix", "--iodepth", "4"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let args = blk_args(&["--matrix", "--runtime", "5", "--no-qsd"]).unwrap();
        assert!(args.matrix);
        let err = blk_args(&["--iodepth", "0"]).unwrap_err();
        assert!(err.to_string().contains("--iodepth"), "{err}");
        let err = blk_args(&["--queues", "65"]).unwrap_err();
        assert!(err.to_string().contains("--queues"), "{err}");
        let err = blk_args(&["--no-fio", "--fio", "/usr/bin/fio"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    fn options_of(args: &[&str]) -> Result<blk::BlkOptions> {
        let mut all = vec!["--ringvm", "/x/ringvm", "--ringvm-blk", "/x/ringvm-blk"];
        all.extend_from_slice(args);
        blk_options(blk_args(&all).unwrap())
    }

    #[test]
    fn blk_options_build_the_cases_and_skip_reasons() {
        let options = options_of(&["--no-fio", "--no-qsd"]).unwrap();
        assert_eq!(options.cases.len(), 1);
        assert_eq!(options.cases[0].label(), "4k randread iodepth=32 queues=1");
        assert!(matches!(&options.fio, blk::ToolPlan::Skip(r) if r == "--no-fio"));
        assert!(matches!(&options.qsd, blk::ToolPlan::Skip(r) if r == "--no-qsd"));

        let options = options_of(&["--rw", "randrw", "--no-fio", "--no-qsd"]).unwrap();
        assert_eq!(options.cases[0].rwmixread, Some(50));
        let options = options_of(&["--matrix", "--no-fio", "--no-qsd"]).unwrap();
        assert_eq!(options.cases, blk::Case::matrix());

        let options = options_of(&["--fio", "/opt/fio", "--no-qsd"]).unwrap();
        assert!(matches!(&options.fio, blk::ToolPlan::Run(p) if p == Path::new("/opt/fio")));

        let err = options_of(&["--rwmixread", "70"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--rwmixread 70: applies to --rw randrw only (got --rw randread)"
        );
        let err = options_of(&["--dir", "/tmp/a,b"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--dir /tmp/a,b: a path with a comma"),
            "{err}"
        );
        let err = options_of(&["--bs", "4M", "--size", "2M"]).unwrap_err();
        assert!(
            err.to_string().starts_with("--size 2097152: smaller than"),
            "{err}"
        );
    }

    #[test]
    fn blk_format_qcow2() {
        assert_eq!(blk_args(&[]).unwrap().format, blk::ImageFormat::Raw);
        let options = options_of(&[
            "--format",
            "qcow2",
            "--qemu-img",
            "/x/qemu-img",
            "--iodepth",
            "8",
            "--queues",
            "2",
            "--no-qsd",
        ])
        .unwrap();
        assert_eq!(options.format, blk::ImageFormat::Qcow2);
        assert_eq!(options.qemu_img, Some(PathBuf::from("/x/qemu-img")));
        assert_eq!(options.cases[0].label(), "4k randread iodepth=8 queues=2");
        assert!(
            matches!(&options.fio, blk::ToolPlan::Skip(r) if r.starts_with("not run with --format qcow2"))
        );
        for conflicting in [
            &["--matrix"][..],
            &["--rw", "randwrite"],
            &["--rwmixread", "10"],
        ] {
            let mut args = vec!["--format", "qcow2"];
            args.extend_from_slice(conflicting);
            let err = blk_args(&args).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{args:?}"
            );
        }
        let err = blk_args(&["--format", "vmdk"]).unwrap_err();
        assert!(
            err.to_string().contains("[possible values: raw, qcow2]"),
            "{err}"
        );
    }

    fn net_args(args: &[&str]) -> Result<NetArgs, clap::Error> {
        let cli = Cli::try_parse_from(["ringvm-bench", "net"].iter().chain(args))?;
        let BenchCommand::Net(args) = cli.command else {
            panic!("parsed as {cli:?}")
        };
        Ok(args)
    }

    #[test]
    fn net_defaults_and_flags() {
        let args = net_args(&[]).unwrap();
        assert_eq!(args.runtime, 3);
        assert_eq!(args.cases.0, net::Case::all());
        assert_eq!(args.json, PathBuf::from("ringvm-bench-net.json"));
        assert!(!args.no_qemu && !args.no_ceiling);
        let args = net_args(&["--runtime", "1", "--cases", "tso-rx", "--no-qemu"]).unwrap();
        assert_eq!(args.runtime, 1);
        assert_eq!(args.cases.0.len(), 1);
        let options = net_options(NetArgs {
            ringvm: Some(PathBuf::from("/x/ringvm")),
            ringvm_net: Some(PathBuf::from("/x/ringvm-net")),
            ..args
        })
        .unwrap();
        assert!(matches!(options.qemu, net::QemuPlan::Skip(ref r) if r == "--no-qemu"));
        assert_eq!(options.ringvm_net, PathBuf::from("/x/ringvm-net"));
        assert!(options.ceiling);
        let err = net_args(&["--cases", "64-up"]).unwrap_err();
        assert!(
            err.to_string().contains("expected comma-separated SIZE"),
            "{err}"
        );
        let err = net_args(&["--runtime", "0"]).unwrap_err();
        assert!(err.to_string().contains("--runtime"), "{err}");
        let err = net_args(&["--no-qemu", "--qemu", "/q"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn missing_tools_are_skipped_with_a_reason() {
        let plan = tool_plan(false, "qsd", None, "no-such-tool-ringvm-bench");
        assert!(matches!(
            plan,
            blk::ToolPlan::Skip(reason) if reason
                == "no-such-tool-ringvm-bench not found on PATH (install it, or pass --qsd PATH)"
        ));
    }
}
