//! `ringvm-bench`: measures ringvm and its baselines side by side in one run
//! and prints the numbers; it never fails on speed, only when a run did not
//! do what it should.

mod boot;
mod guest;
mod host;
mod quickstart;
mod stats;

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
}
