//! `job=net-bench`: UDP packets per second and bits per second through the
//! first virtio-net device (pair 0, polled).
//!
//! Parameters:
//!
//! - `ip=A.B.C.D/prefix` the guest's address (required);
//! - `dir=tx|rx` (default tx): the guest sends (to `peer=A.B.C.D:PORT`,
//!   required, whose MAC it resolves with ARP first), or receives the
//!   datagrams sent to its `port`;
//! - `size=` the Ethernet frame bytes without FCS, headers included, from 60
//!   (the Ethernet minimum: 18 bytes of UDP payload) to 1514 (default 60) in
//!   tx mode (`size` and `payload` are null in rx mode, which takes whatever
//!   comes);
//! - `time=` the measurement (default 10 s; fio spellings). In rx mode it
//!   starts at the first datagram, which may take up to `wait=` (default
//!   30 s);
//! - `port=` the guest's UDP port (default 9000): the source in tx mode, the
//!   one listened on in rx mode.
//!
//! Every datagram's payload starts with a sequence number (u64,
//! little-endian, from 0) when it has room for one: in rx mode, `lost` counts
//! the numbers missing between the first and the last seen; in tx mode the
//! host counts them, and `lost` is null. ARP requests (and pings) are
//! answered throughout. Output, one line, `testguest: result ` and:
//!
//! ```text
//! {"job":"net-bench","dir":"tx","size":60,"payload":18,"time_ms":10000,
//!  "elapsed_ms":10000,"packets":..,"bytes":..,"packets_per_sec":..,
//!  "bits_per_sec":..,"lost":null,"dropped":0,"tx_ring_full":..,
//!  "notifies":..,"queue_size":256,"mrg_rxbuf":true,"event_idx":true,
//!  "tsc_khz":..}
//! ```
//!
//! `bytes` and `bits_per_sec` count whole frames (without the virtio header
//! and FCS); `dropped` counts received frames that were neither benchmark
//! datagrams nor answered (malformed, or for another address or port);
//! `tx_ring_full` counts send attempts that found every transmit buffer in
//! flight.

use alloc::vec;
use core::fmt;

use super::params::Params;
use super::{Boot, JobFailed};
use crate::netproto::{
    self, Iface, Verdict, ETH_HEADER_BYTES, ETH_MTU_BYTES, UDP_FRAME_HEADER_BYTES,
};
use crate::tsc::{self, TscRate};
use crate::virtio::net::{NetDevice, VIRTIO_NET_F_MRG_RXBUF};
use crate::virtio::VIRTIO_F_EVENT_IDX;

const NAME: &str = "net-bench";
const FRAME_MIN_BYTES: u64 = 60;
const FRAME_MAX_BYTES: usize = ETH_HEADER_BYTES + ETH_MTU_BYTES;
/// Received frames larger than this are dropped unparsed.
const RX_FRAME_MAX_BYTES: usize = 65536 + ETH_HEADER_BYTES;
const DEFAULT_PORT: u64 = 9000;
const DEFAULT_TIME_MS: u64 = 10_000;
const DEFAULT_WAIT_MS: u64 = 30_000;
/// ARP requests for the peer, one per [`ARP_RETRY_MS`], before giving up.
const ARP_ATTEMPTS: u32 = 30;
const ARP_RETRY_MS: u64 = 100;
/// Packets sent between looks at the clock and the receive queue: rdtsc and
/// an empty used ring cost little, but not nothing at millions per second.
const TX_CHECK_EVERY: u64 = 64;
const SEQ_BYTES: usize = 8;

fn failed(what: fmt::Arguments<'_>) -> JobFailed {
    println!("{NAME} FAILED {what}");
    JobFailed
}

/// "A.B.C.D:PORT".
fn parse_peer(text: &str) -> Option<([u8; 4], u16)> {
    let (ip, port) = text.rsplit_once(':')?;
    if ip.contains('/') {
        return None;
    }
    let (ip, _) = netproto::parse_ipv4_cidr(ip)?;
    let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
    Some((ip, port))
}

struct Bench {
    device: NetDevice,
    iface: Iface,
    frame: vec::Vec<u8>,
    reply: vec::Vec<u8>,
    dropped: u64,
}

impl Bench {
    /// Handles one received frame other than a benchmark datagram: answers
    /// it or counts it as dropped.
    fn answer(&mut self, len: usize) -> Result<(), JobFailed> {
        match netproto::answer(&self.iface, &self.frame[..len], &mut self.reply) {
            Verdict::Reply { len, .. } => match self.device.send(&self.reply[..len]) {
                Ok(true) => Ok(()),
                Ok(false) => Err(failed(format_args!(
                    "the device returns no transmit buffers"
                ))),
                Err(e) => Err(failed(format_args!("{e}"))),
            },
            Verdict::Ignored(_) | Verdict::Malformed(_) => {
                self.dropped += 1;
                Ok(())
            }
        }
    }

    /// Answers everything received so far; with `peer`, returns its MAC if an
    /// ARP packet from it came by.
    fn drain(&mut self, peer: Option<[u8; 4]>) -> Result<Option<[u8; 6]>, JobFailed> {
        let mut found = None;
        while let Some(received) = self.device.recv(&mut self.frame) {
            let Ok(len) = received else {
                self.dropped += 1;
                continue;
            };
            if let (Some(peer), Some((ip, mac))) =
                (peer, netproto::arp_sender(&self.iface, &self.frame[..len]))
            {
                if ip == peer {
                    found = Some(mac);
                }
            }
            self.answer(len)?;
        }
        Ok(found)
    }
}

/// A number, or `null`.
struct Maybe<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for Maybe<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(n) => n.fmt(f),
            None => f.write_str("null"),
        }
    }
}

#[derive(Default)]
struct Totals {
    elapsed_cycles: u64,
    packets: u64,
    bytes: u64,
    lost: Option<u64>,
    tx_ring_full: u64,
}

pub fn run(boot: &Boot) -> Result<(), JobFailed> {
    let params = Params::new(&boot.cmdline, NAME);
    let Some((ip, _)) = params.get("ip").and_then(netproto::parse_ipv4_cidr) else {
        return Err(failed(format_args!(
            "needs ip=A.B.C.D/prefix, e.g. ip=10.0.2.15/24"
        )));
    };
    let tx = params.choice("dir", &["tx", "rx"])? == "tx";
    let size = params
        .number_in("size", FRAME_MIN_BYTES..=FRAME_MAX_BYTES as u64)?
        .unwrap_or(FRAME_MIN_BYTES) as usize;
    let time_ms = params.ms("time")?.unwrap_or(DEFAULT_TIME_MS);
    let wait_ms = params.ms("wait")?.unwrap_or(DEFAULT_WAIT_MS);
    let port = params
        .number_in("port", 1..=u64::from(u16::MAX))?
        .unwrap_or(DEFAULT_PORT) as u16;
    let peer = match params.get("peer") {
        None if tx => {
            return Err(failed(format_args!(
                "dir=tx needs peer=A.B.C.D:PORT, where to send"
            )))
        }
        None => None,
        Some(text) => Some(parse_peer(text).ok_or_else(|| {
            failed(format_args!(
                "bad parameter peer={text}: expected A.B.C.D:PORT"
            ))
        })?),
    };
    let Some(rate) = tsc::rate(boot.start_info.rsdp_paddr) else {
        return Err(failed(format_args!("the TSC rate is unknown")));
    };
    let device = NetDevice::open(FRAME_MAX_BYTES).map_err(|e| failed(format_args!("{e}")))?;
    let iface = Iface {
        mac: device.config.mac,
        ip,
        udp_port: port,
    };
    let mut bench = Bench {
        device,
        iface,
        frame: vec![0u8; RX_FRAME_MAX_BYTES],
        reply: vec![0u8; FRAME_MAX_BYTES],
        dropped: 0,
    };
    let totals = match peer {
        Some((peer_ip, peer_port)) if tx => {
            send_for(&mut bench, &rate, peer_ip, peer_port, size, time_ms)?
        }
        _ => receive_for(&mut bench, &rate, time_ms, wait_ms)?,
    };
    let per_sec = |n: u64| rate.per_sec(n, totals.elapsed_cycles);
    println!(
        "result {{\"job\":\"{NAME}\",\"dir\":\"{}\",\"size\":{},\"payload\":{},\
         \"time_ms\":{time_ms},\"elapsed_ms\":{},\"packets\":{},\"bytes\":{},\
         \"packets_per_sec\":{},\"bits_per_sec\":{},\"lost\":{},\"dropped\":{},\
         \"tx_ring_full\":{},\"notifies\":{},\"queue_size\":{},\"mrg_rxbuf\":{},\
         \"event_idx\":{},\"tsc_khz\":{}}}",
        if tx { "tx" } else { "rx" },
        Maybe(tx.then_some(size)),
        Maybe(tx.then_some(size - UDP_FRAME_HEADER_BYTES)),
        rate.ms(totals.elapsed_cycles),
        totals.packets,
        totals.bytes,
        per_sec(totals.packets),
        per_sec(totals.bytes.saturating_mul(8)),
        Maybe(totals.lost),
        bench.dropped,
        totals.tx_ring_full,
        bench.device.notifies(),
        bench.device.queue_sizes().0,
        bench.device.has(VIRTIO_NET_F_MRG_RXBUF),
        bench.device.has(VIRTIO_F_EVENT_IDX),
        rate.khz,
    );
    Ok(())
}

/// Resolves the peer's MAC, then sends `size`-byte frames to it for
/// `time_ms`.
fn send_for(
    bench: &mut Bench,
    rate: &TscRate,
    peer_ip: [u8; 4],
    peer_port: u16,
    size: usize,
    time_ms: u64,
) -> Result<Totals, JobFailed> {
    let mut request = [0u8; FRAME_MIN_BYTES as usize];
    let request_len = netproto::arp_request(&bench.iface, peer_ip, &mut request);
    let mut peer_mac = None;
    for _ in 0..ARP_ATTEMPTS {
        if let Err(e) = bench.device.send(&request[..request_len]) {
            return Err(failed(format_args!("{e}")));
        }
        let until = tsc::now() + rate.cycles_in_ms(ARP_RETRY_MS);
        while peer_mac.is_none() && tsc::now() < until {
            peer_mac = bench.drain(Some(peer_ip))?;
        }
        if peer_mac.is_some() {
            break;
        }
    }
    let Some(peer_mac) = peer_mac else {
        return Err(failed(format_args!(
            "no ARP answer from {}.{}.{}.{}",
            peer_ip[0], peer_ip[1], peer_ip[2], peer_ip[3]
        )));
    };
    let payload = size - UDP_FRAME_HEADER_BYTES;
    let mut frame = vec![0u8; size];
    netproto::udp_frame(
        &bench.iface,
        peer_mac,
        peer_ip,
        peer_port,
        payload,
        &mut frame,
    )
    .expect("size is within 60..=1514 bytes");
    let mut totals = Totals::default();
    let start = tsc::now();
    let end = start + rate.cycles_in_ms(time_ms);
    loop {
        if totals.packets % TX_CHECK_EVERY == 0 {
            if tsc::now() >= end {
                break;
            }
            bench.drain(None)?;
        }
        if payload >= SEQ_BYTES {
            frame[UDP_FRAME_HEADER_BYTES..UDP_FRAME_HEADER_BYTES + SEQ_BYTES]
                .copy_from_slice(&totals.packets.to_le_bytes());
        }
        match bench.device.try_send(&frame) {
            Ok(true) => {
                totals.packets += 1;
                totals.bytes += size as u64;
            }
            Ok(false) => {
                totals.tx_ring_full += 1;
                if tsc::now() >= end {
                    break;
                }
            }
            Err(e) => return Err(failed(format_args!("{e}"))),
        }
    }
    totals.elapsed_cycles = tsc::now() - start;
    Ok(totals)
}

/// Counts the datagrams to the guest's port for `time_ms` from the first
/// one, which may take `wait_ms` to come.
fn receive_for(
    bench: &mut Bench,
    rate: &TscRate,
    time_ms: u64,
    wait_ms: u64,
) -> Result<Totals, JobFailed> {
    let mut totals = Totals::default();
    let give_up = tsc::now() + rate.cycles_in_ms(wait_ms);
    let mut window: Option<(u64, u64)> = None;
    // (first, last) sequence numbers seen.
    let mut seqs: Option<(u64, u64)> = None;
    let mut sequenced = 0u64;
    loop {
        let now = tsc::now();
        match window {
            None if now >= give_up => {
                return Err(failed(format_args!(
                    "no datagram to port {} within {wait_ms} ms",
                    bench.iface.udp_port
                )))
            }
            Some((_, end)) if now >= end => break,
            _ => {}
        }
        let Some(received) = bench.device.recv(&mut bench.frame) else {
            core::hint::spin_loop();
            continue;
        };
        let Ok(len) = received else {
            bench.dropped += 1;
            continue;
        };
        match netproto::udp_payload(&bench.iface, &bench.frame[..len]) {
            Ok(payload) => {
                if window.is_none() {
                    let start = tsc::now();
                    window = Some((start, start + rate.cycles_in_ms(time_ms)));
                }
                totals.packets += 1;
                totals.bytes += len as u64;
                if let Some(seq) = payload.get(..SEQ_BYTES) {
                    let seq = u64::from_le_bytes(seq.try_into().expect("8 bytes"));
                    sequenced += 1;
                    seqs = Some(match seqs {
                        None => (seq, seq),
                        Some((first, last)) => (first.min(seq), last.max(seq)),
                    });
                }
            }
            Err(_) => bench.answer(len)?,
        }
    }
    let (start, _) = window.expect("the loop ends only once the window has started");
    totals.elapsed_cycles = tsc::now() - start;
    totals.lost = Some(seqs.map_or(0, |(first, last)| {
        (last - first + 1).saturating_sub(sequenced)
    }));
    Ok(totals)
}
