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

use std::io;
use std::process::Command;
use std::time::Duration;

use ringvm_tests::harness::{self, ExitOutcome};
use ringvm_tests::netns::{can_make_taps, echo_job, echo_through, Netns, TAP};

const QEMU_PINGS: u16 = 3;
/// The bar: 20 pings, 0% loss.
const RINGVM_PINGS: u16 = 20;

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
