//! Host-to-guest frames (the RX queue): the guest's receive chains are
//! taken from the available ring into an [`RxStash`], a frame is read with
//! one readv straight into their buffers, and [`RxStash::complete`] says
//! which chains the frame filled (more than one only with
//! VIRTIO_NET_F_MRG_RXBUF, whose count goes into the header's
//! num_buffers).
//!
//! Chains stay in the stash until a frame uses them, so a chain taken for a
//! frame that turned out short serves the next frame; nothing is pushed back
//! into the available ring. Their buffers are looked up in guest memory
//! once, when they are taken: the stash keeps them as iovecs
//! ([`GuestIoVecs`]) for every frame read into them, and makes them again
//! only when the memory table changes.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::queue::GuestRam;
use crate::tap::{FrameFd, GuestIoVecs, VNET_HDR_BYTES};

/// With MRG_RXBUF, chains are gathered until they hold this much before a
/// frame is read: the header and the largest frame a tap hands over with
/// TSO (64 KiB of IP packet plus an Ethernet header with a VLAN tag). A
/// frame never has to be cut short for want of buffers.
pub const RX_MERGE_BYTES: usize = VNET_HDR_BYTES + 65535 + 18;

/// Offset of num_buffers in virtio_net_hdr_v1.
const NUM_BUFFERS_OFFSET: usize = 10;

/// One receive chain: its head, its device-writable buffers, and how many
/// of the stash's iovecs they are.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RxChain {
    head: u16,
    buffers: Vec<(GuestAddress, u32)>,
    capacity: usize,
    iovecs: usize,
}

/// Receive chains taken from the available ring and not used yet.
#[derive(Debug, Default)]
pub struct RxStash {
    chains: VecDeque<RxChain>,
    capacity: usize,
    /// The buffers of `chains`, in order.
    iovecs: GuestIoVecs,
    /// Buffer lists of chains used, kept for the next ones (no allocation
    /// per chain).
    spare: Vec<Vec<(GuestAddress, u32)>>,
}

/// How a frame of `frame_bytes` fills chains of `capacities` bytes, in
/// order: the length written into each chain it uses (at least one, even
/// for an empty frame). With `mergeable` false only the first chain is
/// used. The second value says whether the frame did not fit.
pub fn split_frame(capacities: &[usize], frame_bytes: usize, mergeable: bool) -> (Vec<u32>, bool) {
    let mut lens = Vec::new();
    let truncated = split_frame_into(capacities.iter().copied(), frame_bytes, mergeable, |len| {
        lens.push(len)
    });
    (lens, truncated)
}

/// [`split_frame`] handing each length to `each`; returns whether the
/// frame did not fit.
fn split_frame_into(
    capacities: impl Iterator<Item = usize>,
    frame_bytes: usize,
    mergeable: bool,
    mut each: impl FnMut(u32),
) -> bool {
    let usable = capacities.take(if mergeable { usize::MAX } else { 1 });
    let mut left = frame_bytes;
    for capacity in usable {
        let len = left.min(capacity);
        each(len as u32);
        left -= len;
        if left == 0 {
            break;
        }
    }
    left > 0
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
    /// outside guest memory is not kept: its head goes to `bad`. When `mem`
    /// is not the memory the stashed chains were looked up in (a new memory
    /// table), they are looked up again first, and those no longer in
    /// guest memory go to `bad` too.
    pub fn fill(
        &mut self,
        queue: &mut Queue,
        mem: &Arc<GuestRam>,
        mergeable: bool,
        bad: &mut Vec<u16>,
    ) {
        if !self.iovecs.is_from(mem) {
            self.remap(mem, bad);
        }
        while !self.ready(mergeable) {
            let Some(chain) = queue.pop_descriptor_chain(&**mem) else {
                return;
            };
            let head = chain.head_index();
            let mut buffers = self.spare.pop().unwrap_or_default();
            let mut capacity = 0usize;
            let mut ok = true;
            for desc in chain {
                if !desc.is_write_only() {
                    ok = false;
                    break;
                }
                buffers.push((desc.addr(), desc.len()));
                capacity += desc.len() as usize;
            }
            let iovecs = if ok && capacity > 0 {
                self.push_iovecs(&buffers)
            } else {
                None
            };
            let Some(iovecs) = iovecs else {
                buffers.clear();
                self.spare.push(buffers);
                bad.push(head);
                continue;
            };
            self.capacity += capacity;
            self.chains.push_back(RxChain {
                head,
                buffers,
                capacity,
                iovecs,
            });
        }
    }

    /// Appends the iovecs of `buffers`: how many, or None (nothing
    /// appended) when one is not all in guest memory.
    fn push_iovecs(&mut self, buffers: &[(GuestAddress, u32)]) -> Option<usize> {
        let before = self.iovecs.len();
        for &(addr, len) in buffers {
            if self.iovecs.push_writable(addr, len as usize).is_none() {
                self.iovecs.truncate(before);
                return None;
            }
        }
        Some(self.iovecs.len() - before)
    }

    /// Looks every stashed chain up again in `mem`; those no longer in it go
    /// to `bad`.
    fn remap(&mut self, mem: &Arc<GuestRam>, bad: &mut Vec<u16>) {
        self.iovecs.reset(mem);
        let chains = std::mem::take(&mut self.chains);
        self.capacity = 0;
        for mut chain in chains {
            match self.push_iovecs(&chain.buffers) {
                Some(iovecs) => {
                    chain.iovecs = iovecs;
                    self.capacity += chain.capacity;
                    self.chains.push_back(chain);
                }
                None => {
                    bad.push(chain.head);
                    self.recycle(chain);
                }
            }
        }
    }

    fn recycle(&mut self, mut chain: RxChain) {
        chain.buffers.clear();
        self.spare.push(chain.buffers);
    }

    /// Reads one frame from `tap` into the stashed chains (the first one
    /// only without `mergeable`), and at most one byte more: the length
    /// read, for [`RxStash::complete`]; Ok(None) when no frame is waiting.
    pub fn read_frame(&mut self, tap: &FrameFd, mergeable: bool) -> io::Result<Option<usize>> {
        let count = if mergeable {
            self.iovecs.len()
        } else {
            self.chains.front().map_or(0, |chain| chain.iovecs)
        };
        self.iovecs.read_frame(tap, count)
    }

    /// A frame of `frame_bytes` was read into the stash's iovecs: sets
    /// num_buffers in its header, and takes the chains it used out, adding
    /// (head, bytes written) of each to `used` in ring order. Returns
    /// whether the frame was longer than the buffers offered for it.
    pub fn complete(
        &mut self,
        mem: &GuestRam,
        frame_bytes: usize,
        mergeable: bool,
        used: &mut Vec<(u16, u32)>,
    ) -> bool {
        let mut num_buffers = 0u16;
        let truncated = split_frame_into(
            self.chains.iter().map(|c| c.capacity),
            frame_bytes,
            mergeable,
            |_| num_buffers += 1,
        );
        if let Some(first) = self.chains.front() {
            write_at(
                mem,
                &first.buffers,
                NUM_BUFFERS_OFFSET,
                &num_buffers.to_le_bytes(),
            );
        }
        let mut left = frame_bytes;
        for _ in 0..num_buffers {
            let chain = self
                .chains
                .pop_front()
                .expect("split_frame_into counts only the chains it was given");
            let len = left.min(chain.capacity);
            left -= len;
            self.capacity -= chain.capacity;
            self.iovecs.drop_front(chain.iovecs);
            used.push((chain.head, len as u32));
            self.recycle(chain);
        }
        truncated
    }

    /// Empties the stash (queue stopped or memory gone): the heads, to be
    /// returned to the used ring with length 0.
    pub fn take_all(&mut self) -> Vec<u16> {
        self.capacity = 0;
        self.iovecs.clear();
        let chains: Vec<RxChain> = self.chains.drain(..).collect();
        chains
            .into_iter()
            .map(|chain| {
                let head = chain.head;
                self.recycle(chain);
                head
            })
            .collect()
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
    use crate::tap::{seqpacket_pair, IoVec};
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

    fn memory() -> Arc<GuestRam> {
        Arc::new(GuestRam::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap())
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
        assert_eq!(stash.iovecs.len(), 4);
        let n = stash.read_frame(&tap, true).unwrap().unwrap();
        assert_eq!(n, 50_000);
        let mut used = Vec::new();
        assert!(!stash.complete(&mem, n, true, &mut used));
        assert_eq!(used, vec![(0, 0x6000), (2, 50_000 - 0x6000)]);
        assert_eq!(stash.len(), 1, "the third chain waits for the next frame");
        assert_eq!(stash.iovecs.len(), 1, "and so do its iovecs");

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
        let mut used = Vec::new();
        assert!(!stash.complete(&mem, 100, false, &mut used));
        assert_eq!(used, vec![(0, 100)]);
        // num_buffers sits at offset 10: in the second buffer, at 6.
        let mut num = [0u8; 2];
        mem.read_slice(&mut num, GuestAddress(0x10_1006)).unwrap();
        assert_eq!(u16::from_le_bytes(num), 1);
        used.clear();
        assert!(stash.complete(&mem, 100, false, &mut used), "empty stash");
        assert!(used.is_empty());
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

    #[test]
    fn a_new_memory_table_looks_the_stashed_chains_up_again() {
        let old = memory();
        let mut queue = queue_with(
            &old,
            &[
                vec![wdesc(0x10_0000, 0x1000)],
                vec![wdesc(0x30_0000, 0x1000)],
                vec![wdesc(0x18_0000, 0x1000)],
            ],
        );
        let mut stash = RxStash::default();
        let mut bad = Vec::new();
        stash.fill(&mut queue, &old, true, &mut bad);
        assert_eq!((stash.len(), bad.len()), (3, 0), "not ready: all taken");

        // The frontend's new table maps the first 2 MiB only, elsewhere.
        let new = Arc::new(GuestRam::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap());
        stash.fill(&mut queue, &new, true, &mut bad);
        assert_eq!(bad, vec![1], "the chain past the new table goes back");
        assert_eq!((stash.len(), stash.iovecs.len()), (2, 2));

        let (tap, peer) = seqpacket_pair().unwrap();
        let mut frame: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8).collect();
        peer.write_frame(&[IoVec::from_mut(&mut frame)]).unwrap();
        let n = stash.read_frame(&tap, true).unwrap().unwrap();
        let mut used = Vec::new();
        assert!(!stash.complete(&new, n, true, &mut used));
        assert_eq!(used, vec![(0, 0x1000), (2, 0x800)]);
        let mut got = vec![0u8; 0x1800];
        new.read_slice(&mut got[..0x1000], GuestAddress(0x10_0000))
            .unwrap();
        new.read_slice(&mut got[0x1000..], GuestAddress(0x18_0000))
            .unwrap();
        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(got, frame, "the frame is in the new memory");
        let mut untouched = [0u8; 16];
        old.read_slice(&mut untouched, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(untouched, [0; 16], "not in the old one");
    }

    #[test]
    fn a_frame_longer_than_its_one_chain_is_truncated() {
        let mem = memory();
        let mut queue = queue_with(
            &mem,
            &[vec![wdesc(0x10_0000, 64)], vec![wdesc(0x18_0000, 2048)]],
        );
        let mut stash = RxStash::default();
        let mut bad = Vec::new();
        stash.fill(&mut queue, &mem, false, &mut bad);
        let (tap, peer) = seqpacket_pair().unwrap();
        peer.write_frame(&[IoVec::from_mut(&mut [7u8; 100])])
            .unwrap();
        let n = stash.read_frame(&tap, false).unwrap().unwrap();
        assert_eq!(n, 65, "the chain and the spill byte");
        let mut used = Vec::new();
        assert!(stash.complete(&mem, n, false, &mut used));
        assert_eq!(used, vec![(0, 64)]);
        // The next chain takes the next frame whole.
        stash.fill(&mut queue, &mem, false, &mut bad);
        peer.write_frame(&[IoVec::from_mut(&mut [8u8; 100])])
            .unwrap();
        let n = stash.read_frame(&tap, false).unwrap().unwrap();
        used.clear();
        assert!(!stash.complete(&mem, n, false, &mut used));
        assert_eq!(used, vec![(1, 100)]);
        assert_eq!(stash.read_frame(&tap, false).unwrap(), None);
    }
}
