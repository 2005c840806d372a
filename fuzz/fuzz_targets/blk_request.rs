//! Arbitrary descriptor chains (direct or in an indirect table; any
//! address, length and direction; any request type, sector and
//! discard/write-zeroes segments) served one per kick by ringvm-blk's queue
//! worker: `request::parse_request`, the raw image's mapping and the sync
//! engine, against a 64 KiB memfd image.
//!
//! Invariants, per request:
//! - nothing panics;
//! - no image byte changes outside the sectors the request names (those of
//!   a write's data, or its discard/write-zeroes segments), and none at
//!   all on a read-only disk;
//! - no guest byte changes outside the chain's device-writable buffers and
//!   the used ring;
//! - the chain gets exactly one used entry, for its head;
//! - a status byte in guest memory ends as OK, IOERR or UNSUPP; with OK, a
//!   write put the chain's bytes on the disk, a read put the disk's bytes
//!   in the chain, discard/write-zeroes left zeroes, and GET_ID the serial.
//!
//! The used-entry and guest-memory checks are skipped for a request whose
//! writable buffers overlap the descriptor table or the available ring: its
//! own data may then have made more chains available. Such a request also
//! ends the input: the device may have rewritten the available index, and a
//! ring whose index runs more than a queue ahead is refused as a whole (so
//! later requests would rightly get no used entry).
//!
//! Input: a flags byte (bit 0: read-only disk, bit 1: EVENT_IDX), then up
//! to [`MAX_REQUESTS`] requests, each: a type byte (0-5: IN, OUT, FLUSH,
//! GET_ID, DISCARD, WRITE_ZEROES; else a raw u32 follows), a [`sector`],
//! 0-4 segments (sector, count, flags), all written at [`HDR`]; a shape
//! byte (1-8 descriptors; bit 7: in an indirect table); the descriptors
//! (see [`descriptor`]). seeds/blk_request.py writes such inputs.

#![no_main]

use std::ops::Range;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ringvm_blk::queue::GuestRam;
use ringvm_fuzz::{read_guest, tracing, BlkQueue, Bytes, MemImage, IMAGE_BYTES, SERIAL};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes as _, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const QUEUE_SIZE: u16 = 16;
/// Guest memory: rings and headers, two adjacent data regions, a hole, and
/// a small region after it.
const REGIONS: [(u64, u64); 4] = [
    (0, 0x8000),
    (0x1_0000, 0x1_0000),
    (0x2_0000, 0x1_0000),
    (0x4_0000, 0x1000),
];
const DESC_TABLE: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Where the request header (and its segments) is written.
const HDR: u64 = 0x3000;
/// Indirect tables, one per request slot.
const INDIRECT: u64 = 0x4000;
const DATA: u64 = 0x1_0000;
const DATA_END: u64 = 0x3_0000;
const HIGH: u64 = 0x4_0000;
const HOLE: u64 = 0x3_0000;
const SECTOR: u64 = 512;
const CAPACITY_SECTORS: u64 = IMAGE_BYTES / SECTOR;
/// Requests per input: enough for write-then-read sequences.
const MAX_REQUESTS: usize = 12;
const MAX_DESCRIPTORS: u8 = 8;

const DEFINED_TYPES: [u32; 6] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
];

fn sector(input: &mut Bytes<'_>) -> u64 {
    match input.u8() % 4 {
        0 => u64::from(input.u8()),
        1 => u64::from(input.u16()),
        2 => CAPACITY_SECTORS.wrapping_sub(u64::from(input.u8())),
        _ => input.u64(),
    }
}

/// A descriptor as the target writes it: a guest address from one of a few
/// areas (or any), a length of a few bytes, whole sectors or anything.
fn descriptor(input: &mut Bytes<'_>) -> (u64, u32, u16) {
    let kind = input.u8();
    let v = input.u16();
    let addr = match kind & 7 {
        0 => HDR + u64::from(v % 64),
        1 | 7 => DATA + u64::from(v),
        // Across the boundary of the two data regions.
        2 => 0x2_0000 - 0x100 + u64::from(v % 0x200),
        3 => HIGH + u64::from(v % 0x1100),
        4 => HOLE + u64::from(v),
        5 => u64::from(v % 0x4000),
        _ => input.u64(),
    };
    let len_v = input.u16();
    let len = match kind >> 6 {
        0 => u32::from(len_v % 32),
        1 => u32::from(len_v % 129) * SECTOR as u32,
        2 => u32::from(len_v),
        _ => input.u32(),
    };
    let mut flags = 0;
    if kind & 0x08 != 0 {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    if kind & 0x10 != 0 && kind & 0x20 != 0 {
        // A stray INDIRECT flag: a table within a table, or a table at an
        // arbitrary address.
        flags |= VRING_DESC_F_INDIRECT as u16;
    }
    (addr, len, flags)
}

fn write_desc(ram: &GuestRam, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write_slice(&raw, GuestAddress(at))
        .expect("ring memory");
}

/// The chain as virtio-queue walks it (the same walk the worker does):
/// (address, length, writable), zero-length descriptors left out.
fn walk_chain(ram: &GuestRam, avail_index: u16) -> Vec<(u64, u32, bool)> {
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .unwrap();
    queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    queue.set_ready(true);
    queue.set_next_avail(avail_index);
    let mut chains = queue.iter(ram).expect("our avail ring");
    let chain = chains.next().expect("the chain just made available");
    chain
        .filter(|d| d.len() > 0)
        .map(|d| (d.addr().0, d.len(), d.is_write_only()))
        .collect()
}

fn range(addr: u64, len: u64) -> Range<u64> {
    addr..addr.saturating_add(len)
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Longest byte stream worth reading: a request longer than this cannot be
/// served by the 64 KiB disk (a stray indirect table can repeat the same
/// buffer thousands of times).
const MAX_STREAM_BYTES: u64 = IMAGE_BYTES + 4096;

/// The bytes of `descs` (in order) from guest memory; None if one of them
/// is not all in guest memory, or if they are more than
/// [`MAX_STREAM_BYTES`].
fn stream(ram: &GuestRam, descs: &[(u64, u32, bool)]) -> Option<Vec<u8>> {
    let total: u64 = descs.iter().map(|d| u64::from(d.1)).sum();
    if total > MAX_STREAM_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    for &(addr, len, _) in descs {
        if !ram.check_range(GuestAddress(addr), len as usize, Permissions::Read) {
            return None;
        }
        let mut chunk = vec![0u8; len as usize];
        ram.read_slice(&mut chunk, GuestAddress(addr)).ok()?;
        bytes.extend_from_slice(&chunk);
    }
    Some(bytes)
}

/// Offsets of the bytes that differ (compared a chunk at a time: the
/// fuzzer's comparison hooks would make a byte loop the slowest part).
fn changed<'a>(before: &'a [u8], after: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    const CHUNK: usize = 256;
    before
        .chunks(CHUNK)
        .zip(after.chunks(CHUNK))
        .enumerate()
        .filter(|(_, (b, a))| b != a)
        .flat_map(|(c, (b, a))| {
            (0..b.len())
                .filter(move |&i| b[i] != a[i])
                .map(move |i| c * CHUNK + i)
        })
}

fn snapshot(ram: &GuestRam) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(start, len)| read_guest(ram, start, len as usize))
        .collect()
}

/// What the request may change, worked out from the chain before the kick.
struct Expected {
    request_type: Option<u32>,
    sector: u64,
    /// A write's data: the device-readable bytes after the header.
    out_data: Vec<u8>,
    /// Image byte ranges the request may change.
    disk_writes: Vec<Range<u64>>,
    /// DISCARD/WRITE_ZEROES ranges, in bytes.
    zeroed: Vec<Range<u64>>,
}

fn expect(ram: &GuestRam, chain: &[(u64, u32, bool)], readonly: bool) -> Expected {
    let readable = chain.iter().take_while(|d| !d.2).count();
    let mut expected = Expected {
        request_type: None,
        sector: 0,
        out_data: Vec::new(),
        disk_writes: Vec::new(),
        zeroed: Vec::new(),
    };
    // Unreadable or too long: refused without touching the disk.
    let Some(out) = stream(ram, &chain[..readable]) else {
        return expected;
    };
    if out.len() < 16 {
        return expected;
    }
    let request_type = u32::from_le_bytes(out[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(out[8..16].try_into().unwrap());
    expected.request_type = Some(request_type);
    expected.sector = sector;
    let disk_range = |sector: u64, len: u64| {
        let start = sector.saturating_mul(SECTOR).min(IMAGE_BYTES);
        start..start.saturating_add(len).min(IMAGE_BYTES)
    };
    match request_type {
        VIRTIO_BLK_T_OUT => {
            expected.out_data = out[16..].to_vec();
            if !readonly {
                expected
                    .disk_writes
                    .push(disk_range(sector, out.len() as u64 - 16));
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            for segment in out[16..].chunks_exact(16) {
                let sector = u64::from_le_bytes(segment[0..8].try_into().unwrap());
                let num_sectors = u32::from_le_bytes(segment[8..12].try_into().unwrap());
                let bytes = disk_range(sector, u64::from(num_sectors) * SECTOR);
                expected.zeroed.push(bytes.clone());
                if !readonly {
                    expected.disk_writes.push(bytes);
                }
            }
        }
        _ => {}
    }
    expected
}

/// Serves one request from `input` and checks it; false when the request
/// rewrote the rings (nothing after it can be checked).
fn serve(q: &mut BlkQueue, input: &mut Bytes<'_>, slot: usize, readonly: bool) -> bool {
    let ram = q.ram();
    // The header and its segments, written where the chain usually starts.
    let type_sel = input.u8();
    let request_type = match type_sel % 8 {
        t @ 0..=5 => DEFINED_TYPES[usize::from(t)],
        _ => input.u32(),
    };
    let header_sector = sector(input);
    let mut header = Vec::with_capacity(16 * 5);
    header.extend_from_slice(&request_type.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&header_sector.to_le_bytes());
    for _ in 0..input.u8() % 5 {
        let segment_sector = sector(input);
        let raw = input.u16();
        let num_sectors = if raw & 0x8000 != 0 {
            input.u32()
        } else {
            u32::from(raw)
        };
        let flags = input.u8();
        let flags = if flags & 0x80 != 0 {
            u32::from(flags)
        } else {
            u32::from(flags & 1)
        };
        header.extend_from_slice(&segment_sector.to_le_bytes());
        header.extend_from_slice(&num_sectors.to_le_bytes());
        header.extend_from_slice(&flags.to_le_bytes());
    }
    ram.write_slice(&header, GuestAddress(HDR)).unwrap();

    // The chain: direct in the descriptor table, or in an indirect table.
    let shape = input.u8();
    let count = 1 + shape % MAX_DESCRIPTORS;
    let indirect = shape & 0x80 != 0;
    let descs: Vec<_> = (0..count).map(|_| descriptor(input)).collect();
    let head = (slot * usize::from(MAX_DESCRIPTORS)) as u16 % QUEUE_SIZE;
    let link = |i: usize, flags: u16| {
        if i + 1 < descs.len() {
            flags | VRING_DESC_F_NEXT as u16
        } else {
            flags
        }
    };
    if indirect {
        let table = INDIRECT + 0x100 * (slot as u64 % 16);
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let at = table + 16 * i as u64;
            write_desc(&ram, at, addr, len, link(i, flags), i as u16 + 1);
        }
        let table_len = 16 * descs.len() as u32;
        let at = DESC_TABLE + 16 * u64::from(head);
        write_desc(&ram, at, table, table_len, VRING_DESC_F_INDIRECT as u16, 0);
    } else {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_SIZE;
            let next = (index + 1) % QUEUE_SIZE;
            let at = DESC_TABLE + 16 * u64::from(index);
            write_desc(&ram, at, addr, len, link(i, flags), next);
        }
    }
    let avail_idx: u16 = ram.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    let ring_slot = AVAIL + 4 + 2 * u64::from(avail_idx % QUEUE_SIZE);
    ram.write_obj(head, GuestAddress(ring_slot)).unwrap();
    ram.write_obj(avail_idx.wrapping_add(1), GuestAddress(AVAIL + 2))
        .unwrap();

    // What may change, from the chain as the device will walk it.
    let chain = walk_chain(&ram, avail_idx);
    let expected = expect(&ram, &chain, readonly);
    let writable: Vec<_> = chain
        .iter()
        .filter(|d| d.2)
        .map(|d| range(d.0, u64::from(d.1)))
        .collect();
    let rings = [
        range(DESC_TABLE, 16 * u64::from(QUEUE_SIZE)),
        range(AVAIL, 6 + 2 * u64::from(QUEUE_SIZE)),
    ];
    let used_ring = range(USED, 6 + 8 * u64::from(QUEUE_SIZE));
    let self_modifying = writable
        .iter()
        .any(|w| rings.iter().any(|r| overlaps(w, r)));
    let status_addr = chain
        .iter()
        .rev()
        .find(|d| d.2)
        .and_then(|d| d.0.checked_add(u64::from(d.1) - 1))
        .filter(|&a| ram.check_range(GuestAddress(a), 1, Permissions::Write));
    let disk_before = MemImage::get().contents();
    let ram_before = snapshot(&ram);
    let next_used_before = q.vring.get_ref().get_queue().next_used();

    q.worker.on_kick(&q.vring);
    q.worker.drain();
    if tracing() {
        let entry = USED + 4 + 8 * u64::from(next_used_before % QUEUE_SIZE);
        let used_len: u32 = ram.read_obj(GuestAddress(entry + 4)).unwrap();
        let status = status_addr.map(|a| ram.read_obj::<u8>(GuestAddress(a)).unwrap());
        eprintln!(
            "request type {:?} sector {} chain {chain:x?}: status {status:?}, used length {used_len}",
            expected.request_type, expected.sector
        );
    }
    assert_eq!(q.worker.in_flight(), 0, "I/O left in flight after a drain");

    // The image: only the named sectors change.
    let disk_after = MemImage::get().contents();
    if let Some(at) = changed(&disk_before, &disk_after)
        .find(|&i| !expected.disk_writes.iter().any(|r| r.contains(&(i as u64))))
    {
        panic!(
            "image byte {at} changed, outside {:x?} (request type {:?}, sector {})",
            expected.disk_writes, expected.request_type, expected.sector
        );
    }
    if self_modifying {
        return false;
    }

    // Guest memory: only the writable buffers and the used ring change.
    let ram_after = snapshot(&ram);
    for (r, &(start, _)) in REGIONS.iter().enumerate() {
        for i in changed(&ram_before[r], &ram_after[r]) {
            let addr = start + i as u64;
            if !used_ring.contains(&addr) && !writable.iter().any(|w| w.contains(&addr)) {
                panic!("guest byte {addr:#x} changed outside the chain's writable buffers {writable:x?}");
            }
        }
    }

    // One used entry, for this head.
    let next_used = q.vring.get_ref().get_queue().next_used();
    assert_eq!(
        next_used.wrapping_sub(next_used_before),
        1,
        "one used entry per chain"
    );
    let entry = USED + 4 + 8 * u64::from(next_used_before % QUEUE_SIZE);
    let id: u32 = ram.read_obj(GuestAddress(entry)).unwrap();
    let used_len: u32 = ram.read_obj(GuestAddress(entry + 4)).unwrap();
    assert_eq!(id, u32::from(head), "the used entry names another head");
    let writable_bytes: u64 = writable.iter().map(|w| w.end - w.start).sum();
    assert!(
        u64::from(used_len) <= writable_bytes,
        "used length {used_len} beyond the chain's {writable_bytes} writable bytes"
    );

    // The status, and what an OK request did.
    let Some(status_addr) = status_addr.filter(|a| !used_ring.contains(a)) else {
        return true;
    };
    let status: u8 = ram.read_obj(GuestAddress(status_addr)).unwrap();
    assert!(
        [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&u32::from(status)),
        "status byte {status}"
    );
    if u32::from(status) != VIRTIO_BLK_S_OK {
        return true;
    }
    // The bytes the device wrote, when no buffer overwrote another.
    let data_writable: Vec<_> = chain.iter().filter(|d| d.2).copied().collect();
    let disjoint = writable.iter().enumerate().all(|(i, a)| {
        writable[i + 1..].iter().all(|b| !overlaps(a, b)) && !overlaps(a, &used_ring)
    });
    let written = || disjoint.then(|| stream(&ram, &data_writable)).flatten();
    match expected.request_type {
        Some(VIRTIO_BLK_T_OUT) => {
            assert!(!readonly, "a write to a read-only disk succeeded");
            let start = (expected.sector * SECTOR) as usize;
            let data = &expected.out_data;
            assert_eq!(
                &disk_after[start..start + data.len()],
                &data[..],
                "the disk does not hold what was written"
            );
        }
        Some(VIRTIO_BLK_T_IN) => {
            let len = writable_bytes - 1;
            assert_eq!(u64::from(used_len), len + 1, "used length of a read");
            if let Some(got) = written() {
                let start = (expected.sector * SECTOR) as usize;
                assert_eq!(
                    &got[..len as usize],
                    &disk_before[start..start + len as usize],
                    "the read did not return the disk's bytes"
                );
            }
        }
        Some(VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            assert!(!readonly, "a discard on a read-only disk succeeded");
            for r in &expected.zeroed {
                assert!(
                    disk_after[r.start as usize..r.end as usize]
                        .iter()
                        .all(|&b| b == 0),
                    "sectors {r:?} not zeroed"
                );
            }
        }
        Some(VIRTIO_BLK_T_GET_ID) => {
            let len = (writable_bytes - 1).min(20) as usize;
            if let Some(got) = written() {
                let mut serial = [0u8; 20];
                serial[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
                assert_eq!(&got[..len], &serial[..len], "GET_ID answer");
            }
        }
        _ => {}
    }
    true
}

fn data_pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        (DATA..DATA_END)
            .map(|addr| addr.wrapping_mul(31) as u8 | 1)
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let flags = input.u8();
    let readonly = flags & 1 != 0;
    let event_idx = flags & 2 != 0;
    MemImage::get().reset();
    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let ram = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    // Recognisable data in the buffers, so that writes show on the disk.
    ram.write_slice(data_pattern(), GuestAddress(DATA)).unwrap();
    let mut q = BlkQueue::new(ram, QUEUE_SIZE, readonly);
    q.configure(QUEUE_SIZE, DESC_TABLE, AVAIL, USED, event_idx);
    for slot in 0..MAX_REQUESTS {
        if input.is_empty() {
            break;
        }
        if !serve(&mut q, &mut input, slot, readonly) {
            break;
        }
    }
});
