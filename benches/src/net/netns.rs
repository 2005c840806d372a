//! The benchmark's own network namespace and its taps.
//!
//! [`Netns::enter_new`] moves the calling thread (the benchmark's main
//! thread, before it starts any other) into a new, unnamed network namespace
//! with unshare(2): every thread and child process started afterwards lives
//! in it, and it disappears, taps included, when the last of them exits:
//! there is nothing to clean up after an error, a panic or Ctrl-C, and
//! nothing of the host's own network is ever touched.
//!
//! Two taps: a multi-queue one for ringvm-net (it opens its tap with
//! IFF_MULTI_QUEUE) and the ceiling, a single-queue one for QEMU (its
//! `-netdev tap` opens one queue without that flag, which a multi-queue tap
//! refuses). Neither has an address: the benchmark's frames carry their
//! addresses themselves, IPv6 is off (no router solicitations or MLD reports
//! in the counts), and each has a fixed MAC so that frames addressed to
//! another MAC are dropped by the host's IP layer (PACKET_OTHERHOST) right
//! after the tap has counted them.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use thiserror::Error;

/// Bound of each tap's queue towards its reader (tun's ring, sized from
/// txqueuelen when a queue is attached): room for the host sender's window
/// (see packet.rs) with some to spare.
pub const TAP_TX_QUEUE_LEN: u32 = 1024;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("needs root for a network namespace and taps (running as uid {0})")]
    NotRoot(u32),
    #[error("needs /dev/net/tun for taps")]
    NoTun,
    #[error("creating a network namespace (unshare CLONE_NEWNET)")]
    Unshare(#[source] io::Error),
    #[error("running `ip {args}` (iproute2 is needed)")]
    IpSpawn {
        args: String,
        #[source]
        source: io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    IpFailed { args: String, stderr: String },
    #[error("writing {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Whether this process can make a network namespace with taps, or why not.
pub fn check_privileges() -> Result<(), NetnsError> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(NetnsError::NotRoot(uid));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err(NetnsError::NoTun);
    }
    Ok(())
}

/// A tap to create: its name, MAC, and whether it is multi-queue.
#[derive(Clone, Copy, Debug)]
pub struct TapSpec {
    pub name: &'static str,
    pub mac: [u8; 6],
    pub multi_queue: bool,
}

/// The namespace the calling thread entered; dropping it changes nothing
/// (the namespace lives as long as the processes in it).
pub struct Netns {
    _private: (),
}

impl Netns {
    /// Moves the calling thread into a new network namespace and creates
    /// `taps` there, up, without addresses, IPv6 off.
    pub fn enter_new(taps: &[TapSpec]) -> Result<Netns, NetnsError> {
        check_privileges()?;
        // SAFETY: unshare(2) takes flags only; CLONE_NEWNET moves the calling
        // thread (and what it starts afterwards) into a new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } == -1 {
            return Err(NetnsError::Unshare(io::Error::last_os_error()));
        }
        for tap in taps {
            let mut add = vec!["tuntap", "add", "dev", tap.name, "mode", "tap"];
            if tap.multi_queue {
                add.push("multi_queue");
            }
            ip(&add)?;
            sysctl(
                &format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name),
                "1",
            )?;
            let mac = format_mac(tap.mac);
            let txqueuelen = TAP_TX_QUEUE_LEN.to_string();
            ip(&[
                "link",
                "set",
                "dev",
                tap.name,
                "address",
                &mac,
                "txqueuelen",
                &txqueuelen,
                "up",
            ])?;
        }
        Ok(Netns { _private: () })
    }
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetnsError::IpSpawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::IpFailed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Writes a sysctl of the calling thread's network namespace.
fn sysctl(path: &str, value: &str) -> Result<(), NetnsError> {
    fs::write(path, value).map_err(|source| NetnsError::Sysctl {
        path: path.to_string(),
        source,
    })
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A tap's counters as the kernel keeps them. `rx` is what the tap received
/// from its reader/writer side (frames a backend wrote: guest to host), `tx`
/// what the kernel sent out through it (host to guest): `tx_packets` counts
/// the frames a reader took, `tx_dropped` those dropped because its queue was
/// full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TapCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

impl TapCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &TapCounters) -> TapCounters {
        TapCounters {
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            rx_dropped: self.rx_dropped.saturating_sub(earlier.rx_dropped),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            tx_dropped: self.tx_dropped.saturating_sub(earlier.tx_dropped),
        }
    }
}

/// linux/if_link.h: the attribute of RTM_GETSTATS that holds struct
/// rtnl_link_stats64, and its bit in the request's filter_mask
/// (IFLA_STATS_FILTER_BIT).
const IFLA_STATS_LINK_64: u16 = 1;
const IFLA_STATS_LINK_64_FILTER: u32 = 1 << (IFLA_STATS_LINK_64 - 1);
const NLMSG_HEADER_BYTES: usize = 16;
/// struct if_stats_msg: family, two pad bytes... ifindex, filter_mask.
const IF_STATS_MSG_BYTES: usize = 12;
const RTATTR_HEADER_BYTES: usize = 4;
/// The first eight u64 of struct rtnl_link_stats64: rx/tx packets, rx/tx
/// bytes, rx/tx errors, rx/tx dropped.
const LINK_STATS_BYTES: usize = 64;

/// A tap's counters read through rtnetlink (RTM_GETSTATS for one
/// interface, a few microseconds; /proc/net/dev takes a hundred times that
/// on these machines), in the namespace the socket was opened in.
pub struct TapStats {
    fd: OwnedFd,
    ifindex: u32,
    seq: u32,
    reply: Vec<u8>,
}

impl TapStats {
    pub fn open(tap: &str) -> io::Result<TapStats> {
        let name = CString::new(tap).map_err(io::Error::other)?;
        // SAFETY: name is NUL-terminated and outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(TapStats {
            // SAFETY: fd is a new descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            ifindex,
            seq: 0,
            reply: vec![0; 4096],
        })
    }

    pub fn read(&mut self) -> io::Result<TapCounters> {
        self.seq = self.seq.wrapping_add(1);
        let request = getstats_request(self.ifindex, self.seq);
        // SAFETY: request is a buffer of the length given, alive for the
        // call; a netlink socket without an address sends to the kernel.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        };
        if sent == -1 {
            return Err(io::Error::last_os_error());
        }
        loop {
            // SAFETY: reply is a writable buffer of the length given, alive
            // for the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.reply.as_mut_ptr().cast(),
                    self.reply.len(),
                    0,
                )
            };
            if n == -1 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            match parse_getstats_reply(&self.reply[..n as usize], self.seq) {
                // A reply to an earlier, abandoned request.
                Ok(None) => continue,
                Ok(Some(counters)) => return Ok(counters),
                Err(err) => return Err(err),
            }
        }
    }
}

fn getstats_request(ifindex: u32, seq: u32) -> Vec<u8> {
    let len = NLMSG_HEADER_BYTES + IF_STATS_MSG_BYTES;
    let mut request = Vec::with_capacity(len);
    request.extend_from_slice(&(len as u32).to_ne_bytes());
    request.extend_from_slice(&libc::RTM_GETSTATS.to_ne_bytes());
    request.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request.extend_from_slice(&seq.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    // if_stats_msg: family AF_UNSPEC, padding, ifindex, filter_mask.
    request.extend_from_slice(&[0; 4]);
    request.extend_from_slice(&ifindex.to_ne_bytes());
    request.extend_from_slice(&IFLA_STATS_LINK_64_FILTER.to_ne_bytes());
    request
}

/// The counters in a reply to request `seq`; `Ok(None)` for a reply to
/// another request.
fn parse_getstats_reply(reply: &[u8], seq: u32) -> io::Result<Option<TapCounters>> {
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("RTM_GETSTATS: {what}"));
    let u16_at = |at: usize| u16::from_ne_bytes([reply[at], reply[at + 1]]);
    let u32_at = |at: usize| u32::from_ne_bytes(reply[at..at + 4].try_into().expect("4 bytes"));
    if reply.len() < NLMSG_HEADER_BYTES {
        return Err(bad("short reply"));
    }
    let len = (u32_at(0) as usize).min(reply.len());
    if u32_at(8) != seq {
        return Ok(None);
    }
    let kind = u16_at(4);
    if kind == libc::NLMSG_ERROR as u16 {
        // struct nlmsgerr: a negative errno first.
        let errno = reply
            .get(NLMSG_HEADER_BYTES..NLMSG_HEADER_BYTES + 4)
            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| bad("short error"))?;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != libc::RTM_NEWSTATS {
        return Err(bad("unexpected message type"));
    }
    let mut at = NLMSG_HEADER_BYTES + IF_STATS_MSG_BYTES;
    while at + RTATTR_HEADER_BYTES <= len {
        let attr_len = usize::from(u16_at(at));
        if attr_len < RTATTR_HEADER_BYTES || at + attr_len > len {
            return Err(bad("bad attribute length"));
        }
        if u16_at(at + 2) == IFLA_STATS_LINK_64 {
            let stats = &reply[at + RTATTR_HEADER_BYTES..at + attr_len];
            if stats.len() < LINK_STATS_BYTES {
                return Err(bad("short rtnl_link_stats64"));
            }
            let field =
                |i: usize| u64::from_ne_bytes(stats[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            return Ok(Some(TapCounters {
                rx_packets: field(0),
                tx_packets: field(1),
                rx_bytes: field(2),
                tx_bytes: field(3),
                rx_dropped: field(6),
                tx_dropped: field(7),
            }));
        }
        // Attributes are 4-byte aligned.
        at += attr_len.next_multiple_of(4);
    }
    Err(bad("no IFLA_STATS_LINK_64"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(seq: u32, stats: &[u64]) -> Vec<u8> {
        let mut attr = Vec::new();
        for v in stats {
            attr.extend_from_slice(&v.to_ne_bytes());
        }
        let mut body = vec![0u8; IF_STATS_MSG_BYTES];
        // An attribute before ours, to be skipped (6 bytes, padded to 8).
        body.extend_from_slice(&6u16.to_ne_bytes());
        body.extend_from_slice(&9u16.to_ne_bytes());
        body.extend_from_slice(&[1, 2, 0, 0]);
        body.extend_from_slice(&((4 + attr.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&IFLA_STATS_LINK_64.to_ne_bytes());
        body.extend_from_slice(&attr);
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&libc::RTM_NEWSTATS.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn getstats_replies_parse() {
        let stats: Vec<u64> = (1..=24).collect();
        let counters = parse_getstats_reply(&reply(7, &stats), 7).unwrap().unwrap();
        assert_eq!(
            counters,
            TapCounters {
                rx_packets: 1,
                tx_packets: 2,
                rx_bytes: 3,
                tx_bytes: 4,
                rx_dropped: 7,
                tx_dropped: 8,
            }
        );
        assert_eq!(parse_getstats_reply(&reply(6, &stats), 7).unwrap(), None);
        let err = parse_getstats_reply(&reply(7, &stats[..4]), 7).unwrap_err();
        assert!(err.to_string().contains("short rtnl_link_stats64"), "{err}");
        let mut error = reply(7, &stats);
        error[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        error[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        let err = parse_getstats_reply(&error, 7).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        let mut broken = reply(7, &stats);
        broken[28..30].copy_from_slice(&2u16.to_ne_bytes());
        assert!(parse_getstats_reply(&broken, 7).is_err());
        assert!(parse_getstats_reply(&broken[..10], 7).is_err());
        for cut in 0..broken.len() {
            let _ = parse_getstats_reply(&reply(7, &stats)[..cut], 7);
        }
        let request = getstats_request(3, 9);
        assert_eq!(request.len(), 28);
        assert_eq!(&request[20..24], &3u32.to_ne_bytes());
        assert_eq!(&request[24..28], &1u32.to_ne_bytes());
    }

    #[test]
    fn counters_subtract() {
        let earlier = TapCounters {
            rx_packets: 10,
            ..TapCounters::default()
        };
        let later = TapCounters {
            rx_packets: 17,
            ..TapCounters::default()
        };
        assert_eq!(later.since(&earlier).rx_packets, 7);
        assert_eq!(earlier.since(&later).rx_packets, 0);
    }

    #[test]
    fn macs_are_printed_as_ip_takes_them() {
        assert_eq!(
            format_mac([0x02, 0x72, 0x76, 0x62, 0, 0xfe]),
            "02:72:76:62:00:fe"
        );
    }
}
