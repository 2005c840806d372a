//! Split virtqueues in arbitrary guest memory, walked by ringvm-blk's queue
//! worker as a guest kick makes it (`QueueWorker::on_kick`: the available
//! ring through virtio-queue, every chain through `parse_request` and the
//! sync engine, the used ring and EVENT_IDX notification at the end).
//! Descriptor tables, rings, indirect tables, indices and buffers are all
//! input bytes: loops, chains longer than the queue, nested or misaligned
//! indirect tables, addresses and lengths outside guest memory or wrapping
//! the address space, ring indices far ahead or behind.
//!
//! Invariants, per kick:
//! - nothing panics, and the kick returns (libFuzzer's -timeout);
//! - every chain taken off the available ring is answered or counted as
//!   dropped: the counters account for exactly the chains the available
//!   index moved past;
//! - the used ring gains no more entries than chains were answered, each
//!   for a head below the queue size;
//! - when the device cannot have written the available ring during the
//!   kick (no device-writable buffer of any descriptor, nor the used ring,
//!   overlaps it or a descriptor table), each used entry is for a head the
//!   available ring held in the slots the kick consumed;
//! - nothing is left in flight after a drain.
//!
//! Input: a flags byte (bit 0: EVENT_IDX, bit 1: read-only disk, bit 2: ring
//! addresses are any u64, bits 3-7: 1-3 kicks), the queue size (u16, which
//! the queue refuses unless a power of two up to [`MAX_QUEUE_SIZE`]), the
//! descriptor table, available and used ring addresses (see
//! [`ring_address`]), next_avail and next_used (u16 each), then guest
//! memory: 16 KiB from address 0, 4 KiB at [`HIGH`]. seeds/virtqueue.py
//! writes such inputs.

#![no_main]

use std::ops::Range;
use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use ringvm_blk::counters::QueueCounters;
use ringvm_blk::queue::GuestRam;
use ringvm_fuzz::{tracing, BlkQueue, Bytes, MemImage};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

/// Slots of the worker (ringvm-blk's `--queue-size`); the queue size the
/// input asks for is refused unless a power of two up to this.
const MAX_QUEUE_SIZE: u16 = 64;
/// Guest memory: the input's bytes from address 0, then a hole, then one
/// more page (also input bytes).
const LOW_BYTES: u64 = 0x4000;
const HIGH: u64 = 0x8000;
const HIGH_BYTES: u64 = 0x1000;

/// A ring address: mostly inside low memory (or just past it), or any.
fn ring_address(input: &mut Bytes<'_>, any: bool) -> u64 {
    if any {
        input.u64()
    } else {
        u64::from(input.u16()) % (LOW_BYTES + 0x400)
    }
}

fn taken(c: &QueueCounters) -> u64 {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    [
        &c.reads,
        &c.writes,
        &c.flushes,
        &c.get_ids,
        &c.discards,
        &c.write_zeroes,
        &c.chains_dropped,
    ]
    .into_iter()
    .map(load)
    .chain(c.bad.iter().map(load))
    .sum()
}

fn range(start: u64, len: u64) -> Range<u64> {
    start..start.saturating_add(len)
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Every guest range the device may write while it serves this ring as it
/// is now, or None if that cannot be bounded simply: the writable buffers of
/// every descriptor in the table and in the indirect tables it points to,
/// plus the used ring. None too if one of them overlaps a descriptor table
/// (the device could then write itself new descriptors).
fn device_writes(ram: &GuestRam, desc: u64, used: u64, size: u16) -> Option<Vec<Range<u64>>> {
    const MAX_INDIRECT: u64 = 1024;
    let read_desc = |at: u64| -> Option<(u64, u32, u16)> {
        let raw: [u8; 16] = ram.read_obj(GuestAddress(at)).ok()?;
        Some((
            u64::from_le_bytes(raw[0..8].try_into().unwrap()),
            u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            u16::from_le_bytes(raw[12..14].try_into().unwrap()),
        ))
    };
    let mut tables = vec![range(desc, 16 * u64::from(size))];
    let mut writes = vec![range(used, 6 + 8 * u64::from(size))];
    let note = |writes: &mut Vec<Range<u64>>, (addr, len, flags): (u64, u32, u16)| {
        if flags & VRING_DESC_F_WRITE as u16 != 0 && len > 0 {
            writes.push(range(addr, u64::from(len)));
        }
    };
    for i in 0..u64::from(size) {
        // A descriptor outside guest memory ends its chain unread.
        let Some(d) = read_desc(desc.checked_add(16 * i)?) else {
            continue;
        };
        if d.2 & VRING_DESC_F_INDIRECT as u16 != 0 {
            let entries = u64::from(d.1) / 16;
            if entries > MAX_INDIRECT {
                return None;
            }
            tables.push(range(d.0, 16 * entries));
            for e in 0..entries {
                if let Some(entry) = d.0.checked_add(16 * e).and_then(read_desc) {
                    note(&mut writes, entry);
                }
            }
        } else {
            note(&mut writes, d);
        }
    }
    let clear = writes
        .iter()
        .all(|w| tables.iter().all(|t| !overlaps(w, t)));
    clear.then_some(writes)
}

/// The heads in the available ring slots `next_avail..next_avail + count`,
/// as they are now (None where a slot is outside guest memory).
fn avail_heads(
    ram: &GuestRam,
    avail: u64,
    size: u16,
    next_avail: u16,
    count: u64,
) -> Vec<Option<u16>> {
    (0..count.min(u64::from(size)))
        .map(|i| {
            let slot = next_avail.wrapping_add(i as u16) % size;
            let at = avail.checked_add(4 + 2 * u64::from(slot))?;
            ram.read_obj::<u16>(GuestAddress(at)).ok()
        })
        .collect()
}

fn kick(q: &mut BlkQueue) {
    let ram = q.ram();
    let (size, desc, avail, used, next_avail, next_used) = {
        let state = q.vring.get_ref();
        let queue = state.get_queue();
        (
            queue.size(),
            queue.desc_table(),
            queue.avail_ring(),
            queue.used_ring(),
            queue.next_avail(),
            queue.next_used(),
        )
    };
    if tracing() {
        eprintln!("kick: size {size} avail {avail:#x} used {used:#x} next_avail {next_avail} next_used {next_used}");
    }
    let avail_ring = range(avail, 6 + 2 * u64::from(size));
    let quiet_avail = device_writes(&ram, desc, used, size)
        .is_some_and(|writes| writes.iter().all(|w| !overlaps(w, &avail_ring)));
    // With the ring quiet, a kick takes at most a queue's worth.
    let heads_before = avail_heads(&ram, avail, size, next_avail, u64::from(size));
    let taken_before = taken(&q.counters);
    let dropped_before = q.counters.chains_dropped.load(Ordering::Relaxed);

    q.worker.on_kick(&q.vring);
    q.worker.drain();
    assert_eq!(q.worker.in_flight(), 0, "I/O left in flight after a drain");

    let taken = taken(&q.counters) - taken_before;
    let dropped = q.counters.chains_dropped.load(Ordering::Relaxed) - dropped_before;
    let (next_avail_after, next_used_after) = {
        let state = q.vring.get_ref();
        (
            state.get_queue().next_avail(),
            state.get_queue().next_used(),
        )
    };
    if tracing() {
        eprintln!(
            "kicked: {taken} chains taken ({dropped} dropped), next_avail -> {next_avail_after}, \
             next_used -> {next_used_after}"
        );
    }
    assert_eq!(
        next_avail_after.wrapping_sub(next_avail),
        taken as u16,
        "chains taken off the ring ({}) but not accounted for ({taken})",
        next_avail_after.wrapping_sub(next_avail)
    );
    let added = u64::from(next_used_after.wrapping_sub(next_used));
    assert!(
        added <= taken - dropped || taken - dropped > u64::from(u16::MAX),
        "{added} used entries for {} chains answered",
        taken - dropped
    );
    // The heads of the consumed slots (the ring did not change meanwhile).
    let consumed: Vec<u16> = heads_before
        .iter()
        .take(taken.min(u64::from(size)) as usize)
        .flatten()
        .copied()
        .collect();
    for i in 0..added.min(u64::from(size)) {
        let index = next_used_after.wrapping_sub(1 + i as u16) % size;
        let Some(at) = used.checked_add(4 + 8 * u64::from(index)) else {
            continue;
        };
        // The device wrote the entry, so it is in guest memory.
        let id: u32 = ram.read_obj(GuestAddress(at)).expect("a used entry");
        assert!(
            id < u32::from(size),
            "used entry for head {id} of a queue of {size}"
        );
        if quiet_avail && taken <= u64::from(size) {
            assert!(
                consumed.contains(&(id as u16)),
                "used entry for head {id}, which the consumed slots {consumed:?} did not hold"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let flags = input.u8();
    let event_idx = flags & 1 != 0;
    let readonly = flags & 2 != 0;
    let any_address = flags & 4 != 0;
    let kicks = 1 + (flags >> 3) % 3;
    let size = input.u16();
    let desc = ring_address(&mut input, any_address);
    let avail = ring_address(&mut input, any_address);
    let used = ring_address(&mut input, any_address);
    let next_avail = input.u16();
    let next_used = input.u16();

    let ram = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_BYTES as usize),
        (GuestAddress(HIGH), HIGH_BYTES as usize),
    ])
    .expect("guest memory");
    let low = input.take(LOW_BYTES as usize);
    ram.write_slice(low, GuestAddress(0)).unwrap();
    let high = input.take(HIGH_BYTES as usize);
    ram.write_slice(high, GuestAddress(HIGH)).unwrap();

    MemImage::get().reset();
    let mut q = BlkQueue::new(ram, MAX_QUEUE_SIZE, readonly);
    q.configure(size, desc, avail, used, event_idx);
    q.vring.set_queue_next_avail(next_avail);
    q.vring.set_queue_next_used(next_used);
    for _ in 0..kicks {
        kick(&mut q);
    }
});
