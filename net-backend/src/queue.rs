//! One [`PairWorker`] per RX/TX queue pair, run by that pair's worker
//! thread, with that pair's tap queue.
//!
//! - TX kick ([`PairWorker::on_tx_kick`]): every available chain is checked
//!   ([`crate::tx`]) and written to the tap with one writev, header
//!   included; bad ones are returned with length 0 and counted.
//! - Tap readable ([`PairWorker::on_tap_readable`]): frames are read with
//!   readv straight into the guest's receive buffers ([`crate::rx`]) until
//!   the tap is empty. When the guest has no buffers left, the worker asks
//!   for an RX kick (enable_notification) and takes the tap out of its
//!   epoll, so a full tap does not spin the thread.
//! - RX kick ([`PairWorker::on_rx_kick`]): buffers arrived; the tap goes
//!   back into the epoll and is read at once.
//!
//! Both sides put what they did on the used ring in small batches as they
//! go (`RX_PUBLISH_FRAMES`, `TX_PUBLISH_CHAINS`), each with one store
//! of the used index and at most one signal (EVENT_IDX decides from the
//! batch's span), not once at the end of a wakeup: the guest, which polls
//! or runs on another CPU, takes them and gives the buffers back while the
//! worker goes on. With one batch per wakeup, ringvm-bench net saw the RX
//! ring run dry within nearly every wakeup (the guest saw nothing to take
//! until the worker stopped) and the guest kick once per ring of TX frames;
//! with small batches both became rare.
//!
//! A pair is served only while the frontend has both its rings started and
//! enabled ([`PairWorker::follow_enable`], at every event of the thread and
//! when [`crate::vring::NetVring`] reports a change): then its tap queue is
//! attached; otherwise it is detached and out of the epoll, and neither
//! the tap nor the rings are touched (each batch checks its ring's state
//! under the ring's lock, which the frontend's SET_VRING_ENABLE takes too).
//! When a pair comes on, both rings are served at once: kicks that came
//! while it was off were dropped. The frames waiting in a tap queue when
//! it is detached are lost (the kernel drops them); receive chains taken
//! from the guest stay with the worker until the pair comes back, or go
//! back on GET_VRING_BASE.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vhost_user_backend::{VringState, VringT};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::counters::{add, inc, PairCounters};
use crate::rx::RxStash;
use crate::tap::{FrameFd, Tap};
use crate::tx::tx_iovecs;
use crate::used;
use crate::vring::{is_live, NetVring};

/// Guest RAM as the backend maps it from the frontend's memory table.
pub type GuestRam = GuestMemoryMmap<()>;
pub type GuestRamAtomic = GuestMemoryAtomic<GuestRam>;
pub type Vring = NetVring;

/// Guest-triggered warnings: at most one per second per pair.
const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Frames read from the tap per wakeup: past this the worker returns to its
/// event loop (the tap, still readable, wakes it again), so that a busy RX
/// side cannot starve the TX queue of the same thread.
const MAX_RX_FRAMES_PER_WAKEUP: usize = 256;
/// Passes over the TX available ring per kick, as in ringvm-blk, and chains
/// taken per kick: past either the worker kicks itself and returns to its
/// event loop, so that a guest that keeps the ring busy (it gets its
/// buffers back as the worker goes, see TX_PUBLISH_CHAINS) cannot starve
/// the RX side of the same thread.
const MAX_TX_PASSES_PER_KICK: u32 = 4;
const MAX_TX_CHAINS_PER_KICK: usize = 1024;
/// Times per wakeup the RX side looks at the available ring again after
/// asking for a kick: chains can arrive in between, but a ring whose index
/// moves without chains that can be taken must not hold the thread.
const MAX_RX_RECHECKS: u32 = 4;
/// Frames (RX) and chains (TX) put on the used ring at a time within one
/// wakeup, rather than all at its end: the guest takes them and gives the
/// buffers back while the worker goes on, instead of finding its ring
/// empty (TX) or full (RX) and waiting for the whole wakeup's batch.
const RX_PUBLISH_FRAMES: usize = 8;
const TX_PUBLISH_CHAINS: usize = 8;

/// Puts the pair's tap queue into its thread's epoll (true) or takes it
/// out (false).
pub type TapWatch = Box<dyn Fn(bool) -> io::Result<()> + Send + Sync>;

pub struct PairWorker {
    index: u16,
    /// The tap device, to attach and detach this pair's queue.
    tap_device: Arc<Tap>,
    /// This pair's tap queue.
    tap: Arc<FrameFd>,
    /// Signalled by the pair's rings when the frontend changes their state.
    changes: Arc<EventFd>,
    /// Both rings started and enabled, and the tap queue attached.
    live: bool,
    /// The backend is going away: the pair never comes on again.
    closed: bool,
    mem: GuestRamAtomic,
    acked_features: Arc<AtomicU64>,
    counters: Arc<PairCounters>,
    stash: RxStash,
    /// Kept from one batch to the next (no allocation per batch): the RX
    /// batch's used entries and bad heads, the TX batch's used entries.
    rx_used: Vec<(u16, u32)>,
    rx_bad: Vec<u16>,
    tx_used: Vec<(u16, u32)>,
    watch: Option<TapWatch>,
    /// The tap is in the thread's epoll.
    watching: bool,
    /// The RX vring, kept from its first event for stop and reset.
    rx_vring: Option<Vring>,
    quiet_until: Option<Instant>,
    suppressed: u64,
}

impl PairWorker {
    /// The worker of pair `index`, served by that queue of `tap`; `changes`
    /// is the eventfd its thread wakes up on when the frontend changes the
    /// state of the pair's rings.
    pub fn new(
        index: u16,
        tap: Arc<Tap>,
        mem: GuestRamAtomic,
        acked_features: Arc<AtomicU64>,
        counters: Arc<PairCounters>,
        changes: Arc<EventFd>,
    ) -> Self {
        PairWorker {
            index,
            tap: Arc::clone(&tap.queues[usize::from(index)]),
            tap_device: tap,
            changes,
            live: false,
            closed: false,
            mem,
            acked_features,
            counters,
            stash: RxStash::default(),
            rx_used: Vec::new(),
            rx_bad: Vec::new(),
            tx_used: Vec::new(),
            watch: None,
            watching: false,
            rx_vring: None,
            quiet_until: None,
            suppressed: 0,
        }
    }

    pub fn set_tap_watch(&mut self, watch: TapWatch) {
        self.watch = Some(watch);
    }

    fn features(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    /// Follows the state the frontend gave the pair's rings: attaches the
    /// tap queue when both are started and enabled, detaches it when one
    /// is not. Returns true when the pair has just come on: its rings must
    /// then be served ([`PairWorker::on_enabled`]).
    pub fn follow_enable(&mut self, rx: &Vring, tx: &Vring) -> bool {
        // Before the state is read: see NetVring::report_changes_to.
        rx.report_changes_to(&self.changes);
        tx.report_changes_to(&self.changes);
        let wanted = !self.closed && rx.is_live() && tx.is_live();
        if wanted == self.live {
            return false;
        }
        if !wanted {
            self.go_off();
            return false;
        }
        if let Err(err) = self
            .tap_device
            .set_queue_attached(usize::from(self.index), true)
        {
            self.warn(format_args!(
                "cannot attach the pair's tap queue: {err}; the pair stays off"
            ));
            return false;
        }
        inc(&self.counters.tap_attaches);
        self.live = true;
        self.rx_vring = Some(rx.clone());
        info!(pair = self.index, "pair enabled: tap queue attached");
        true
    }

    /// The pair stops being served: the tap queue leaves the epoll and is
    /// detached (the frames waiting in it are dropped by the kernel).
    fn go_off(&mut self) {
        if !self.live {
            return;
        }
        self.live = false;
        self.set_watching(false);
        match self
            .tap_device
            .set_queue_attached(usize::from(self.index), false)
        {
            Ok(()) => {
                inc(&self.counters.tap_detaches);
                info!(pair = self.index, "pair disabled: tap queue detached");
            }
            Err(err) => self.warn(format_args!(
                "cannot detach the pair's tap queue: {err}; the kernel may steer flows to it"
            )),
        }
    }

    /// The rings' eventfd woke the thread: consumed before
    /// [`PairWorker::follow_enable`] reads the state, so that a change after
    /// that read wakes the thread again.
    pub fn on_state_change(&self) {
        // Non-blocking: nothing to read is not an error worth a word.
        let _ = self.changes.read();
    }

    /// The pair has just come on: what the guest queued while it was off.
    pub fn on_enabled(&mut self, rx: &Vring, tx: &Vring) {
        self.transmit(tx);
        self.set_watching(true);
        self.receive(rx);
    }

    fn set_watching(&mut self, on: bool) {
        if self.watching == on {
            return;
        }
        let Some(watch) = &self.watch else {
            return;
        };
        match watch(on) {
            Ok(()) => self.watching = on,
            Err(err) => self.warn(format_args!(
                "cannot change the tap's epoll interest: {err}"
            )),
        }
    }

    /// The guest added receive buffers (or the RX queue was enabled).
    pub fn on_rx_kick(&mut self, rx: &Vring) {
        inc(&self.counters.rx_kicks);
        if !self.live {
            return;
        }
        if !self.watching {
            self.set_watching(true);
        }
        self.receive(rx);
    }

    /// The tap has frames.
    pub fn on_tap_readable(&mut self, rx: &Vring) {
        if !self.live {
            // Detached and out of the epoll already, or about to be.
            self.set_watching(false);
            return;
        }
        inc(&self.counters.tap_wakeups);
        self.receive(rx);
    }

    fn receive(&mut self, rx: &Vring) {
        let mergeable = self.features() & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mem = self.mem.memory().into_inner();
        let mut state = rx.get_mut();
        if !self.live || !is_live(&state) {
            // The frontend turned the ring off since the thread's last
            // look: the state change wakes it up to detach.
            return;
        }
        let mut bad = std::mem::take(&mut self.rx_bad);
        let mut used = std::mem::take(&mut self.rx_used);
        let mut frames = 0;
        let mut rechecks = 0;
        while frames < MAX_RX_FRAMES_PER_WAKEUP {
            self.stash
                .fill(state.get_queue_mut(), &mem, mergeable, &mut bad);
            if !self.stash.ready(mergeable) {
                // Ask for a kick when buffers arrive; some may have arrived
                // meanwhile.
                if let Ok(true) = state.enable_notification() {
                    if state.get_queue().ready() && rechecks < MAX_RX_RECHECKS {
                        rechecks += 1;
                        continue;
                    }
                }
                inc(&self.counters.rx_no_buffers);
                self.set_watching(false);
                break;
            }
            match self.stash.read_frame(&self.tap, mergeable) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    let first = used.len();
                    let truncated = self.stash.complete(&mem, n, mergeable, &mut used);
                    frames += 1;
                    if truncated {
                        // Dropped: its chains go back empty.
                        inc(&self.counters.rx_truncated);
                        self.warn(format_args!(
                            "dropped a frame longer than the receive buffers offered for it"
                        ));
                        for entry in &mut used[first..] {
                            entry.1 = 0;
                        }
                    } else {
                        inc(&self.counters.rx_frames);
                        add(&self.counters.rx_bytes, n as u64);
                    }
                    if frames % RX_PUBLISH_FRAMES == 0 {
                        // Between frames: a merged frame's chains go
                        // together.
                        self.publish(&mut state, used.drain(..));
                    }
                }
                Err(err) => {
                    inc(&self.counters.rx_errors);
                    self.warn(format_args!("cannot read from the tap: {err}"));
                    break;
                }
            }
        }
        if !bad.is_empty() {
            add(&self.counters.rx_bad_chains, bad.len() as u64);
            self.warn(format_args!(
                "{} receive chains with read-only buffers or buffers outside guest memory returned unused",
                bad.len()
            ));
        }
        let entries = bad.drain(..).map(|head| (head, 0)).chain(used.drain(..));
        self.publish(&mut state, entries);
        self.rx_bad = bad;
        self.rx_used = used;
    }

    /// The guest has frames to send.
    pub fn on_tx_kick(&mut self, tx: &Vring) {
        inc(&self.counters.tx_kicks);
        self.transmit(tx);
    }

    fn transmit(&mut self, tx: &Vring) {
        let features = self.features();
        let mem = self.mem.memory().into_inner();
        let mut state = tx.get_mut();
        if !self.live || !is_live(&state) {
            return;
        }
        let mut used = std::mem::take(&mut self.tx_used);
        let mut iovecs = Vec::new();
        let mut passes = 0;
        let mut chains = 0;
        loop {
            passes += 1;
            if let Err(err) = state.disable_notification() {
                self.warn(format_args!("cannot disable TX notifications: {err}"));
            }
            while chains < MAX_TX_CHAINS_PER_KICK {
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                    break;
                };
                chains += 1;
                let head = chain.head_index();
                match tx_iovecs(chain, &mem, features, &mut iovecs) {
                    Ok(len) => match self.tap.write_frame(&iovecs) {
                        Ok(_) => {
                            inc(&self.counters.tx_frames);
                            add(&self.counters.tx_bytes, len as u64);
                        }
                        Err(err) => {
                            inc(&self.counters.tx_errors);
                            self.warn(format_args!("cannot write a frame to the tap: {err}"));
                        }
                    },
                    Err(kind) => {
                        inc(&self.counters.tx_bad[kind.index()]);
                        self.warn(format_args!("dropped a frame from the guest: {kind:?}"));
                    }
                }
                iovecs.clear();
                used.push((head, 0));
                if used.len() == TX_PUBLISH_CHAINS {
                    self.publish(&mut state, used.drain(..));
                }
            }
            let more = if chains >= MAX_TX_CHAINS_PER_KICK {
                // The guest keeps the ring busy: leave notifications off and
                // come back after the thread's other events.
                Ok(true)
            } else {
                state.enable_notification()
            };
            match more {
                Ok(true) if passes < MAX_TX_PASSES_PER_KICK && chains < MAX_TX_CHAINS_PER_KICK => {
                    continue
                }
                Ok(true) => {
                    if let Err(err) = kick_again(&state) {
                        self.warn(format_args!("cannot kick the TX queue again: {err}"));
                    }
                    break;
                }
                Ok(false) => break,
                Err(err) => {
                    self.warn(format_args!("cannot enable TX notifications: {err}"));
                    break;
                }
            }
        }
        self.publish(&mut state, used.drain(..));
        self.tx_used = used;
    }

    /// A ring of the pair stops (GET_VRING_BASE): the pair goes off at once
    /// (not at the thread's next wakeup), and for the RX ring the receive
    /// chains taken and not used go back with length 0.
    pub fn stop_ring(&mut self, rx_ring: bool) {
        self.go_off();
        if !rx_ring {
            return;
        }
        let heads = self.stash.take_all();
        if let Some(rx) = self.rx_vring.clone() {
            let mut state = rx.get_mut();
            self.publish(&mut state, heads.into_iter().map(|head| (head, 0)));
        }
    }

    /// Device reset: the rings are gone, so is what was taken from them,
    /// and the tap queue is detached.
    pub fn reset(&mut self) {
        self.go_off();
        self.stash.take_all();
        self.rx_vring = None;
    }

    /// The frontend is gone: [`reset`](Self::reset), and the pair stays
    /// off whatever its rings say (they keep the state the frontend left).
    pub fn close(&mut self) {
        self.closed = true;
        self.reset();
    }

    /// Adds a batch to the used ring with one store of the used index (a
    /// merged frame's buffers reach the driver together: used.rs) and
    /// signals the guest once, if it asked to be (EVENT_IDX).
    fn publish(
        &mut self,
        state: &mut VringState<GuestRamAtomic>,
        entries: impl Iterator<Item = (u16, u32)>,
    ) {
        let mem = self.mem.memory();
        let published = used::publish(state.get_queue_mut(), &*mem, entries);
        if let Some((head, why)) = &published.failed {
            self.warn(format_args!(
                "cannot add head {head} to the used ring: {why}"
            ));
        }
        if published.old == published.new {
            return;
        }
        if !used::needs_interrupt(state.get_queue(), &*mem, published.old, published.new) {
            inc(&self.counters.notifications_suppressed);
            return;
        }
        match state.signal_used_queue() {
            Ok(()) => inc(&self.counters.notifications),
            Err(err) => self.warn(format_args!("cannot signal the guest: {err}")),
        }
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self.quiet_until.is_some_and(|until| now < until) {
            self.suppressed += 1;
            return;
        }
        self.quiet_until = Some(now + LOG_INTERVAL);
        let suppressed = std::mem::take(&mut self.suppressed);
        if suppressed > 0 {
            warn!(
                pair = self.index,
                "{message} ({suppressed} similar warnings suppressed)"
            );
        } else {
            warn!(pair = self.index, "{message}");
        }
    }
}

/// Signals the vring's kick eventfd, so that the worker thread's event
/// loop serves the queue again after its other events.
fn kick_again(state: &VringState<GuestRamAtomic>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let Some(kick) = state.get_kick() else {
        return Ok(());
    };
    // SAFETY: the descriptor is the vring's kick eventfd, which `state`
    // keeps open while it is borrowed here; eventfd_write passes the value,
    // no pointer.
    if unsafe { libc::eventfd_write(kick.as_raw_fd(), 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
