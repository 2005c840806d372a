//! The host's sender: frames injected into a tap from the host side through
//! an AF_PACKET socket, as if the host's stack sent them, towards whatever
//! reads the tap (ringvm-net, QEMU, or the ceiling's reader).
//!
//! The socket has PACKET_VNET_HDR, so each frame carries a (legacy, 10-byte)
//! virtio-net header: 64 KiB TSO frames go in as one GSO packet with a
//! partial checksum, and the tap hands them to its reader whole when the
//! reader enabled TSO4 on it (TUNSETOFFLOAD, which ringvm-net and QEMU do
//! when the guest negotiated GUEST_TSO4); otherwise the kernel cuts them into
//! segments first. PACKET_QDISC_BYPASS skips the queueing discipline.
//!
//! A tap never pushes back: when its queue towards the reader is full it
//! drops (counter tx_dropped). So the sender keeps at most a window of frames
//! in flight, measured with the tap's own counters ([`Ledger`]: frames sent
//! less frames taken by the reader or dropped), and sleeps while the window
//! is full: the reader sets the pace, and the sender leaves the CPU to it.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::netns::{TapCounters, TapStats};
use super::netproto::{NetHdr, NET_HDR_LEGACY_BYTES};

/// Frames handed to the kernel per sendmmsg(2).
const BATCH_FRAMES: usize = 64;
/// Bytes in flight at most (frames sent and not yet taken by the reader or
/// dropped): 4 MiB is more than the tap's queue holds of 60- or 1514-byte
/// frames, so the window in frames decides for those, and this for 64 KiB
/// ones (64 of them: four times what the guest's receive ring holds).
const WINDOW_BYTES: usize = 4 << 20;
/// Frames in flight at most: three quarters of the tap's queue, so that the
/// window never overflows it.
const WINDOW_FRAMES: usize = super::netns::TAP_TX_QUEUE_LEN as usize * 3 / 4;
/// Pause while the window is full. Short enough that a fast reader does not
/// run dry (768 frames of 64 bytes last it about a millisecond, 64 of 64 KiB
/// about as long), long enough that the sender's polls (a netlink request
/// each) cost little CPU. The sender's timer slack is set to 1 µs so that a
/// pause is about as long as asked.
const FULL_WINDOW_PAUSE: Duration = Duration::from_micros(50);

/// An AF_PACKET socket bound to one tap, sending frames with a virtio-net
/// header in front.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens the socket on `tap` (in the calling thread's namespace). It
    /// receives nothing: bound with protocol 0, the kernel delivers no frame
    /// to it.
    pub fn open(tap: &str) -> io::Result<PacketSocket> {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(tap).map_err(io::Error::other)?;
        // SAFETY: name is NUL-terminated and outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        for option in [libc::PACKET_VNET_HDR, libc::PACKET_QDISC_BYPASS] {
            let on: libc::c_int = 1;
            // SAFETY: the option value is a c_int on this stack frame, and
            // the length passed is its size.
            let ret = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    option,
                    (&on as *const libc::c_int).cast(),
                    mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if ret == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
        // SAFETY: addr is a sockaddr_ll of the length given, alive for the
        // call.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if ret == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd })
    }

    /// Sends `frames` (each a virtio-net header and a frame) with one
    /// sendmmsg; how many the kernel took.
    pub fn send(&self, frames: &[Vec<u8>]) -> io::Result<usize> {
        let mut iovecs: Vec<libc::iovec> = frames
            .iter()
            .map(|frame| libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            })
            .collect();
        let mut messages: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iov| {
                // SAFETY: msghdr is plain data; all zeroes is a valid value
                // (no name, no control data).
                let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
                hdr.msg_iov = iov;
                hdr.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: hdr,
                    msg_len: 0,
                }
            })
            .collect();
        loop {
            // SAFETY: each message points to one iovec in `iovecs`, each
            // iovec to a frame in `frames`; all outlive the call, and the
            // kernel only reads the frames. The count matches `messages`.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    messages.as_mut_ptr(),
                    u32::try_from(messages.len()).unwrap_or(u32::MAX),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                // The device's queue is stopped or the socket buffer is
                // full: nothing was sent this time.
                io::ErrorKind::WouldBlock => return Ok(0),
                _ if err.raw_os_error() == Some(libc::ENOBUFS) => return Ok(0),
                _ => return Err(err),
            }
        }
    }
}

/// Builds one frame of a stream: the frame with sequence number `seq`
/// (from 0) into `out` (the frame's bytes; its virtio-net header is written
/// by the caller). Every frame of a stream has the same length and header.
pub trait FrameStream: Send {
    /// The frame's length without its virtio-net header.
    fn frame_len(&self) -> usize;
    fn header(&self) -> NetHdr;
    fn write(&mut self, seq: u64, out: &mut [u8]);
}

/// What a sender did.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SenderTotals {
    pub frames: u64,
    pub bytes: u64,
    /// Times the window was full and the sender paused.
    pub pauses: u64,
    /// The sender thread's CPU time.
    pub cpu_s: f64,
}

/// Every frame sent into a tap from the host since `base` was read: the
/// frames in its queue are `sent` less what its counters say was taken or
/// dropped since. Kept across the runs of a session, so that the frames one
/// run leaves in the queue count as in flight in the next (else the window
/// would overfill the queue by as many).
#[derive(Clone, Copy, Debug)]
pub struct Ledger {
    pub base: TapCounters,
    pub sent: u64,
}

impl Ledger {
    /// A ledger from now, for `tap` whose queue holds nothing of ours.
    pub fn open(stats: &mut TapStats) -> io::Result<Ledger> {
        Ok(Ledger {
            base: stats.read()?,
            sent: 0,
        })
    }

    fn in_flight(&self, sent_now: u64, counters: &TapCounters) -> u64 {
        let done = counters.since(&self.base);
        (self.sent + sent_now).saturating_sub(done.tx_packets + done.tx_dropped)
    }
}

/// Sends the frames of `stream` through `socket` on `tap` until `stop` is
/// set, keeping the window (see the module doc) against the tap's counters
/// and `ledger` (which the caller then adds the frames sent to).
pub fn send_paced(
    socket: &PacketSocket,
    tap: &str,
    stream: &mut dyn FrameStream,
    stop: &AtomicBool,
    ledger: Ledger,
) -> io::Result<SenderTotals> {
    set_timer_slack_ns(1000);
    let frame_len = stream.frame_len();
    let window = window_frames(frame_len);
    let batch = BATCH_FRAMES.min(window as usize).max(1);
    let mut frames = vec![vec![0u8; NET_HDR_LEGACY_BYTES + frame_len]; batch];
    let header = stream.header();
    for frame in &mut frames {
        header
            .write(&mut frame[..NET_HDR_LEGACY_BYTES])
            .expect("room for the legacy header");
    }
    let mut stats = TapStats::open(tap)?;
    let cpu_start = thread_cpu_s();
    let mut totals = SenderTotals::default();
    while !stop.load(Ordering::Relaxed) {
        let in_flight = ledger.in_flight(totals.frames, &stats.read()?);
        let room = window.saturating_sub(in_flight) as usize;
        if room < batch {
            totals.pauses += 1;
            std::thread::sleep(FULL_WINDOW_PAUSE);
            continue;
        }
        for (i, frame) in frames.iter_mut().enumerate() {
            stream.write(totals.frames + i as u64, &mut frame[NET_HDR_LEGACY_BYTES..]);
        }
        let sent = socket.send(&frames)?;
        if sent == 0 {
            totals.pauses += 1;
            std::thread::sleep(FULL_WINDOW_PAUSE);
        }
        totals.frames += sent as u64;
        totals.bytes += (sent * frame_len) as u64;
    }
    totals.cpu_s = thread_cpu_s() - cpu_start;
    Ok(totals)
}

/// Frames in flight at most for frames of `frame_len` bytes.
fn window_frames(frame_len: usize) -> u64 {
    WINDOW_FRAMES.min((WINDOW_BYTES / frame_len.max(1)).max(1)) as u64
}

/// Sends one frame (a go signal) through `socket`, retrying while the
/// device's queue is full, for at most a second.
pub fn send_one(socket: &PacketSocket, header: NetHdr, frame: &[u8]) -> io::Result<()> {
    let mut buffer = vec![0u8; NET_HDR_LEGACY_BYTES + frame.len()];
    header
        .write(&mut buffer[..NET_HDR_LEGACY_BYTES])
        .expect("room for the legacy header");
    buffer[NET_HDR_LEGACY_BYTES..].copy_from_slice(frame);
    let deadline = Instant::now() + Duration::from_secs(1);
    let frames = [buffer];
    while socket.send(&frames)? == 0 {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the tap took no frame for a second",
            ));
        }
        std::thread::sleep(FULL_WINDOW_PAUSE);
    }
    Ok(())
}

/// The calling thread's user+system CPU time in seconds.
pub fn thread_cpu_s() -> f64 {
    // SAFETY: rusage is a C struct of integers and timevals: all zero bytes
    // is a valid value.
    let mut usage: libc::rusage = unsafe { mem::zeroed() };
    // SAFETY: usage is a valid, writable rusage that outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } == -1 {
        return 0.0;
    }
    let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Makes the calling thread's sleeps end within `ns` of their time (the
/// default slack is 50 µs).
fn set_timer_slack_ns(ns: libc::c_ulong) {
    // SAFETY: PR_SET_TIMERSLACK takes its value by value and changes only
    // the calling thread's timer slack. A failure leaves the default, which
    // only makes pauses longer.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_earlier_runs_stay_in_flight_until_taken() {
        let base = TapCounters {
            tx_packets: 100,
            tx_dropped: 5,
            ..TapCounters::default()
        };
        let ledger = Ledger { base, sent: 700 };
        let now = TapCounters {
            tx_packets: 300,
            tx_dropped: 5,
            ..TapCounters::default()
        };
        // 700 earlier frames, 200 of them taken since: 500 left, and the
        // 64 this sender sent.
        assert_eq!(ledger.in_flight(64, &now), 564);
        let drained = TapCounters {
            tx_packets: 900,
            tx_dropped: 10,
            ..TapCounters::default()
        };
        assert_eq!(ledger.in_flight(0, &drained), 0);
    }

    #[test]
    fn windows_stay_inside_the_taps_queue() {
        assert_eq!(window_frames(60), 768);
        assert_eq!(window_frames(1514), 768);
        assert_eq!(window_frames(65535), 64);
        assert_eq!(window_frames(0), 768);
        assert_eq!(window_frames(usize::MAX), 1);
        assert!(window_frames(60) < u64::from(super::super::netns::TAP_TX_QUEUE_LEN));
    }
}
