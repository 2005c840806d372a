//! A split virtqueue (virtio 1.2 2.7), driver side: descriptor table, avail
//! ring and used ring in heap memory ([`DmaBuf`]), notification and interrupt
//! suppression (VIRTIO_F_EVENT_IDX when negotiated, the ring flags otherwise).
//!
//! Layout of the one allocation, page-aligned:
//!
//! ```text
//! 0                       descriptor table   16 * size
//! 16 * size               avail ring         flags, idx, ring[size], used_event
//! next page boundary      used ring          flags, idx, ring[size] (id, len), avail_event
//! ```
//!
//! The used ring gets its own page: the device writes it while the driver
//! writes the avail ring, and on two host CPUs a shared cache line would
//! bounce between them.
//!
//! Costs that shape this (see DESIGN.md, Environment): a notify write is an
//! exit (~7 µs through an ioeventfd, 16 µs otherwise) and an interrupt is a
//! trip through the CPL0 stub, which PVM emulates; memory is native. So the
//! driver publishes a batch with one index write, notifies only when the
//! device asked for it (avail_event), and in poll mode keeps used_event where
//! the device never reaches it.

use core::fmt;
use core::ptr;
use core::sync::atomic::{fence, Ordering};

use crate::heap::DmaBuf;
use crate::mmio::Mmio;

/// virtq_desc.flags: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// virtq_desc.flags: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// virtq_desc.flags: the buffer is a table of descriptors (VIRTIO_F_INDIRECT_DESC).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// virtq_avail.flags: the driver wants no interrupts (without EVENT_IDX).
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// virtq_used.flags: the device wants no notifications (without EVENT_IDX).
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// Largest split queue (virtio 1.2 2.7: Queue Size up to 32768).
pub const QUEUE_SIZE_MAX: u16 = 32768;

const DESC_BYTES: usize = 16;
const USED_ELEM_BYTES: usize = 8;
/// flags + idx at the start of both rings.
const RING_HEADER_BYTES: usize = 4;
const PAGE_BYTES: usize = 4096;

/// One `virtq_desc`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Writes a descriptor the device may read as soon as it is published.
///
/// # Safety
/// `at` points to a descriptor slot in memory shared with the device (a
/// queue's table or an indirect table), which the device does not read while
/// the driver writes it (the descriptor belongs to no available chain).
pub unsafe fn write_descriptor(at: *mut Descriptor, descriptor: Descriptor) {
    // SAFETY: the caller's contract; volatile so that the write is not
    // merged with or moved past the publishing index write.
    unsafe { ptr::write_volatile(at, descriptor) }
}

/// One `virtq_used_elem`: the head of a finished chain and the bytes the
/// device wrote into it.
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

pub struct SplitQueue {
    index: u16,
    size: u16,
    mem: DmaBuf,
    used_offset: usize,
    notify: Mmio,
    event_idx: bool,
    /// Next avail ring entry to fill (the driver's copy of avail->idx,
    /// including entries not yet published).
    next_avail: u16,
    /// avail->idx as published (and as of the last notification decision).
    published_avail: u16,
    /// Next used ring entry to read.
    last_used: u16,
    interrupts_on: bool,
    /// Notify writes done.
    pub notifies: u64,
}

impl SplitQueue {
    /// A queue of `size` entries (a power of two) that notifies through the
    /// 2-byte register `notify`. Interrupts start off. `None` if the heap is
    /// exhausted.
    pub fn new(index: u16, size: u16, notify: Mmio, event_idx: bool) -> Option<SplitQueue> {
        assert!(
            size.is_power_of_two() && size <= QUEUE_SIZE_MAX,
            "queue size {size}"
        );
        let n = usize::from(size);
        let avail_end = DESC_BYTES * n + RING_HEADER_BYTES + 2 * n + 2;
        let used_offset = avail_end.next_multiple_of(PAGE_BYTES);
        let used_end = used_offset + RING_HEADER_BYTES + USED_ELEM_BYTES * n + 2;
        let mem = DmaBuf::alloc(used_end)?;
        let mut queue = SplitQueue {
            index,
            size,
            mem,
            used_offset,
            notify,
            event_idx,
            next_avail: 0,
            published_avail: 0,
            last_used: 0,
            interrupts_on: true,
            notifies: 0,
        };
        queue.set_interrupts(false);
        Some(queue)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn desc_paddr(&self) -> u64 {
        self.mem.paddr()
    }

    pub fn avail_paddr(&self) -> u64 {
        self.mem.paddr() + (DESC_BYTES * usize::from(self.size)) as u64
    }

    pub fn used_paddr(&self) -> u64 {
        self.mem.paddr() + self.used_offset as u64
    }

    fn avail_offset(&self) -> usize {
        DESC_BYTES * usize::from(self.size)
    }

    /// Byte offset in `mem` of avail->ring[i]; i == size gives used_event.
    fn avail_ring_offset(&self, i: usize) -> usize {
        self.avail_offset() + RING_HEADER_BYTES + 2 * i
    }

    fn used_ring_offset(&self, i: usize) -> usize {
        self.used_offset + RING_HEADER_BYTES + USED_ELEM_BYTES * i
    }

    fn read16(&self, offset: usize) -> u16 {
        // SAFETY: `ptr_at` checked the offset against the allocation; the
        // device may write this field at any time, hence volatile.
        unsafe { ptr::read_volatile(self.mem.ptr_at::<u16>(offset)) }
    }

    fn write16(&mut self, offset: usize, value: u16) {
        // SAFETY: as in read16; this is a field the driver owns (avail ring),
        // written volatile because the device reads it concurrently.
        unsafe { ptr::write_volatile(self.mem.ptr_at::<u16>(offset), value) }
    }

    /// Writes descriptor `i` of the table.
    ///
    /// The caller (the device driver) only rewrites descriptors of chains the
    /// device has returned or never seen.
    pub fn set_descriptor(&mut self, i: u16, descriptor: Descriptor) {
        assert!(i < self.size, "descriptor {i} of {}", self.size);
        let at = self.mem.ptr_at::<Descriptor>(DESC_BYTES * usize::from(i));
        // SAFETY: `at` is descriptor i of this queue's table (bounds checked
        // by ptr_at); the driver only calls this for descriptors of no
        // available chain (see above).
        unsafe { write_descriptor(at, descriptor) }
    }

    /// Adds the chain starting at descriptor `head` to the avail ring,
    /// unpublished until [`publish`](Self::publish).
    pub fn push_avail(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        self.write16(self.avail_ring_offset(slot), head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes every pushed chain available and notifies the device if it
    /// asked to be (avail_event with EVENT_IDX, else used->flags). Returns
    /// whether it notified.
    pub fn publish(&mut self) -> bool {
        let (old, new) = (self.published_avail, self.next_avail);
        if new == old {
            return false;
        }
        // The ring entries (and descriptors, headers, data) before the index.
        fence(Ordering::Release);
        self.write16(self.avail_offset() + 2, new);
        self.published_avail = new;
        // The index store before the load of avail_event / used->flags
        // (mfence): otherwise the device could go to sleep having seen the
        // old index while the driver reads a stale "no notification needed".
        fence(Ordering::SeqCst);
        let wanted = if self.event_idx {
            let avail_event = self.read16(self.used_ring_offset(usize::from(self.size)));
            need_event(avail_event, new, old)
        } else {
            self.read16(self.used_offset) & VIRTQ_USED_F_NO_NOTIFY == 0
        };
        if wanted {
            self.notify.write16(0, self.index);
            self.notifies += 1;
        }
        wanted
    }

    /// The next finished chain, if the device has returned one.
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        let used_idx = self.read16(self.used_offset + 2);
        if used_idx == self.last_used {
            return None;
        }
        // The index load before the element (and the request's status and
        // data) loads.
        fence(Ordering::Acquire);
        let at = self.used_ring_offset(usize::from(self.last_used % self.size));
        // SAFETY: at is used->ring[last_used % size] (bounds checked by
        // ptr_at); the device wrote it before it published used_idx.
        let (id, len) = unsafe {
            (
                ptr::read_volatile(self.mem.ptr_at::<u32>(at)),
                ptr::read_volatile(self.mem.ptr_at::<u32>(at + 4)),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        if !self.interrupts_on && self.event_idx {
            // Keep used_event just behind what has been read: the device
            // interrupts when used->idx passes used_event, which it cannot
            // do before another 65535 completions.
            self.write16(
                self.avail_ring_offset(usize::from(self.size)),
                self.last_used.wrapping_sub(1),
            );
        }
        Some(UsedElem { id, len })
    }

    /// Asks for an interrupt on the next completion (`on`) or for none. When
    /// turning them on, returns whether completions are already waiting
    /// (which will not interrupt: read them first).
    pub fn set_interrupts(&mut self, on: bool) -> bool {
        self.interrupts_on = on;
        if self.event_idx {
            let event = if on {
                self.last_used
            } else {
                self.last_used.wrapping_sub(1)
            };
            self.write16(self.avail_ring_offset(usize::from(self.size)), event);
        } else {
            let flags = if on { 0 } else { VIRTQ_AVAIL_F_NO_INTERRUPT };
            self.write16(self.avail_offset(), flags);
        }
        if !on {
            return false;
        }
        // used_event (or the flags) before the used index load, as in publish.
        fence(Ordering::SeqCst);
        self.read16(self.used_offset + 2) != self.last_used
    }
}

impl fmt::Display for SplitQueue {
    /// The ring indexes as both sides see them, for stall reports.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = usize::from(self.size);
        write!(
            f,
            "avail idx={} event(used_event)={} flags={:#x}; used idx={} last_used={} \
             avail_event={} flags={:#x}",
            self.read16(self.avail_offset() + 2),
            self.read16(self.avail_ring_offset(size)),
            self.read16(self.avail_offset()),
            self.read16(self.used_offset + 2),
            self.last_used,
            self.read16(self.used_ring_offset(size)),
            self.read16(self.used_offset),
        )
    }
}

/// virtio 1.2 2.7.10 (vring_need_event): whether moving an index from `old`
/// to `new` passes `event`, i.e. event is in [old, new) modulo 2^16.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
