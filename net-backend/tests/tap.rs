//! Backend tests with no guest: `ringvm-net` on a real tap inside a network
//! namespace made for the test, driven through the vhost crate's frontend
//! with rings in shared memfd memory, as a VMM drives it; an AF_PACKET
//! socket on the tap plays the host.
//!
//! They need root and /dev/net/tun (as CI and the development machines
//! have).

mod support;

use support::{Backend, Desc::R, Desc::W, Guest, Netns};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

const TAP: &str = "rvtap0";
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// IEEE 802 local experimental ethertype: no stack in the namespace
/// answers or sends it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const HDR: u64 = 0x10_0000;
const FRAME: u64 = 0x11_0000;
const RX_BUFS: u64 = 0x20_0000;
const RX_BUF_BYTES: u32 = 2048;
const RXQ: usize = 0;
const TXQ: usize = 1;

fn frame(dst: [u8; 6], src: [u8; 6], payload_len: usize, seed: u8) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ETHERTYPE);
    frame.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    frame
}

#[test]
fn frames_go_both_ways_through_the_tap() {
    let ns = Netns::new();
    ns.add_tap(TAP, true);
    let host = ns.packet_socket(TAP);
    let mut backend = Backend::start(&ns, TAP, &["--mac", "52:54:00:12:34:56"]);
    let mut g = Guest::connect(&backend.socket, 2, true);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MQ,
    ] {
        assert_ne!(g.features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(g.frontend.get_queue_num().unwrap(), 2);
    let (_, config) = g
        .frontend
        .get_config(0, 10, VhostUserConfigFlags::empty(), &[0; 10])
        .unwrap();
    assert_eq!(&config[..6], MAC);
    assert_eq!(&config[6..8], 1u16.to_le_bytes(), "LINK_UP");
    assert_eq!(&config[8..10], 1u16.to_le_bytes(), "max_virtqueue_pairs");

    // TX: header and frame in two buffers; the frame shows on the tap.
    let sent = frame([0xff; 6], MAC, 200, 1);
    g.fill(HDR, 12, 0);
    g.write_mem(FRAME, &sent);
    let before = g.used_idx(TXQ);
    let head = g.submit(TXQ, &[R(HDR, 12), R(FRAME, sent.len() as u32)]);
    g.kick(TXQ);
    g.wait_used(TXQ, before.wrapping_add(1));
    assert_eq!(g.used(TXQ, before), (u32::from(head), 0));
    let seen = host.wait_for(|f| f == sent.as_slice());
    assert_eq!(seen, sent);

    // A bad frame (shorter than the header) is returned with length 0 and
    // the next good one still goes through.
    let before = g.used_idx(TXQ);
    let bad = g.submit(TXQ, &[R(HDR, 8)]);
    let sent2 = frame([0xff; 6], MAC, 64, 2);
    g.write_mem(FRAME, &sent2);
    let good = g.submit(TXQ, &[R(HDR, 12), R(FRAME, sent2.len() as u32)]);
    g.kick(TXQ);
    g.wait_used(TXQ, before.wrapping_add(2));
    assert_eq!(g.used(TXQ, before), (u32::from(bad), 0));
    assert_eq!(g.used(TXQ, before.wrapping_add(1)), (u32::from(good), 0));
    host.wait_for(|f| f == sent2.as_slice());

    // RX: the guest posts buffers (one descriptor each; with MRG_RXBUF a
    // frame may span several), the host sends a frame to the guest's MAC.
    let rx_chains = 40u16;
    for i in 0..rx_chains {
        let at = RX_BUFS + u64::from(i) * u64::from(RX_BUF_BYTES);
        g.submit(RXQ, &[W(at, RX_BUF_BYTES)]);
    }
    g.kick(RXQ);
    let received = frame(MAC, [0x02, 0, 0, 0, 0, 1], 3000, 3);
    host.send(&received);
    let mut entries = Vec::new();
    let mut seen_idx = 0;
    let (num_buffers, bytes) = loop {
        entries.extend(g.wait_used_entries(RXQ, &mut seen_idx));
        if let Some(found) = find_frame(&g, &entries) {
            break found;
        }
    };
    assert_eq!(num_buffers, 2, "3014 bytes + header span two 2 KiB buffers");
    assert_eq!(bytes, received);

    drop(g);
    let status = backend.wait_exit();
    assert!(status.success(), "{status}: {}", backend.stderr());
    let counters = backend.counters();
    assert_eq!(counters["tx_frames"], 2, "{counters:?}");
    assert_eq!(counters["tx_bad_short"], 1, "{counters:?}");
    assert!(counters["rx_frames"] >= 1, "{counters:?}");
    assert_eq!(counters["frontends"], 1);
    assert!(
        !backend.stderr().contains("cannot set offloads"),
        "{}",
        backend.stderr()
    );
}

/// The first frame of ours among the used RX entries: its num_buffers and
/// its bytes gathered from that many chains, without the header.
fn find_frame(g: &Guest, entries: &[(u32, u32)]) -> Option<(u16, Vec<u8>)> {
    let buffer = |id: u32| RX_BUFS + u64::from(id) * u64::from(RX_BUF_BYTES);
    for (i, &(id, len)) in entries.iter().enumerate() {
        if len < 12 + 14 || g.read(buffer(id) + 12 + 12, 2) != ETHERTYPE {
            continue;
        }
        let header = g.read(buffer(id), 12);
        let num_buffers = u16::from_le_bytes([header[10], header[11]]);
        let parts = entries.get(i..i + usize::from(num_buffers))?;
        let mut bytes = g.read(buffer(id) + 12, len as usize - 12);
        for &(next, next_len) in &parts[1..] {
            bytes.extend(g.read(buffer(next), next_len as usize));
        }
        return Some((num_buffers, bytes));
    }
    None
}

#[test]
fn a_missing_tap_is_an_error_naming_it() {
    let ns = Netns::new();
    let mut backend = Backend::spawn(&ns, "rvmissing0", &[]);
    let status = backend.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", backend.stderr());
    assert!(
        backend
            .stderr()
            .contains("ringvm-net: tap rvmissing0: no such network interface"),
        "{}",
        backend.stderr()
    );
    assert!(!backend.socket.exists());
    assert!(
        !ns.succeeds(&["ip", "link", "show", "rvmissing0"]),
        "the backend must not create the tap"
    );
}

#[test]
fn a_single_queue_tap_serves_one_pair_only() {
    let ns = Netns::new();
    ns.add_tap("rvsingle0", false);
    let mut backend = Backend::spawn(&ns, "rvsingle0", &["--queues", "2"]);
    let status = backend.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", backend.stderr());
    assert!(
        backend
            .stderr()
            .contains("ringvm-net: tap rvsingle0: not a multi-queue tap"),
        "{}",
        backend.stderr()
    );

    // Not a tap at all.
    let mut backend = Backend::spawn(&ns, "lo", &["--queues", "2"]);
    let status = backend.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", backend.stderr());
    assert!(
        backend
            .stderr()
            .contains("ringvm-net: tap lo: cannot attach queue 0 (is it a tap device"),
        "{}",
        backend.stderr()
    );

    // One pair is fine on it.
    let mut backend = Backend::start(&ns, "rvsingle0", &[]);
    let g = Guest::connect(&backend.socket, 2, false);
    drop(g);
    let status = backend.wait_exit();
    assert!(status.success(), "{status}: {}", backend.stderr());
}

#[test]
fn two_pairs_each_with_a_tap_queue() {
    let ns = Netns::new();
    ns.add_tap(TAP, true);
    let host = ns.packet_socket(TAP);
    let mut backend = Backend::start(&ns, TAP, &["--queues", "2"]);
    let mut g = Guest::connect(&backend.socket, 4, true);
    // TX on the second pair's TX queue (3).
    let sent = frame([0xff; 6], MAC, 100, 9);
    g.fill(HDR, 12, 0);
    g.write_mem(FRAME, &sent);
    g.submit(3, &[R(HDR, 12), R(FRAME, sent.len() as u32)]);
    g.kick(3);
    g.wait_used(3, 1);
    host.wait_for(|f| f == sent.as_slice());
    drop(g);
    let status = backend.wait_exit();
    assert!(status.success(), "{status}: {}", backend.stderr());
    assert_eq!(backend.counters()["tx_frames"], 1);
}

#[test]
fn without_receive_buffers_the_tap_waits_for_the_rx_kick() {
    let ns = Netns::new();
    ns.add_tap(TAP, true);
    let host = ns.packet_socket(TAP);
    let mut backend = Backend::start(&ns, TAP, &[]);
    // One frame per chain: MRG_RXBUF refused.
    let mut g = Guest::connect_without(&backend.socket, 2, true, 1 << VIRTIO_NET_F_MRG_RXBUF);
    let post = |g: &mut Guest, first: u16, count: u16| {
        for i in first..first + count {
            let at = RX_BUFS + u64::from(i) * u64::from(RX_BUF_BYTES);
            g.submit_at(RXQ, i, &[W(at, RX_BUF_BYTES)]);
        }
        g.kick(RXQ);
    };
    post(&mut g, 0, 2);
    backend.wait_counter("tap_attaches", 1);
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|seed| frame(MAC, [0x02, 0, 0, 0, 0, 1], 100, seed))
        .collect();
    for f in &frames[..3] {
        host.send(f);
    }
    let mut entries = Vec::new();
    let mut seen = 0;
    while entries.len() < 2 {
        entries.extend(g.wait_used_entries(RXQ, &mut seen));
    }
    assert_eq!(entries.len(), 2, "two chains, two frames");

    // Out of buffers: a frame more must not wake the backend.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let idle = backend.dump_counters();
    assert!(idle["rx_no_buffers"] >= 1, "{idle:?}");
    host.send(&frames[3]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let later = backend.dump_counters();
    assert_eq!(later["tap_wakeups"], idle["tap_wakeups"], "{later:?}");
    assert_eq!(later["rx_frames"], 2, "{later:?}");

    // New buffers and a kick: the frames that waited in the tap arrive.
    post(&mut g, 2, 2);
    while entries.len() < 4 {
        entries.extend(g.wait_used_entries(RXQ, &mut seen));
    }
    let mut got = Vec::new();
    for &(id, len) in &entries {
        assert_eq!(len as usize, 12 + frames[0].len());
        let at = RX_BUFS + u64::from(id) * u64::from(RX_BUF_BYTES);
        let header = g.read(at, 12);
        assert_eq!(u16::from_le_bytes([header[10], header[11]]), 1);
        got.push(g.read(at + 12, frames[0].len()));
    }
    assert_eq!(got, frames);
    drop(g);
    assert!(backend.wait_exit().success(), "{}", backend.stderr());
}

#[test]
fn a_frame_longer_than_a_lone_buffer_is_dropped_and_counted() {
    let ns = Netns::new();
    ns.add_tap(TAP, true);
    let host = ns.packet_socket(TAP);
    let mut backend = Backend::start(&ns, TAP, &[]);
    let mut g = Guest::connect_without(&backend.socket, 2, true, 1 << VIRTIO_NET_F_MRG_RXBUF);
    g.submit(RXQ, &[W(RX_BUFS, RX_BUF_BYTES)]);
    g.kick(RXQ);
    backend.wait_counter("tap_attaches", 1);
    let long = frame(MAC, [0x02, 0, 0, 0, 0, 1], 3000, 5);
    host.send(&long);
    let mut seen = 0;
    let entries = g.wait_used_entries(RXQ, &mut seen);
    assert_eq!(entries, vec![(0, 0)], "returned empty");
    // A frame that fits still goes through.
    g.submit(RXQ, &[W(RX_BUFS, RX_BUF_BYTES)]);
    g.kick(RXQ);
    let short = frame(MAC, [0x02, 0, 0, 0, 0, 1], 1000, 6);
    host.send(&short);
    let entries = g.wait_used_entries(RXQ, &mut seen);
    assert_eq!(entries, vec![(1, 12 + short.len() as u32)]);
    assert_eq!(g.read(RX_BUFS + 12, short.len()), short);
    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit();
    assert!(status.success(), "{status}: {}", backend.stderr());
    let counters = backend.counters();
    assert_eq!(counters["rx_truncated"], 1, "{counters:?}");
    assert_eq!(counters["rx_frames"], 1, "{counters:?}");
    assert_eq!(
        counters["rx_bytes"],
        12 + short.len() as u64,
        "{counters:?}"
    );
    drop(g);
}

/// Host flows for the multiqueue test: UDP source ports `FLOW_PORT + i`.
const FLOWS: u16 = 32;
const FLOW_PORT: u16 = 40_000;
/// RX buffers of queue `q` (0 or 2): one 2 KiB buffer per descriptor.
const MQ_RX_BUFS: [u64; 2] = [0x20_0000, 0x30_0000];

/// An IPv4/UDP frame from the host to the guest's MAC, source port
/// `sport`: the tap steers each such flow to one of its attached queues by
/// its hash.
fn udp_frame(sport: u16) -> Vec<u8> {
    let payload = sport.to_be_bytes();
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut frame = MAC.to_vec();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&9u16.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&payload);
    frame
}

/// Receives `count` frames of ours on RX queues 0 and 2 (pair 0 and 1),
/// posting each buffer again; returns the UDP source ports each pair got.
fn receive_flows(g: &mut Guest, seen: &mut [u16; 2], count: usize) -> [Vec<u16>; 2] {
    let deadline = std::time::Instant::now() + support::TIMEOUT;
    let mut ports = [Vec::new(), Vec::new()];
    while ports[0].len() + ports[1].len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {ports:?} of {count} flows arrived"
        );
        for pair in 0..2 {
            let q = 2 * pair;
            for (head, len) in g.poll_used(q, &mut seen[pair]) {
                let at = MQ_RX_BUFS[pair] + u64::from(head) * u64::from(RX_BUF_BYTES);
                let frame = g.read(at + 12, len as usize - 12);
                // Ethernet, IPv4 (20 bytes), UDP source port.
                if frame.len() >= 14 + 20 + 8 && frame[12..14] == [0x08, 0x00] {
                    ports[pair].push(u16::from_be_bytes([frame[34], frame[35]]));
                }
                g.submit_at(q, head as u16, &[W(at, RX_BUF_BYTES)]);
            }
            g.kick(q);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ports
}

fn send_flows(host: &support::PacketSocket) {
    for i in 0..FLOWS {
        host.send(&udp_frame(FLOW_PORT + i));
    }
}

#[test]
fn a_pair_gets_flows_only_while_the_frontend_has_it_enabled() {
    let ns = Netns::new();
    ns.add_tap(TAP, true);
    let host = ns.packet_socket(TAP);
    let mut backend = Backend::start(&ns, TAP, &["--queues", "2"]);
    // One frame per chain (MRG_RXBUF refused), so a used entry is a frame.
    let mut g = Guest::negotiate_without(&backend.socket, 4, true, 1 << VIRTIO_NET_F_MRG_RXBUF);
    g.share_memory();
    for q in 0..4 {
        g.set_up_queue(q);
    }
    // As at DRIVER_OK: pair 0 on, pair 1 set up but off until the guest
    // asks for it (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
    g.frontend.set_vring_enable(0, true).unwrap();
    g.frontend.set_vring_enable(1, true).unwrap();
    for (pair, bufs) in MQ_RX_BUFS.into_iter().enumerate() {
        for i in 0..support::QUEUE_SIZE {
            let at = bufs + u64::from(i) * u64::from(RX_BUF_BYTES);
            g.submit_at(2 * pair, i, &[W(at, RX_BUF_BYTES)]);
        }
        g.kick(2 * pair);
    }
    // A frame on pair 1's TX queue waits for the pair.
    let sent = frame([0xff; 6], MAC, 80, 4);
    g.fill(HDR, 12, 0);
    g.write_mem(FRAME, &sent);
    g.submit(3, &[R(HDR, 12), R(FRAME, sent.len() as u32)]);
    g.kick(3);
    backend.wait_counter("tap_attaches", 1);

    send_flows(&host);
    let mut seen = [0u16; 2];
    let ports = receive_flows(&mut g, &mut seen, FLOWS.into());
    assert_eq!(ports[0].len(), usize::from(FLOWS), "{ports:?}");
    assert!(ports[1].is_empty(), "{ports:?}");
    assert_eq!(g.used_idx(2), 0, "no receive buffer of pair 1 used");
    assert_eq!(g.used_idx(3), 0, "pair 1's TX frame waits");
    assert_eq!(backend.dump_counters()["tx_frames"], 0);

    // Pair 1 on: its waiting TX frame goes out, and the flows spread over
    // both tap queues.
    g.frontend.set_vring_enable(2, true).unwrap();
    g.frontend.set_vring_enable(3, true).unwrap();
    g.kick(2);
    g.kick(3);
    backend.wait_counter("tap_attaches", 2);
    g.wait_used(3, 1);
    host.wait_for(|f| f == sent.as_slice());
    send_flows(&host);
    let ports = receive_flows(&mut g, &mut seen, FLOWS.into());
    assert!(
        !ports[0].is_empty() && !ports[1].is_empty(),
        "{FLOWS} flows over two attached tap queues, yet one pair got them all: {ports:?}"
    );
    let mut all: Vec<u16> = ports.concat();
    all.sort_unstable();
    assert_eq!(all, (FLOW_PORT..FLOW_PORT + FLOWS).collect::<Vec<_>>());

    // Pair 1 off again: everything on pair 0.
    let before = g.used_idx(2);
    g.frontend.set_vring_enable(2, false).unwrap();
    g.frontend.set_vring_enable(3, false).unwrap();
    backend.wait_counter("tap_detaches", 1);
    send_flows(&host);
    let ports = receive_flows(&mut g, &mut seen, FLOWS.into());
    assert_eq!(ports[0].len(), usize::from(FLOWS), "{ports:?}");
    assert!(ports[1].is_empty(), "{ports:?}");
    assert_eq!(g.used_idx(2), before);

    drop(g);
    let status = backend.wait_exit();
    assert!(status.success(), "{status}: {}", backend.stderr());
    let counters = backend.counters();
    assert_eq!(counters["tap_attaches"], 2, "{counters:?}");
    assert_eq!(
        counters["tap_detaches"], 2,
        "pair 0 at disconnect: {counters:?}"
    );
    assert_eq!(counters["rx_frames"], 3 * u64::from(FLOWS), "{counters:?}");
    assert_eq!(counters["tx_frames"], 1, "{counters:?}");
}
