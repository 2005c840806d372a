//! QEMU as the vhost-user frontend of ringvm-net: ringvm-net serves a
//! multi-queue tap in a network namespace the test makes (the host's
//! interfaces are never touched), and QEMU runs the test guest's
//! `job=net-echo` on `-netdev vhost-user` with its RAM in a shared memfd.
//! The host pings the guest 20 times (0% loss) and echoes UDP datagrams of
//! 1, 100 and 1472 bytes through it byte for byte; when QEMU quits,
//! ringvm-net exits 0 and its counters show the frames. The same with two
//! queue pairs (`queues=2`, `mq=on`): the guest turns both on through
//! QEMU's control queue, QEMU enables pair 1's rings in ringvm-net
//! (SET_VRING_ENABLE), and the echoes from several source ports reach the
//! guest on both pairs.
//!
//! Needs root (netns, tap), /dev/net/tun and qemu-system-x86_64; skipped
//! otherwise.
//!
//! QEMU 7.2 sends SET_VRING_ENABLE before SET_FEATURES, and with two pairs
//! the same ADD_MEM_REG twice; both ended the connection in vhost 0.18, and
//! ringvm's patched copy accepts them (third_party/README.md).

use ringvm_tests::harness::{self, ExitOutcome};
use ringvm_tests::netns::{
    backend_counters, can_make_taps, echo_job, echo_through, udp_flows, Netns, GUEST_MAC_TEXT,
    UDP_SIZES,
};

/// 20 pings, 0% loss.
const PINGS: u16 = 20;
/// Guest RAM, all of it in the memfd QEMU shares with ringvm-net.
const MEMORY: &str = "128M";

/// Boots the test guest under QEMU with `queue_pairs` pairs on ringvm-net
/// (`--queues queue_pairs`) and checks the echo and ringvm-net's exit.
fn net_echo_under_qemu_vhost_user(queue_pairs: u16) {
    let Some(qemu) = harness::qemu_path() else {
        println!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    };
    if !can_make_taps() {
        return;
    }
    let ns = Netns::create(&format!("qemu-vu{queue_pairs}"), true)
        .expect("a network namespace with a multi-queue tap");
    let dir = tempfile::tempdir().unwrap();
    let pairs = queue_pairs.to_string();
    let mut backend = ns.spawn_ringvm_net(dir.path(), &["--queues", &pairs]);

    // QEMU itself stays in the host's namespace: it never touches the tap,
    // only ringvm-net's socket.
    let mut guest = harness::qemu_guest_command(&qemu, &echo_job(PINGS, queue_pairs));
    guest
        .args(["-m", MEMORY, "-nodefaults", "-serial", "stdio"])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={MEMORY},share=on"
        ))
        .args(["-numa", "node,memdev=mem", "-chardev"])
        .arg(format!("socket,id=c0,path={}", backend.socket.display()))
        .arg("-netdev")
        .arg(format!("vhost-user,id=n0,chardev=c0,queues={queue_pairs}"));
    let mut device = format!("virtio-net-pci,netdev=n0,disable-legacy=on,mac={GUEST_MAC_TEXT}");
    if queue_pairs > 1 {
        // One MSI-X vector per queue, one for the control queue, one for
        // configuration changes.
        device.push_str(&format!(",mq=on,vectors={}", 2 * queue_pairs + 2));
    }
    guest.arg("-device").arg(device);

    // A failed echo shows ringvm-net's side too (a dropped frontend is only
    // seen there).
    let echoed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        echo_through(&ns, guest, PINGS, queue_pairs)
    }));
    let out = echoed.unwrap_or_else(|panic| {
        eprintln!("--- ringvm-net ---\n{}", backend.log());
        std::panic::resume_unwind(panic)
    });
    // isa-debug-exit reports (5 << 1) | 1.
    assert_eq!(
        out.status,
        ExitOutcome::Exited((5 << 1) | 1),
        "{out}\n--- ringvm-net ---\n{}",
        backend.log()
    );
    // QEMU offers MQ with its own control queue (ringvm-net offers MQ), so
    // the guest reads max_virtqueue_pairs: the netdev's `queues`.
    let max_pairs = out
        .stdout
        .lines()
        .find(|l| l.contains("net-echo ready "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("max_pairs="))
        });
    assert_eq!(max_pairs, Some(pairs.as_str()), "{out}");

    // ringvm-net ends when QEMU disconnects, and says what went through.
    let (status, log) = backend.wait_exit();
    assert!(status.success(), "ringvm-net: {status}\n{log}");
    assert!(log.contains("frontend connected"), "{log}");
    let counters =
        backend_counters(&log).unwrap_or_else(|| panic!("no counters line at exit\n{log}"));
    let counter = |name: &str| {
        *counters
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in the counters\n{log}"))
    };
    // Guest to tap: the ARP answer, every echo reply and datagram. Tap to
    // guest: the ARP request, the corrupted frame, the pings and datagrams
    // (and whatever the host's stack adds, e.g. IPv6 solicitations).
    let answers = 1 + u64::from(PINGS) + (UDP_SIZES.len() * udp_flows(queue_pairs)) as u64;
    assert!(counter("tx_frames") >= answers, "{log}");
    assert!(counter("rx_frames") > answers, "{log}");
    // Each frame carries the 12-byte header; the largest echo is 1472 bytes.
    assert!(
        counter("tx_bytes") > counter("tx_frames") * 12 + 1472,
        "{log}"
    );
    for bad in [
        "tx_bad_short",
        "tx_bad_gso",
        "tx_bad_csum",
        "tx_bad_too_long",
        "tx_bad_memory",
        "tx_bad_writable",
        "rx_bad_chains",
        "tx_errors",
        "rx_errors",
    ] {
        assert_eq!(counter(bad), 0, "{bad}\n{log}");
    }
    println!(
        "ringvm-net under QEMU ({queue_pairs} pair(s)): tx_frames={} rx_frames={} tx_bytes={} rx_bytes={}",
        counter("tx_frames"),
        counter("rx_frames"),
        counter("tx_bytes"),
        counter("rx_bytes")
    );
}

#[test]
fn net_echo_through_qemu_vhost_user_and_ringvm_net() {
    net_echo_under_qemu_vhost_user(1);
}

#[test]
fn net_echo_through_qemu_vhost_user_with_two_queue_pairs() {
    net_echo_under_qemu_vhost_user(2);
}
