//! The host side of the test guest's `job=net-echo`, on a tap in a network
//! namespace of the test's own (the host's interfaces are never touched):
//! the namespace and its tap, ringvm-net serving that tap, pings, UDP
//! echoes and a corrupted frame sent to the guest, and the check of the
//! guest's `net-echo ok` line. Used by tests/tests/guest_net.rs (ringvm and
//! QEMU's in-process virtio-net) and tests/tests/qemu_vhost_user_net.rs
//! (QEMU as the vhost-user frontend of ringvm-net).
//!
//! Everything here needs root (netns, tap, raw sockets) and /dev/net/tun:
//! [`can_make_taps`] says whether the machine has them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::harness;

/// The tap's address in the namespace.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The address net-echo answers for (`ip=` of [`echo_job`]).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The MAC the device gives the guest (`mac=` of each VMM's device).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// [`GUEST_MAC`] as the VMMs' options spell it.
pub const GUEST_MAC_TEXT: &str = "52:54:00:12:34:56";
/// The tap's name inside the namespace.
pub const TAP: &str = "rvtap0";
/// Payload sizes of the UDP echoes: the smallest, a small one, and the
/// largest that fits a 1500-byte MTU without fragments.
pub const UDP_SIZES: [usize; 3] = [1, 100, 1472];
/// The host's requests wait this long for each answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of one VMM run of net-echo. QEMU's firmware alone takes about 20 s
/// on PVM before the guest's first instruction (it runs at CPL0, which PVM
/// emulates), and over 60 s with four QEMU tests booting at once beside a
/// build on 2 cores (seen in CI: the ready line came after the wait ended).
const ECHO_RUN_TIMEOUT: Duration = Duration::from_secs(240);
/// How long net-echo may take to print its ready line.
const ECHO_READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long ringvm-net may take to create its socket, and to exit after its
/// frontend went away.
const BACKEND_WAIT: Duration = Duration::from_secs(20);

/// A network namespace (its name is the field), deleted (with the tap in
/// it) on drop.
pub struct Netns(pub String);

impl Netns {
    /// A namespace named after `tag` and this process, with [`TAP`] in it,
    /// addressed [`HOST_IP`]/24 and up. `multi_queue`: ringvm-net opens its
    /// tap with IFF_MULTI_QUEUE, QEMU's tap netdev (one queue) without; the
    /// tap must be created to match.
    pub fn create(tag: &str, multi_queue: bool) -> io::Result<Netns> {
        let name = format!("ringvm-test-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        let n = ns.0.as_str();
        let mut tuntap = vec!["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"];
        if multi_queue {
            tuntap.push("multi_queue");
        }
        ip(&tuntap)?;
        ip(&["-n", n, "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
        ip(&["-n", n, "link", "set", TAP, "up"])?;
        Ok(ns)
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> io::Result<()> {
        let file = File::open(Path::new("/run/netns").join(&self.0))?;
        // SAFETY: setns(2) on a namespace file we hold open; it changes only
        // this thread's network namespace and touches no memory.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Starts `ringvm-net --tap TAP --socket <dir>/net.sock` with `args` in
    /// the namespace, its log in `<dir>/ringvm-net.log`, and waits for its
    /// socket.
    ///
    /// # Panics
    ///
    /// When it cannot be spawned, or exits or takes over [`BACKEND_WAIT`]
    /// before listening (with its log).
    pub fn spawn_ringvm_net(&self, dir: &Path, args: &[&str]) -> RingvmNet {
        let socket = dir.join("net.sock");
        let log = dir.join("ringvm-net.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(harness::binary("ringvm-net"))
            .args(["--tap", TAP, "--socket"])
            .arg(&socket)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("creating ringvm-net's log"))
            .spawn()
            .expect("spawning ringvm-net");
        let mut backend = RingvmNet { child, socket, log };
        let deadline = Instant::now() + BACKEND_WAIT;
        while !backend.socket.exists() {
            if let Some(status) = backend.child.try_wait().expect("polling ringvm-net") {
                panic!("ringvm-net {status} before listening\n{}", backend.log());
            }
            assert!(
                Instant::now() < deadline,
                "ringvm-net did not create {} within {BACKEND_WAIT:?}\n{}",
                backend.socket.display(),
                backend.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        backend
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.0]);
    }
}

/// ringvm-net serving the namespace's tap; killed on drop if still running.
pub struct RingvmNet {
    child: Child,
    /// The vhost-user socket it listens on.
    pub socket: PathBuf,
    log: PathBuf,
}

impl RingvmNet {
    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|err| format!("(cannot read {}: {err})", self.log.display()))
    }

    /// Waits (at most [`BACKEND_WAIT`]: it ends when its frontend
    /// disconnects) for it to exit; returns its status and its log.
    ///
    /// # Panics
    ///
    /// When it is still running after the wait (it is killed).
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + BACKEND_WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling ringvm-net") {
                return (status, self.log());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "ringvm-net did not exit within {BACKEND_WAIT:?} of its frontend's end\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RingvmNet {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last `counters: name=value ...` line a backend logged (at exit, or
/// on SIGUSR1), as a map; `None` when there is none.
pub fn backend_counters(log: &str) -> Option<BTreeMap<String, u64>> {
    const MARKER: &str = "counters: ";
    let line = log.lines().rev().find(|l| l.contains(MARKER))?;
    let list = &line[line.find(MARKER)? + MARKER.len()..];
    let counters: BTreeMap<String, u64> = list
        .split_whitespace()
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect();
    (!counters.is_empty()).then_some(counters)
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Forwards the guest's console, and says when net-echo is ready.
struct ReadySignal {
    seen: Vec<u8>,
    ready: Option<mpsc::Sender<()>>,
}

impl Write for ReadySignal {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.seen.extend_from_slice(buf);
        if self.ready.is_some() && String::from_utf8_lossy(&self.seen).contains("net-echo ready") {
            let _ = self.ready.take().expect("checked").send(());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn socket(domain: i32, kind: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(domain, kind, protocol) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Pings the guest `count` times through a raw ICMP socket; every request
/// must be answered (0% loss) with a reply that matches it.
pub fn ping(count: u16) -> io::Result<()> {
    // A raw socket read and written as a datagram socket (IPv4 header on
    // receive only).
    let sock = UdpSocket::from(socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP)?);
    sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let to = SocketAddr::V4(SocketAddrV4::new(GUEST_IP, 0));
    for seq in 0..count {
        let mut request = vec![8, 0, 0, 0, 0x12, 0x34];
        request.extend_from_slice(&seq.to_be_bytes());
        request.extend((0..56u8).map(|i| i.wrapping_mul(seq as u8 + 7)));
        let sum = checksum(&request);
        request[2..4].copy_from_slice(&sum.to_be_bytes());
        sock.send_to(&request, to)?;
        let mut buf = [0u8; 2048];
        loop {
            let (len, from) = sock.recv_from(&mut buf)?;
            let header = usize::from(buf[0] & 0xf) * 4;
            let reply = &buf[header..len];
            if from != to || reply[0] != 0 {
                continue; // our own request, looped back to the raw socket
            }
            assert_eq!(checksum(reply), 0, "ICMP checksum of the reply");
            assert_eq!(checksum(&buf[..header]), 0, "IPv4 checksum of the reply");
            assert_eq!(&reply[4..], &request[4..], "echo reply {seq}");
            break;
        }
    }
    Ok(())
}

/// UDP source ports (flows) with more than one queue pair: the tap sends
/// each flow to one of its queues by the flow's hash, so all of them miss a
/// pair with probability 2^-15 (and the ping and ARP flows make it
/// smaller).
const UDP_FLOWS_MULTI_PAIR: usize = 16;

/// UDP flows of a run with `pairs` queue pairs.
pub fn udp_flows(pairs: u16) -> usize {
    if pairs > 1 {
        UDP_FLOWS_MULTI_PAIR
    } else {
        1
    }
}

/// Echoes datagrams of [`UDP_SIZES`] through the guest's port 7, from
/// `flows` source ports, and checks them byte for byte.
pub fn udp_echo(flows: usize) -> io::Result<()> {
    for flow in 0..flows {
        let sock = UdpSocket::bind((HOST_IP, 0))?;
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        for size in UDP_SIZES {
            let message: Vec<u8> = (0..size).map(|i| (i * 7 + size + flow) as u8).collect();
            sock.send_to(&message, (GUEST_IP, 7))?;
            let mut buf = [0u8; 2048];
            let (len, from) = sock.recv_from(&mut buf)?;
            assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(GUEST_IP, 7)));
            assert_eq!(
                &buf[..len],
                &message[..],
                "echo of {size} bytes, flow {flow}"
            );
        }
    }
    Ok(())
}

/// Sends the guest an IPv4 frame with a wrong header checksum, through a
/// packet socket on the tap.
pub fn send_corrupted_frame() -> io::Result<()> {
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
    let name = std::ffi::CString::new(TAP).expect("no NUL");
    // SAFETY: a NUL-terminated name that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a sockaddr_ll of the length given, alive for the call.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound == -1 {
        return Err(io::Error::last_os_error());
    }
    let mut frame = GUEST_MAC.to_vec();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    // IPv4 + UDP to port 7, header checksum left wrong (0).
    frame.extend_from_slice(&[0x45, 0, 0, 29, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    frame.extend_from_slice(&HOST_IP.octets());
    frame.extend_from_slice(&GUEST_IP.octets());
    frame.extend_from_slice(&[0x9c, 0x40, 0, 7, 0, 9, 0, 0, b'x']);
    File::from(fd).write_all(&frame)
}

/// Root and /dev/net/tun; prints `SKIPPED: ...` and returns false without
/// them.
pub fn can_make_taps() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: needs root and /dev/net/tun for a tap in a network namespace");
        return false;
    }
    true
}

/// Runs `guest` (a VMM running [`echo_job`]`(pings, pairs)`), and once it
/// is ready the host side in the namespace: `pings` pings, a corrupted
/// frame, the UDP echoes (from [`udp_flows`]`(pairs)` source ports).
/// Returns the VMM's output after checking the guest's counts (one ARP
/// answer, every ping and datagram, the corrupted frame dropped,
/// [`GUEST_MAC`], `pairs` queue pairs each of which received frames).
pub fn echo_through(ns: &Netns, guest: Command, pings: u16, pairs: u16) -> harness::RunOutput {
    let (ready_tx, ready_rx) = mpsc::channel();
    let vmm_run = thread::spawn(move || {
        let mut signal = ReadySignal {
            seen: Vec::new(),
            ready: Some(ready_tx),
        };
        harness::run_bounded_echo(guest, ECHO_RUN_TIMEOUT, None, &mut signal)
    });
    let host_side = ready_rx.recv_timeout(ECHO_READY_TIMEOUT).map(|()| {
        thread::scope(|s| {
            s.spawn(|| -> io::Result<()> {
                ns.enter()?;
                // The pings first: they wait for the guest's link (ARP is
                // retried), whereas a frame sent before the backend has
                // attached a tap queue is dropped by the kernel.
                ping(pings)?;
                send_corrupted_frame()?;
                udp_echo(udp_flows(pairs))
            })
            .join()
        })
    });
    let out = vmm_run
        .join()
        .expect("VMM thread")
        .expect("spawning the VMM");
    match host_side {
        Err(_) => panic!("net-echo did not get ready\n{out}"),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Ok(Ok(result)) => result.unwrap_or_else(|e| panic!("host side: {e}\n{out}")),
    }
    assert!(
        out.stdout
            .contains("net-echo dropped a malformed frame: bad IPv4 header checksum"),
        "{out}"
    );
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("testguest: net-echo ok "))
        .unwrap_or_else(|| panic!("no net-echo ok line\n{out}"))
        .trim_end();
    println!("net-echo ok {line}");
    let field = |key: &str| -> u64 {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in {line}"))
    };
    assert_eq!(field("arp"), 1, "{line}");
    assert_eq!(field("icmp"), u64::from(pings), "{line}");
    assert_eq!(
        field("udp"),
        (UDP_SIZES.len() * udp_flows(pairs)) as u64,
        "{line}"
    );
    assert!(field("dropped") >= 1, "{line}");
    assert!(
        line.contains(&format!(" mac={GUEST_MAC_TEXT} pairs=")),
        "{line}"
    );
    assert_eq!(field("pairs"), u64::from(pairs), "{line}");
    let per_pair: Vec<u64> = line
        .split(' ')
        .find_map(|kv| kv.strip_prefix("rx_per_pair="))
        .unwrap_or_else(|| panic!("no rx_per_pair= in {line}"))
        .split(',')
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("rx_per_pair in {line}"))
        })
        .collect();
    assert_eq!(per_pair.len(), usize::from(pairs), "{line}");
    assert!(
        per_pair.iter().all(|&n| n > 0),
        "a queue pair received nothing: {line}"
    );
    out
}

/// `job=net-echo` for [`GUEST_IP`] that ends after 1 ARP answer, `pings`
/// pings and the datagrams of a run with `pairs` pairs (or 60 s) with exit
/// code 5. `pairs=` is left to its default: every pair the device has.
pub fn echo_job(pings: u16, pairs: u16) -> String {
    let answers = 1 + u64::from(pings) + (UDP_SIZES.len() * udp_flows(pairs)) as u64;
    format!("job=net-echo ip={GUEST_IP}/24 count={answers} time=60 exit=5")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_come_from_the_last_counters_line() {
        let log = "2025-01-01T00:00:00Z  INFO ringvm_net: counters: tx_frames=1 rx_frames=2\n\
                   2025-01-01T00:00:01Z  INFO ringvm_net: frontend disconnected\n\
                   2025-01-01T00:00:01Z  INFO ringvm_net: counters: tx_frames=25 rx_frames=27 \
                   tx_bytes=3000\n";
        let counters = backend_counters(log).unwrap();
        assert_eq!(counters.get("tx_frames"), Some(&25));
        assert_eq!(counters.get("rx_frames"), Some(&27));
        assert_eq!(counters.get("tx_bytes"), Some(&3000));
        assert_eq!(backend_counters("no counters here\n"), None);
    }

    #[test]
    fn checksum_of_a_checksummed_header_is_zero() {
        // An IPv4 header with its checksum (0xb861) filled in.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&header), 0);
        let mut unsummed = header;
        unsummed[10..12].fill(0);
        assert_eq!(checksum(&unsummed), 0xb861);
    }

    #[test]
    fn echo_job_counts_every_answer() {
        assert_eq!(
            echo_job(20, 1),
            "job=net-echo ip=10.77.0.2/24 count=24 time=60 exit=5"
        );
        assert_eq!(
            echo_job(20, 2),
            "job=net-echo ip=10.77.0.2/24 count=69 time=60 exit=5"
        );
    }
}
