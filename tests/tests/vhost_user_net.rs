//! ringvm as a vhost-user-net frontend (`--net`): the errors a user meets
//! (no socket, a peer that is not a vhost-user backend, a backend with too
//! few queues, more queue pairs than ringvm or the backend serves), and
//! ringvm + ringvm-net on a tap inside a network namespace the test makes,
//! which shows the device set up with the backend while the test guest runs,
//! with one queue pair or two.
//!
//! The tap test needs root and /dev/net/tun, as net-backend's tests do; it
//! never touches the host's interfaces.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ringvm_tests::guest::GUEST_ELF_PATH;
use ringvm_tests::harness::{binary, run_bounded, vm_survives_backend_death, RunOutput};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const SOCKET_WAIT: Duration = Duration::from_secs(20);

fn ringvm(args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(binary("ringvm"));
    cmd.args(args);
    run_bounded(cmd, RUN_TIMEOUT, Some("testguest:")).expect("spawning ringvm")
}

fn hello_with_net(spec: &str) -> RunOutput {
    ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--cmdline",
        "job=hello",
        "--net",
        spec,
    ])
}

/// Status 2, the socket named, and the guest never started.
fn assert_refused(out: &RunOutput, socket: &str, also: &str) {
    assert!(out.exited_with(2), "{out}");
    assert!(out.stderr.contains(socket), "the socket is named\n{out}");
    assert!(out.stderr.contains(also), "'{also}' is said\n{out}");
    assert!(
        !out.stdout.contains("testguest:"),
        "the guest must not start\n{out}"
    );
}

/// Waits for `child` to create `socket`; panics if it exits first.
fn wait_listening(child: &mut Child, socket: &Path, who: &str) {
    let deadline = Instant::now() + SOCKET_WAIT;
    while !socket.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{who} exited with {status} before listening (its stderr is above)");
        }
        assert!(
            Instant::now() < deadline,
            "{who} did not create {} within {SOCKET_WAIT:?}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn missing_socket_is_named_before_the_guest_starts() {
    let out = hello_with_net("socket=/nonexistent/net.sock");
    assert_refused(&out, "/nonexistent/net.sock", "--net 0");
}

#[test]
fn peer_that_is_not_vhost_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let mut buf = [0u8; 256];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nnot vhost-user at all");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let out = hello_with_net(&format!("socket={}", sock.display()));
    assert_refused(&out, sock.to_str().unwrap(), "vhost-user");
    server.join().unwrap();
}

#[test]
fn more_queue_pairs_than_ringvm_gives_are_refused() {
    let out = hello_with_net("socket=/tmp/ringvm-net-test.sock,num_queues=33");
    assert_refused(
        &out,
        "/tmp/ringvm-net-test.sock",
        "num_queues=33: use a number from 1 to 32",
    );
}

/// ringvm-net --queues 2: `num_queues=3` is refused naming the socket and
/// what the backend serves.
#[test]
fn more_queue_pairs_than_the_backend_serves_are_refused() {
    let Some(ns) = Netns::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let mut net = start_ringvm_net(&ns, &sock, 2);
    let out = hello_with_net(&format!("socket={},num_queues=3", sock.display()));
    let _ = net.kill();
    let _ = net.wait();
    assert_refused(
        &out,
        sock.to_str().unwrap(),
        "--net asks for num_queues=3 queue pairs, but the backend serves 2",
    );
}

#[test]
fn bad_mac_is_refused_with_the_option_named() {
    let out = hello_with_net("socket=/tmp/n.sock,mac=01:00:5e:00:00:01");
    assert_refused(&out, "/tmp/n.sock", "mac=01:00:5e:00:00:01: a multicast");
}

/// A backend with one virtqueue (ringvm-blk --queues 1) cannot serve a
/// virtio-net RX/TX pair.
#[test]
fn backend_with_too_few_queues_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("blk.sock");
    let mut blk = Command::new(binary("ringvm-blk"))
        .arg("--image")
        .arg(&img)
        .arg("--socket")
        .arg(&sock)
        .args(["--queues", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning ringvm-blk");
    wait_listening(&mut blk, &sock, "ringvm-blk");
    let out = hello_with_net(&format!("socket={}", sock.display()));
    let _ = blk.kill();
    let _ = blk.wait();
    assert_refused(
        &out,
        sock.to_str().unwrap(),
        "is it a vhost-user-net backend?",
    );
}

/// A network namespace of the test's own with a multi-queue tap in it,
/// deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Option<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ringvm-vmmnet-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let added = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !added {
            println!("SKIPPED: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        let ns = Netns { name };
        ns.exec(&[
            "ip",
            "tuntap",
            "add",
            "dev",
            "tap0",
            "mode",
            "tap",
            "multi_queue",
        ]);
        ns.exec(&["ip", "link", "set", "tap0", "up"]);
        Some(ns)
    }

    fn exec(&self, args: &[&str]) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "ip netns exec {} {args:?}", self.name);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// ringvm-net on the namespace's tap0 with `queues` pairs, its log
/// (RUST_LOG=info) on a pipe.
fn start_ringvm_net(ns: &Netns, sock: &Path, queues: u16) -> Child {
    // `ip netns exec` execs ringvm-net: the child's pid is ringvm-net's.
    let mut net = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(binary("ringvm-net"))
        .args(["--tap", "tap0", "--queues", &queues.to_string()])
        .args(["--mac", "52:54:00:12:34:56"])
        .arg("--socket")
        .arg(sock)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ringvm-net");
    wait_listening(&mut net, sock, "ringvm-net");
    net
}

#[test]
fn ringvm_net_on_a_tap_serves_the_device_while_the_guest_runs() {
    guest_runs_with_ringvm_net(1);
}

/// `num_queues=2` with ringvm-net --queues 2: accepted, the guest runs (the
/// test guest drives pair 0 and leaves the control queue alone).
#[test]
fn two_queue_pairs_are_accepted_when_ringvm_net_serves_them() {
    guest_runs_with_ringvm_net(2);
}

fn guest_runs_with_ringvm_net(pairs: u16) {
    let Some(ns) = Netns::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let mut net = start_ringvm_net(&ns, &sock, pairs);

    let mut cmd = Command::new(binary("ringvm"));
    cmd.args([
        "--kernel",
        GUEST_ELF_PATH,
        "--cmdline",
        "job=hello",
        "--net",
        &format!("socket={},num_queues={pairs}", sock.display()),
    ])
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1");
    let out = run_bounded(cmd, RUN_TIMEOUT, Some("testguest:")).expect("spawning ringvm");

    // ringvm-net exits 0 when its frontend goes away.
    let deadline = Instant::now() + SOCKET_WAIT;
    let status = loop {
        if let Some(s) = net.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = net.kill();
            break net.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut net_log = String::new();
    net.stderr
        .take()
        .unwrap()
        .read_to_string(&mut net_log)
        .unwrap();

    assert!(out.exited_with(0), "{out}\nringvm-net:\n{net_log}");
    assert!(out.stdout.contains("testguest: hello"), "{out}");
    assert!(
        out.stderr.contains("mac=52:54:00:12:34:56"),
        "the backend's MAC is the guest's\n{out}"
    );
    assert!(
        out.stderr.contains(&format!("pairs={pairs}")),
        "ringvm logs the pairs it gives\n{out}"
    );
    assert_eq!(status.code(), Some(0), "ringvm-net:\n{net_log}");
    assert!(net_log.contains("frontend connected"), "{net_log}");
    assert!(net_log.contains("frontend disconnected"), "{net_log}");
    assert!(net_log.contains("frontends=1"), "{net_log}");
}

#[test]
fn ringvm_net_death_leaves_the_vm_running() {
    let Some(ns) = Netns::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let mut net = start_ringvm_net(&ns, &sock, 1);
    let net_arg = format!("socket={}", sock.display());
    let stderr = vm_survives_backend_death(&["--net", &net_arg], || {
        net.kill().unwrap();
        net.wait().unwrap();
    });
    assert!(
        stderr.contains("backend disconnected") && stderr.contains("net0"),
        "the loss is logged, naming the device: {stderr}"
    );
}
