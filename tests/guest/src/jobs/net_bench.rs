//! `job=net-bench`: packets per second and bits per second through the first
//! virtio-net device (pair 0, polled), with UDP datagrams and, when the
//! device offers TSO, 64 KiB TCP/IPv4 frames.
//!
//! Parameters:
//!
//! - `ip=A.B.C.D/prefix` the guest's address (required);
//! - `dir=tx|rx` (default tx): the guest sends (to `peer=A.B.C.D:PORT`,
//!   required, whose MAC is `peer_mac=` or else resolved with ARP), or
//!   receives what is sent to its `port`;
//! - `size=` in tx mode, the Ethernet frame bytes without FCS, headers
//!   included (default 60): from 60 (the Ethernet minimum: 18 bytes of UDP
//!   payload) to 1514, a UDP datagram; from 1515 to 65536, one TCP/IPv4 TSO
//!   frame (needs VIRTIO_NET_F_HOST_TSO4): 54 bytes of Ethernet, IPv4 and TCP
//!   headers and the payload, handed to the device with a GSO header
//!   (GSO_TCPV4, gso_size 1460, the MSS of a 1500-byte MTU, and NEEDS_CSUM),
//!   so that the device or the host cuts it into segments of at most 1514
//!   bytes (`size=65536`: 45 segments). In rx mode `size` and `payload` are
//!   null: the job takes whatever comes, UDP datagrams and TCP segments or
//!   TSO frames alike;
//! - `runs=LIST` several runs in one boot, in place of `dir=` and `size=`:
//!   comma-separated `tx:SIZE` and `rx` items (`runs=tx:60,tx:65536,rx`);
//!   run `i` uses port `port + i`, so that frames left over from one run do
//!   not count in the next;
//! - `start=now|datagram` (default now): with `datagram`, a tx run waits
//!   up to `wait=` for a datagram or segment to its port before it starts
//!   sending (a host that counts what arrives reads its counters, then says
//!   go), and after the last run the job prints `testguest: net-bench done
//!   port=P` and waits up to `wait=` for one more datagram, to port
//!   `port + runs` (the host reads the VMM's CPU time while it still runs,
//!   then lets it end);
//! - `time=` each run's measurement (default 10 s; fio spellings). In rx
//!   mode it starts at the first datagram or segment, which may take up to
//!   `wait=` (default 30 s);
//! - `port=` the guest's port (default 9000): the source in tx mode, the one
//!   listened on in rx mode (for UDP and TCP).
//!
//! UDP payloads start with a sequence number (u64, little-endian, from 0)
//! when they have room for one, and the rest is zero; TCP frames carry their
//! position in the TCP sequence number (from 0, wrapping) and a zero
//! payload. In rx mode, `lost` counts the datagram numbers missing between
//! the first and the last seen, `lost_bytes` the TCP payload bytes missing
//! between the first and the last sequence number seen; in tx mode the host
//! counts, and both are null. ARP requests (and pings) are answered
//! throughout.
//!
//! Output: once the device is up, `testguest: net-bench device mac=MAC
//! features=0xF offloads=LIST queue_size=N` (the negotiated feature bits and
//! the offloads among them: csum, guest_csum, host_tso4, guest_tso4); then
//! per run `testguest: net-bench ready run=I dir=tx|rx port=P` when it
//! starts waiting (for the go datagram, or the first one), and at its end
//! `testguest: result ` and one line of JSON:
//!
//! ```text
//! {"job":"net-bench","run":0,"dir":"tx","proto":"udp","size":60,"payload":18,
//!  "port":9000,"time_ms":10000,"elapsed_ms":10000,"elapsed_cycles":..,
//!  "packets":..,"bytes":..,
//!  "packets_per_sec":..,"bits_per_sec":..,"lost":null,"lost_bytes":null,
//!  "gso_frames":0,"csum_offloaded":0,"dropped":0,"rx_bad_num_buffers":0,
//!  "tx_ring_full":..,
//!  "notifies":..,"queue_size":256,"mrg_rxbuf":true,"event_idx":true,
//!  "features":"0x..","offloads":"csum,guest_csum,host_tso4,guest_tso4",
//!  "tsc_khz":..}
//! ```
//!
//! `packets` counts frames as handed to or taken from the device (a TSO
//! frame is one packet), `bytes` and `bits_per_sec` their bytes without the
//! virtio header and FCS (a TSO frame's headers once); `proto` is what was
//! sent or received (`udp`, `tcp`, `udp+tcp`, or null when nothing came);
//! `gso_frames` counts frames with a GSO header (sent as TSO frames, or
//! received as such because the host did not cut them), `csum_offloaded`
//! those whose checksum was left to the device (tx: NEEDS_CSUM) or to the
//! guest's trust (rx: NEEDS_CSUM or DATA_VALID); `dropped` counts received
//! frames that were neither benchmark frames nor answered (malformed, or for
//! another address or port: frames of an earlier run too), and among them
//! `rx_bad_num_buffers` the packets the driver dropped because the device
//! returned fewer buffers than their `num_buffers` says (with MRG_RXBUF a
//! device must return all of a packet's buffers together, virtio 1.2
//! 5.1.6.4.2; the buffers that come later count as dropped too); `tx_ring_full`
//! counts send attempts that found every transmit buffer in flight;
//! `notifies` the run's notify writes.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::{self, Write as _};

use super::params::Params;
use super::{Boot, JobFailed};
use crate::netproto::{
    self, Iface, Proto, Verdict, ETH_HEADER_BYTES, ETH_MTU_BYTES, TCP_FRAME_HEADER_BYTES,
    UDP_FRAME_HEADER_BYTES,
};
use crate::tsc::{self, TscRate};
use crate::virtio::net::{
    Mac, NetDevice, RxDrop, OFFLOAD_NAMES, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
};
use crate::virtio::VIRTIO_F_EVENT_IDX;

const NAME: &str = "net-bench";
const FRAME_MIN_BYTES: usize = 60;
/// The largest UDP frame: a 1500-byte IPv4 packet.
const UDP_FRAME_MAX_BYTES: usize = ETH_HEADER_BYTES + ETH_MTU_BYTES;
/// The largest TSO frame: 64 KiB, what ringvm-net and Linux (GSO_MAX_SIZE)
/// take.
const TSO_FRAME_MAX_BYTES: usize = 65536;
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
/// What a tx run writes of each frame: the TCP headers, or the UDP headers
/// and the sequence number.
const HEAD_MAX_BYTES: usize = if TCP_FRAME_HEADER_BYTES > UDP_FRAME_HEADER_BYTES + SEQ_BYTES {
    TCP_FRAME_HEADER_BYTES
} else {
    UDP_FRAME_HEADER_BYTES + SEQ_BYTES
};
/// Runs of one `runs=` list at most (each is a line of output and a port).
const RUNS_MAX: usize = 64;

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

/// One run: send frames of a size, or receive.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RunSpec {
    Tx { size: usize },
    Rx,
}

/// A tx frame size, checked.
fn parse_size(text: &str) -> Option<usize> {
    super::params::parse_bytes(text)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| (FRAME_MIN_BYTES..=TSO_FRAME_MAX_BYTES).contains(n))
}

/// `tx:SIZE,rx,...`.
fn parse_runs(text: &str) -> Option<Vec<RunSpec>> {
    let runs = text
        .split(',')
        .map(|item| match item.split_once(':') {
            Some(("tx", size)) => parse_size(size).map(|size| RunSpec::Tx { size }),
            None if item == "rx" => Some(RunSpec::Rx),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    (1..=RUNS_MAX).contains(&runs.len()).then_some(runs)
}

struct Bench {
    device: NetDevice,
    iface: Iface,
    frame: Vec<u8>,
    reply: Vec<u8>,
    dropped: u64,
    bad_num_buffers: u64,
}

impl Bench {
    /// Handles one received frame other than a benchmark frame: answers it
    /// or counts it as dropped.
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

    /// The next received frame: `Some(Ok((len, checksum_offloaded, gso)))`,
    /// `Some(Err(()))` for one dropped by the driver (counted), `None` when
    /// nothing came. Partial checksums are left as they are: the job trusts
    /// them, as Linux does.
    fn recv(&mut self) -> Option<Result<(usize, bool, bool), ()>> {
        match self.device.recv_offloaded(&mut self.frame)? {
            Ok((len, hdr)) => Some(Ok((len, hdr.checksum_offloaded(), hdr.is_gso()))),
            Err(why) => {
                self.dropped += 1;
                if matches!(why, RxDrop::BadNumBuffers) {
                    self.bad_num_buffers += 1;
                }
                Some(Err(()))
            }
        }
    }

    /// The benchmark frame (a datagram or segment to the job's port) in the
    /// first `len` bytes of the receive buffer, if it is one.
    fn bench_frame(&self, len: usize, checksum_offloaded: bool) -> Option<netproto::Transport<'_>> {
        netproto::transport_payload(&self.iface, &self.frame[..len], !checksum_offloaded).ok()
    }

    /// Answers everything received so far; with `peer`, returns its MAC if an
    /// ARP packet from it came by; with `go`, whether a benchmark frame came.
    fn drain(&mut self, peer: Option<[u8; 4]>) -> Result<(Option<[u8; 6]>, bool), JobFailed> {
        let mut found = None;
        let mut go = false;
        while let Some(received) = self.recv() {
            let Ok((len, trusted, _)) = received else {
                continue;
            };
            if self.bench_frame(len, trusted).is_some() {
                go = true;
                continue;
            }
            if let (Some(peer), Some((ip, mac))) =
                (peer, netproto::arp_sender(&self.iface, &self.frame[..len]))
            {
                if ip == peer {
                    found = Some(mac);
                }
            }
            self.answer(len)?;
        }
        Ok((found, go))
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

/// What one run counted.
#[derive(Default)]
struct Totals {
    elapsed_cycles: u64,
    packets: u64,
    bytes: u64,
    lost: Option<u64>,
    lost_bytes: Option<u64>,
    udp: bool,
    tcp: bool,
    gso_frames: u64,
    csum_offloaded: u64,
    tx_ring_full: u64,
}

/// What every run shares.
struct Settings {
    rate: TscRate,
    time_ms: u64,
    wait_ms: u64,
    start_on_datagram: bool,
    peer: Option<([u8; 4], u16)>,
    peer_mac: Option<[u8; 6]>,
}

pub fn run(boot: &Boot) -> Result<(), JobFailed> {
    let params = Params::new(&boot.cmdline, NAME);
    let Some((ip, _)) = params.get("ip").and_then(netproto::parse_ipv4_cidr) else {
        return Err(failed(format_args!(
            "needs ip=A.B.C.D/prefix, e.g. ip=10.0.2.15/24"
        )));
    };
    let runs = match params.get("runs") {
        Some(text) => {
            if params.get("dir").is_some() || params.get("size").is_some() {
                return Err(failed(format_args!(
                    "runs= replaces dir= and size=: give one or the other"
                )));
            }
            parse_runs(text).ok_or_else(|| {
                failed(format_args!(
                    "bad parameter runs={text}: expected 1 to {RUNS_MAX} comma-separated \
                     tx:SIZE (SIZE from {FRAME_MIN_BYTES} to {TSO_FRAME_MAX_BYTES}) or rx, \
                     e.g. runs=tx:60,tx:1514,rx"
                ))
            })?
        }
        None => {
            let tx = params.choice("dir", &["tx", "rx"])? == "tx";
            let size = match params.get("size") {
                None => FRAME_MIN_BYTES,
                Some(text) => parse_size(text).ok_or_else(|| {
                    failed(format_args!(
                        "bad parameter size={text}: expected {FRAME_MIN_BYTES} to \
                         {UDP_FRAME_MAX_BYTES} (UDP) or up to {TSO_FRAME_MAX_BYTES} (TSO)"
                    ))
                })?,
            };
            vec![if tx {
                RunSpec::Tx { size }
            } else {
                RunSpec::Rx
            }]
        }
    };
    let any_tx = runs.iter().any(|r| matches!(r, RunSpec::Tx { .. }));
    let tso = runs
        .iter()
        .any(|r| matches!(r, RunSpec::Tx { size } if *size > UDP_FRAME_MAX_BYTES));
    let time_ms = params.ms("time")?.unwrap_or(DEFAULT_TIME_MS);
    let wait_ms = params.ms("wait")?.unwrap_or(DEFAULT_WAIT_MS);
    let port = params
        .number_in("port", 1..=u64::from(u16::MAX))?
        .unwrap_or(DEFAULT_PORT);
    if port + runs.len() as u64 > u64::from(u16::MAX) {
        return Err(failed(format_args!(
            "port={port} leaves no port for each of the {} runs and the last datagram",
            runs.len()
        )));
    }
    let start_on_datagram = params.choice("start", &["now", "datagram"])? == "datagram";
    let peer = match params.get("peer") {
        None if any_tx => {
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
    let peer_mac = match params.get("peer_mac") {
        None => None,
        Some(text) => Some(netproto::parse_mac(text).ok_or_else(|| {
            failed(format_args!(
                "bad parameter peer_mac={text}: expected six hex bytes like 02:00:00:00:00:01"
            ))
        })?),
    };
    let Some(rate) = tsc::rate(boot.start_info.rsdp_paddr) else {
        return Err(failed(format_args!("the TSC rate is unknown")));
    };
    let tx_frame_bytes = if tso {
        TSO_FRAME_MAX_BYTES
    } else {
        UDP_FRAME_MAX_BYTES
    };
    let device = NetDevice::open(tx_frame_bytes).map_err(|e| failed(format_args!("{e}")))?;
    if tso && !device.has(VIRTIO_NET_F_HOST_TSO4) {
        return Err(failed(format_args!(
            "frames above {UDP_FRAME_MAX_BYTES} bytes are TSO frames, and the device does not \
             offer VIRTIO_NET_F_HOST_TSO4 (with CSUM)"
        )));
    }
    let offloads = offload_names(&device);
    println!(
        "{NAME} device mac={} features={:#x} offloads={} queue_size={}",
        Mac(device.config.mac),
        device.features,
        offloads,
        device.queue_sizes().0
    );
    let mut bench = Bench {
        iface: Iface {
            mac: device.config.mac,
            ip,
            udp_port: port as u16,
        },
        device,
        frame: vec![0u8; RX_FRAME_MAX_BYTES],
        reply: vec![0u8; UDP_FRAME_MAX_BYTES],
        dropped: 0,
        bad_num_buffers: 0,
    };
    let mut settings = Settings {
        rate,
        time_ms,
        wait_ms,
        start_on_datagram,
        peer,
        peer_mac,
    };
    for (index, spec) in runs.iter().enumerate() {
        bench.iface.udp_port = port as u16 + index as u16;
        // What arrived between runs is not this run's.
        bench.drain(None)?;
        bench.dropped = 0;
        bench.bad_num_buffers = 0;
        let notifies = bench.device.notifies();
        let dir = match spec {
            RunSpec::Tx { .. } => "tx",
            RunSpec::Rx => "rx",
        };
        let totals = match *spec {
            RunSpec::Tx { size } => send_for(&mut bench, &mut settings, index, size)?,
            RunSpec::Rx => {
                println!(
                    "{NAME} ready run={index} dir=rx port={}",
                    bench.iface.udp_port
                );
                receive_for(&mut bench, &settings)?
            }
        };
        report(
            &bench,
            &settings,
            &offloads,
            index,
            dir,
            *spec,
            &totals,
            bench.device.notifies() - notifies,
        );
    }
    if settings.start_on_datagram {
        bench.iface.udp_port = port as u16 + runs.len() as u16;
        println!("{NAME} done port={}", bench.iface.udp_port);
        wait_for_datagram(&mut bench, &settings.rate, settings.wait_ms)?;
    }
    Ok(())
}

/// Answers what comes until a datagram or segment to the job's port does,
/// for at most `wait_ms`.
fn wait_for_datagram(bench: &mut Bench, rate: &TscRate, wait_ms: u64) -> Result<(), JobFailed> {
    let give_up = tsc::now() + rate.cycles_in_ms(wait_ms);
    loop {
        if bench.drain(None)?.1 {
            return Ok(());
        }
        if tsc::now() >= give_up {
            return Err(failed(format_args!(
                "no datagram to port {} within {wait_ms} ms",
                bench.iface.udp_port
            )));
        }
        core::hint::spin_loop();
    }
}

/// The negotiated offloads, comma-separated (empty when none).
fn offload_names(device: &NetDevice) -> String {
    let mut names = String::new();
    for &(bit, name) in OFFLOAD_NAMES {
        if device.has(bit) {
            if !names.is_empty() {
                names.push(',');
            }
            names.push_str(name);
        }
    }
    names
}

#[allow(clippy::too_many_arguments)]
fn report(
    bench: &Bench,
    settings: &Settings,
    offloads: &str,
    index: usize,
    dir: &str,
    spec: RunSpec,
    totals: &Totals,
    notifies: u64,
) {
    let rate = &settings.rate;
    let per_sec = |n: u64| rate.per_sec(n, totals.elapsed_cycles);
    let size = match spec {
        RunSpec::Tx { size } => Some(size),
        RunSpec::Rx => None,
    };
    let header_bytes = if totals.tcp {
        TCP_FRAME_HEADER_BYTES
    } else {
        UDP_FRAME_HEADER_BYTES
    };
    let proto = match (totals.udp, totals.tcp) {
        (true, true) => "\"udp+tcp\"",
        (true, false) => "\"udp\"",
        (false, true) => "\"tcp\"",
        (false, false) => "null",
    };
    let mut line = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        line,
        "result {{\"job\":\"{NAME}\",\"run\":{index},\"dir\":\"{dir}\",\"proto\":{proto},\
         \"size\":{},\"payload\":{},\"port\":{},\"time_ms\":{},\"elapsed_ms\":{},\"elapsed_cycles\":{},\
         \"packets\":{},\"bytes\":{},\"packets_per_sec\":{},\"bits_per_sec\":{},\"lost\":{},\
         \"lost_bytes\":{},\"gso_frames\":{},\"csum_offloaded\":{},\"dropped\":{},\"rx_bad_num_buffers\":{},\
         \"tx_ring_full\":{},\"notifies\":{notifies},\"queue_size\":{},\"mrg_rxbuf\":{},\
         \"event_idx\":{},\"features\":\"{:#x}\",\"offloads\":\"{offloads}\",\"tsc_khz\":{}}}",
        Maybe(size),
        Maybe(size.map(|s| s - header_bytes)),
        bench.iface.udp_port,
        settings.time_ms,
        rate.ms(totals.elapsed_cycles),
        totals.elapsed_cycles,
        totals.packets,
        totals.bytes,
        per_sec(totals.packets),
        per_sec(totals.bytes.saturating_mul(8)),
        Maybe(totals.lost),
        Maybe(totals.lost_bytes),
        totals.gso_frames,
        totals.csum_offloaded,
        bench.dropped,
        bench.bad_num_buffers,
        totals.tx_ring_full,
        bench.device.queue_sizes().0,
        bench.device.has(VIRTIO_NET_F_MRG_RXBUF),
        bench.device.has(VIRTIO_F_EVENT_IDX),
        bench.device.features,
        rate.khz,
    );
    println!("{line}");
}

/// The peer's MAC: `peer_mac=`, or the answer to an ARP request (resolved
/// once, for every run).
fn resolve_peer(
    bench: &mut Bench,
    settings: &mut Settings,
    peer_ip: [u8; 4],
) -> Result<[u8; 6], JobFailed> {
    if let Some(mac) = settings.peer_mac {
        return Ok(mac);
    }
    let mut request = [0u8; FRAME_MIN_BYTES];
    let request_len = netproto::arp_request(&bench.iface, peer_ip, &mut request);
    for _ in 0..ARP_ATTEMPTS {
        if let Err(e) = bench.device.send(&request[..request_len]) {
            return Err(failed(format_args!("{e}")));
        }
        let until = tsc::now() + settings.rate.cycles_in_ms(ARP_RETRY_MS);
        while tsc::now() < until {
            if let (Some(mac), _) = bench.drain(Some(peer_ip))? {
                settings.peer_mac = Some(mac);
                return Ok(mac);
            }
        }
    }
    Err(failed(format_args!(
        "no ARP answer from {}.{}.{}.{}",
        peer_ip[0], peer_ip[1], peer_ip[2], peer_ip[3]
    )))
}

/// Resolves the peer's MAC, says it is ready, waits for the go datagram if
/// asked to, then sends `size`-byte frames to the peer for `time_ms`.
fn send_for(
    bench: &mut Bench,
    settings: &mut Settings,
    index: usize,
    size: usize,
) -> Result<Totals, JobFailed> {
    let (peer_ip, peer_port) = settings.peer.expect("tx runs need peer= (checked)");
    let peer_mac = resolve_peer(bench, settings, peer_ip)?;
    let rate = &settings.rate;
    println!(
        "{NAME} ready run={index} dir=tx port={}",
        bench.iface.udp_port
    );
    if settings.start_on_datagram {
        wait_for_datagram(bench, rate, settings.wait_ms)?;
    }
    let tso = size > UDP_FRAME_MAX_BYTES;
    // The headers of each frame (and the UDP sequence number); the rest of
    // the frame is zero.
    let mut head = [0u8; HEAD_MAX_BYTES];
    let (head_len, mut hdr) = if tso {
        let (_, hdr) = netproto::tcp_frame(
            &bench.iface,
            peer_mac,
            peer_ip,
            peer_port,
            0,
            size - TCP_FRAME_HEADER_BYTES,
            &mut head,
        )
        .expect("a TSO frame of at most 64 KiB fits IPv4");
        (TCP_FRAME_HEADER_BYTES, hdr)
    } else {
        let mut frame = vec![0u8; size];
        netproto::udp_frame(
            &bench.iface,
            peer_mac,
            peer_ip,
            peer_port,
            size - UDP_FRAME_HEADER_BYTES,
            &mut frame,
        )
        .expect("size is within 60..=1514 bytes");
        // Even the smallest frame has 18 bytes of payload, room for the
        // sequence number.
        let head_len = UDP_FRAME_HEADER_BYTES + SEQ_BYTES;
        head[..head_len].copy_from_slice(&frame[..head_len]);
        (head_len, netproto::NetHdr::default())
    };
    let mut totals = Totals {
        udp: !tso,
        tcp: tso,
        ..Totals::default()
    };
    let start = tsc::now();
    let end = start + rate.cycles_in_ms(settings.time_ms);
    loop {
        if totals.packets % TX_CHECK_EVERY == 0 {
            if tsc::now() >= end {
                break;
            }
            bench.drain(None)?;
        }
        if tso {
            // The position of the frame's payload in the byte stream.
            let seq = (totals.packets as u32).wrapping_mul((size - TCP_FRAME_HEADER_BYTES) as u32);
            (_, hdr) = netproto::tcp_frame(
                &bench.iface,
                peer_mac,
                peer_ip,
                peer_port,
                seq,
                size - TCP_FRAME_HEADER_BYTES,
                &mut head,
            )
            .expect("as above");
        } else {
            head[UDP_FRAME_HEADER_BYTES..head_len].copy_from_slice(&totals.packets.to_le_bytes());
        }
        match bench
            .device
            .try_send_offloaded(&hdr, &head[..head_len], size)
        {
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
    if tso {
        totals.gso_frames = totals.packets;
        totals.csum_offloaded = totals.packets;
    }
    Ok(totals)
}

/// Where the TCP byte stream has been seen, in 64-bit positions: 32-bit
/// sequence numbers wrap every 4 GiB, which a fast run passes.
#[derive(Default)]
struct TcpSpan {
    /// The last sequence number seen and its 64-bit position.
    last: Option<(u32, u64)>,
    first: u64,
    end: u64,
    payload_bytes: u64,
}

impl TcpSpan {
    fn add(&mut self, seq: u32, len: usize) {
        let at = match self.last {
            // Within 2 GiB of the last one, before or after it.
            Some((last_seq, last_at)) => {
                last_at.wrapping_add_signed(i64::from(seq.wrapping_sub(last_seq) as i32))
            }
            // Far from 0 so that a segment a little before it stays positive.
            None => 1 << 40,
        };
        if self.last.is_none() {
            self.first = at;
            self.end = at;
        }
        self.last = Some((seq, at));
        self.first = self.first.min(at);
        self.end = self.end.max(at + len as u64);
        self.payload_bytes += len as u64;
    }

    fn lost_bytes(&self) -> u64 {
        (self.end - self.first).saturating_sub(self.payload_bytes)
    }
}

/// Counts the datagrams and segments to the job's port for `time_ms` from
/// the first one, which may take `wait_ms` to come.
fn receive_for(bench: &mut Bench, settings: &Settings) -> Result<Totals, JobFailed> {
    let rate = &settings.rate;
    let mut totals = Totals::default();
    let give_up = tsc::now() + rate.cycles_in_ms(settings.wait_ms);
    let mut window: Option<(u64, u64)> = None;
    // (first, last) UDP sequence numbers seen.
    let mut seqs: Option<(u64, u64)> = None;
    let mut sequenced = 0u64;
    let mut tcp = TcpSpan::default();
    loop {
        let now = tsc::now();
        match window {
            None if now >= give_up => {
                return Err(failed(format_args!(
                    "no datagram or segment to port {} within {} ms",
                    bench.iface.udp_port, settings.wait_ms
                )))
            }
            Some((_, end)) if now >= end => break,
            _ => {}
        }
        let Some(received) = bench.recv() else {
            core::hint::spin_loop();
            continue;
        };
        let Ok((len, trusted, gso)) = received else {
            continue;
        };
        let Some(segment) = bench.bench_frame(len, trusted) else {
            bench.answer(len)?;
            continue;
        };
        let (proto, seq, payload_len, first_bytes) = (
            segment.proto,
            segment.tcp_seq,
            segment.payload.len(),
            segment
                .payload
                .get(..SEQ_BYTES)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        );
        if window.is_none() {
            let start = tsc::now();
            window = Some((start, start + rate.cycles_in_ms(settings.time_ms)));
        }
        totals.packets += 1;
        totals.bytes += len as u64;
        totals.gso_frames += u64::from(gso);
        totals.csum_offloaded += u64::from(trusted);
        match (proto, seq) {
            (Proto::Tcp, Some(seq)) => {
                totals.tcp = true;
                tcp.add(seq, payload_len);
            }
            _ => {
                totals.udp = true;
                if let Some(seq) = first_bytes {
                    sequenced += 1;
                    seqs = Some(match seqs {
                        None => (seq, seq),
                        Some((first, last)) => (first.min(seq), last.max(seq)),
                    });
                }
            }
        }
    }
    let (start, _) = window.expect("the loop ends only once the window has started");
    totals.elapsed_cycles = tsc::now() - start;
    totals.lost = totals.udp.then(|| {
        seqs.map_or(0, |(first, last)| {
            (last - first + 1).saturating_sub(sequenced)
        })
    });
    totals.lost_bytes = totals.tcp.then(|| tcp.lost_bytes());
    Ok(totals)
}
