//! A VMM's side of the vhost-user connection, for the backend tests: the
//! `ringvm-net` binary on a real unix socket inside a network namespace of
//! its own, the guest of `ringvm-backend`'s test frontend (the vhost crate's
//! frontend, guest memory in a memfd that both processes map, split-queue
//! rings laid out by hand, kick/call eventfds), and an AF_PACKET socket on
//! the tap to see the host's side.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ringvm_backend::test_support::{wait_readable, BackendProcess};
pub use ringvm_backend::test_support::{Desc, Guest, QUEUE_SIZE, TIMEOUT};

/// A network namespace of the test's own, deleted on drop: the host's
/// interfaces are never touched.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ringvm-net-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        // No IPv6 autoconfiguration traffic on the taps made here.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns
    }

    /// Runs a command inside the namespace; it must succeed.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Whether a command inside the namespace succeeds.
    pub fn succeeds(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Creates an up tap, multi-queue or not, with jumbo frames (so a frame
    /// to the guest can be larger than a receive buffer).
    pub fn add_tap(&self, name: &str, multi_queue: bool) {
        let mut args = vec!["ip", "tuntap", "add", "dev", name, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.exec(&args);
        self.exec(&["ip", "link", "set", name, "mtu", "9000", "up"]);
    }

    /// An AF_PACKET socket bound to `ifname` in the namespace: sees every
    /// frame on the tap and sends frames into it. Made by a thread that
    /// enters the namespace alone (setns changes the calling thread only).
    pub fn packet_socket(&self, ifname: &str) -> PacketSocket {
        let path = format!("/run/netns/{}", self.name);
        let ifname = std::ffi::CString::new(ifname).unwrap();
        thread::spawn(move || {
            let ns = File::open(path).unwrap();
            // SAFETY: setns on an open namespace file; it changes this
            // short-lived thread's network namespace only.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
            // SAFETY: a NUL-terminated name that outlives the call.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            assert_ne!(ifindex, 0);
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket(2) with constant arguments; the result is
            // owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(protocol),
                )
            };
            assert!(fd >= 0);
            // SAFETY: a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: binds to an address on this stack frame, of the size
            // given.
            let ret = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
            PacketSocket { fd, ifindex }
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl PacketSocket {
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: sends `frame` (valid for its length) to an address on
        // this stack frame, of the size given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame the socket sees for which `wanted` is true.
    pub fn wait_for(&self, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = vec![0u8; 70_000];
        loop {
            assert!(
                Instant::now() < deadline,
                "the frame never showed on the tap"
            );
            if !wait_readable(self.fd.as_raw_fd(), Duration::from_millis(50)) {
                continue;
            }
            // SAFETY: receives at most buf.len() bytes into `buf`.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n >= 0, "{}", std::io::Error::last_os_error());
            let frame = &buf[..n as usize];
            if wanted(frame) {
                return frame.to_vec();
            }
        }
    }
}

/// A running `ringvm-net` in a namespace. Dereferences to the process
/// (stderr, signals, exit, counters).
pub struct Backend {
    // First: dropped (the process killed) before `dir` is removed.
    process: BackendProcess,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Backend {
    /// Starts `ringvm-net --tap TAP --socket ... args` in `ns` and waits
    /// for its socket.
    pub fn start(ns: &Netns, tap: &str, args: &[&str]) -> Backend {
        let mut backend = Self::spawn(ns, tap, args);
        backend.process.wait_for_socket(&backend.socket);
        backend
    }

    /// Spawns without waiting for the socket. `ip netns exec` execs the
    /// backend in its own process, so the child is the backend.
    pub fn spawn(ns: &Netns, tap: &str, args: &[&str]) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("net.sock");
        let process = BackendProcess::spawn(
            "ringvm-net",
            Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .arg(env!("CARGO_BIN_EXE_ringvm-net"))
                .args(["--tap", tap])
                .arg("--socket")
                .arg(&socket)
                .args(args),
        );
        Backend {
            process,
            dir,
            socket,
        }
    }
}

impl Backend {
    /// Waits until counter `name` is at least `value` (SIGUSR1 dumps);
    /// returns that dump. A pair's tap queue is attached asynchronously
    /// after SET_VRING_ENABLE, so frames from the host wait for
    /// `tap_attaches`.
    pub fn wait_counter(&self, name: &str, value: u64) -> HashMap<String, u64> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let counters = self.dump_counters();
            if counters[name] >= value {
                return counters;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {value}: {counters:?}\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Deref for Backend {
    type Target = BackendProcess;

    fn deref(&self) -> &BackendProcess {
        &self.process
    }
}

impl DerefMut for Backend {
    fn deref_mut(&mut self) -> &mut BackendProcess {
        &mut self.process
    }
}
