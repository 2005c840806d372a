//! The test guest's virtio-net driver and `job=net-echo` end to end, on a
//! tap in a network namespace of its own (the host's interfaces are never
//! touched): the host side pings the guest, echoes UDP datagrams through it
//! and sends it a corrupted frame. Two device paths, each with one queue
//! pair and with two:
//! - ringvm with `--net` and ringvm-net on the tap (20 pings, 0% loss);
//!   two pairs: `--net ...,num_queues=2` and `ringvm-net --queues 2`, ringvm
//!   serving the control queue and enabling pair 1 in ringvm-net when the
//!   guest asks;
//! - QEMU's in-process virtio-net-pci on the tap (the driver under a
//!   second implementation of the device); two pairs: `mq=on` on a
//!   two-queue tap.
//!
//! With two pairs the datagrams come from several source ports, so that the
//! tap spreads the flows over both of its queues, and the guest's
//! `rx_per_pair` must show that both pairs received frames.
//!
//! Needs root (netns, tap) and /dev/net/tun, and qemu-system-x86_64 for the
//! QEMU run; skipped otherwise.

use std::fs::File;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ringvm_tests::harness::{self, ExitOutcome};

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const TAP: &str = "rvtap0";
const QEMU_PINGS: u16 = 3;
/// The bar: 20 pings, 0% loss.
const RINGVM_PINGS: u16 = 20;
const UDP_SIZES: [usize; 3] = [1, 100, 1472];
/// UDP source ports (flows) with two queue pairs: the tap sends each flow
/// to one of its queues by the flow's hash, so all of them miss a pair
/// with probability 2^-15 (and the ping and ARP flows make it smaller).
const UDP_FLOWS_TWO_PAIRS: usize = 16;
/// The host's replies wait this long for each answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A network namespace, deleted (with the tap in it) on drop.
struct Netns(String);

impl Netns {
    /// `multi_queue`: ringvm-net opens its tap with IFF_MULTI_QUEUE, QEMU
    /// without unless it has two queues; the tap must be created to match.
    fn create(tag: &str, multi_queue: bool) -> io::Result<Netns> {
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
    fn enter(&self) -> io::Result<()> {
        let file = File::open(Path::new("/run/netns").join(&self.0))?;
        // SAFETY: setns(2) on a namespace file we hold open; it changes only
        // this thread's network namespace and touches no memory.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.0]);
    }
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

/// Pings the guest through a raw ICMP socket; checks every reply.
fn ping(count: u16) -> io::Result<()> {
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

/// Echoes datagrams through the guest's port 7, from `flows` source ports.
fn udp_echo(flows: usize) -> io::Result<()> {
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

/// UDP flows of a run with `pairs` queue pairs.
fn udp_flows(pairs: u16) -> usize {
    if pairs > 1 {
        UDP_FLOWS_TWO_PAIRS
    } else {
        1
    }
}

/// Sends the guest an IPv4 frame with a wrong header checksum, through a
/// packet socket on the tap.
fn send_corrupted_frame() -> io::Result<()> {
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

/// Root and /dev/net/tun, or why not.
fn can_make_taps() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: needs root and /dev/net/tun for a tap in a network namespace");
        return false;
    }
    true
}

/// Runs `guest` (a VMM running `echo_job(pings, pairs)`), and once it is
/// ready the host side in the namespace: a corrupted frame, `pings` pings,
/// the UDP echoes. Returns the VMM's output after checking the guest's
/// counts, and that each of its `pairs` queue pairs received frames.
fn echo_through(ns: &Netns, guest: Command, pings: u16, pairs: u16) -> harness::RunOutput {
    let (ready_tx, ready_rx) = mpsc::channel();
    let vmm_run = thread::spawn(move || {
        let mut signal = ReadySignal {
            seen: Vec::new(),
            ready: Some(ready_tx),
        };
        harness::run_bounded_echo(guest, Duration::from_secs(90), None, &mut signal)
    });
    let host_side = ready_rx.recv_timeout(Duration::from_secs(60)).map(|()| {
        thread::scope(|s| {
            s.spawn(|| -> io::Result<()> {
                ns.enter()?;
                send_corrupted_frame()?;
                ping(pings)?;
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
        .unwrap_or_else(|| panic!("no net-echo ok line\n{out}"));
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
    assert!(line.contains(" mac=52:54:00:12:34:56 pairs="), "{line}");
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

/// 1 ARP answer, the pings and the datagrams: then the job ends. `pairs=`
/// is left to its default, every pair the device has.
fn echo_job(pings: u16, pairs: u16) -> String {
    let answers = 1 + u64::from(pings) + (UDP_SIZES.len() * udp_flows(pairs)) as u64;
    format!("job=net-echo ip={GUEST_IP}/24 count={answers} time=60 exit=5")
}

#[test]
fn net_echo_through_ringvm_and_ringvm_net() {
    echo_through_ringvm(1);
}

#[test]
fn net_echo_through_ringvm_and_ringvm_net_with_two_queue_pairs() {
    echo_through_ringvm(2);
}

fn echo_through_ringvm(pairs: u16) {
    if !can_make_taps() {
        return;
    }
    let ns =
        Netns::create(&format!("ringvm{pairs}"), true).expect("a network namespace with a tap");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let mut backend = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(harness::binary("ringvm-net"))
        .args(["--tap", TAP, "--queues", &pairs.to_string(), "--socket"])
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning ringvm-net");
    harness::wait_for_path(&socket, Duration::from_secs(20), "ringvm-net");
    let mut guest = Command::new(harness::binary("ringvm"));
    let mut net = format!("socket={},mac=52:54:00:12:34:56", socket.display());
    if pairs > 1 {
        net.push_str(&format!(",num_queues={pairs}"));
    }
    guest
        .args(["--kernel", ringvm_tests::guest::GUEST_ELF_PATH, "--cmdline"])
        .arg(echo_job(RINGVM_PINGS, pairs))
        .arg("--net")
        .arg(net);
    let out = echo_through(&ns, guest, RINGVM_PINGS, pairs);
    assert_eq!(out.status, ExitOutcome::Exited(5), "{out}");
    // ringvm-net ends when ringvm disconnects.
    let status = backend.wait().expect("ringvm-net exit");
    let mut stderr = String::new();
    if let Some(mut pipe) = backend.stderr.take() {
        let _ = io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(status.success(), "ringvm-net: {status}\n{stderr}");
    assert!(stderr.contains("frontend connected"), "{stderr}");
    // Pair 0's tap queue attached at DRIVER_OK, pair 1's when the guest's
    // VQ_PAIRS_SET made ringvm enable its rings; none before.
    let counters = stderr
        .lines()
        .rev()
        .find_map(|l| l.split_once("counters: ").map(|(_, c)| c))
        .unwrap_or_else(|| panic!("no counters from ringvm-net\n{stderr}"));
    assert!(
        counters
            .split(' ')
            .any(|kv| kv == format!("tap_attaches={pairs}")),
        "{counters}"
    );
}

#[test]
fn net_echo_answers_ping_udp_and_counts_a_corrupted_frame_under_qemu() {
    echo_under_qemu(1);
}

#[test]
fn net_echo_serves_two_queue_pairs_under_qemu_multiqueue() {
    echo_under_qemu(2);
}

/// QEMU's virtio-net-pci on the tap; with more than one pair, `mq=on` on a
/// multi-queue tap with that many queues (QEMU serves the control queue,
/// and attaches a tap queue per enabled pair).
fn echo_under_qemu(pairs: u16) {
    let Some(qemu) = harness::qemu_path() else {
        println!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    };
    if !can_make_taps() {
        return;
    }
    let ns = match Netns::create(&format!("qemu{pairs}"), pairs > 1) {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIPPED: cannot set up a network namespace with a tap: {e}");
            return;
        }
    };
    let guest = harness::qemu_guest_command(&qemu, &echo_job(QEMU_PINGS, pairs));
    let mut netdev = format!("tap,id=n0,ifname={TAP},script=no,downscript=no");
    let mut device = "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56".to_string();
    if pairs > 1 {
        // vhost=off: QEMU moves the frames itself. Vectors: one per queue
        // (2 per pair and the control queue) and the config interrupt.
        netdev.push_str(&format!(",vhost=off,queues={pairs}"));
        device.push_str(&format!(",mq=on,vectors={}", 2 * pairs + 2));
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(guest.get_program())
        .args(guest.get_args())
        .args(["-m", "128M", "-nodefaults", "-serial", "stdio"])
        .args(["-netdev", &netdev, "-device", &device]);
    let out = echo_through(&ns, cmd, QEMU_PINGS, pairs);
    assert_eq!(out.status, ExitOutcome::Exited((5 << 1) | 1), "{out}");
}
