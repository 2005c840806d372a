//! Parsing of the command-line values that need more than clap's built-ins.

use std::path::PathBuf;

use crate::devices::virtio::vhost_user::blk::{DiskConfig, DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE};
use crate::devices::virtio::vhost_user::MAX_QUEUES;
use crate::vm::SerialMode;

/// Parses `socket=PATH[,num_queues=N][,queue_size=N]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    const FORM: &str = "use socket=PATH[,num_queues=N][,queue_size=N]";
    let mut socket = None;
    let mut num_queues = None;
    let mut queue_size = DEFAULT_QUEUE_SIZE;
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not key=value: {FORM}"))?;
        match key {
            "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
            "num_queues" => {
                num_queues = Some(
                    value
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUES as u16).contains(n))
                        .ok_or_else(|| {
                            format!("num_queues={value}: use a number from 1 to {MAX_QUEUES}")
                        })?,
                )
            }
            "queue_size" => {
                queue_size = value
                    .parse::<u16>()
                    .ok()
                    .filter(|n| n.is_power_of_two() && *n <= MAX_QUEUE_SIZE)
                    .ok_or_else(|| {
                        format!("queue_size={value}: use a power of two from 1 to {MAX_QUEUE_SIZE}")
                    })?
            }
            _ => return Err(format!("unknown or empty key '{key}': {FORM}")),
        }
    }
    Ok(DiskConfig {
        socket: socket.ok_or_else(|| format!("no socket=PATH: {FORM}"))?,
        num_queues,
        queue_size,
    })
}

/// Parses a size such as `512M`, `2G`, `65536K` or a bare byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'0'..=b'9') => (s, 0),
        _ => {
            return Err(format!(
                "'{s}' is not a size: use a number with K, M or G (e.g. 512M)"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size: use a number with K, M or G (e.g. 512M)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses `stdio`, `off` or `file=PATH`.
pub fn parse_serial(s: &str) -> Result<SerialMode, String> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "off" => Ok(SerialMode::Off),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(format!(
                "'{s}' is not a serial mode: use stdio, off or file=PATH"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12T").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("18446744073709551615G")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("socket=/tmp/b.sock"),
            Ok(DiskConfig {
                socket: "/tmp/b.sock".into(),
                num_queues: None,
                queue_size: DEFAULT_QUEUE_SIZE
            })
        );
        let d = parse_disk("socket=/s,num_queues=4,queue_size=1024").unwrap();
        assert_eq!((d.num_queues, d.queue_size), (Some(4), 1024));
        assert!(parse_disk("num_queues=2")
            .unwrap_err()
            .contains("no socket"));
        assert!(parse_disk("socket=/s,num_queues=0")
            .unwrap_err()
            .contains("num_queues=0"));
        assert!(parse_disk("socket=/s,num_queues=65").is_err());
        assert!(parse_disk("socket=/s,queue_size=100")
            .unwrap_err()
            .contains("power of two"));
        assert!(parse_disk("socket=/s,queue_size=65536").is_err());
        assert!(parse_disk("socket=/s,color=red")
            .unwrap_err()
            .contains("unknown"));
        assert!(parse_disk("/tmp/b.sock").unwrap_err().contains("key=value"));
        assert!(parse_disk("socket=").is_err());
    }

    #[test]
    fn serial_modes() {
        assert_eq!(parse_serial("stdio"), Ok(SerialMode::Stdio));
        assert_eq!(parse_serial("off"), Ok(SerialMode::Off));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp").is_err());
    }
}
