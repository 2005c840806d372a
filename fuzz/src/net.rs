//! The guest side of the net_frames target: guest memory laid out with a
//! TX and an RX split virtqueue, chains written into them from the input,
//! and what the target checks the device against (the chains as the device
//! walks them, guest memory snapshots, byte streams in guest buffers).

use std::ops::Range;
use std::sync::OnceLock;

use ringvm_net::queue::{GuestRam, GuestRamAtomic, Vring};
use ringvm_net::rx::RX_MERGE_BYTES;
use ringvm_net::tap::VNET_HDR_BYTES;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes as _, GuestAddress};

use crate::Bytes;

/// The worker's maximum queue size (ringvm-net's `--queue-size`).
pub const MAX_QUEUE_SIZE: u16 = 64;
/// Guest memory: rings, indirect tables and TX headers; two adjacent data
/// regions (one buffer can span both); a hole; a page past it.
pub const REGIONS: [(u64, u64); 4] = [
    (0, 0x8000),
    (0x1_0000, 0x1_0000),
    (0x2_0000, 0x1_0000),
    (0x4_0000, 0x1000),
];
pub const TX_RING: RingLayout = RingLayout {
    desc: 0x0000,
    avail: 0x1000,
    used: 0x1400,
};
pub const RX_RING: RingLayout = RingLayout {
    desc: 0x2000,
    avail: 0x3000,
    used: 0x3400,
};
/// Indirect tables: [`INDIRECT_SLOTS`] of 16 descriptors.
pub const INDIRECT: u64 = 0x4000;
pub const INDIRECT_SLOTS: u64 = 32;
pub const INDIRECT_SLOT_BYTES: u64 = 0x100;
/// TX headers: one 16-byte slot per chain.
pub const HEADERS: u64 = 0x6000;
pub const HEADER_SLOTS: u64 = 0x200;
pub const DATA: u64 = 0x1_0000;
pub const DATA_END: u64 = 0x3_0000;
pub const BOUNDARY: u64 = 0x2_0000;
pub const HOLE: u64 = 0x3_0000;
pub const HIGH: u64 = 0x4_0000;
/// Descriptors per chain.
pub const MAX_DESCRIPTORS: u8 = 8;

#[derive(Clone, Copy)]
pub struct RingLayout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

pub fn range(start: u64, len: u64) -> Range<u64> {
    start..start.saturating_add(len)
}

pub fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Whether `len` bytes at `addr` are all guest memory (by the layout, not
/// by asking vm-memory). Zero bytes are anywhere.
pub fn in_ram(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut at = addr;
    while at < end {
        match REGIONS.iter().find(|&&(s, l)| s <= at && at < s + l) {
            Some(&(s, l)) => at = s + l,
            None => return false,
        }
    }
    true
}

pub fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// One queue as the driver side of the target sees it.
pub struct Ring {
    pub layout: RingLayout,
    pub size: u16,
    pub vring: Vring,
    /// Next descriptor-table slot for a direct chain.
    pub cursor: u16,
    /// The available index published so far.
    pub avail_idx: u16,
}

impl Ring {
    pub fn new(mem: &GuestRamAtomic, layout: RingLayout, size: u16) -> Ring {
        let vring = Vring::new(mem.clone(), MAX_QUEUE_SIZE).expect("vring");
        vring.set_queue_size(size);
        vring
            .set_queue_info(layout.desc, layout.avail, layout.used)
            .expect("aligned ring addresses");
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Ring {
            layout,
            size,
            vring,
            cursor: 0,
            avail_idx: 0,
        }
    }

    pub fn set_indices(&mut self, ram: &GuestRam, next_avail: u16, next_used: u16) {
        self.vring.set_queue_next_avail(next_avail);
        self.vring.set_queue_next_used(next_used);
        self.avail_idx = next_avail;
        ram.write_obj(next_avail, GuestAddress(self.layout.avail + 2))
            .unwrap();
        ram.write_obj(next_used, GuestAddress(self.layout.used + 2))
            .unwrap();
    }

    pub fn next_avail(&self) -> u16 {
        self.vring.queue_next_avail()
    }

    pub fn next_used(&self) -> u16 {
        self.vring.get_ref().get_queue().next_used()
    }

    /// The used ring, with avail_event.
    pub fn used_range(&self) -> Range<u64> {
        range(self.layout.used, 6 + 8 * u64::from(self.size))
    }

    /// The descriptor table and the available ring (with used_event).
    pub fn driver_ranges(&self) -> [Range<u64>; 2] {
        [
            range(self.layout.desc, 16 * u64::from(self.size)),
            range(self.layout.avail, 6 + 2 * u64::from(self.size)),
        ]
    }

    /// The used entries from `from` to the ring's next_used.
    pub fn used_entries(&self, ram: &GuestRam, from: u16) -> Vec<(u16, u32)> {
        let count = self.next_used().wrapping_sub(from);
        (0..count)
            .map(|i| {
                let slot = from.wrapping_add(i) % self.size;
                let at = self.layout.used + 4 + 8 * u64::from(slot);
                let id: u32 = ram.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = ram.read_obj(GuestAddress(at + 4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }
}

/// A chain as the device walks it: its head, and its descriptors (address,
/// length, device-writable).
#[derive(Clone, Debug)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<(u64, u32, bool)>,
}

impl Chain {
    pub fn total(&self) -> u64 {
        self.descs.iter().map(|d| u64::from(d.1)).sum()
    }
}

/// The chains available from `next_avail`, walked as virtio-queue walks
/// them for the worker; None when the available index runs more than a
/// queue ahead (the device then takes none).
pub fn walk(ram: &GuestRam, ring: &Ring, next_avail: u16) -> Option<Vec<Chain>> {
    let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("queue");
    queue.set_size(ring.size);
    queue
        .try_set_desc_table_address(GuestAddress(ring.layout.desc))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(ring.layout.avail))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(ring.layout.used))
        .unwrap();
    queue.set_ready(true);
    queue.set_next_avail(next_avail);
    let chains = queue.iter(ram).ok()?;
    Some(
        chains
            .map(|chain| Chain {
                head: chain.head_index(),
                descs: chain
                    .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                    .collect(),
            })
            .collect(),
    )
}

/// Indirect tables the descriptor tables point to now (any of their
/// entries, chained or not).
pub fn indirect_tables(ram: &GuestRam, ring: &Ring) -> Vec<Range<u64>> {
    (0..u64::from(ring.size))
        .filter_map(|i| {
            let raw: [u8; 16] = ram.read_obj(GuestAddress(ring.layout.desc + 16 * i)).ok()?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
            (flags & VRING_DESC_F_INDIRECT as u16 != 0).then(|| range(addr, u64::from(len)))
        })
        .collect()
}

pub fn snapshot(ram: &GuestRam) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(start, len)| {
            let mut bytes = vec![0u8; len as usize];
            ram.read_slice(&mut bytes, GuestAddress(start)).unwrap();
            bytes
        })
        .collect()
}

/// The first guest address whose byte differs between two snapshots and
/// lies outside `allowed` (compared a chunk at a time: the fuzzer's
/// comparison hooks would make a byte loop the slowest part).
pub fn changed_outside(
    before: &[Vec<u8>],
    after: &[Vec<u8>],
    allowed: &[Range<u64>],
) -> Option<u64> {
    const CHUNK: usize = 256;
    for (r, &(start, _)) in REGIONS.iter().enumerate() {
        for (c, (b, a)) in before[r]
            .chunks(CHUNK)
            .zip(after[r].chunks(CHUNK))
            .enumerate()
        {
            if b == a {
                continue;
            }
            let at = start + (c * CHUNK) as u64;
            let span = at..at + b.len() as u64;
            if allowed
                .iter()
                .any(|w| w.start <= span.start && span.end <= w.end)
            {
                continue;
            }
            let outside = (0..b.len())
                .find(|&i| b[i] != a[i] && !allowed.iter().any(|w| w.contains(&(at + i as u64))));
            if let Some(i) = outside {
                return Some(at + i as u64);
            }
        }
    }
    None
}

/// Compares `bytes` with the guest bytes of `buffers` (in order, as one
/// stream), leaving out the stream offsets in `skip_offsets` and the
/// guest addresses in `skip`. The buffers must be in guest memory.
pub fn stream_matches(
    ram: &GuestRam,
    buffers: &[(u64, u32)],
    bytes: &[u8],
    skip_offsets: Range<usize>,
    skip: &Range<u64>,
) -> Result<(), String> {
    let mut offset = 0usize;
    for &(addr, len) in buffers {
        if offset >= bytes.len() {
            break;
        }
        let n = (len as usize).min(bytes.len() - offset);
        if n == 0 {
            // Anywhere, even outside guest memory.
            continue;
        }
        let mut got = vec![0u8; n];
        ram.read_slice(&mut got, GuestAddress(addr)).unwrap();
        let want = &bytes[offset..offset + n];
        if got != want {
            let bad = (0..n).find(|&i| {
                let at = addr + i as u64;
                got[i] != want[i] && !skip.contains(&at) && !skip_offsets.contains(&(offset + i))
            });
            if let Some(i) = bad {
                return Err(format!(
                    "byte {} (guest {:#x}) is {:#04x}, not {:#04x}",
                    offset + i,
                    addr + i as u64,
                    got[i],
                    want[i]
                ));
            }
        }
        offset += n;
    }
    if offset < bytes.len() {
        return Err(format!("{} bytes, the buffers hold {offset}", bytes.len()));
    }
    Ok(())
}

/// Places buffers one after the other in the data regions, so that most
/// chains do not overlap.
pub struct Alloc {
    pub next: u64,
}

impl Alloc {
    pub fn take(&mut self, len: u64) -> u64 {
        if len > DATA_END - DATA {
            return DATA;
        }
        if self.next + len > DATA_END {
            self.next = DATA;
        }
        let at = self.next;
        self.next += len;
        at
    }
}

/// A chain's shape byte: 1-8 descriptors (bits 0-2); bit 3: in an indirect
/// table; bit 4: every descriptor's next field is a u16 of the input; bit
/// 5: the head put in the available ring is a u16 of the input; bit 6:
/// every descriptor's flags are a u16 of the input.
pub struct Shape {
    pub count: u8,
    pub indirect: bool,
    pub raw_next: bool,
    pub raw_head: bool,
    pub raw_flags: bool,
}

impl Shape {
    pub fn read(input: &mut Bytes<'_>) -> Shape {
        let b = input.u8();
        Shape {
            count: 1 + b % MAX_DESCRIPTORS,
            indirect: b & 0x08 != 0,
            raw_next: b & 0x10 != 0,
            raw_head: b & 0x20 != 0,
            raw_flags: b & 0x40 != 0,
        }
    }
}

/// One descriptor: a kind byte, a u16 `v` and a u16 `w`. Kind bits 0-2 the
/// address: 0 the next free bytes of the data regions, 1 data + `v`, 2
/// around the boundary of the two data regions, 3 around the end of the
/// page past the hole, 4 in the hole, 5 the ring area, 6 the chain's header
/// slot, 7 a u64 that follows; bit 3: the other direction than the queue's
/// (device-writable on TX, device-readable on RX); bits 4 and 5 both set: a
/// stray INDIRECT flag; bits 6-7 the length: `w` % 32, `w`, 64 KiB + `w`
/// (up to twice `w`), a u32 that follows.
pub fn descriptor(
    input: &mut Bytes<'_>,
    alloc: &mut Alloc,
    header: u64,
    rx: bool,
) -> (u64, u32, u16) {
    let kind = input.u8();
    let v = input.u16();
    let w = input.u16();
    let len = match kind >> 6 {
        0 => u32::from(w % 32),
        1 => u32::from(w),
        2 => 0x1_0000 + u32::from(w) * 2,
        _ => input.u32(),
    };
    let addr = match kind & 7 {
        0 => alloc.take(u64::from(len)),
        1 => DATA + u64::from(v),
        2 => BOUNDARY - 0x100 + u64::from(v % 0x200),
        3 => HIGH + u64::from(v % 0x1100),
        4 => HOLE + u64::from(v),
        5 => u64::from(v % 0x8000),
        6 => header + u64::from(v % 16),
        _ => input.u64(),
    };
    let mut flags = 0;
    if (kind & 0x08 != 0) != rx {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    if kind & 0x30 == 0x30 {
        flags |= VRING_DESC_F_INDIRECT as u16;
    }
    (addr, len, flags)
}

pub fn write_desc(ram: &GuestRam, at: u64, (addr, len, flags): (u64, u32, u16), next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write_slice(&raw, GuestAddress(at)).unwrap();
}

/// A frame from the network: a length selector byte and a u16 `v` (bits
/// 0-1: 12 + `v` % 128 bytes, an Ethernet frame up to 1514 bytes after the
/// header, 12 + `v`, or `RX_MERGE_BYTES` - 8 + `v` % 16), its first 16
/// bytes from the input, the rest a pattern.
pub fn frame(input: &mut Bytes<'_>) -> Vec<u8> {
    let sel = input.u8();
    let v = input.u16();
    let len = match sel & 3 {
        0 => VNET_HDR_BYTES + usize::from(v % 128),
        1 => VNET_HDR_BYTES + 14 + usize::from(v % 1501),
        2 => VNET_HDR_BYTES + usize::from(v),
        _ => RX_MERGE_BYTES - 8 + usize::from(v % 16),
    };
    let seed = u32::from(sel) << 16 | u32::from(v);
    let mut bytes: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(0x9e37_79b1).wrapping_add(seed) >> 13) as u8)
        .collect();
    let head = input.take(16.min(len));
    bytes[..head.len()].copy_from_slice(head);
    bytes
}

/// Writes a chain from the input into `ring` (descriptors from its
/// cursor, or an indirect table in slot `slot`; a TX chain's header in
/// header slot `slot`) and makes it available. Input: [`Shape`], a TX
/// chain's 12-byte header, the descriptors ([`descriptor`], each followed
/// by its next field and flags as the shape says), the head if the shape
/// says so.
pub fn add_chain(
    ram: &GuestRam,
    ring: &mut Ring,
    input: &mut Bytes<'_>,
    alloc: &mut Alloc,
    slot: u64,
    rx: bool,
) {
    let shape = Shape::read(input);
    let header = HEADERS + 16 * (slot % HEADER_SLOTS);
    if !rx {
        let mut hdr = [0u8; VNET_HDR_BYTES];
        input.fill(&mut hdr);
        ram.write_slice(&hdr, GuestAddress(header)).unwrap();
    }
    let mut descs = Vec::new();
    for i in 0..shape.count {
        let (addr, len, mut flags) = descriptor(input, alloc, header, rx);
        let next = if shape.raw_next { input.u16() } else { 0 };
        if i + 1 < shape.count {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        if shape.raw_flags {
            flags = input.u16();
        }
        descs.push((addr, len, flags, next));
    }
    let raw_head = if shape.raw_head {
        Some(input.u16())
    } else {
        None
    };
    let head = if shape.indirect {
        let table = INDIRECT + INDIRECT_SLOT_BYTES * (slot % INDIRECT_SLOTS);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let next = if shape.raw_next { next } else { i as u16 + 1 };
            write_desc(ram, table + 16 * i as u64, (addr, len, flags), next);
        }
        let head = ring.cursor;
        ring.cursor = (ring.cursor + 1) % ring.size;
        let table_len = 16 * u32::from(shape.count);
        write_desc(
            ram,
            ring.layout.desc + 16 * u64::from(head),
            (table, table_len, VRING_DESC_F_INDIRECT as u16),
            0,
        );
        head
    } else {
        let head = ring.cursor;
        for &(addr, len, flags, next) in &descs {
            let index = ring.cursor;
            ring.cursor = (ring.cursor + 1) % ring.size;
            let next = if shape.raw_next { next } else { ring.cursor };
            write_desc(
                ram,
                ring.layout.desc + 16 * u64::from(index),
                (addr, len, flags),
                next,
            );
        }
        head
    };
    let head = raw_head.unwrap_or(head);
    let at = ring.layout.avail + 4 + 2 * u64::from(ring.avail_idx % ring.size);
    ram.write_obj(head, GuestAddress(at)).unwrap();
    ring.avail_idx = ring.avail_idx.wrapping_add(1);
    ram.write_obj(ring.avail_idx, GuestAddress(ring.layout.avail + 2))
        .unwrap();
}

/// The data regions' bytes before the input's own.
pub fn data_pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        (DATA..DATA_END)
            .map(|addr| (addr.wrapping_mul(31) >> 3) as u8 | 1)
            .collect()
    })
}
