//! `job=net-echo ip=A.B.C.D/prefix [port=N] [count=N] [time=SECONDS]
//! [pairs=N]`: drives the first virtio-net device (polled) and answers ARP
//! requests for `ip`, ICMP echo requests to it, and UDP datagrams to `port`
//! (default 7, the echo service), echoed byte for byte. With multiqueue it
//! turns on `pairs` queue pairs (default: all the device has; more than it
//! has fails the job) through the control queue, and serves each: a frame
//! received on a pair is answered on the same pair's transmit queue, so a
//! flow stays on its pair. It stops after `count` answers or `time` (fio
//! spellings: `10`, `500ms`, `2m`), whichever comes first, or runs until
//! the VM is stopped, then prints
//! `net-echo ok arp=N icmp=N udp=N dropped=N mac=MAC pairs=N rx_per_pair=A,B`,
//! `rx_per_pair` being the frames received on each pair. `dropped` counts
//! every frame not answered: malformed ones (truncated, bad checksum) and
//! ones for another address, protocol or port.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::params::Params;
use super::{Boot, JobFailed};
use crate::netproto::{self, Iface, ReplyKind, Verdict, ETH_HEADER_BYTES, ETH_MTU_BYTES};
use crate::tsc;
use crate::virtio::net::{
    Mac, NetDevice, RxDrop, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_S_LINK_UP,
};

const NAME: &str = "net-echo";
/// UDP echo (RFC 862).
const DEFAULT_PORT: u64 = 7;
/// Largest frame handled: an MTU-sized packet without VLAN tag.
const FRAME_MAX_BYTES: usize = ETH_HEADER_BYTES + ETH_MTU_BYTES;
/// Received frames up to this size are copied whole; larger ones (with
/// MRG_RXBUF, e.g. 64 KiB GSO packets) are dropped without being parsed.
const RX_FRAME_MAX_BYTES: usize = 65536 + ETH_HEADER_BYTES;
/// Malformed frames reported on the console: the first few are enough to
/// debug a test, and a flood of them must not slow the job down.
const DROP_REPORTS_MAX: u64 = 8;

fn failed(what: fmt::Arguments<'_>) -> JobFailed {
    println!("{NAME} FAILED {what}");
    JobFailed
}

#[derive(Default)]
struct Counts {
    arp: u64,
    icmp: u64,
    udp: u64,
    dropped: u64,
}

impl Counts {
    fn answered(&self) -> u64 {
        self.arp + self.icmp + self.udp
    }
}

pub fn run(boot: &Boot) -> Result<(), JobFailed> {
    let params = Params::new(&boot.cmdline, NAME);
    let Some(ip_text) = params.get("ip") else {
        return Err(failed(format_args!(
            "missing parameter ip=A.B.C.D/prefix, e.g. ip=10.0.2.15/24"
        )));
    };
    let Some((ip, prefix)) = netproto::parse_ipv4_cidr(ip_text) else {
        return Err(failed(format_args!(
            "bad parameter ip={ip_text}: expected A.B.C.D/prefix, e.g. 10.0.2.15/24"
        )));
    };
    let port = params
        .number_in("port", 1..=u64::from(u16::MAX))?
        .unwrap_or(DEFAULT_PORT) as u16;
    let count = params.number("count")?;
    let pairs = params
        .number_in("pairs", 1..=u64::from(u16::MAX))?
        .map(|n| n as u16);
    let time_ms = params.ms("time")?;
    let rate = tsc::rate(boot.start_info.rsdp_paddr);
    let deadline = match (time_ms, rate) {
        (None, _) => None,
        (Some(ms), Some(rate)) => Some(tsc::now().saturating_add(rate.cycles_in_ms(ms))),
        (Some(_), None) => {
            return Err(failed(format_args!(
                "time= needs the TSC rate, which is unknown"
            )))
        }
    };

    let mut device =
        NetDevice::open_pairs(FRAME_MAX_BYTES, pairs).map_err(|e| failed(format_args!("{e}")))?;
    let pairs = device.pairs();
    let mac = device.config.mac;
    println!(
        "{NAME} ready ip={}.{}.{}.{}/{prefix} port={port} mac={} link={} mrg_rxbuf={} \
         max_pairs={} pairs={pairs}",
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        Mac(mac),
        if device.config.status & VIRTIO_NET_S_LINK_UP != 0 {
            "up"
        } else {
            "down"
        },
        u8::from(device.has(VIRTIO_NET_F_MRG_RXBUF)),
        if device.has(VIRTIO_NET_F_MQ) {
            device.config.max_virtqueue_pairs
        } else {
            1
        },
    );

    let iface = Iface {
        mac,
        ip,
        udp_port: port,
    };
    let mut frame = alloc::vec![0u8; RX_FRAME_MAX_BYTES];
    let mut reply = alloc::vec![0u8; FRAME_MAX_BYTES];
    let mut counts = Counts::default();
    let mut reported = 0;
    // The pair looked at next: one frame from each in turn.
    let mut next = 0;
    loop {
        if count.is_some_and(|n| counts.answered() >= n) {
            break;
        }
        if deadline.is_some_and(|d| tsc::now() >= d) {
            break;
        }
        let pair = next;
        next = (next + 1) % pairs;
        let Some(received) = device.pair(pair).recv(&mut frame) else {
            core::hint::spin_loop();
            continue;
        };
        // (why, whether to report it): malformed frames are, the first few.
        let (why, report) = match received {
            Err(RxDrop::Short) => ("shorter than the virtio-net header", true),
            Err(RxDrop::BadNumBuffers) => ("bad num_buffers", true),
            Err(RxDrop::TooLarge) => ("larger than 64 KiB", true),
            Ok(len) => match netproto::answer(&iface, &frame[..len], &mut reply) {
                Verdict::Reply { kind, len } => {
                    // On the pair the request came on.
                    match device.pair(pair).send(&reply[..len]) {
                        Ok(true) => {}
                        Ok(false) => {
                            return Err(failed(format_args!(
                                "the device returns no transmit buffers (status {:#x})",
                                device.device_status()
                            )))
                        }
                        Err(e) => return Err(failed(format_args!("{e}"))),
                    }
                    match kind {
                        ReplyKind::Arp => counts.arp += 1,
                        ReplyKind::Icmp => counts.icmp += 1,
                        ReplyKind::Udp => counts.udp += 1,
                    }
                    continue;
                }
                Verdict::Ignored(why) => (why, false),
                Verdict::Malformed(why) => (why, true),
            },
        };
        counts.dropped += 1;
        if report && reported < DROP_REPORTS_MAX {
            reported += 1;
            println!("{NAME} dropped a malformed frame: {why}");
        }
    }
    let rx_per_pair: Vec<String> = (0..pairs)
        .map(|p| alloc::format!("{}", device.pair(p).rx_packets))
        .collect();
    println!(
        "{NAME} ok arp={} icmp={} udp={} dropped={} mac={} pairs={pairs} rx_per_pair={}",
        counts.arp,
        counts.icmp,
        counts.udp,
        counts.dropped,
        Mac(mac),
        rx_per_pair.join(",")
    );
    Ok(())
}
