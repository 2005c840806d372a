//! Host-to-guest frames (the RX queue): the guest's receive chains are
//! taken from the available ring into an [`RxStash`], a frame is read with
//! one readv straight into their buffers, and [`split_frame`] says which
//! chains the frame filled (more than one only with VIRTIO_NET_F_MRG_RXBUF,
//! whose count goes into the header's num_buffers).
//!
//! Chains stay in the stash until a frame uses them, so a chain taken for a
//! frame that turned out short serves the next frame; nothing is pushed back
//! into the available ring.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::queue::GuestRam;
use crate::tap::{IoVec, VNET_HDR_BYTES};

/// With MRG_RXBUF, chains are gathered until they hold this much before a
/// frame is read: the header and the largest frame a tap hands over with
/// TSO (64 KiB of IP packet plus an Ethernet header with a VLAN tag). A
/// frame never has to be cut short for want of buffers.
pub const RX_MERGE_BYTES: usize = VNET_HDR_BYTES + 65535 + 18;

/// Offset of num_buffers in virtio_net_hdr_v1.
const NUM_BUFFERS_OFFSET: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum RxError {
    /// The memory table changed since the chain was taken.
    #[error("a receive buffer at {0:#x} is no longer in guest memory")]
    OutsideMemory(u64),
}

/// One receive chain: its head and its device-writable buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxChain {
    pub head: u16,
    pub buffers: Vec<(GuestAddress, u32)>,
    pub capacity: usize,
}

/// Receive chains taken from the available ring and not used yet.
#[derive(Debug, Default)]
pub struct RxStash {
    chains: VecDeque<RxChain>,
    capacity: usize,
}

/// What one frame did to the stash.
#[derive(Debug, PartialEq, Eq)]
pub struct RxFrame {
    /// (head, bytes written) per chain the frame used, in ring order.
    pub used: Vec<(u16, u32)>,
    /// The frame was longer than the buffers offered for it.
    pub truncated: bool,
}

/// How a frame of `frame_bytes` fills chains of `capacities` bytes, in
/// order: the length written into each chain it uses (at least one, even
/// for an empty frame). With `mergeable` false only the first chain is
/// used. The second value says whether the frame did not fit.
pub fn split_frame(capacities: &[usize], frame_bytes: usize, mergeable: bool) -> (Vec<u32>, bool) {
    let usable = if mergeable {
        capacities
    } else {
        &capacities[..capacities.len().min(1)]
    };
    let mut left = frame_bytes;
    let mut lens = Vec::new();
    for &capacity in usable {
        let len = left.min(capacity);
        lens.push(len as u32);
        left -= len;
        if left == 0 {
            break;
        }
    }
    (lens, left > 0)
}

impl RxStash {
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Whether a frame can be read: one chain, or with `mergeable` enough
    /// chains for the largest frame.
    pub fn ready(&self, mergeable: bool) -> bool {
        if mergeable {
            self.capacity >= RX_MERGE_BYTES
        } else {
            !self.chains.is_empty()
        }
    }

    /// Takes chains from the available ring until [`RxStash::ready`] or the
    /// ring is empty. A chain with a device-readable buffer or a buffer
    /// outside guest memory is not kept: its head goes to `bad`.
    pub fn fill(&mut self, queue: &mut Queue, mem: &GuestRam, mergeable: bool, bad: &mut Vec<u16>) {
        while !self.ready(mergeable) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return;
            };
            let head = chain.head_index();
            let mut buffers = Vec::new();
            let mut capacity = 0usize;
            let mut ok = true;
            for desc in chain {
                let len = desc.len() as usize;
                if !desc.is_write_only() || !mem.check_range(desc.addr(), len, Permissions::Write) {
                    ok = false;
                    break;
                }
                buffers.push((desc.addr(), desc.len()));
                capacity += len;
            }
            if !ok || capacity == 0 {
                bad.push(head);
                continue;
            }
            self.capacity += capacity;
            self.chains.push_back(RxChain {
                head,
                buffers,
                capacity,
            });
        }
    }

    /// The iovecs a frame is read into: the first chain's buffers, or every
    /// chain's with `mergeable`. An error when guest memory no longer holds
    /// them (a new memory table): the caller returns the stash.
    pub fn iovecs<'m>(
        &self,
        mem: &'m GuestRam,
        mergeable: bool,
        iovecs: &mut Vec<IoVec<'m>>,
    ) -> Result<(), RxError> {
        iovecs.clear();
        let take = if mergeable { self.chains.len() } else { 1 };
        for chain in self.chains.iter().take(take) {
            for &(addr, len) in &chain.buffers {
                let outside = |_| RxError::OutsideMemory(addr.raw_value());
                let slices = mem
                    .get_slices(addr, len as usize, Permissions::Write)
                    .map_err(outside)?;
                for slice in slices {
                    iovecs.push(IoVec::from_volatile(&slice.map_err(outside)?));
                }
            }
        }
        Ok(())
    }

    /// A frame of `frame_bytes` was read into the stash's iovecs: sets
    /// num_buffers in its header, and takes the chains it used out.
    pub fn complete(&mut self, mem: &GuestRam, frame_bytes: usize, mergeable: bool) -> RxFrame {
        let capacities: Vec<usize> = self.chains.iter().map(|c| c.capacity).collect();
        let (lens, truncated) = split_frame(&capacities, frame_bytes, mergeable);
        let num_buffers = lens.len() as u16;
        if let Some(first) = self.chains.front() {
            write_at(
                mem,
                &first.buffers,
                NUM_BUFFERS_OFFSET,
                &num_buffers.to_le_bytes(),
            );
        }
        let used = lens
            .into_iter()
            .map(|len| {
                let chain = self
                    .chains
                    .pop_front()
                    .expect("split_frame uses only the chains it was given");
                self.capacity -= chain.capacity;
                (chain.head, len)
            })
            .collect();
        RxFrame { used, truncated }
    }

    /// Empties the stash (queue stopped or memory gone): the heads, to be
    /// returned to the used ring with length 0.
    pub fn take_all(&mut self) -> Vec<u16> {
        self.capacity = 0;
        self.chains.drain(..).map(|c| c.head).collect()
    }
}

/// Writes `bytes` at byte `offset` of the buffers, which may split them.
fn write_at(mem: &GuestRam, buffers: &[(GuestAddress, u32)], offset: usize, bytes: &[u8]) {
    let mut skip = offset;
    let mut done = 0;
    for &(addr, len) in buffers {
        let len = len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(bytes.len() - done);
        let at = addr.unchecked_add(skip as u64);
        // The range was checked when the chain was taken; a new memory
        // table since then only loses the header field, not the process.
        let _ = mem.write_slice(&bytes[done..done + take], at);
        done += take;
        skip = 0;
        if done == bytes.len() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::seqpacket_pair;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    #[test]
    fn split_fills_chains_in_order() {
        assert_eq!(
            split_frame(&[100, 100, 100], 250, true),
            (vec![100, 100, 50], false)
        );
        assert_eq!(split_frame(&[100, 100], 100, true), (vec![100], false));
        assert_eq!(split_frame(&[100, 100], 0, true), (vec![0], false));
        assert_eq!(split_frame(&[100, 100], 250, true), (vec![100, 100], true));
        assert_eq!(split_frame(&[100, 100], 150, false), (vec![100], true));
        assert_eq!(split_frame(&[1600], 1514, false), (vec![1514], false));
    }

    fn wdesc(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// A mock RX ring with one chain per entry of `chains`, laid out one
    /// after the other from descriptor 0 (a chain's head is its first
    /// descriptor's index).
    fn queue_with(mem: &GuestRam, chains: &[Vec<RawDescriptor>]) -> Queue {
        let vq = MockSplitQueue::new(mem, 256);
        let mut flat = Vec::new();
        for chain in chains {
            for (i, raw) in chain.iter().enumerate() {
                let d = SplitDescriptor::from(*raw);
                let (flags, next) = if i + 1 < chain.len() {
                    (d.flags() | VRING_DESC_F_NEXT as u16, flat.len() as u16 + 1)
                } else {
                    (d.flags(), 0)
                };
                flat.push(RawDescriptor::from(SplitDescriptor::new(
                    d.addr().raw_value(),
                    d.len(),
                    flags,
                    next,
                )));
            }
        }
        vq.add_desc_chains(&flat, 0).unwrap();
        vq.create_queue().unwrap()
    }

    #[test]
    fn one_frame_merged_across_chains() {
        let mem = memory();
        // Chains of 16 KiB + 8 KiB, 32 KiB, 32 KiB, 32 KiB: not enough for
        // RX_MERGE_BYTES until the third.
        let mut queue = queue_with(
            &mem,
            &[
                vec![wdesc(0x10_0000, 0x4000), wdesc(0x20_0000, 0x2000)],
                vec![wdesc(0x18_0000, 0x8000)],
                vec![wdesc(0x28_0000, 0x8000)],
                vec![wdesc(0x30_0000, 0x8000)],
            ],
        );
        let mut stash = RxStash::default();
        let mut bad = Vec::new();
        stash.fill(&mut queue, &mem, true, &mut bad);
        assert!(bad.is_empty());
        assert_eq!(stash.len(), 3, "stops once the largest frame fits");
        assert!(stash.ready(true));

        // A 50000-byte frame (header included) through a socketpair.
        let (tap, peer) = seqpacket_pair().unwrap();
        let mut frame: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        frame[..VNET_HDR_BYTES].fill(0);
        peer.write_frame(&[IoVec::from_mut(&mut frame.clone())])
            .unwrap();
        let mut iovecs = Vec::new();
        stash.iovecs(&mem, true, &mut iovecs).unwrap();
        assert_eq!(iovecs.len(), 4);
        let n = tap.read_frame(&iovecs).unwrap().unwrap();
        assert_eq!(n, 50_000);
        drop(iovecs);
        let done = stash.complete(&mem, n, true);
        assert_eq!(done.used, vec![(0, 0x6000), (2, 50_000 - 0x6000)]);
        assert!(!done.truncated);
        assert_eq!(stash.len(), 1, "the third chain waits for the next frame");

        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&2u16.to_le_bytes());
        let mut got = vec![0u8; 50_000];
        mem.read_slice(&mut got[..0x4000], GuestAddress(0x10_0000))
            .unwrap();
        mem.read_slice(&mut got[0x4000..0x6000], GuestAddress(0x20_0000))
            .unwrap();
        mem.read_slice(&mut got[0x6000..], GuestAddress(0x18_0000))
            .unwrap();
        assert_eq!(got, frame);
    }

    #[test]
    fn without_mergeable_one_chain_per_frame_and_num_buffers_is_1() {
        let mem = memory();
        let mut queue = queue_with(
            &mem,
            &[
                vec![wdesc(0x10_0000, 4), wdesc(0x10_1000, 1600)],
                vec![wdesc(0x18_0000, 1604)],
            ],
        );
        mem.write_slice(&[0xff; 16], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&[0xff; 16], GuestAddress(0x10_1000))
            .unwrap();
        let mut stash = RxStash::default();
        let mut bad = Vec::new();
        stash.fill(&mut queue, &mem, false, &mut bad);
        assert_eq!(stash.len(), 1);
        let done = stash.complete(&mem, 100, false);
        assert_eq!(done.used, vec![(0, 100)]);
        // num_buffers sits at offset 10: in the second buffer, at 6.
        let mut num = [0u8; 2];
        mem.read_slice(&mut num, GuestAddress(0x10_1006)).unwrap();
        assert_eq!(u16::from_le_bytes(num), 1);
        let done = stash.complete(&mem, 100, false);
        assert!(done.used.is_empty() && done.truncated, "empty stash");
    }

    #[test]
    fn readable_or_outside_memory_chains_are_returned() {
        let mem = memory();
        let readable = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 64, 0, 0));
        let mut queue = queue_with(
            &mem,
            &[
                vec![readable],
                vec![wdesc(0x40_0000 - 8, 64)],
                vec![wdesc(0x18_0000, 2048)],
            ],
        );
        let mut stash = RxStash::default();
        let mut bad = Vec::new();
        stash.fill(&mut queue, &mem, false, &mut bad);
        assert_eq!(bad, vec![0, 1]);
        assert_eq!(stash.len(), 1);
        assert_eq!(stash.take_all(), vec![2]);
        assert!(stash.is_empty() && !stash.ready(false));
    }
}
