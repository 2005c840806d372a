//! The test guest's virtio-net driver and `job=net-echo` end to end, on a
//! tap in a network namespace of its own (the host's interfaces are never
//! touched): the host side pings the guest, echoes UDP datagrams through it
//! and sends it a corrupted frame. Two device paths:
//! - ringvm with `--net` and ringvm-net on the tap (20 pings, 0% loss);
//! - QEMU's in-process virtio-net-pci on the tap (the driver under a
//!   second implementation of the device).
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
    if !can_make_taps() {
        return;
    }
    let ns = Netns::create("ringvm", true).expect("a network namespace with a tap");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let mut backend = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(harness::binary("ringvm-net"))
        .args(["--tap", TAP, "--socket"])
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning ringvm-net");
    harness::wait_for_path(&socket, Duration::from_secs(20), "ringvm-net");
    let mut guest = Command::new(harness::binary("ringvm"));
    guest
        .args(["--kernel", ringvm_tests::guest::GUEST_ELF_PATH, "--cmdline"])
        .arg(echo_job(RINGVM_PINGS))
        .arg("--net")
        .arg(format!("socket={},mac=52:54:00:12:34:56", socket.display()));
    let out = echo_through(&ns, guest, RINGVM_PINGS);
    assert_eq!(out.status, ExitOutcome::Exited(5), "{out}");
    // ringvm-net ends when ringvm disconnects.
    let status = backend.wait().expect("ringvm-net exit");
    let mut stderr = String::new();
    if let Some(mut pipe) = backend.stderr.take() {
        let _ = io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(status.success(), "ringvm-net: {status}\n{stderr}");
    assert!(stderr.contains("frontend connected"), "{stderr}");
}

#[test]
fn net_echo_answers_ping_udp_and_counts_a_corrupted_frame_under_qemu() {
    let Some(qemu) = harness::qemu_path() else {
        println!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    };
    if !can_make_taps() {
        return;
    }
    let ns = match Netns::create("qemu", false) {
        Ok(ns) => ns,
        Err(e) => {
            println!("SKIPPED: cannot set up a network namespace with a tap: {e}");
            return;
        }
    };
    let guest = harness::qemu_guest_command(&qemu, &echo_job(QEMU_PINGS));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(guest.get_program())
        .args(guest.get_args())
        .args(["-m", "128M", "-nodefaults", "-serial", "stdio"])
        .arg("-netdev")
        .arg(format!("tap,id=n0,ifname={TAP},script=no,downscript=no"))
        .args([
            "-device",
            "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56",
        ]);
    let out = echo_through(&ns, cmd, QEMU_PINGS);
    assert_eq!(out.status, ExitOutcome::Exited((5 << 1) | 1), "{out}");
}
