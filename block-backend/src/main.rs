//! `ringvm-blk`: the vhost-user-blk backend that serves a raw or qcow2 image
//! to a VMM's virtio-blk device (see DESIGN.md).
//!
//! This file parses and validates the command line, installs the log
//! subscriber, opens the image and hands over to [`ringvm_blk::daemon::run`].
//! Exit status: 0 when the frontend disconnected or SIGTERM/SIGINT ended the
//! process, 1 when the image or the socket cannot be used or the frontend
//! broke the protocol, 2 for command-line errors. `create` writes a thin qcow2
//! image and exits 0, 2 for a refused request (an existing path, a size the
//! format cannot hold), 1 when the file cannot be written.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ringvm_backend::cli::{init_logging, parse_queue_size, parse_socket_path};
use ringvm_blk::backend::BlkOptions;
use ringvm_blk::counters::Counters;
use ringvm_blk::daemon::{self, error_chain, DaemonConfig};
use ringvm_blk::image::qcow2::meta;
use ringvm_blk::image::{self, Format, OpenOptions};
use tracing::info;
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

/// Upper bound of `--queues`: one worker thread and io_uring per queue.
const MAX_QUEUES: u16 = 64;
/// virtio-blk addresses the disk in 512-byte sectors (virtio 1.2, 5.2.4).
const SECTOR_BYTES: u64 = 512;
/// qcow2 cluster sizes are 1 << cluster_bits with cluster_bits in 9..=21
/// (qcow2 specification, header field cluster_bits).
const MIN_CLUSTER_BYTES: u64 = 1 << 9;
const MAX_CLUSTER_BYTES: u64 = 1 << 21;

#[derive(Debug, Parser)]
#[command(
    name = "ringvm-blk",
    version,
    about = "vhost-user-blk backend: serves a raw or qcow2 image to a VMM's virtio-blk device",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<BlkCommand>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum BlkCommand {
    /// Create a thin qcow2 image (no cluster allocated).
    Create(CreateArgs),
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// The image file to create.
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// Virtual disk size in bytes, with an optional K, M, G or T suffix
    /// (powers of 1024); a multiple of 512.
    #[arg(long, value_name = "SIZE", value_parser = parse_disk_size)]
    size: u64,
    /// qcow2 cluster size: a power of two from 512 to 2M.
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_cluster_size)]
    cluster_size: u64,
}

/// The serving flags. They are `Option`s only because a subcommand makes
/// `--image` and `--socket` optional; without one, clap requires them.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Disk image to serve: a regular file or a block device.
    #[arg(long, value_name = "PATH", required = true, value_parser = parse_image_path)]
    image: Option<PathBuf>,
    /// Unix socket to listen on for the VMM (the vhost-user frontend).
    #[arg(long, value_name = "PATH", required = true, value_parser = parse_socket_path)]
    socket: Option<PathBuf>,
    /// Number of virtqueues, each served by its own thread (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_queue_count)]
    queues: u16,
    /// Maximum entries per virtqueue: a power of two from 1 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Serve the disk read-only (VIRTIO_BLK_F_RO).
    #[arg(long)]
    readonly: bool,
    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    direct: bool,
    /// Disk serial the guest reads with GET_ID: up to 20 printable ASCII bytes.
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    serial: Option<String>,
    /// Image format; when absent, it is taken from the image's header.
    #[arg(long, value_enum, value_name = "FORMAT")]
    format: Option<ImageFormat>,
    /// After the VMM disconnects, wait for the next one instead of exiting.
    #[arg(long)]
    keep_listening: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ImageFormat {
    Raw,
    Qcow2,
}

fn parse_image_path(value: &str) -> Result<PathBuf, String> {
    let meta = fs::metadata(value).map_err(|err| format!("cannot use {value}: {err}"))?;
    let kind = meta.file_type();
    if kind.is_file() || kind.is_block_device() {
        Ok(PathBuf::from(value))
    } else {
        Err(format!(
            "{value} is neither a regular file nor a block device"
        ))
    }
}

fn parse_queue_count(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(count) if (1..=MAX_QUEUES).contains(&count) => Ok(count),
        _ => Err(format!(
            "expected a number of queues from 1 to {MAX_QUEUES}"
        )),
    }
}

fn parse_serial(value: &str) -> Result<String, String> {
    let max_bytes = VIRTIO_BLK_ID_BYTES as usize;
    if value.len() > max_bytes {
        return Err(format!(
            "{} bytes long; a virtio-blk serial holds at most {max_bytes}",
            value.len()
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err("expected printable ASCII characters only".to_string());
    }
    Ok(value.to_string())
}

/// `4096`, `64K`, `512M`, `10G`, `1T` (suffixes are powers of 1024, either case).
fn parse_size(value: &str) -> Result<u64, String> {
    let invalid =
        || "expected a number of bytes with an optional K, M, G or T suffix (e.g. 10G)".to_string();
    let (digits, shift) = match value.char_indices().last() {
        Some((at, suffix)) if suffix.is_ascii_alphabetic() => {
            let shift = match suffix.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(invalid()),
            };
            (&value[..at], shift)
        }
        _ => (value, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let number: u64 = digits.parse().map_err(|_| invalid())?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| "too large for a 64-bit byte count".to_string())
}

fn parse_disk_size(value: &str) -> Result<u64, String> {
    let bytes = parse_size(value)?;
    if bytes == 0 || bytes % SECTOR_BYTES != 0 {
        return Err(format!(
            "{bytes} bytes: a disk size must be a positive multiple of {SECTOR_BYTES} bytes"
        ));
    }
    Ok(bytes)
}

fn parse_cluster_size(value: &str) -> Result<u64, String> {
    let bytes = parse_size(value)?;
    if !bytes.is_power_of_two() || !(MIN_CLUSTER_BYTES..=MAX_CLUSTER_BYTES).contains(&bytes) {
        return Err(format!(
            "{bytes} bytes: a qcow2 cluster size is a power of two from 512 to 2M"
        ));
    }
    Ok(bytes)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // qcow2-rs logs its cache activity at info: only its warnings.
    init_logging("info,qcow2_rs=warn");
    match cli.command {
        Some(BlkCommand::Create(args)) => ExitCode::from(create(&args)),
        None => serve(cli.serve),
    }
}

/// Creates the image; returns the exit status.
fn create(args: &CreateArgs) -> u8 {
    match meta::create(&args.path, args.size, args.cluster_size) {
        Ok(()) => {
            info!(
                "created {}: qcow2, {} bytes, {} byte clusters",
                args.path.display(),
                args.size,
                args.cluster_size
            );
            0
        }
        Err(err) => {
            eprintln!("ringvm-blk: {}", error_chain(&err));
            if err.is_bad_input() {
                2
            } else {
                1
            }
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let (Some(image_path), Some(socket)) = (args.image, args.socket) else {
        unreachable!("clap requires --image and --socket without a subcommand");
    };
    let options = OpenOptions {
        readonly: args.readonly,
        direct: args.direct,
        format: args.format.map(|format| match format {
            ImageFormat::Raw => Format::Raw,
            ImageFormat::Qcow2 => Format::Qcow2,
        }),
    };
    let image = match image::open(&image_path, options) {
        Ok(image) => image,
        Err(err) => {
            eprintln!("ringvm-blk: {}", error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    let counters = Counters::new(usize::from(args.queues));
    if let Some(image_counters) = image.counters() {
        let _ = counters.image.set(image_counters);
    }
    let config = DaemonConfig {
        socket,
        keep_listening: args.keep_listening,
        device: BlkOptions {
            num_queues: args.queues,
            queue_size: args.queue_size,
            readonly: args.readonly,
            serial: args.serial,
        },
    };
    let result = daemon::run(image, &config, &counters);
    info!("counters: {}", counters.snapshot());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ringvm-blk: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ringvm-blk").chain(args.iter().copied()))
    }

    /// The error clap prints, which must name the flag and what it accepts.
    fn error(args: &[&str]) -> String {
        let err = parse(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        err.to_string()
    }

    fn image() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_parse() {
        let image = image();
        let path = image.path().to_str().unwrap();
        let cli = parse(&[
            "--image",
            path,
            "--socket",
            "/run/blk.sock",
            "--queues",
            "4",
            "--queue-size",
            "1024",
            "--readonly",
            "--direct",
            "--serial",
            "disk-0",
            "--format",
            "qcow2",
            "--keep-listening",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let serve = cli.serve;
        assert_eq!(serve.image.as_deref(), Some(image.path()));
        assert_eq!(serve.socket, Some(PathBuf::from("/run/blk.sock")));
        assert_eq!((serve.queues, serve.queue_size), (4, 1024));
        assert!(serve.readonly && serve.direct && serve.keep_listening);
        assert_eq!(serve.serial.as_deref(), Some("disk-0"));
        assert_eq!(serve.format, Some(ImageFormat::Qcow2));
    }

    #[test]
    fn serve_defaults() {
        let image = image();
        let cli = parse(&["--image", image.path().to_str().unwrap(), "--socket", "s"]).unwrap();
        assert_eq!((cli.serve.queues, cli.serve.queue_size), (1, 256));
        assert!(!cli.serve.readonly && !cli.serve.direct && !cli.serve.keep_listening);
        assert_eq!(cli.serve.format, None);
    }

    #[test]
    fn image_and_socket_are_required_to_serve() {
        let err = parse(&["--socket", "s"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        assert!(err.to_string().contains("--image <PATH>"), "{err}");
        let image = image();
        let err = parse(&["--image", image.path().to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("--socket <PATH>"), "{err}");
    }

    #[test]
    fn image_must_exist_and_be_a_file_or_block_device() {
        let err = error(&["--image", "/nonexistent/disk.img", "--socket", "s"]);
        assert!(
            err.contains("'--image <PATH>'") && err.contains("cannot use /nonexistent/disk.img"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let err = error(&["--image", dir.path().to_str().unwrap(), "--socket", "s"]);
        assert!(
            err.contains("is neither a regular file nor a block device"),
            "{err}"
        );
    }

    #[test]
    fn socket_path_must_fit_sockaddr_un() {
        let image = image();
        let long = format!("/tmp/{}.sock", "x".repeat(200));
        let err = error(&["--image", image.path().to_str().unwrap(), "--socket", &long]);
        assert!(err.contains("'--socket <PATH>'"), "{err}");
        assert!(err.contains("not usable as a unix socket path"), "{err}");
    }

    #[test]
    fn bad_queue_count_names_the_flag() {
        let image = image();
        let path = image.path().to_str().unwrap();
        for bad in ["0", "65", "-1", "two"] {
            let err = error(&["--image", path, "--socket", "s", &format!("--queues={bad}")]);
            assert!(
                err.contains(&format!("invalid value '{bad}' for '--queues <N>'")),
                "{err}"
            );
            assert!(err.contains("from 1 to 64"), "{err}");
        }
    }

    #[test]
    fn bad_queue_size_names_the_flag() {
        let image = image();
        let path = image.path().to_str().unwrap();
        for bad in ["0", "100", "65536", "1k"] {
            let err = error(&["--image", path, "--socket", "s", "--queue-size", bad]);
            assert!(
                err.contains(&format!("invalid value '{bad}' for '--queue-size <N>'")),
                "{err}"
            );
            assert!(err.contains("power of two from 1 to 32768"), "{err}");
        }
        for good in ["1", "2", "32768"] {
            assert!(parse(&["--image", path, "--socket", "s", "--queue-size", good]).is_ok());
        }
    }

    #[test]
    fn bad_serial_names_the_flag() {
        let image = image();
        let path = image.path().to_str().unwrap();
        let err = error(&[
            "--image",
            path,
            "--socket",
            "s",
            "--serial",
            &"x".repeat(21),
        ]);
        assert!(
            err.contains("'--serial <ID>'") && err.contains("at most 20"),
            "{err}"
        );
        let err = error(&["--image", path, "--socket", "s", "--serial", "tab\there"]);
        assert!(err.contains("printable ASCII"), "{err}");
        assert!(parse(&[
            "--image",
            path,
            "--socket",
            "s",
            "--serial",
            &"x".repeat(20)
        ])
        .is_ok());
    }

    #[test]
    fn bad_format_lists_the_choices() {
        let image = image();
        let err = error(&[
            "--image",
            image.path().to_str().unwrap(),
            "--socket",
            "s",
            "--format",
            "vmdk",
        ]);
        assert!(err.contains("'--format <FORMAT>'"), "{err}");
        assert!(err.contains("raw, qcow2"), "{err}");
    }

    #[test]
    fn create_parses_sizes() {
        let cli = parse(&[
            "create",
            "disk.qcow2",
            "--size",
            "10G",
            "--cluster-size",
            "2M",
        ])
        .unwrap();
        let Some(BlkCommand::Create(create)) = cli.command else {
            panic!("parsed as {cli:?}")
        };
        assert_eq!(create.path, PathBuf::from("disk.qcow2"));
        assert_eq!(create.size, 10 << 30);
        assert_eq!(create.cluster_size, 2 << 20);
        let cli = parse(&["create", "disk.qcow2", "--size", "512"]).unwrap();
        let Some(BlkCommand::Create(create)) = cli.command else {
            panic!("parsed as {cli:?}")
        };
        assert_eq!((create.size, create.cluster_size), (512, 64 << 10));
    }

    #[test]
    fn create_writes_an_image_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        let cli = parse(&["create", path.to_str().unwrap(), "--size", "1G"]).unwrap();
        let Some(BlkCommand::Create(args)) = cli.command else {
            panic!("parsed as {cli:?}")
        };
        assert_eq!(create(&args), 0);
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", path.to_str().unwrap()])
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&out.stdout);
        assert!(info.contains("\"virtual-size\": 1073741824,"), "{info}");
        assert!(info.contains("\"cluster-size\": 65536,"), "{info}");
        let len = fs::metadata(&path).unwrap().len();
        // An existing path is refused, untouched, with status 2.
        assert_eq!(create(&args), 2);
        assert_eq!(fs::metadata(&path).unwrap().len(), len);
        // A directory that does not exist is not the user's input: status 1.
        let missing = CreateArgs {
            path: dir.path().join("no/such/dir.qcow2"),
            size: 1 << 30,
            cluster_size: 65536,
        };
        assert_eq!(create(&missing), 1);
    }

    #[test]
    fn create_does_not_take_serve_flags() {
        let err = parse(&["--readonly", "create", "d", "--size", "1G"]).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        let err = parse(&["create", "d"]).unwrap_err();
        assert!(err.to_string().contains("--size <SIZE>"), "{err}");
    }

    #[test]
    fn bad_size_suffix_names_the_flag() {
        for bad in ["10X", "G", "", "1.5G", "-1G", "10GB"] {
            let err = error(&["create", "d", &format!("--size={bad}")]);
            assert!(
                err.contains(&format!("invalid value '{bad}' for '--size <SIZE>'")),
                "{err}"
            );
            assert!(err.contains("optional K, M, G or T suffix"), "{err}");
        }
    }

    #[test]
    fn size_must_be_whole_sectors_and_fit_u64() {
        let err = error(&["create", "d", "--size", "1000"]);
        assert!(err.contains("positive multiple of 512"), "{err}");
        let err = error(&["create", "d", "--size", "0"]);
        assert!(err.contains("positive multiple of 512"), "{err}");
        let err = error(&["create", "d", "--size", "17179869184G"]);
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn cluster_size_must_be_a_qcow2_cluster_size() {
        for bad in ["256", "96K", "4M"] {
            let err = error(&["create", "d", "--size", "1G", "--cluster-size", bad]);
            assert!(err.contains("'--cluster-size <SIZE>'"), "{err}");
            assert!(err.contains("power of two from 512 to 2M"), "{err}");
        }
    }

    #[test]
    fn size_suffixes_are_powers_of_1024_in_either_case() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 << 40));
        assert!(parse_size("16777216T").is_err());
    }
}
