//! Backend tests with no guest: `ringvm-blk` on a real unix socket, driven
//! through the vhost crate's frontend with rings in shared memfd memory, as
//! a VMM drives it. Every request type, every bad request, and how the
//! process starts, refuses and ends.

mod support;

use std::mem::offset_of;
use std::os::fd::AsRawFd;
use std::time::Duration;

use ringvm_backend::test_support::{memfd, QUEUE_SIZE};
use support::{
    patterned, Backend, BlkRequests, Desc::R, Desc::W, Guest, DATA, HDR, IMAGE_BYTES, STATUS,
};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SECURE_ERASE, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;
const SECTORS: u64 = IMAGE_BYTES / 512;

fn assert_clean_exit(backend: &mut Backend) {
    let status = backend.wait_exit();
    assert!(status.success(), "{status}: {}", backend.stderr());
    assert!(!backend.socket.exists(), "the socket file is removed");
}

#[test]
fn negotiates_features_queues_and_config() {
    let mut backend = Backend::start(&["--queues", "2", "--queue-size", "64"]);
    let mut guest = Guest::negotiate(&backend.socket, 2, true);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(guest.features & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(guest.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(guest.frontend.get_queue_num().unwrap(), 2);
    assert!(guest.frontend.get_max_mem_slots().unwrap() > 1);

    let size = std::mem::size_of::<virtio_blk_config>() as u32;
    let (_, config) = guest
        .frontend
        .get_config(
            0,
            size,
            VhostUserConfigFlags::empty(),
            &vec![0; size as usize],
        )
        .unwrap();
    let u32_at = |offset: usize| u32::from_le_bytes(config[offset..offset + 4].try_into().unwrap());
    let capacity = u64::from_le_bytes(config[0..8].try_into().unwrap());
    assert_eq!(capacity, SECTORS);
    assert_eq!(u32_at(offset_of!(virtio_blk_config, seg_max)), 62);
    assert_eq!(u32_at(offset_of!(virtio_blk_config, blk_size)), 512);
    let queues = offset_of!(virtio_blk_config, num_queues);
    assert_eq!(&config[queues..queues + 2], 2u16.to_le_bytes());
    assert!(u32_at(offset_of!(virtio_blk_config, max_discard_sectors)) >= 8);
    assert!(u32_at(offset_of!(virtio_blk_config, max_discard_seg)) >= 1);
    assert!(u32_at(offset_of!(virtio_blk_config, discard_sector_alignment)) >= 1);
    assert!(u32_at(offset_of!(virtio_blk_config, max_write_zeroes_sectors)) >= 8);
    assert!(u32_at(offset_of!(virtio_blk_config, max_write_zeroes_seg)) >= 1);
    assert_eq!(
        config[offset_of!(virtio_blk_config, write_zeroes_may_unmap)],
        1
    );

    drop(guest);
    assert_clean_exit(&mut backend);
}

#[test]
fn serves_every_request_type() {
    let mut backend = Backend::start(&["--serial", "disk-7"]);
    let mut g = Guest::connect(&backend.socket, 1, false);

    g.header(HDR, VIRTIO_BLK_T_OUT, 16);
    g.fill(DATA, 4096, 0xa1);
    g.fill(DATA + 0x10000, 4096, 0xb2);
    let write = [
        R(HDR, 16),
        R(DATA, 4096),
        R(DATA + 0x10000, 4096),
        W(STATUS, 1),
    ];
    assert_eq!(g.request(0, &write), (OK, 1));
    assert_eq!(backend.image_bytes(16 * 512, 4096), vec![0xa1; 4096]);
    assert_eq!(backend.image_bytes(24 * 512, 4096), vec![0xb2; 4096]);

    g.header(HDR, VIRTIO_BLK_T_IN, 15);
    let read = [R(HDR, 16), W(DATA + 0x20000, 5120), W(STATUS, 1)];
    assert_eq!(g.request(0, &read), (OK, 5121));
    let mut expected = patterned(15 * 512, 512);
    expected.extend(vec![0xa1; 4096]);
    expected.extend(vec![0xb2; 512]);
    assert_eq!(g.read(DATA + 0x20000, 5120), expected);

    g.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.request(0, &[R(HDR, 16), W(STATUS, 1)]), (OK, 1));

    g.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    g.fill(DATA, 20, 0xff);
    assert_eq!(
        g.request(0, &[R(HDR, 16), W(DATA, 20), W(STATUS, 1)]),
        (OK, 21)
    );
    assert_eq!(g.read(DATA, 20), b"disk-7\0\0\0\0\0\0\0\0\0\0\0\0\0\0");

    g.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    g.segment(HDR + 16, 64, 16, 0);
    assert_eq!(g.request(0, &[R(HDR, 32), W(STATUS, 1)]), (OK, 1));
    assert_eq!(backend.image_bytes(64 * 512, 8192), vec![0; 8192]);

    g.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    g.segment(HDR + 16, 128, 8, 0);
    g.segment(HDR + 32, 256, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(g.request(0, &[R(HDR, 48), W(STATUS, 1)]), (OK, 1));
    assert_eq!(backend.image_bytes(128 * 512, 4096), vec![0; 4096]);
    assert_eq!(backend.image_bytes(256 * 512, 4096), vec![0; 4096]);
    assert_eq!(
        backend.image_bytes(264 * 512, 512),
        patterned(264 * 512, 512)
    );

    g.header(HDR, VIRTIO_BLK_T_SECURE_ERASE, 0);
    assert_eq!(g.request(0, &[R(HDR, 16), W(STATUS, 1)]), (UNSUPP, 1));

    drop(g);
    assert_clean_exit(&mut backend);
    let counters = backend.counters();
    for (name, value) in [
        ("writes", 1),
        ("reads", 1),
        ("flushes", 1),
        ("get_ids", 1),
        ("discards", 1),
        ("write_zeroes", 1),
        ("unsupported", 1),
        ("bytes_written", 8192),
        ("bytes_read", 5120),
        ("io_errors", 0),
        ("frontends", 1),
    ] {
        assert_eq!(counters[name], value, "{name}");
    }
}

#[test]
fn answers_every_bad_request() {
    let mut backend = Backend::start(&[]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    let outside = (16 << 20) + 0x1000;
    type Case = (&'static str, fn(&Guest), Vec<support::Desc>, Option<u8>);
    let cases: Vec<Case> = vec![
        (
            "no header",
            |_| {},
            vec![R(HDR, 8), W(STATUS, 1)],
            Some(IOERR),
        ),
        (
            "no status descriptor",
            |g| g.header(HDR, VIRTIO_BLK_T_OUT, 0),
            vec![R(HDR, 16), R(DATA, 512)],
            None,
        ),
        (
            "read into a device-readable buffer",
            |g| g.header(HDR, VIRTIO_BLK_T_IN, 0),
            vec![R(HDR, 16), R(DATA, 512), W(STATUS, 1)],
            Some(IOERR),
        ),
        (
            "write from a device-writable buffer",
            |g| g.header(HDR, VIRTIO_BLK_T_OUT, 0),
            vec![R(HDR, 16), W(DATA, 512), W(STATUS, 1)],
            Some(IOERR),
        ),
        (
            "readable after writable",
            |g| g.header(HDR, VIRTIO_BLK_T_OUT, 0),
            vec![R(HDR, 16), W(STATUS, 1), R(DATA, 512)],
            Some(IOERR),
        ),
        (
            "length not a multiple of 512",
            |g| g.header(HDR, VIRTIO_BLK_T_OUT, 0),
            vec![R(HDR, 16), R(DATA, 1000), W(STATUS, 1)],
            Some(IOERR),
        ),
        (
            "past the capacity",
            |g| g.header(HDR, VIRTIO_BLK_T_IN, SECTORS - 1),
            vec![R(HDR, 16), W(DATA, 1024), W(STATUS, 1)],
            Some(IOERR),
        ),
        (
            "sector range overflowing u64",
            |g| g.header(HDR, VIRTIO_BLK_T_OUT, u64::MAX - 1),
            vec![R(HDR, 16), R(DATA, 4096), W(STATUS, 1)],
            Some(IOERR),
        ),
        (
            "discard segment with reserved flags",
            |g| {
                g.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
                g.segment(HDR + 16, 0, 8, 0x10);
            },
            vec![R(HDR, 32), W(STATUS, 1)],
            Some(UNSUPP),
        ),
        (
            "discard segment with the unmap flag",
            |g| {
                g.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
                g.segment(HDR + 16, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
            },
            vec![R(HDR, 32), W(STATUS, 1)],
            Some(UNSUPP),
        ),
        (
            "data buffer outside guest memory",
            |g| g.header(HDR, VIRTIO_BLK_T_IN, 0),
            vec![R(HDR, 16), W(outside, 512), W(STATUS, 1)],
            Some(IOERR),
        ),
        (
            "status outside guest memory",
            |g| g.header(HDR, VIRTIO_BLK_T_FLUSH, 0),
            vec![R(HDR, 16), W(outside, 1)],
            None,
        ),
    ];
    for (name, setup, descs, expected) in &cases {
        setup(&g);
        g.fill(DATA, 4096, 0xee);
        g.fill(STATUS, 1, 0xee);
        let (status, len) = g.request(0, descs);
        match expected {
            Some(expected) => assert_eq!((status, len), (*expected, 1), "{name}"),
            None => assert_eq!(len, 0, "{name}: returned unused"),
        }
        assert_eq!(g.read(DATA, 4096), vec![0xee; 4096], "{name}");
        assert_eq!(
            g.read(STATUS, 1),
            if expected.is_some() {
                vec![expected.unwrap()]
            } else {
                vec![0xee]
            },
            "{name}"
        );
    }
    // The device still serves good requests.
    g.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        g.request(0, &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)]),
        (OK, 513)
    );
    drop(g);
    assert_clean_exit(&mut backend);
    assert_eq!(
        backend.image_bytes(0, IMAGE_BYTES as usize),
        patterned(0, IMAGE_BYTES as usize)
    );
    let counters = backend.counters();
    for (name, value) in [
        ("bad_no_header", 1),
        ("bad_no_status", 1),
        ("bad_direction", 3),
        ("bad_length", 1),
        ("bad_range", 2),
        ("bad_flags", 2),
        ("bad_memory", 2),
        ("chains_returned_unused", 2),
        ("reads", 1),
        ("writes", 0),
    ] {
        assert_eq!(counters[name], value, "{name}");
    }
}

#[test]
fn readonly_disks_refuse_writes() {
    let mut backend = Backend::start(&["--readonly"]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    assert_ne!(g.features & (1 << VIRTIO_BLK_F_RO), 0);
    g.header(HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        g.request(0, &[R(HDR, 16), R(DATA, 512), W(STATUS, 1)]),
        (IOERR, 1)
    );
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        g.header(HDR, request_type, 0);
        g.segment(HDR + 16, 0, 8, 0);
        assert_eq!(g.request(0, &[R(HDR, 32), W(STATUS, 1)]), (IOERR, 1));
    }
    g.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        g.request(0, &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)]),
        (OK, 513)
    );
    g.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.request(0, &[R(HDR, 16), W(STATUS, 1)]), (OK, 1));
    drop(g);
    assert_clean_exit(&mut backend);
    assert_eq!(backend.image_bytes(0, 4096), patterned(0, 4096));
    assert_eq!(backend.counters()["readonly_writes"], 3);
}

#[test]
fn each_queue_serves_on_its_own() {
    let mut backend = Backend::start(&["--queues", "2"]);
    let mut g = Guest::connect(&backend.socket, 2, false);
    for q in 0..2u64 {
        g.header(HDR + 0x100 * q, VIRTIO_BLK_T_OUT, 1000 + q * 8);
        g.fill(DATA + 0x10000 * q, 4096, 0x10 + q as u8);
        let descs = [
            R(HDR + 0x100 * q, 16),
            R(DATA + 0x10000 * q, 4096),
            W(STATUS + q, 1),
        ];
        assert_eq!(g.request(q as usize, &descs), (OK, 1));
    }
    // Each queue reads what the other wrote.
    for q in 0..2u64 {
        let other = 1 - q;
        g.header(HDR + 0x100 * q, VIRTIO_BLK_T_IN, 1000 + other * 8);
        let descs = [
            R(HDR + 0x100 * q, 16),
            W(DATA + 0x40000 + 0x10000 * q, 4096),
            W(STATUS + q, 1),
        ];
        assert_eq!(g.request(q as usize, &descs), (OK, 4097));
        assert_eq!(
            g.read(DATA + 0x40000 + 0x10000 * q, 4096),
            vec![0x10 + other as u8; 4096]
        );
    }
    drop(g);
    assert_clean_exit(&mut backend);
}

#[test]
fn one_kick_serves_every_available_chain() {
    let mut backend = Backend::start(&[]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    for i in 0..16u64 {
        g.header(HDR + 0x100 * i, VIRTIO_BLK_T_IN, i * 8);
        g.submit(
            0,
            &[
                R(HDR + 0x100 * i, 16),
                W(DATA + 0x1000 * i, 4096),
                W(STATUS + i, 1),
            ],
        );
    }
    g.kick(0);
    g.wait_used(0, 16);
    for i in 0..16u64 {
        assert_eq!(g.read(STATUS + i, 1), [OK]);
        assert_eq!(g.read(DATA + 0x1000 * i, 4096), patterned(i * 4096, 4096));
    }
    drop(g);
    assert_clean_exit(&mut backend);
    let counters = backend.counters();
    assert_eq!(counters["reads"], 16);
    assert_eq!(counters["submits"], 1, "one io_uring_enter for the kick");
}

#[test]
fn event_idx_signals_only_when_the_guest_asks() {
    let mut backend = Backend::start(&[]);
    let mut g = Guest::connect(&backend.socket, 1, true);
    assert_ne!(g.features & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    // Signal me when the used index passes 5: not for the first request.
    g.set_used_event(0, 5);
    g.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.request(0, &[R(HDR, 16), W(STATUS, 1)]), (OK, 1));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!g.signalled(0), "no signal before used_event");
    // Signal me at the next one.
    g.set_used_event(0, 1);
    g.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    g.request(0, &[R(HDR, 16), W(STATUS, 1)]);
    std::thread::sleep(Duration::from_millis(50));
    // `request` may have consumed the signal while waiting; ask the counters.
    drop(g);
    assert_clean_exit(&mut backend);
    let counters = backend.counters();
    assert_eq!(counters["notifications"], 1, "{counters:?}");
    assert_eq!(counters["notifications_suppressed"], 1, "{counters:?}");
}

#[test]
fn get_vring_base_returns_after_in_flight_requests_completed() {
    // O_DIRECT writes complete asynchronously, so they are still in flight
    // when GET_VRING_BASE arrives.
    let mut backend = Backend::start(&["--direct"]);
    let mut g = Guest::connect(&backend.socket, 1, true);
    g.fill(DATA, 256 << 10, 0x6d);
    for i in 0..16u64 {
        g.header(HDR + 0x100 * i, VIRTIO_BLK_T_OUT, i * 512);
        g.submit(
            0,
            &[R(HDR + 0x100 * i, 16), R(DATA, 256 << 10), W(STATUS + i, 1)],
        );
    }
    g.kick(0);
    // With EVENT_IDX the backend publishes how far it took the available
    // ring (avail_event) once it has submitted the batch.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while g.avail_event(0) != 16 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    }
    let base = g.frontend.get_vring_base(0).unwrap();
    assert_eq!(base, 16);
    assert_eq!(g.used_idx(0), 16, "every request taken is answered");
    for i in 0..16u64 {
        assert_eq!(g.read(STATUS + i, 1), [OK]);
    }
    drop(g);
    assert_clean_exit(&mut backend);
    assert_eq!(backend.image_bytes(0, 4 << 20), vec![0x6d; 4 << 20]);
}

#[test]
fn guest_memory_added_later_is_used() {
    let mut backend = Backend::start(&[]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    const HIGH: u64 = 0x1_0000_0000;
    let extra = memfd(1 << 20);
    let high = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(HIGH),
        1 << 20,
        Some(FileOffset::new(extra.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: HIGH,
        memory_size: 1 << 20,
        userspace_addr: vm_memory::GuestMemoryBackend::get_host_address(&high, GuestAddress(HIGH))
            .unwrap() as u64,
        mmap_offset: 0,
        mmap_handle: extra.as_raw_fd(),
    };
    assert!(g
        .frontend
        .get_protocol_features()
        .unwrap()
        .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
    g.with_reply(|frontend| frontend.add_mem_region(&region).map(|_| ()));
    g.header(HDR, VIRTIO_BLK_T_IN, 8);
    assert_eq!(
        g.request(0, &[R(HDR, 16), W(HIGH + 0x800, 8192), W(STATUS, 1)]),
        (OK, 8193)
    );
    let mut seen = vec![0u8; 8192];
    high.read_slice(&mut seen, GuestAddress(HIGH + 0x800))
        .unwrap();
    assert_eq!(seen, patterned(4096, 8192));
    drop(g);
    assert_clean_exit(&mut backend);
}

/// QEMU 7.2's vhost-user-net sends the memory table once per queue pair
/// over one connection, so the same ADD_MEM_REG comes again; ringvm's
/// patched vhost (third_party/README.md) counts it, and the region stays
/// until it was removed as often as added.
#[test]
fn the_same_memory_region_added_twice_stays_until_removed_twice() {
    let mut backend = Backend::start(&[]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    const HIGH: u64 = 0x1_0000_0000;
    let extra = memfd(1 << 20);
    let high = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(HIGH),
        1 << 20,
        Some(FileOffset::new(extra.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: HIGH,
        memory_size: 1 << 20,
        userspace_addr: vm_memory::GuestMemoryBackend::get_host_address(&high, GuestAddress(HIGH))
            .unwrap() as u64,
        mmap_offset: 0,
        mmap_handle: extra.as_raw_fd(),
    };
    g.with_reply(|frontend| frontend.add_mem_region(&region).map(|_| ()));
    g.with_reply(|frontend| frontend.add_mem_region(&region).map(|_| ()));
    g.header(HDR, VIRTIO_BLK_T_IN, 8);
    let read_high =
        |g: &mut Guest| g.request(0, &[R(HDR, 16), W(HIGH + 0x800, 4096), W(STATUS, 1)]);
    assert_eq!(read_high(&mut g), (OK, 4097));
    g.with_reply(|frontend| frontend.remove_mem_region(&region));
    assert_eq!(read_high(&mut g), (OK, 4097), "added twice, removed once");
    g.with_reply(|frontend| frontend.remove_mem_region(&region));
    // Gone: the buffer is outside guest memory now.
    assert_ne!(read_high(&mut g).0, OK);
    drop(g);
    assert_clean_exit(&mut backend);
}

#[test]
fn direct_io_serves_aligned_and_unaligned_buffers() {
    let mut backend = Backend::start(&["--direct"]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    g.header(HDR, VIRTIO_BLK_T_OUT, 8);
    g.fill(DATA, 8192, 0x4d);
    assert_eq!(
        g.request(0, &[R(HDR, 16), R(DATA, 8192), W(STATUS, 1)]),
        (OK, 1)
    );
    g.header(HDR, VIRTIO_BLK_T_OUT, 24);
    g.fill(DATA + 0x4001, 512, 0x4e);
    assert_eq!(
        g.request(0, &[R(HDR, 16), R(DATA + 0x4001, 512), W(STATUS, 1)]),
        (OK, 1)
    );
    g.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.request(0, &[R(HDR, 16), W(STATUS, 1)]), (OK, 1));
    g.header(HDR, VIRTIO_BLK_T_IN, 8);
    assert_eq!(
        g.request(0, &[R(HDR, 16), W(DATA + 0x8000, 8704), W(STATUS, 1)]),
        (OK, 8705)
    );
    let mut expected = vec![0x4d; 8192];
    expected.extend(vec![0x4e; 512]);
    assert_eq!(g.read(DATA + 0x8000, 8704), expected);
    drop(g);
    assert_clean_exit(&mut backend);
    assert!(backend.counters()["direct_fallbacks"] >= 1);
    assert_eq!(backend.image_bytes(4096, 8192), vec![0x4d; 8192]);
}

#[test]
fn disconnect_ends_the_process_with_status_0() {
    let mut backend = Backend::start(&[]);
    let g = Guest::connect(&backend.socket, 1, false);
    std::thread::sleep(Duration::from_millis(50));
    assert!(backend.running());
    drop(g);
    assert_clean_exit(&mut backend);
    assert!(backend.stderr().contains("frontend disconnected"));
}

#[test]
fn sigterm_ends_the_process_with_status_0() {
    // Without a frontend.
    let mut backend = Backend::start(&[]);
    backend.signal(libc::SIGTERM);
    assert_clean_exit(&mut backend);
    // With one, and O_DIRECT writes in flight: they complete, are answered
    // and reach the image before the process exits.
    let mut backend = Backend::start(&["--direct"]);
    let mut g = Guest::connect(&backend.socket, 1, true);
    g.fill(DATA, 256 << 10, 0x5e);
    for i in 0..8u64 {
        g.header(HDR + 0x100 * i, VIRTIO_BLK_T_OUT, i * 512);
        g.submit(
            0,
            &[R(HDR + 0x100 * i, 16), R(DATA, 256 << 10), W(STATUS + i, 1)],
        );
    }
    g.kick(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while g.avail_event(0) != 8 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    }
    backend.signal(libc::SIGTERM);
    assert_clean_exit(&mut backend);
    assert_eq!(g.used_idx(0), 8);
    assert_eq!(backend.image_bytes(0, 2 << 20), vec![0x5e; 2 << 20]);
    assert_eq!(backend.counters()["frontends"], 1);
    // The frontend sees the connection closed.
    assert!(g.frontend.get_features().is_err());
}

#[test]
fn sigusr1_prints_the_counters() {
    let mut backend = Backend::start(&[]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    g.header(HDR, VIRTIO_BLK_T_IN, 0);
    g.request(0, &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)]);
    backend.signal(libc::SIGUSR1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !backend.stderr().contains("counters: reads=1 ") {
        assert!(std::time::Instant::now() < deadline, "{}", backend.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(backend.running());
    drop(g);
    assert_clean_exit(&mut backend);
}

#[test]
fn a_second_frontend_is_refused_while_one_is_served() {
    let mut backend = Backend::start(&[]);
    let mut first = Guest::connect(&backend.socket, 1, false);
    // The socket is there: connecting works, but the backend closes it.
    let second = Frontend::connect(&backend.socket, 1).unwrap();
    assert!(second.get_features().is_err());
    // The first frontend is still served.
    first.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        first.request(0, &[R(HDR, 16), W(DATA, 512), W(STATUS, 1)]),
        (OK, 513)
    );
    drop(first);
    assert_clean_exit(&mut backend);
    let counters = backend.counters();
    assert_eq!(counters["frontends"], 1);
    assert_eq!(counters["frontends_refused"], 1);
    assert!(backend.stderr().contains("refused a second frontend"));
}

#[test]
fn no_backend_means_no_socket_to_connect_to() {
    let dir = tempfile::tempdir().unwrap();
    let Err(err) = Frontend::connect(dir.path().join("blk.sock"), 1) else {
        panic!("connected to a socket nobody created")
    };
    assert!(err.to_string().contains("No such file"), "{err}");
}

#[test]
fn keep_listening_serves_the_next_frontend() {
    let mut backend = Backend::start(&["--keep-listening"]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    g.header(HDR, VIRTIO_BLK_T_OUT, 0);
    g.fill(DATA, 512, 0x77);
    assert_eq!(
        g.request(0, &[R(HDR, 16), R(DATA, 512), W(STATUS, 1)]),
        (OK, 1)
    );
    drop(g);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !backend.stderr().contains("waiting for the next frontend") {
        assert!(std::time::Instant::now() < deadline, "{}", backend.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(backend.running());
    let mut g = Guest::connect(&backend.socket, 1, false);
    g.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        g.request(0, &[R(HDR, 16), W(DATA + 0x1000, 512), W(STATUS, 1)]),
        (OK, 513)
    );
    assert_eq!(g.read(DATA + 0x1000, 512), vec![0x77; 512]);
    drop(g);
    std::thread::sleep(Duration::from_millis(50));
    assert!(backend.running());
    backend.signal(libc::SIGTERM);
    assert_clean_exit(&mut backend);
    let counters = backend.counters();
    assert_eq!(counters["frontends"], 2);
    assert_eq!((counters["reads"], counters["writes"]), (1, 1));
}

#[test]
fn a_protocol_error_ends_the_process_with_status_1() {
    let mut backend = Backend::start(&[]);
    let g = Guest::negotiate(&backend.socket, 1, false);
    // SET_OWNER twice breaks the protocol; the backend drops the connection.
    let _ = g.frontend.set_owner();
    let status = backend.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", backend.stderr());
    assert!(
        backend
            .stderr()
            .contains("the frontend broke the connection"),
        "{}",
        backend.stderr()
    );
}

/// One vhost-user message, written raw: the vhost crate's frontend refuses
/// to send SET_VRING_ENABLE before SET_FEATURES, which QEMU does.
fn raw_request(
    sock: &mut std::os::unix::net::UnixStream,
    request: u32,
    need_reply: bool,
    body: &[u8],
) {
    use std::io::Write;
    let flags: u32 = 0x1 | if need_reply { 0x8 } else { 0 };
    let mut msg = Vec::new();
    for word in [request, flags, body.len() as u32] {
        msg.extend_from_slice(&word.to_le_bytes());
    }
    msg.extend_from_slice(body);
    sock.write_all(&msg).unwrap();
}

/// The u64 body of the reply to `request`, or None at end of file.
fn raw_reply_u64(sock: &mut std::os::unix::net::UnixStream, request: u32) -> Option<u64> {
    use std::io::Read;
    let mut reply = [0u8; 20];
    sock.read_exact(&mut reply).ok()?;
    let word = |i: usize| u32::from_le_bytes(reply[4 * i..4 * i + 4].try_into().unwrap());
    assert_eq!(
        (word(0), word(1) & 0x4, word(2)),
        (request, 0x4, 8),
        "a reply to {request}"
    );
    Some(u64::from_le_bytes(reply[12..20].try_into().unwrap()))
}

/// QEMU's vhost-user-net (7.2) sends SET_VRING_ENABLE when the guest
/// negotiates its features, before SET_FEATURES reaches the backend. vhost
/// 0.18 ended the connection there; ringvm's patched copy
/// (third_party/README.md) keeps the request and carries it out at
/// SET_FEATURES. ringvm-blk shares the daemon with ringvm-net.
#[test]
fn set_vring_enable_before_set_features_is_carried_out_at_set_features() {
    const GET_FEATURES: u32 = 1;
    const SET_FEATURES: u32 = 2;
    const SET_OWNER: u32 = 3;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const SET_VRING_ENABLE: u32 = 18;
    let handshake = |socket: &std::path::Path| {
        let mut sock = std::os::unix::net::UnixStream::connect(socket).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        raw_request(&mut sock, SET_OWNER, false, &[]);
        raw_request(&mut sock, GET_FEATURES, false, &[]);
        let features = raw_reply_u64(&mut sock, GET_FEATURES).unwrap();
        assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES offered");
        raw_request(&mut sock, GET_PROTOCOL_FEATURES, false, &[]);
        let protocol = raw_reply_u64(&mut sock, GET_PROTOCOL_FEATURES).unwrap();
        let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
        assert_ne!(protocol & reply_ack, 0);
        raw_request(
            &mut sock,
            SET_PROTOCOL_FEATURES,
            false,
            &reply_ack.to_le_bytes(),
        );
        (sock, features)
    };
    let vring_state = |index: u32, num: u32| {
        let mut body = index.to_le_bytes().to_vec();
        body.extend_from_slice(&num.to_le_bytes());
        body
    };

    // Ring 0 enabled early: acknowledged, then applied at SET_FEATURES,
    // and the connection goes on.
    let mut backend = Backend::start(&[]);
    let (mut sock, features) = handshake(&backend.socket);
    raw_request(&mut sock, SET_VRING_ENABLE, true, &vring_state(0, 1));
    assert_eq!(
        raw_reply_u64(&mut sock, SET_VRING_ENABLE),
        Some(0),
        "{}",
        backend.stderr()
    );
    raw_request(&mut sock, SET_FEATURES, true, &features.to_le_bytes());
    assert_eq!(
        raw_reply_u64(&mut sock, SET_FEATURES),
        Some(0),
        "{}",
        backend.stderr()
    );
    raw_request(&mut sock, GET_FEATURES, false, &[]);
    assert_eq!(raw_reply_u64(&mut sock, GET_FEATURES), Some(features));
    drop(sock);
    assert_clean_exit(&mut backend);

    // An early enable of a ring the backend does not have is carried out
    // too, at SET_FEATURES: refused there, which ends the connection.
    let mut backend = Backend::start(&[]);
    let (mut sock, features) = handshake(&backend.socket);
    raw_request(&mut sock, SET_VRING_ENABLE, false, &vring_state(99, 1));
    raw_request(&mut sock, SET_FEATURES, true, &features.to_le_bytes());
    assert_eq!(
        raw_reply_u64(&mut sock, SET_FEATURES),
        Some(1),
        "the enable failed"
    );
    assert_eq!(
        raw_reply_u64(&mut sock, GET_FEATURES),
        None,
        "the connection ended"
    );
    assert_eq!(backend.wait_exit().code(), Some(1), "{}", backend.stderr());
}

#[test]
fn a_malformed_qcow2_header_or_format_qcow2_on_raw_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    // The magic and version 3, and nothing else: no valid cluster size.
    let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
    header.resize(1 << 16, 0);
    std::fs::write(&image, &header).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut backend = Backend::spawn(dir, image, socket, &[]);
    let status = backend.wait_exit();
    assert_eq!(status.code(), Some(1));
    assert!(
        backend.stderr().contains("cluster_bits"),
        "{}",
        backend.stderr()
    );
    assert!(!backend.socket.exists());

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let socket = dir.path().join("blk.sock");
    let mut backend = Backend::spawn(dir, image, socket, &["--format", "qcow2"]);
    assert_eq!(backend.wait_exit().code(), Some(1));
    assert!(
        backend.stderr().contains("not a qcow2 image"),
        "{}",
        backend.stderr()
    );
}

#[test]
fn an_unusable_socket_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let socket = dir.path().join("missing").join("blk.sock");
    let mut backend = Backend::spawn(dir, image.clone(), socket, &[]);
    assert_eq!(backend.wait_exit().code(), Some(1));
    assert!(
        backend.stderr().contains("cannot listen"),
        "{}",
        backend.stderr()
    );

    // A regular file where the socket should be is left alone.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("precious");
    std::fs::write(&socket, b"keep me").unwrap();
    let mut backend = Backend::spawn(dir, image, socket.clone(), &[]);
    assert_eq!(backend.wait_exit().code(), Some(1));
    assert!(backend.stderr().contains("is not a unix socket"));
    assert_eq!(std::fs::read(&socket).unwrap(), b"keep me");
}

#[test]
fn queue_size_is_a_maximum() {
    let mut backend = Backend::start(&["--queue-size", "32"]);
    let mut g = Guest::negotiate(&backend.socket, 1, false);
    g.share_memory();
    // The frontend asks for more than the backend allows: refused, and the
    // connection (which vhost-user-backend ends at the first refused
    // message) with it.
    let _ = g.frontend.set_vring_num(0, QUEUE_SIZE);
    assert_eq!(backend.wait_exit().code(), Some(1));
    assert!(
        backend
            .stderr()
            .contains("the frontend broke the connection"),
        "{}",
        backend.stderr()
    );
}
