//! The ceiling: how fast this host moves the cases' frames through a tap
//! with nothing behind it but the kernel. It opens the multi-queue tap with
//! ringvm-net's own tap code (one queue, IFF_VNET_HDR with the 12-byte
//! header, non-blocking, attached) and
//!
//! - tx: writes the frames the guest would send (one write per frame, the
//!   TSO ones with their GSO header) as fast as it can; the rate is what the
//!   tap counted as arriving over the time taken;
//! - rx: enables checksum offload and TSO4 on the tap as ringvm-net does
//!   for a guest that negotiated them, and reads (one read per frame) what
//!   the host's sender (packet.rs, paced the same way as in the guest runs)
//!   injects, for the run time from the first frame.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ringvm_net::tap::{self, FrameFd, IoVec, VNET_HDR_BYTES};
use thiserror::Error;

use super::frames;
use super::netns::TapStats;
use super::netproto::{self, NetHdr};
use super::packet::{self, PacketSocket};
use super::report::{self, Measurement};
use super::{Case, Dir, TAP_MQ};

/// Frames written between looks at the clock.
const CLOCK_EVERY_FRAMES: u64 = 64;
/// How long the reader waits for a frame before it looks at the clock.
const READ_POLL_MS: libc::c_int = 10;
/// How long the reader waits for the first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame the reader takes: 64 KiB and an Ethernet header with a
/// VLAN tag, as ringvm-net's receive path.
const READ_BUFFER_BYTES: usize = VNET_HDR_BYTES + 65536 + 18;

#[derive(Debug, Error)]
pub enum CeilingError {
    #[error("opening tap {TAP_MQ}")]
    Tap(#[source] tap::TapError),
    #[error("tap {TAP_MQ}: {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no frame came through the tap within {} s", FIRST_FRAME_TIMEOUT.as_secs())]
    NoFrames,
    #[error("the host's sender stopped: {0}")]
    Sender(#[source] io::Error),
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> CeilingError {
    move |source| CeilingError::Io { what, source }
}

pub fn run(case: Case, runtime_s: u32) -> Result<Measurement, CeilingError> {
    let runtime = Duration::from_secs(u64::from(runtime_s));
    let tap = tap::open_tap(TAP_MQ, 1).map_err(CeilingError::Tap)?;
    // open_tap leaves the queue detached until its pair is enabled, as
    // ringvm-net does when the guest turns the pair on.
    tap.set_queue_attached(0, true)
        .map_err(io_error("attaching its queue"))?;
    let queue = &tap.queues[0];
    match case.dir {
        Dir::Tx => write_for(case, queue, runtime),
        Dir::Rx => read_for(case, queue, runtime),
    }
}

fn write_for(case: Case, queue: &FrameFd, runtime: Duration) -> Result<Measurement, CeilingError> {
    let mut stream = frames::stream(case.size, frames::guest(frames::GUEST_PORT), frames::peer());
    let mut frame = vec![0u8; VNET_HDR_BYTES + stream.frame_len()];
    stream
        .header()
        .write(&mut frame[..VNET_HDR_BYTES])
        .expect("room for the header");
    let mut stats = TapStats::open(TAP_MQ).map_err(io_error("opening its counters"))?;
    let before = stats.read().map_err(io_error("reading its counters"))?;
    let cpu_start = packet::thread_cpu_s();
    let start = Instant::now();
    let mut written = 0u64;
    loop {
        if written % CLOCK_EVERY_FRAMES == 0 && start.elapsed() >= runtime {
            break;
        }
        stream.write(written, &mut frame[VNET_HDR_BYTES..]);
        match queue.write_frame(&[IoVec::from_mut(&mut frame)]) {
            Ok(_) => written += 1,
            // Not taken this time (tun does not refuse writes today).
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() >= runtime {
                    break;
                }
            }
            Err(err) => return Err(io_error("writing a frame")(err)),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_s = packet::thread_cpu_s() - cpu_start;
    let tap = stats
        .read()
        .map_err(io_error("reading its counters"))?
        .since(&before);
    let header = stream.header();
    let gso = u64::from(header.is_gso()) * written;
    let csum = u64::from(header.checksum_offloaded()) * written;
    let mut m = Measurement::new(case, seconds, tap.rx_packets, tap.rx_bytes);
    m.sent = written;
    m.drops = written.saturating_sub(tap.rx_packets);
    m.tap_dropped = tap.rx_dropped;
    m.offloads = report::offloads_in_effect(case, gso, csum);
    m.gso_frames = gso;
    m.tap = Some(tap);
    if m.packets > 0 {
        m.cpu_us_per_packet
            .insert("writer".to_string(), cpu_s * 1e6 / m.packets as f64);
    }
    Ok(m)
}

fn read_for(case: Case, queue: &FrameFd, runtime: Duration) -> Result<Measurement, CeilingError> {
    tap::set_offload(queue, libc::TUN_F_CSUM | libc::TUN_F_TSO4)
        .map_err(io_error("enabling checksum offload and TSO4"))?;
    let socket = PacketSocket::open(TAP_MQ).map_err(io_error("opening an AF_PACKET socket"))?;
    let mut stream = frames::stream(
        case.size,
        frames::host(frames::TAP_MQ_MAC),
        frames::guest(frames::GUEST_PORT),
    );
    let mut stats = TapStats::open(TAP_MQ).map_err(io_error("opening its counters"))?;
    let before = stats.read().map_err(io_error("reading its counters"))?;
    // A fresh queue: nothing of an earlier case is in it.
    let ledger = packet::Ledger {
        base: before,
        sent: 0,
    };
    let stop = AtomicBool::new(false);
    let (read, sender) = std::thread::scope(|scope| {
        let sender =
            scope.spawn(|| packet::send_paced(&socket, TAP_MQ, stream.as_mut(), &stop, ledger));
        let read = read_frames(queue, runtime);
        stop.store(true, Ordering::Relaxed);
        (read, sender.join())
    });
    let sender = match sender {
        Ok(result) => result.map_err(CeilingError::Sender)?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let read = read?;
    let tap = stats
        .read()
        .map_err(io_error("reading its counters"))?
        .since(&before);
    let mut m = Measurement::new(case, read.seconds, read.frames, read.bytes);
    m.sent = sender.frames;
    m.tap_dropped = tap.tx_dropped;
    m.drops = tap.tx_dropped;
    m.offloads = report::offloads_in_effect(case, read.gso_frames, read.csum_offloaded);
    m.gso_frames = read.gso_frames;
    m.tap = Some(tap);
    m.sender = Some(sender);
    if m.packets > 0 {
        let per = |s: f64| s * 1e6 / m.packets as f64;
        m.cpu_us_per_packet
            .insert("reader".to_string(), per(read.cpu_s));
        m.cpu_us_per_packet
            .insert("host_sender".to_string(), per(sender.cpu_s));
    }
    Ok(m)
}

/// What the reader counted.
struct Read {
    seconds: f64,
    frames: u64,
    bytes: u64,
    gso_frames: u64,
    csum_offloaded: u64,
    cpu_s: f64,
}

/// Reads the benchmark's frames from `queue` for `runtime` from the first
/// one; other frames are not counted.
fn read_frames(queue: &FrameFd, runtime: Duration) -> Result<Read, CeilingError> {
    let guest = netproto::Iface {
        mac: frames::GUEST_MAC,
        ip: frames::GUEST_IP,
        udp_port: frames::GUEST_PORT,
    };
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let cpu_start = packet::thread_cpu_s();
    let waiting_since = Instant::now();
    let mut window: Option<Instant> = None;
    let mut read = Read {
        seconds: 0.0,
        frames: 0,
        bytes: 0,
        gso_frames: 0,
        csum_offloaded: 0,
        cpu_s: 0.0,
    };
    loop {
        match window {
            Some(start) if start.elapsed() >= runtime => break,
            None if waiting_since.elapsed() >= FIRST_FRAME_TIMEOUT => {
                return Err(CeilingError::NoFrames)
            }
            _ => {}
        }
        let n = match queue.read_frame(&[IoVec::from_mut(&mut buffer)]) {
            Ok(Some(n)) => n,
            Ok(None) => {
                wait_readable(queue)?;
                continue;
            }
            Err(err) => return Err(io_error("reading a frame")(err)),
        };
        let Some(header) = NetHdr::parse(&buffer[..n.min(VNET_HDR_BYTES)]) else {
            continue;
        };
        let frame = &buffer[VNET_HDR_BYTES.min(n)..n];
        let trusted = header.checksum_offloaded();
        if netproto::transport_payload(&guest, frame, !trusted).is_err() {
            continue;
        }
        if window.is_none() {
            window = Some(Instant::now());
        }
        read.frames += 1;
        read.bytes += frame.len() as u64;
        read.gso_frames += u64::from(header.is_gso());
        read.csum_offloaded += u64::from(trusted);
    }
    read.seconds = window.map_or(0.0, |start| start.elapsed().as_secs_f64());
    read.cpu_s = packet::thread_cpu_s() - cpu_start;
    Ok(read)
}

fn wait_readable(queue: &FrameFd) -> Result<(), CeilingError> {
    use std::os::fd::AsRawFd;
    let mut pollfd = libc::pollfd {
        fd: queue.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pollfd is a valid, initialised pollfd that lives across the
    // call, and the count (1) matches.
    let ret = unsafe { libc::poll(&mut pollfd, 1, READ_POLL_MS) };
    if ret == -1 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(io_error("waiting for a frame")(err));
        }
    }
    Ok(())
}
