//! Putting a batch of chains on a used ring with one store of the used
//! index, and deciding whether the guest wants an interrupt for it.
//!
//! virtio-queue's `add_used` stores the used index after every element, so
//! a driver polling the ring can see the first buffers of a frame merged
//! over several (VIRTIO_NET_F_MRG_RXBUF) before the others: virtio 1.2
//! 5.1.6.4.2 has the driver read `num_buffers` from the first and take the
//! rest from the used ring at once, and Linux drops the frame when they are
//! not all there (`receive_mergeable`, "rx error: N buffers out of M
//! missing"). [`publish`] writes every element first, then the index once
//! with release ordering, and moves the queue's `next_used` to match.
//!
//! Since it bypasses `add_used`, virtio-queue's `needs_notification` (which
//! counts `add_used` calls) cannot be used after it; [`needs_interrupt`]
//! decides from the index before and after the batch, as Linux's
//! `vring_need_event` does.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Bytes before the used ring's elements (flags, idx), and per element.
const USED_HEADER_BYTES: u64 = 4;
const USED_ELEMENT_BYTES: u64 = 8;
/// Bytes before the available ring's entries (flags, idx); `used_event`
/// follows the entries.
const AVAIL_HEADER_BYTES: u64 = 4;

/// What [`publish`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// The used index before and after the batch.
    pub old: u16,
    pub new: u16,
    /// The first entry that could not be put on the ring (a head past the
    /// queue size, or a used ring outside guest memory), and why; entries
    /// after it are still tried.
    pub failed: Option<(u16, String)>,
}

/// Puts `entries` (head, bytes written) on `queue`'s used ring, then stores
/// the used index once (see the module documentation).
pub fn publish<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    entries: impl Iterator<Item = (u16, u32)>,
) -> Published {
    let size = queue.size();
    let used_ring = GuestAddress(queue.used_ring());
    let old = Wrapping(queue.next_used());
    let mut next = old;
    let mut failed = None;
    for (head, len) in entries {
        let result = if head >= size {
            Err(format!("head {head} is past the queue size {size}"))
        } else {
            let offset = USED_HEADER_BYTES + u64::from(next.0 % size) * USED_ELEMENT_BYTES;
            let mut element = [0u8; USED_ELEMENT_BYTES as usize];
            element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            element[4..].copy_from_slice(&len.to_le_bytes());
            used_ring
                .checked_add(offset)
                .ok_or_else(|| "the used ring wraps the address space".to_string())
                .and_then(|addr| {
                    mem.write_slice(&element, addr)
                        .map_err(|e| format!("the used ring: {e}"))
                })
        };
        match result {
            Ok(()) => next += Wrapping(1),
            Err(why) => {
                if failed.is_none() {
                    failed = Some((head, why));
                }
            }
        }
    }
    if next != old {
        // Release: the elements above are visible before the index is.
        let stored = used_ring
            .checked_add(2)
            .ok_or_else(|| "the used ring wraps the address space".to_string())
            .and_then(|addr| {
                mem.store(next.0.to_le(), addr, Ordering::Release)
                    .map_err(|e| format!("the used index: {e}"))
            });
        if let Err(why) = stored {
            failed.get_or_insert((0, why));
        }
        queue.set_next_used(next.0);
    }
    Published {
        old: old.0,
        new: next.0,
        failed,
    }
}

/// Whether the guest asked for an interrupt for the used entries from
/// `old` to `new`: always without EVENT_IDX (virtio-queue does not honour
/// VRING_AVAIL_F_NO_INTERRUPT either), else when its `used_event` lies in
/// that span. A `used_event` that cannot be read counts as asking.
pub fn needs_interrupt<M: GuestMemory>(queue: &Queue, mem: &M, old: u16, new: u16) -> bool {
    if old == new {
        return false;
    }
    if !queue.event_idx_enabled() {
        return true;
    }
    // The index store above before the read of used_event (as Linux's
    // virtqueue_kick_prepare and virtio-queue's needs_notification do).
    fence(Ordering::SeqCst);
    let offset = AVAIL_HEADER_BYTES + 2 * u64::from(queue.size());
    let used_event = GuestAddress(queue.avail_ring())
        .checked_add(offset)
        .and_then(|addr| mem.load::<u16>(addr, Ordering::Acquire).ok());
    match used_event {
        Some(event) => need_event(u16::from_le(event), new, old),
        None => true,
    }
}

/// Linux's `vring_need_event`: whether `event` is in [old, new).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const SIZE: u16 = 16;

    fn ring() -> (
        GuestMemoryMmap,
        Queue,
        MockSplitQueue<'static, GuestMemoryMmap>,
    ) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // The mock borrows the memory; leak a copy (mappings are shared) so
        // the test can use both.
        let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
        let vq = MockSplitQueue::new(leaked, SIZE);
        let queue: Queue = vq.create_queue().unwrap();
        (mem, queue, vq)
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &Queue) -> u16 {
        mem.read_obj::<u16>(GuestAddress(q.used_ring() + 2))
            .unwrap()
    }

    fn used_elem(mem: &GuestMemoryMmap, q: &Queue, i: u16) -> (u32, u32) {
        let addr = q.used_ring() + 4 + 8 * u64::from(i % SIZE);
        let id = mem.read_obj::<u32>(GuestAddress(addr)).unwrap();
        let len = mem.read_obj::<u32>(GuestAddress(addr + 4)).unwrap();
        (id, len)
    }

    #[test]
    fn a_merged_frame_lands_with_one_index_update() {
        let (mem, mut q, _vq) = ring();
        let p = publish(&mut q, &mem, [(3, 4096), (5, 4096), (9, 100)].into_iter());
        assert_eq!((p.old, p.new, p.failed), (0, 3, None));
        assert_eq!(used_idx(&mem, &q), 3);
        assert_eq!(q.next_used(), 3);
        assert_eq!(used_elem(&mem, &q, 0), (3, 4096));
        assert_eq!(used_elem(&mem, &q, 1), (5, 4096));
        assert_eq!(used_elem(&mem, &q, 2), (9, 100));
        // An empty batch touches nothing.
        let p = publish(&mut q, &mem, std::iter::empty());
        assert_eq!((p.old, p.new), (3, 3));
        assert!(!needs_interrupt(&q, &mem, p.old, p.new));
    }

    #[test]
    fn the_ring_wraps_and_the_index_wraps() {
        let (mem, mut q, _vq) = ring();
        q.set_next_used(u16::MAX - 1);
        let p = publish(&mut q, &mem, [(1, 10), (2, 20), (4, 40)].into_iter());
        assert_eq!((p.old, p.new), (u16::MAX - 1, 1));
        assert_eq!(used_idx(&mem, &q), 1);
        assert_eq!(used_elem(&mem, &q, u16::MAX - 1), (1, 10));
        assert_eq!(used_elem(&mem, &q, u16::MAX), (2, 20));
        assert_eq!(used_elem(&mem, &q, 0), (4, 40));
    }

    #[test]
    fn a_head_past_the_queue_size_is_skipped_and_reported() {
        let (mem, mut q, _vq) = ring();
        let p = publish(&mut q, &mem, [(1, 10), (SIZE, 20), (2, 30)].into_iter());
        assert_eq!((p.old, p.new), (0, 2));
        let (head, why) = p.failed.unwrap();
        assert_eq!(head, SIZE);
        assert!(why.contains("past the queue size"), "{why}");
        assert_eq!(used_elem(&mem, &q, 1), (2, 30));
    }

    #[test]
    fn a_used_ring_outside_memory_is_reported_not_a_panic() {
        let (mem, mut q, _vq) = ring();
        q.set_used_ring_address(Some(0x20_0000), None);
        let p = publish(&mut q, &mem, [(1, 10)].into_iter());
        assert_eq!(p.new, p.old, "nothing was put on the ring");
        assert!(p.failed.is_some());
    }

    #[test]
    fn event_idx_asks_for_an_interrupt_only_when_used_event_is_crossed() {
        let (mem, mut q, _vq) = ring();
        q.set_event_idx(true);
        let used_event = GuestAddress(q.avail_ring() + 4 + 2 * u64::from(SIZE));
        mem.write_obj::<u16>(5u16.to_le(), used_event).unwrap();
        // [0, 3): 5 not crossed; [3, 6): crossed; [6, 7): not.
        assert!(!needs_interrupt(&q, &mem, 0, 3));
        assert!(needs_interrupt(&q, &mem, 3, 6));
        assert!(!needs_interrupt(&q, &mem, 6, 7));
        // Across the wrap of the index.
        mem.write_obj::<u16>(u16::MAX.to_le(), used_event).unwrap();
        assert!(needs_interrupt(&q, &mem, u16::MAX - 1, 2));
        // Without EVENT_IDX every batch interrupts.
        q.set_event_idx(false);
        assert!(needs_interrupt(&q, &mem, 6, 7));
    }
}
