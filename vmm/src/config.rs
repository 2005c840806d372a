//! Parsing of the command-line values that need more than clap's built-ins.

use std::path::PathBuf;

use crate::devices::virtio::vhost_user::blk::{self, DiskConfig};
use crate::devices::virtio::vhost_user::net::{self, NetConfig};
use crate::devices::virtio::vhost_user::MAX_QUEUES;
use crate::vm::SerialMode;

/// The `key=value` pairs of a comma-separated device spec; `form` says
/// what is accepted.
fn key_values<'a>(
    s: &'a str,
    form: &'a str,
) -> impl Iterator<Item = Result<(&'a str, &'a str), String>> + 'a {
    s.split(',').map(move |part| {
        part.split_once('=')
            .ok_or_else(|| format!("'{part}' is not key=value: {form}"))
    })
}

/// `num_queues=N`: a number from 1 to `max`.
fn parse_num_queues(value: &str, max: u16) -> Result<u16, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| format!("num_queues={value}: use a number from 1 to {max}"))
}

/// `queue_size=N`: a power of two up to `max`.
fn parse_queue_size(value: &str, max: u16) -> Result<u16, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|n| n.is_power_of_two() && *n <= max)
        .ok_or_else(|| format!("queue_size={value}: use a power of two from 1 to {max}"))
}

/// Parses `socket=PATH[,num_queues=N][,queue_size=N]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    const FORM: &str = "use socket=PATH[,num_queues=N][,queue_size=N]";
    let mut socket = None;
    let mut num_queues = None;
    let mut queue_size = blk::DEFAULT_QUEUE_SIZE;
    for kv in key_values(s, FORM) {
        match kv? {
            ("socket", value) if !value.is_empty() => socket = Some(PathBuf::from(value)),
            ("num_queues", value) => num_queues = Some(parse_num_queues(value, MAX_QUEUES as u16)?),
            ("queue_size", value) => queue_size = parse_queue_size(value, blk::MAX_QUEUE_SIZE)?,
            (key, _) => return Err(format!("unknown or empty key '{key}': {FORM}")),
        }
    }
    Ok(DiskConfig {
        socket: socket.ok_or_else(|| format!("no socket=PATH: {FORM}"))?,
        num_queues,
        queue_size,
    })
}

/// Parses `socket=PATH[,num_queues=N][,queue_size=N][,mac=MAC]`.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    const FORM: &str = "use socket=PATH[,num_queues=N][,queue_size=N][,mac=MAC]";
    let mut socket = None;
    let mut num_queues = 1;
    let mut queue_size = net::DEFAULT_QUEUE_SIZE;
    let mut mac = None;
    for kv in key_values(s, FORM) {
        match kv? {
            ("socket", value) if !value.is_empty() => socket = Some(PathBuf::from(value)),
            ("num_queues", value) => num_queues = parse_num_queues(value, net::MAX_QUEUE_PAIRS)?,
            ("queue_size", value) => queue_size = parse_queue_size(value, net::MAX_QUEUE_SIZE)?,
            ("mac", value) => mac = Some(net::parse_mac(value)?),
            (key, _) => return Err(format!("unknown or empty key '{key}': {FORM}")),
        }
    }
    Ok(NetConfig {
        socket: socket.ok_or_else(|| format!("no socket=PATH: {FORM}"))?,
        num_queues,
        queue_size,
        mac,
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
                queue_size: blk::DEFAULT_QUEUE_SIZE
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
    fn nets() {
        assert_eq!(
            parse_net("socket=/tmp/n.sock"),
            Ok(NetConfig {
                socket: "/tmp/n.sock".into(),
                num_queues: 1,
                queue_size: net::DEFAULT_QUEUE_SIZE,
                mac: None,
            })
        );
        let n = parse_net("socket=/s,num_queues=1,queue_size=1024,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(
            (n.num_queues, n.queue_size, n.mac),
            (1, 1024, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
        );
        let err = |spec: &str| parse_net(spec).unwrap_err();
        assert!(err("mac=52:54:00:12:34:56").contains("no socket"));
        assert!(err("socket=").contains("unknown or empty key 'socket'"));
        assert!(err("socket=/s,num_queues=0").contains("num_queues=0"));
        assert!(err("socket=/s,num_queues=x").contains("num_queues=x"));
        assert!(err("socket=/s,num_queues=33").contains("1 to 32"));
        for n in [2, 32] {
            let spec = format!("socket=/s,num_queues={n}");
            assert_eq!(parse_net(&spec).map(|c| c.num_queues), Ok(n));
        }
        assert!(err("socket=/s,queue_size=100").contains("queue_size=100"));
        assert!(err("socket=/s,queue_size=65536").contains("power of two"));
        assert!(err("socket=/s,mac=52:54:00").contains("mac=52:54:00"));
        assert!(err("socket=/s,mac=ff:ff:ff:ff:ff:ff").contains("multicast"));
        assert!(err("socket=/s,color=red").contains("unknown or empty key 'color'"));
        assert!(err("/tmp/n.sock").contains("key=value"));
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
