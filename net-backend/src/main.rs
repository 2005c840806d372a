//! `ringvm-net`: the vhost-user-net backend that moves frames between a VMM's
//! virtio-net queues and a tap device (see DESIGN.md).
//!
//! This file parses and validates the command line, installs the log
//! subscriber, opens the tap and hands over to [`ringvm_net::daemon::run`].
//! Exit status: 0 when the frontend disconnected or SIGTERM/SIGINT ended the
//! process, 1 when the tap or the socket cannot be used or the frontend
//! broke the protocol, 2 for command-line errors.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use clap::Parser;
use ringvm_backend::cli::{init_logging, parse_queue_size, parse_socket_path};
use ringvm_net::backend::NetOptions;
use ringvm_net::counters::Counters;
use ringvm_net::daemon::{self, error_chain, DaemonConfig};
use ringvm_net::tap::open_tap;
use tracing::info;

/// Upper bound of `--queues`: one tap queue (IFF_MULTI_QUEUE) and one worker
/// per RX/TX pair.
const MAX_QUEUE_PAIRS: u16 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "ringvm-net",
    version,
    about = "vhost-user-net backend: connects a VMM's virtio-net device to a tap device"
)]
struct Cli {
    /// Tap device to move frames through.
    #[arg(long, value_name = "NAME", value_parser = parse_tap_name)]
    tap: String,
    /// Unix socket to listen on for the VMM (the vhost-user frontend).
    #[arg(long, value_name = "PATH", value_parser = parse_socket_path)]
    socket: PathBuf,
    /// Number of RX/TX queue pairs, each with its own tap queue (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_queue_pairs)]
    queues: u16,
    /// Maximum entries per virtqueue: a power of two from 1 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
    /// The guest's MAC address (unicast), offered in the device config
    /// (VIRTIO_NET_F_MAC); when absent the guest picks its own.
    #[arg(long, value_name = "MAC")]
    mac: Option<MacAddress>,
}

/// A unicast Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MacAddress([u8; 6]);

impl FromStr for MacAddress {
    type Err = String;

    fn from_str(value: &str) -> Result<MacAddress, String> {
        let invalid =
            || "expected six hex bytes separated by ':' (e.g. 52:54:00:12:34:56)".to_string();
        let mut bytes = [0u8; 6];
        let mut parts = value.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        if bytes[0] & 1 == 1 {
            return Err("a multicast address (lowest bit of the first byte set); the guest's MAC must be unicast".to_string());
        }
        if bytes == [0; 6] {
            return Err("the all-zero address is not a valid station address".to_string());
        }
        Ok(MacAddress(bytes))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An interface name the kernel accepts (dev_valid_name): 1 to IFNAMSIZ - 1
/// bytes, not `.` or `..`, without `/`, `:` or whitespace.
fn parse_tap_name(value: &str) -> Result<String, String> {
    let max_bytes = libc::IFNAMSIZ - 1;
    if value.is_empty() || value.len() > max_bytes {
        return Err(format!("an interface name is 1 to {max_bytes} bytes long"));
    }
    if value == "."
        || value == ".."
        || value
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(
            "an interface name cannot be `.` or `..` or contain '/', ':' or whitespace".to_string(),
        );
    }
    Ok(value.to_string())
}

fn parse_queue_pairs(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(pairs) if (1..=MAX_QUEUE_PAIRS).contains(&pairs) => Ok(pairs),
        _ => Err(format!(
            "expected a number of queue pairs from 1 to {MAX_QUEUE_PAIRS}"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging("info");
    let tap = match open_tap(&cli.tap, cli.queues) {
        Ok(tap) => std::sync::Arc::new(tap),
        Err(err) => {
            eprintln!("ringvm-net: {}", error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    let counters = Counters::new(usize::from(cli.queues));
    let config = DaemonConfig {
        socket: cli.socket,
        device: NetOptions {
            queue_pairs: cli.queues,
            queue_size: cli.queue_size,
            mac: cli.mac.map(|mac| mac.0),
        },
    };
    let result = daemon::run(tap, &config, &counters);
    info!("counters: {}", counters.snapshot());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ringvm-net: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ringvm-net").chain(args.iter().copied()))
    }

    /// The error clap prints, which must name the flag and what it accepts.
    fn error(args: &[&str]) -> String {
        let err = parse(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        err.to_string()
    }

    fn with_base<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--tap", "tap0", "--socket", "/run/net.sock"];
        args.extend_from_slice(extra);
        args
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn all_flags_parse() {
        let cli = parse(&with_base(&[
            "--queues",
            "2",
            "--queue-size",
            "1024",
            "--mac",
            "52:54:00:AB:cd:01",
        ]))
        .unwrap();
        assert_eq!(cli.tap, "tap0");
        assert_eq!(cli.socket, PathBuf::from("/run/net.sock"));
        assert_eq!((cli.queues, cli.queue_size), (2, 1024));
        assert_eq!(
            cli.mac,
            Some(MacAddress([0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]))
        );
        assert_eq!(cli.mac.unwrap().to_string(), "52:54:00:ab:cd:01");
    }

    #[test]
    fn defaults() {
        let cli = parse(&with_base(&[])).unwrap();
        assert_eq!((cli.queues, cli.queue_size, cli.mac), (1, 256, None));
    }

    #[test]
    fn tap_and_socket_are_required() {
        let err = error(&["--socket", "s"]);
        assert!(err.contains("--tap <NAME>"), "{err}");
        let err = error(&["--tap", "tap0"]);
        assert!(err.contains("--socket <PATH>"), "{err}");
    }

    #[test]
    fn bad_mac_names_the_flag() {
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5g",
            "5:54:00:12:34:56",
            "",
        ] {
            let err = error(&with_base(&[&format!("--mac={bad}")]));
            assert!(
                err.contains(&format!("invalid value '{bad}' for '--mac <MAC>'")),
                "{err}"
            );
            assert!(err.contains("six hex bytes separated by ':'"), "{err}");
        }
        let err = error(&with_base(&["--mac", "01:00:5e:00:00:01"]));
        assert!(err.contains("must be unicast"), "{err}");
        let err = error(&with_base(&["--mac", "ff:ff:ff:ff:ff:ff"]));
        assert!(err.contains("must be unicast"), "{err}");
        let err = error(&with_base(&["--mac", "00:00:00:00:00:00"]));
        assert!(err.contains("all-zero"), "{err}");
    }

    #[test]
    fn bad_queue_size_names_the_flag() {
        for bad in ["0", "3", "65536", "-2", "many"] {
            let err = error(&with_base(&[&format!("--queue-size={bad}")]));
            assert!(
                err.contains(&format!("invalid value '{bad}' for '--queue-size <N>'")),
                "{err}"
            );
            assert!(err.contains("power of two from 1 to 32768"), "{err}");
        }
    }

    #[test]
    fn bad_queue_count_names_the_flag() {
        for bad in ["0", "65"] {
            let err = error(&with_base(&["--queues", bad]));
            assert!(
                err.contains(&format!("invalid value '{bad}' for '--queues <N>'")),
                "{err}"
            );
            assert!(err.contains("from 1 to 64"), "{err}");
        }
    }

    #[test]
    fn bad_tap_name_names_the_flag() {
        for bad in ["", "a-very-long-name", "a/b", "a:b", "a b", ".."] {
            let err = error(&["--tap", bad, "--socket", "s"]);
            assert!(
                err.contains(&format!("invalid value '{bad}' for '--tap <NAME>'")),
                "{err}"
            );
        }
        assert!(parse(&["--tap", "fifteen-bytes-x", "--socket", "s"]).is_ok());
    }

    #[test]
    fn socket_path_must_fit_sockaddr_un() {
        let long = format!("/tmp/{}.sock", "x".repeat(200));
        let err = error(&["--tap", "tap0", "--socket", &long]);
        assert!(
            err.contains("'--socket <PATH>'") && err.contains("not usable as a unix socket path"),
            "{err}"
        );
    }
}
