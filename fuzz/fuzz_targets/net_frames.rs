//! Arbitrary TX chains and RX buffer layouts through ringvm-net's frame
//! code: one queue pair's `PairWorker` (TX kicks: `tx::tx_iovecs` and
//! `check_frame`, one writev per frame; RX kicks and tap wakeups: the
//! `rx::RxStash`, one readv per frame, num_buffers, the used ring), over
//! split virtqueues in guest memory and a tap double (a SOCK_SEQPACKET
//! socketpair, see `NetTapDouble`), with a feature set from the input.
//! TX chains: any number of descriptors, lengths, directions and addresses
//! (inside, across regions, in the hole, past the end, any u64), direct or
//! indirect, arbitrary next fields, flags and heads, a virtio-net header
//! with any flags, gso_type and sizes. RX: chains of any layout, and frames
//! from 12 bytes to just past the largest the device gathers buffers for
//! (`RX_MERGE_BYTES`), with and without VIRTIO_NET_F_MRG_RXBUF.
//!
//! Invariants (a zero-length buffer is never outside guest memory, but its
//! direction counts):
//! - nothing panics, and each kick returns (libFuzzer's -timeout);
//! - TX: every chain taken is written to the tap as exactly the bytes it
//!   holds (header included) if it is a valid frame, or else dropped and
//!   counted as a kind it has (a device-writable buffer, a buffer outside
//!   guest memory, shorter than the header, longer than the header plus
//!   `MAX_TX_FRAME_BYTES`, NEEDS_CSUM without VIRTIO_NET_F_CSUM, a GSO type
//!   not negotiated); no guest byte changes but the used ring's;
//! - RX: a chain with a device-readable buffer, a buffer outside guest
//!   memory or no room is returned unused and counted; frames are read in
//!   order into the chains taken in ring order; a frame lands byte-exact in
//!   the device-writable buffers of the chains it used, with num_buffers =
//!   their number (always 1 without MRG_RXBUF), each chain's used length the
//!   bytes it got (buffers filled in order), or, longer than the buffers
//!   offered, is counted truncated with its chains returned empty; with
//!   MRG_RXBUF no frame up to `RX_MERGE_BYTES` is truncated; frames are left
//!   in the tap only when the guest's buffers ran out, and chains in the
//!   ring only when a frame's worth was taken; no guest byte changes
//!   outside the buffers of the chains used and the used ring;
//! - the pair is served once both rings are live (`follow_enable`, then
//!   `on_enabled` serves both rings, checked as above); when a ring stops
//!   (`stop_ring`, GET_VRING_BASE) kicks are not served until it starts
//!   again, and for the RX ring the chains the worker holds go back
//!   unused, in the order it took them;
//! - the used ring gets one entry per chain answered, for the head the
//!   available ring held (heads past the queue size cannot be answered):
//!   TX in ring order; RX the bad chains in ring order and the frames'
//!   chains in order, a frame's chains next to each other (the driver takes
//!   num_buffers entries at once), the two interleaved as the worker
//!   publishes.
//!
//! A step whose RX buffers overlap a descriptor table, an indirect table or
//! an available ring is served but not checked, and ends the input: the
//! device may then have rewritten the rings.
//!
//! Input: a flags byte (bit 0: MRG_RXBUF, 1: CSUM, 2: HOST_TSO4, 3:
//! HOST_TSO6, 4: EVENT_IDX, 5: a raw u64 feature set follows instead, 6:
//! four u16 ring indices follow: TX next_avail, next_used, RX next_avail,
//! next_used), a sizes byte (TX queue size 2^(bits 0-2), RX 2^(bits 3-5),
//! at most `net::MAX_QUEUE_SIZE`), then operations, each an op byte (bits
//! 0-1): 0 adds 1-8 TX chains (bits 2-4), 1 kicks TX (bit 2 set: stops
//! the RX ring, or with bit 3 the TX ring, and starts it again, instead),
//! 2 adds 1-8 RX chains, 3 writes 0-3 frames (bits 2-3) to
//! the tap and then kicks RX (bit 4 set: the tap wakes the worker
//! instead). A chain: see `net::add_chain`; a
//! frame: see `net::frame` (`net` is fuzz/src/net.rs, which also lays out
//! guest memory). seeds/net_frames.py writes such inputs.

#![no_main]

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ringvm_fuzz::net::{
    add_chain, changed_outside, data_pattern, frame, has, in_ram, indirect_tables, overlaps, range,
    snapshot, stream_matches, walk, Alloc, Chain, Ring, DATA, INDIRECT, INDIRECT_SLOTS,
    INDIRECT_SLOT_BYTES, REGIONS, RX_RING, TX_RING,
};
use ringvm_fuzz::{tracing, Bytes, NetTapDouble};
use ringvm_net::counters::PairCounters;
use ringvm_net::queue::{GuestRam, GuestRamAtomic, PairWorker};
use ringvm_net::rx::RX_MERGE_BYTES;
use ringvm_net::tap::{FrameFd, IoVec, VNET_HDR_BYTES};
use ringvm_net::tx::{BadFrame, MAX_TX_FRAME_BYTES};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Operations per input.
const MAX_OPS: usize = 48;
/// Frames waiting in the tap at most (more are not written).
const MAX_PENDING_FRAMES: usize = 8;
const NUM_BUFFERS_OFFSET: usize = 10;

/// A receive chain the device has taken and not used yet (the model's
/// copy of the worker's stash).
#[derive(Clone, Debug)]
struct Taken {
    head: u16,
    buffers: Vec<(u64, u32)>,
    capacity: u64,
}

struct Target {
    ram: Arc<GuestRam>,
    worker: PairWorker,
    counters: Arc<PairCounters>,
    features: u64,
    tx: Ring,
    rx: Ring,
    tap: NetTapDouble,
    alloc: Alloc,
    chains_added: u64,
    /// Frames written to the tap and not read by the worker yet.
    pending: VecDeque<Vec<u8>>,
    /// The receive chains the worker holds.
    stash: VecDeque<Taken>,
}

/// The TX side before the worker runs: what [`Target::tx_check`] checks
/// against.
struct TxPlan {
    next_avail: u16,
    next_used: u16,
    chains: Option<Vec<Chain>>,
    /// Per chain: its bytes, or the kinds of [`BadFrame`] it has.
    verdicts: Vec<Result<Vec<u8>, u8>>,
    bad: Vec<u64>,
    frames: u64,
    bytes: u64,
    errors: u64,
}

/// The RX side before the worker runs: what [`Target::rx_check`] checks
/// against.
struct RxPlan {
    next_avail: u16,
    next_used: u16,
    chains: Option<Vec<Chain>>,
    /// Receive buffers overlap what the device reads to find chains.
    self_modifying: bool,
    counts: [u64; 5],
}

/// Frames read, truncated, bytes read, bad chains, read errors.
fn rx_counts(c: &PairCounters) -> [u64; 5] {
    [
        load(&c.rx_frames),
        load(&c.rx_truncated),
        load(&c.rx_bytes),
        load(&c.rx_bad_chains),
        load(&c.rx_errors),
    ]
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Whether `got` is `want`, except at bytes whose guest address (`want`
/// is the stream of `descs`) lies in `skip`.
fn frame_matches(got: &[u8], want: &[u8], descs: &[(u64, u32, bool)], skip: &Range<u64>) -> bool {
    if got.len() != want.len() {
        return false;
    }
    if got == want {
        return true;
    }
    let mut offset = 0usize;
    for &(addr, len, _) in descs {
        let len = len as usize;
        let (g, w) = (&got[offset..offset + len], &want[offset..offset + len]);
        if g != w && (0..len).any(|i| g[i] != w[i] && !skip.contains(&(addr + i as u64))) {
            return false;
        }
        offset += len;
    }
    true
}

impl Target {
    fn peer(&self) -> &FrameFd {
        &self.tap.peers[0]
    }

    fn mergeable(&self) -> bool {
        has(self.features, VIRTIO_NET_F_MRG_RXBUF)
    }

    fn add_chain(&mut self, input: &mut Bytes<'_>, rx: bool) {
        let slot = self.chains_added;
        self.chains_added += 1;
        let ring = if rx { &mut self.rx } else { &mut self.tx };
        add_chain(&self.ram, ring, input, &mut self.alloc, slot, rx);
    }

    /// The kinds of [`BadFrame`] a TX chain has, as a mask of their
    /// indices; with none it is a frame, whose bytes are returned.
    fn tx_verdict(&self, chain: &Chain) -> Result<Vec<u8>, u8> {
        let mut kinds = 0u8;
        let mark = |kinds: &mut u8, kind: BadFrame| *kinds |= 1 << kind.index();
        let total = chain.total();
        if chain.descs.iter().any(|d| d.2) {
            mark(&mut kinds, BadFrame::WritableBuffer);
        }
        let readable = chain
            .descs
            .iter()
            .all(|&(addr, len, _)| in_ram(addr, u64::from(len)));
        if !readable {
            mark(&mut kinds, BadFrame::OutsideMemory);
        }
        if total < VNET_HDR_BYTES as u64 {
            mark(&mut kinds, BadFrame::Short);
        }
        if total > (VNET_HDR_BYTES + MAX_TX_FRAME_BYTES) as u64 {
            mark(&mut kinds, BadFrame::TooLong);
        }
        if kinds != 0 {
            return Err(kinds);
        }
        let mut bytes = Vec::with_capacity(total as usize);
        // (A zero-length buffer may be anywhere, even outside guest memory.)
        for &(addr, len, _) in chain.descs.iter().filter(|d| d.1 > 0) {
            let start = bytes.len();
            bytes.resize(start + len as usize, 0);
            self.ram
                .read_slice(&mut bytes[start..], GuestAddress(addr))
                .unwrap();
        }
        let flags = u32::from(bytes[0]);
        let gso = u32::from(bytes[1]);
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(self.features, VIRTIO_NET_F_CSUM) {
            mark(&mut kinds, BadFrame::CsumNotNegotiated);
        }
        let gso_ok = match gso {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => has(self.features, VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => has(self.features, VIRTIO_NET_F_HOST_TSO6),
            _ => false,
        };
        if !gso_ok {
            mark(&mut kinds, BadFrame::GsoNotNegotiated);
        }
        if kinds != 0 {
            return Err(kinds);
        }
        Ok(bytes)
    }

    fn tx_plan(&self) -> TxPlan {
        let next_avail = self.tx.next_avail();
        let chains = walk(&self.ram, &self.tx, next_avail);
        // What the chains are, from guest memory as the worker finds it.
        let verdicts = chains
            .iter()
            .flatten()
            .map(|c| self.tx_verdict(c))
            .collect();
        let c = &self.counters;
        TxPlan {
            next_avail,
            next_used: self.tx.next_used(),
            chains,
            verdicts,
            bad: c.tx_bad.iter().map(load).collect(),
            frames: load(&c.tx_frames),
            bytes: load(&c.tx_bytes),
            errors: load(&c.tx_errors),
        }
    }

    /// Checks what the worker did with the TX queue since `plan`; returns
    /// the guest bytes it may have written (the used ring).
    fn tx_check(&mut self, plan: TxPlan) -> Vec<Range<u64>> {
        let ram = Arc::clone(&self.ram);
        let mut sent = Vec::new();
        let mut buf = vec![0u8; 2 * (VNET_HDR_BYTES + MAX_TX_FRAME_BYTES)];
        while let Some(n) = self
            .peer()
            .read_frame(&[IoVec::from_mut(&mut buf)])
            .expect("read the tap double")
        {
            sent.push(buf[..n].to_vec());
        }
        let c = &self.counters;
        let bad: Vec<u64> = c
            .tx_bad
            .iter()
            .zip(&plan.bad)
            .map(|(a, b)| load(a) - b)
            .collect();
        let frames = load(&c.tx_frames) - plan.frames;
        let bytes = load(&c.tx_bytes) - plan.bytes;
        let errors = load(&c.tx_errors) - plan.errors;
        let taken = self.tx.next_avail().wrapping_sub(plan.next_avail);
        if tracing() {
            eprintln!(
                "TX: {taken} chains taken of {:?}, {} frames sent, bad {bad:?}, \
                 {errors} write errors",
                plan.chains.as_ref().map(Vec::len),
                sent.len()
            );
        }

        // Every chain available is taken (none with the index too far
        // ahead), and answered in order with length 0.
        let chains = plan.chains.unwrap_or_default();
        let verdicts = plan.verdicts;
        assert_eq!(
            usize::from(taken),
            chains.len(),
            "TX chains taken of those available"
        );
        let expected: Vec<(u16, u32)> = chains
            .iter()
            .filter(|c| c.head < self.tx.size)
            .map(|c| (c.head, 0))
            .collect();
        assert_eq!(
            self.tx.used_entries(&ram, plan.next_used),
            expected,
            "TX used entries"
        );

        // Valid frames are on the tap, in order, as the chains held them
        // (bar the bytes of the used ring, which the worker writes while it
        // reads); one that is not was refused by the tap (only when the
        // double could not be given room for a queue's worth).
        let mut next_sent = sent.iter().peekable();
        let mut unsent = 0u64;
        let used_ring = self.tx.used_range();
        for (chain, verdict) in chains.iter().zip(&verdicts) {
            let Ok(want) = verdict else { continue };
            let matches = next_sent
                .peek()
                .is_some_and(|got| frame_matches(got, want, &chain.descs, &used_ring));
            if matches {
                next_sent.next();
            } else {
                unsent += 1;
            }
        }
        assert!(
            next_sent.next().is_none(),
            "a frame on the tap that no valid chain holds ({} frames for {} valid chains)",
            sent.len(),
            verdicts.iter().filter(|v| v.is_ok()).count()
        );
        assert_eq!(unsent, errors, "valid frames not on the tap");
        assert!(
            errors == 0 || !self.tap.roomy,
            "{errors} frames refused by a tap with room"
        );
        assert_eq!(frames, sent.len() as u64, "tx_frames");
        let sent_bytes: usize = sent.iter().map(Vec::len).sum();
        assert_eq!(bytes, sent_bytes as u64, "tx_bytes");

        // The dropped chains are counted, each as a kind it has (Hall's
        // condition: every set of kinds was counted at most as often as
        // there are dropped chains with one of them).
        let dropped: Vec<u8> = verdicts.iter().filter_map(|v| v.clone().err()).collect();
        assert_eq!(
            bad.iter().sum::<u64>(),
            dropped.len() as u64,
            "dropped TX chains counted: {bad:?} for kinds {dropped:?}"
        );
        for set in 1u8..(1 << BadFrame::ALL.len()) {
            let counted: u64 = (0..BadFrame::ALL.len())
                .filter(|k| set & (1 << k) != 0)
                .map(|k| bad[k])
                .sum();
            let could = dropped.iter().filter(|&&kinds| kinds & set != 0).count();
            assert!(
                counted <= could as u64,
                "dropped TX chains counted as kinds they do not have: {bad:?} for {dropped:?}"
            );
        }
        vec![used_ring]
    }

    /// Whether the stash lets the worker read a frame.
    fn ready(&self, stash: &VecDeque<Taken>) -> bool {
        if self.mergeable() {
            stash.iter().map(|t| t.capacity).sum::<u64>() >= RX_MERGE_BYTES as u64
        } else {
            !stash.is_empty()
        }
    }

    /// Writes `count` frames from the input to the tap.
    fn write_frames(&mut self, input: &mut Bytes<'_>, count: u8) {
        for _ in 0..count {
            let mut bytes = frame(input);
            if self.pending.len() >= MAX_PENDING_FRAMES {
                continue;
            }
            let wrote = self.peer().write_frame(&[IoVec::from_mut(&mut bytes)]);
            if let Ok(n) = wrote {
                assert_eq!(n, bytes.len(), "a short write to the tap double");
                self.pending.push_back(bytes);
            }
        }
    }

    fn rx_plan(&self) -> RxPlan {
        let ram = &self.ram;
        let next_avail = self.rx.next_avail();
        let chains = walk(ram, &self.rx, next_avail);
        // Buffers the frames may land in, against what the device reads to
        // find chains.
        let mut rings: Vec<Range<u64>> = self
            .tx
            .driver_ranges()
            .into_iter()
            .chain(self.rx.driver_ranges())
            .chain(indirect_tables(ram, &self.tx))
            .chain(indirect_tables(ram, &self.rx))
            .collect();
        rings.push(INDIRECT..INDIRECT + INDIRECT_SLOTS * INDIRECT_SLOT_BYTES);
        let writable = chains
            .iter()
            .flatten()
            .flat_map(|c| c.descs.iter().filter(|d| d.2).map(|d| (d.0, d.1)))
            .chain(self.stash.iter().flat_map(|t| t.buffers.iter().copied()));
        let self_modifying = writable
            .map(|(a, l)| range(a, u64::from(l)))
            .any(|w| rings.iter().any(|r| overlaps(&w, r)));
        RxPlan {
            next_avail,
            next_used: self.rx.next_used(),
            chains,
            self_modifying,
            counts: rx_counts(&self.counters),
        }
    }

    /// Checks what the worker did with the RX queue and the tap since
    /// `plan`; returns the guest bytes it may have written, or None when
    /// the input must end (the device may have rewritten the rings).
    fn rx_check(&mut self, plan: RxPlan) -> Option<Vec<Range<u64>>> {
        let counts = rx_counts(&self.counters);
        let [frames, truncated, bytes, bad_chains, errors] =
            std::array::from_fn(|i| counts[i] - plan.counts[i]);
        let read = (frames + truncated) as usize;
        let taken = usize::from(self.rx.next_avail().wrapping_sub(plan.next_avail));
        if tracing() {
            eprintln!(
                "RX: {} frames waiting, {taken} chains taken of {:?} ({bad_chains} bad), \
                 {frames} frames, {truncated} truncated{}",
                self.pending.len(),
                plan.chains.as_ref().map(Vec::len),
                if plan.self_modifying {
                    ", buffers over the rings"
                } else {
                    ""
                }
            );
        }
        assert_eq!(errors, 0, "reading the tap double failed");
        assert!(read <= self.pending.len(), "more frames read than written");
        if plan.self_modifying {
            return None;
        }

        // The chains taken: bad ones answered at once, good ones stashed.
        let chains = plan.chains.unwrap_or_default();
        assert!(
            taken <= chains.len(),
            "RX chains taken beyond those available"
        );
        // Bad chains, and per frame the entries of the chains it used.
        let mut bad = Vec::new();
        let mut frame_entries: Vec<Vec<(u16, u32)>> = Vec::new();
        let mut good = VecDeque::new();
        for chain in &chains[..taken] {
            let capacity = chain.total();
            let usable = chain
                .descs
                .iter()
                .all(|&(addr, len, write)| write && in_ram(addr, u64::from(len)));
            if usable && capacity > 0 {
                good.push_back(Taken {
                    head: chain.head,
                    buffers: chain.descs.iter().map(|d| (d.0, d.1)).collect(),
                    capacity,
                });
            } else {
                bad.push((chain.head, 0));
            }
        }
        assert_eq!(bad_chains, bad.len() as u64, "bad RX chains counted");

        // The frames read, in order, each into the chains the stash held.
        let mergeable = self.mergeable();
        let mut stash = std::mem::take(&mut self.stash);
        let mut landed = Vec::new();
        let mut written = Vec::new();
        let (mut good_frames, mut truncated_frames, mut good_bytes) = (0, 0, 0);
        for _ in 0..read {
            let frame = self.pending.pop_front().expect("checked above");
            while !self.ready(&stash) {
                let next = good.pop_front().unwrap_or_else(|| {
                    panic!(
                        "a frame of {} bytes read with receive buffers for {} bytes \
                         ({} chains)",
                        frame.len(),
                        stash.iter().map(|t| t.capacity).sum::<u64>(),
                        stash.len()
                    )
                });
                stash.push_back(next);
            }
            let offered: Vec<u64> = if mergeable {
                stash.iter().map(|t| t.capacity).collect()
            } else {
                vec![stash[0].capacity]
            };
            let len = frame.len() as u64;
            let fits = offered.iter().sum::<u64>() >= len;
            if !fits {
                assert!(
                    !mergeable || frame.len() > RX_MERGE_BYTES,
                    "a frame of {len} bytes truncated with MRG_RXBUF"
                );
                truncated_frames += 1;
                let mut entries = Vec::new();
                for _ in 0..offered.len() {
                    let t = stash.pop_front().unwrap();
                    entries.push((t.head, 0));
                    written.extend(t.buffers);
                }
                frame_entries.push(entries);
                continue;
            }
            good_frames += 1;
            good_bytes += len;
            let mut group = Vec::new();
            let mut entries = Vec::new();
            let mut left = len;
            while left > 0 {
                let t = stash.pop_front().unwrap();
                let n = left.min(t.capacity);
                left -= n;
                entries.push((t.head, n as u32));
                written.extend(t.buffers.iter().copied());
                group.push(t);
            }
            frame_entries.push(entries);
            landed.push((frame, group));
        }
        stash.extend(good);

        // The worker stops taking chains only with a frame's worth, and
        // leaves frames in the tap only without one.
        if taken < chains.len() {
            assert!(
                self.ready(&stash),
                "chains left in the ring while the stash cannot take a frame"
            );
        }
        if !self.pending.is_empty() {
            assert!(
                !self.ready(&stash) && taken == chains.len(),
                "{} frames left in the tap with receive buffers for them",
                self.pending.len()
            );
        }
        self.stash = stash;

        self.check_rx_used(plan.next_used, &bad, &frame_entries);
        assert_eq!(frames, good_frames, "rx_frames");
        assert_eq!(truncated, truncated_frames, "rx_truncated");
        assert_eq!(bytes, good_bytes, "rx_bytes");
        self.check_landed(&landed, &written);

        let mut allowed: Vec<Range<u64>> = written
            .iter()
            .map(|&(s, l)| range(s, u64::from(l)))
            .collect();
        allowed.push(self.rx.used_range());
        Some(allowed)
    }

    /// The RX used entries since `next_used`: the bad chains in the order
    /// taken, and the chains of each frame in order, a frame's together
    /// (the driver takes num_buffers entries at once); bad chains and
    /// frames may interleave (the worker publishes as it goes). Heads past
    /// the queue size cannot be answered.
    fn check_rx_used(&self, next_used: u16, bad: &[(u16, u32)], frames: &[Vec<(u16, u32)>]) {
        let size = self.rx.size;
        let answerable = |e: &&(u16, u32)| e.0 < size;
        let bad: Vec<_> = bad.iter().filter(answerable).copied().collect();
        let frames: Vec<Vec<_>> = frames
            .iter()
            .map(|f| f.iter().filter(answerable).copied().collect())
            .collect();
        let got = self.rx.used_entries(&self.ram, next_used);
        let flat: Vec<_> = frames.iter().flatten().copied().collect();
        // Where a frame's entries may end: after each of its chains but
        // the last, only that frame's next chain may follow.
        let mut boundary = vec![false; flat.len() + 1];
        let mut at = 0;
        boundary[0] = true;
        for frame in &frames {
            at += frame.len();
            boundary[at] = true;
        }
        // Whether `got` interleaves `bad` and `flat` so: can[i][j] with i
        // bad entries and j frame entries taken (a chain may be bad in one
        // step and good in another, so heads alone do not tell them apart).
        let mut can = vec![vec![false; flat.len() + 1]; bad.len() + 1];
        can[0][0] = true;
        for i in 0..=bad.len() {
            for j in 0..=flat.len() {
                if !can[i][j] || i + j == got.len() {
                    continue;
                }
                let next = got[i + j];
                if i < bad.len() && boundary[j] && next == bad[i] {
                    can[i + 1][j] = true;
                }
                if j < flat.len() && next == flat[j] {
                    can[i][j + 1] = true;
                }
            }
        }
        assert!(
            got.len() == bad.len() + flat.len() && can[bad.len()][flat.len()],
            "RX used entries {got:?}: not the bad chains {bad:?} and the frames' \
             chains {frames:?}, each frame's together"
        );
    }

    /// Each frame, with num_buffers, in its chains (unless the buffers
    /// written overlap: a later frame may then have overwritten an earlier
    /// one).
    fn check_landed(&self, landed: &[(Vec<u8>, Vec<Taken>)], written: &[(u64, u32)]) {
        let mut spans: Vec<Range<u64>> = written
            .iter()
            .filter(|w| w.1 > 0)
            .map(|&(s, l)| range(s, u64::from(l)))
            .collect();
        spans.sort_by_key(|r| r.start);
        let mut end = 0;
        for span in &spans {
            if span.start < end {
                return;
            }
            end = end.max(span.end);
        }
        let used_ring = self.rx.used_range();
        for (frame, group) in landed {
            let mut frame = frame.clone();
            let num_buffers = group.len() as u16;
            // The header is in the first chain, unless the guest gave one
            // shorter than a header (which MRG_RXBUF forbids).
            let skip = if group[0].capacity >= VNET_HDR_BYTES as u64 {
                frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                    .copy_from_slice(&num_buffers.to_le_bytes());
                0..0
            } else {
                NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2
            };
            let buffers: Vec<_> = group.iter().flat_map(|t| t.buffers.clone()).collect();
            if let Err(err) = stream_matches(&self.ram, &buffers, &frame, skip, &used_ring) {
                panic!(
                    "a frame of {} bytes in {num_buffers} chains {buffers:x?}: {err}",
                    frame.len()
                );
            }
        }
    }

    /// Panics if a guest byte changed since `before` outside `allowed`.
    fn check_memory(&self, before: &[Vec<u8>], allowed: &[Range<u64>], what: &str) {
        let after = snapshot(&self.ram);
        if let Some(at) = changed_outside(before, &after, allowed) {
            panic!("{what} changed guest byte {at:#x}, outside {allowed:x?}");
        }
    }

    /// A TX kick (no guest byte but the used ring's changes).
    fn tx_kick(&mut self) {
        let before = snapshot(&self.ram);
        let plan = self.tx_plan();
        self.worker.on_tx_kick(&self.tx.vring);
        let allowed = self.tx_check(plan);
        self.check_memory(&before, &allowed, "a TX kick");
    }

    /// Writes frames to the tap, then kicks RX or wakes the worker for the
    /// tap; false when the input must end.
    fn rx_step(&mut self, input: &mut Bytes<'_>, op: u8) -> bool {
        self.write_frames(input, (op >> 2) & 3);
        let before = snapshot(&self.ram);
        let plan = self.rx_plan();
        if op & 0x10 != 0 {
            self.worker.on_tap_readable(&self.rx.vring);
        } else {
            self.worker.on_rx_kick(&self.rx.vring);
        }
        let Some(allowed) = self.rx_check(plan) else {
            return false;
        };
        self.check_memory(&before, &allowed, "an RX step");
        true
    }

    /// The pair comes on (its rings live): the worker attaches the tap
    /// queue and serves what both rings hold, TX first; false when the
    /// input must end.
    fn come_on(&mut self) -> bool {
        assert!(
            self.worker.follow_enable(&self.rx.vring, &self.tx.vring),
            "the pair did not come on with both rings started and enabled"
        );
        let before = snapshot(&self.ram);
        let tx_plan = self.tx_plan();
        let rx_plan = self.rx_plan();
        self.worker.on_enabled(&self.rx.vring, &self.tx.vring);
        let mut allowed = self.tx_check(tx_plan);
        let Some(rx_allowed) = self.rx_check(rx_plan) else {
            return false;
        };
        allowed.extend(rx_allowed);
        self.check_memory(&before, &allowed, "a pair coming on");
        true
    }

    /// GET_VRING_BASE on one ring (the crate stops it, then the backend):
    /// the pair goes off, and for the RX ring the chains the worker holds
    /// go back unused, in the order it took them. Then the frontend starts
    /// the ring again (SET_VRING_KICK) and the pair comes back on. False
    /// when the input must end.
    fn stop_and_restart(&mut self, rx_ring: bool) -> bool {
        let ram = Arc::clone(&self.ram);
        let before = snapshot(&ram);
        let ring = if rx_ring { &self.rx } else { &self.tx };
        ring.vring.set_queue_ready(false);
        let next_used = self.rx.next_used();
        self.worker.stop_ring(rx_ring);
        let expected: Vec<(u16, u32)> = if rx_ring {
            self.stash
                .drain(..)
                .filter(|t| t.head < self.rx.size)
                .map(|t| (t.head, 0))
                .collect()
        } else {
            Vec::new()
        };
        if tracing() {
            let which = if rx_ring { "RX" } else { "TX" };
            eprintln!("{which} stop: {} chains returned", expected.len());
        }
        assert_eq!(
            self.rx.used_entries(&ram, next_used),
            expected,
            "RX chains returned when a ring stops"
        );
        // Not live any more: a kick is not served.
        let tx_plan = self.tx_plan();
        let rx_plan = self.rx_plan();
        self.worker.on_tx_kick(&self.tx.vring);
        self.worker.on_rx_kick(&self.rx.vring);
        assert_eq!(
            (self.tx.next_avail(), self.tx.next_used()),
            (tx_plan.next_avail, tx_plan.next_used),
            "a stopped pair served its TX ring"
        );
        assert_eq!(
            (self.rx.next_avail(), self.rx.next_used()),
            (rx_plan.next_avail, rx_plan.next_used),
            "a stopped pair served its RX ring"
        );
        assert_eq!(
            rx_counts(&self.counters),
            rx_plan.counts,
            "a stopped pair read the tap"
        );
        self.check_memory(&before, &[self.rx.used_range()], "stopping a ring");
        let ring = if rx_ring { &self.rx } else { &self.tx };
        ring.vring.set_queue_ready(true);
        self.come_on()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let flags = input.u8();
    let mut features = 0u64;
    for (bit, feature) in [
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_RING_F_EVENT_IDX,
    ]
    .into_iter()
    .enumerate()
    {
        if flags & (1 << bit) != 0 {
            features |= 1 << feature;
        }
    }
    if flags & 0x20 != 0 {
        features = input.u64();
    }
    let indices = (flags & 0x40 != 0).then(|| [input.u16(), input.u16(), input.u16(), input.u16()]);
    let sizes = input.u8();
    let tx_size = 1u16 << (sizes & 7).min(6);
    let rx_size = 1u16 << ((sizes >> 3) & 7).min(6);

    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let ram = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    ram.write_slice(data_pattern(), GuestAddress(DATA)).unwrap();
    let mem = GuestRamAtomic::new(ram);
    let ram = mem.memory().into_inner();
    let mut tx = Ring::new(&mem, TX_RING, tx_size);
    let mut rx = Ring::new(&mem, RX_RING, rx_size);
    let event_idx = has(features, VIRTIO_RING_F_EVENT_IDX);
    tx.vring.set_queue_event_idx(event_idx);
    rx.vring.set_queue_event_idx(event_idx);
    if let Some([tx_avail, tx_used, rx_avail, rx_used]) = indices {
        tx.set_indices(&ram, tx_avail, tx_used);
        rx.set_indices(&ram, rx_avail, rx_used);
    }
    let tap = NetTapDouble::new(1);
    let counters = Arc::new(PairCounters::default());
    let changes = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let worker = PairWorker::new(
        0,
        Arc::clone(&tap.tap),
        mem,
        Arc::new(AtomicU64::new(features)),
        Arc::clone(&counters),
        changes,
    );
    let mut target = Target {
        ram,
        worker,
        counters,
        features,
        tx,
        rx,
        tap,
        alloc: Alloc { next: DATA },
        chains_added: 0,
        pending: VecDeque::new(),
        stash: VecDeque::new(),
    };
    if tracing() {
        eprintln!("features {features:#x}, TX queue of {tx_size}, RX queue of {rx_size}");
    }
    // Both rings started and enabled: the pair comes on (as at the first
    // event of its thread), with nothing to serve yet.
    if !target.come_on() {
        return;
    }
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        match op & 3 {
            0 => {
                for _ in 0..1 + (op >> 2) % 8 {
                    target.add_chain(&mut input, false);
                }
            }
            1 if op & 4 != 0 => {
                if !target.stop_and_restart(op & 8 == 0) {
                    break;
                }
            }
            1 => target.tx_kick(),
            2 => {
                for _ in 0..1 + (op >> 2) % 8 {
                    target.add_chain(&mut input, true);
                }
            }
            _ => {
                if !target.rx_step(&mut input, op) {
                    break;
                }
            }
        }
    }
});
