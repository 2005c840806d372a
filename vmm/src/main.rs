//! `ringvm`: a KVM virtual machine monitor whose storage and network devices
//! are served by vhost-user backends (ringvm-blk, ringvm-net).
//!
//! Exit status: the guest's debug-exit value (port 0xf4); 0 when the guest
//! resets or powers off; 1 on a VM fault, a guest kernel panic or a host
//! error; 2 on bad arguments or input files; 128+N when stopped by signal N.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use ringvm::vm::{self, SerialMode, VmConfig};
use ringvm::{config, devices};

/// Exit status for bad arguments or input files.
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for a VM fault or a host-side error.
const EXIT_FAULT: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "ringvm",
    version,
    about = "KVM VMM with vhost-user storage and network backends"
)]
struct Cli {
    /// Kernel to boot: an ELF with a PVH entry note, or a Linux bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs (PVH: passed as the first module; Linux: the initrd).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Number of vCPUs (1-64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    cpus: u8,
    /// Guest RAM, with a K, M or G suffix (a bare number is bytes).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = config::parse_size)]
    memory: u64,
    /// A virtio-blk disk served by a vhost-user-blk backend listening on
    /// PATH (repeatable): socket=PATH[,num_queues=N][,queue_size=N].
    #[arg(long, value_name = "SPEC", value_parser = config::parse_disk)]
    disk: Vec<ringvm::devices::virtio::vhost_user::blk::DiskConfig>,
    /// A virtio-net device served by a vhost-user-net backend listening on
    /// PATH (repeatable): socket=PATH[,num_queues=N][,queue_size=N][,mac=MAC].
    #[arg(long, value_name = "SPEC", value_parser = config::parse_net)]
    net: Vec<ringvm::devices::virtio::vhost_user::net::NetConfig>,
    /// Serial console: stdio, file=PATH or off.
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = config::parse_serial)]
    serial: SerialMode,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = VmConfig {
        kernel: cli.kernel,
        initramfs: cli.initramfs,
        cmdline: cli.cmdline,
        num_vcpus: cli.cpus,
        memory_bytes: cli.memory,
        serial: cli.serial,
        disks: cli.disk,
        nets: cli.net,
    };
    match vm::run(&cfg) {
        Ok(reason) => {
            match &reason {
                devices::ExitReason::Fault(what) => eprintln!("ringvm: VM fault: {what}"),
                devices::ExitReason::GuestPanic(what) => eprintln!("ringvm: guest panic: {what}"),
                _ => {}
            }
            ExitCode::from(reason.exit_status() as u8)
        }
        Err(e) => {
            let status = if e.is_bad_input() {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAULT
            };
            eprintln!("ringvm: error: {:#}", anyhow::Error::new(e));
            ExitCode::from(status)
        }
    }
}
