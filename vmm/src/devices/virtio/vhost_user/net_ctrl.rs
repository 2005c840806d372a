//! virtio-net's control virtqueue (virtio 1.2 5.1.6.5), served by ringvm
//! itself. A vhost-user-net backend (ringvm-net, or any backend QEMU drives)
//! serves the data queues only; the frontend owns the control queue, as in
//! QEMU.
//!
//! The one command ringvm carries out is VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
//! (5.1.6.5.5). When the driver asks for n pairs, the backend gets
//! SET_VRING_ENABLE 1 for the RX and TX rings of pairs below n and 0 for
//! the rest. Each pair this turns on has its two rings kicked once, so the
//! backend checks for buffers the driver added while the pair was off.
//! Every other class and command belongs to a feature ringvm does not offer
//! (CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, CTRL_MAC_ADDR, CTRL_GUEST_OFFLOADS,
//! RSS, ...) and gets VIRTIO_NET_ERR.
//!
//! A request is `class` and `command`, then the command's data (all
//! device-readable), then one device-writable `ack` byte. Some chains break
//! this layout: a short header, a readable buffer after a writable one, a
//! buffer outside guest RAM, a descriptor loop, or a bad indirect table.
//! Such a chain gets VIRTIO_NET_ERR if its ack byte can be written;
//! otherwise it goes back unanswered, with used length 0. Either way the
//! problem is logged at most once a second and the queue carries on.
//!
//! Where it runs: one thread per device (`net-ctrlq`). It starts at
//! DRIVER_OK if the driver set the control queue up. The device reset stops
//! and joins it before the transport forgets the rings, and a dropped
//! device does the same. The thread sleeps in epoll on two eventfds: the
//! queue's kick (a KVM ioeventfd, so the vCPU only signals it) and a stop
//! eventfd. It interrupts the driver through the queue's MSI-X irqfd.
//!
//! Why not the VMM's mio event loop: a command costs blocking vhost-user
//! messages (one SET_VRING_ENABLE per data ring, each bounded only by the
//! socket's 10 s timeout). A stalled backend would then stall console
//! input, stop signals and the backend-death watch of every device. The
//! loop also cannot register the kick eventfd before features are
//! negotiated: the control queue's index (2 or 2N) depends on
//! VIRTIO_NET_F_MQ. A thread also costs nothing while it sleeps.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::virtio_net::{
    virtio_net_ctrl_hdr, virtio_net_ctrl_mq, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{ActivateError, QueueConfig};

/// `class` and `command`.
const HEADER_BYTES: usize = std::mem::size_of::<virtio_net_ctrl_hdr>();
/// VQ_PAIRS_SET's data: le16 virtqueue_pairs.
const PAIRS_BYTES: usize = std::mem::size_of::<virtio_net_ctrl_mq>();
/// Bytes of a request that ringvm reads. The longer commands (MAC tables,
/// RSS) belong to features ringvm does not offer.
const READ_BYTES: usize = HEADER_BYTES + PAIRS_BYTES;
/// A guest can trigger at most one warning per interval (per device).
const WARN_INTERVAL: Duration = Duration::from_secs(1);
/// epoll tokens of the control-queue thread.
const KICK: Token = Token(0);
const STOP: Token = Token(1);

#[derive(Debug, thiserror::Error)]
pub enum NetCtrlError {
    #[error(
        "a broken descriptor chain (empty, a loop, a next index past its table, \
         or an unreadable or nested indirect table)"
    )]
    BrokenChain,
    #[error("a device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    #[error("a buffer outside guest RAM")]
    OutsideMemory,
    #[error("a request of {0} bytes, shorter than its 2-byte class and command")]
    ShortHeader(usize),
    #[error("VQ_PAIRS_SET with {0} bytes of data, fewer than the 2 of virtqueue_pairs")]
    ShortPairs(usize),
    #[error(
        "class {class} command {command}, which ringvm does not serve (its feature is not offered)"
    )]
    Unsupported { class: u8, command: u8 },
    #[error("VQ_PAIRS_SET without VIRTIO_NET_F_MQ negotiated")]
    NoMultiqueue,
    #[error("VQ_PAIRS_SET {asked}: the device has 1 to {max} queue pairs")]
    PairsOutOfRange { asked: u16, max: u16 },
    #[error("VQ_PAIRS_SET {asked}: the driver did not set up queue {queue}")]
    RingNotSetUp { asked: u16, queue: usize },
    #[error("VQ_PAIRS_SET: SET_VRING_ENABLE of queue {queue} failed")]
    Backend {
        queue: usize,
        #[source]
        source: vhost::Error,
    },
    #[error("the device is being reset")]
    Stopping,
}

/// A command ringvm carries out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: run this many pairs.
    SetPairs(u16),
}

/// One control request, as its descriptor chain holds it.
#[derive(Debug)]
pub struct Request {
    /// Where the ack byte goes: the chain's first device-writable byte, if
    /// it is in guest RAM. None: the chain goes back with used length 0.
    pub ack: Option<GuestAddress>,
    pub command: Result<Command, NetCtrlError>,
}

/// Reads a request from the descriptors of one chain (virtio-queue's
/// `DescriptorChain`, which follows indirect tables and stops at a loop
/// after as many descriptors as the table holds). Never panics; a chain
/// that breaks the layout yields an error command.
pub fn parse_request(mem: &GuestMemoryMmap, chain: impl Iterator<Item = Descriptor>) -> Request {
    let mut bytes = [0u8; READ_BYTES];
    let mut readable_bytes = 0usize;
    let mut fault = None;
    let mut ack = None;
    let mut ack_seen = false;
    let mut writable_seen = false;
    // A chain whose last descriptor still says NEXT was cut short: the
    // iterator met a loop, a next index past the table, or an unreadable
    // descriptor. An empty chain counts as broken too.
    let mut last_has_next = true;
    for d in chain {
        last_has_next = d.has_next();
        let len = d.len() as usize;
        let in_ram = GuestMemoryBackend::check_range(mem, d.addr(), len);
        if d.is_write_only() {
            writable_seen = true;
            if !ack_seen && len > 0 {
                ack_seen = true;
                ack = in_ram.then_some(d.addr());
            }
            if !in_ram {
                fault.get_or_insert(NetCtrlError::OutsideMemory);
            }
            continue;
        }
        if writable_seen {
            fault.get_or_insert(NetCtrlError::ReadableAfterWritable);
            continue;
        }
        if !in_ram {
            fault.get_or_insert(NetCtrlError::OutsideMemory);
            continue;
        }
        let have = readable_bytes.min(READ_BYTES);
        let take = len.min(READ_BYTES - have);
        if take > 0
            && mem
                .read_slice(&mut bytes[have..have + take], d.addr())
                .is_err()
        {
            fault.get_or_insert(NetCtrlError::OutsideMemory);
        }
        readable_bytes = readable_bytes.saturating_add(len);
    }
    if last_has_next {
        fault = Some(NetCtrlError::BrokenChain);
    }
    let command = match fault {
        Some(f) => Err(f),
        None => parse_command(&bytes[..readable_bytes.min(READ_BYTES)], readable_bytes),
    };
    Request { ack, command }
}

/// The command in a request's first bytes; `total` is the length of all
/// its device-readable buffers. Data past what a command needs is ignored,
/// as QEMU does.
pub fn parse_command(bytes: &[u8], total: usize) -> Result<Command, NetCtrlError> {
    let [class, command, data @ ..] = bytes else {
        return Err(NetCtrlError::ShortHeader(total));
    };
    match (u32::from(*class), u32::from(*command)) {
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => match data {
            [lo, hi, ..] => Ok(Command::SetPairs(u16::from_le_bytes([*lo, *hi]))),
            _ => Err(NetCtrlError::ShortPairs(total - HEADER_BYTES)),
        },
        _ => Err(NetCtrlError::Unsupported {
            class: *class,
            command: *command,
        }),
    }
}

/// Turns the backend's data rings on and off: the vhost-user [`Frontend`],
/// or a recorder in tests.
pub trait VringSwitch: Send {
    fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<(), vhost::Error>;
}

impl VringSwitch for Frontend {
    fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<(), vhost::Error> {
        VhostUserFrontend::set_vring_enable(self, queue, enable)
    }
}

/// A data ring the backend was given.
struct DataRing {
    /// A dup of the ring's kick eventfd (the backend listens on it).
    kick: EventFd,
    /// What ringvm last told the backend with SET_VRING_ENABLE.
    enabled: bool,
}

/// The data rings, and which pairs of them run: what VQ_PAIRS_SET changes.
pub struct QueuePairs<S> {
    switch: S,
    multiqueue: bool,
    max_pairs: u16,
    /// By queue index: the ring, if the driver set it up and the backend
    /// has it.
    rings: Vec<Option<DataRing>>,
}

impl<S: VringSwitch> QueuePairs<S> {
    /// `rings`: (queue index, kick eventfd, enabled at DRIVER_OK) for each
    /// data ring the backend was given. Indices at or past `data_queues`
    /// are not data rings and are left out.
    pub fn new(
        switch: S,
        multiqueue: bool,
        max_pairs: u16,
        data_queues: usize,
        rings: Vec<(usize, EventFd, bool)>,
    ) -> Self {
        let mut slots: Vec<Option<DataRing>> = (0..data_queues).map(|_| None).collect();
        for (index, kick, enabled) in rings {
            if let Some(slot) = slots.get_mut(index) {
                *slot = Some(DataRing { kick, enabled });
            }
        }
        Self {
            switch,
            multiqueue,
            max_pairs,
            rings: slots,
        }
    }

    /// VQ_PAIRS_SET `asked`: pairs below `asked` on, the others off. Each
    /// pair that goes from off to on has its two rings kicked once. Nothing
    /// changes if `asked` is refused. `stop` is checked before every
    /// message, so a reset does not wait for all of them.
    pub fn set_pairs(&mut self, asked: u16, stop: &AtomicBool) -> Result<(), NetCtrlError> {
        if !self.multiqueue {
            return Err(NetCtrlError::NoMultiqueue);
        }
        if asked == 0 || asked > self.max_pairs {
            return Err(NetCtrlError::PairsOutOfRange {
                asked,
                max: self.max_pairs,
            });
        }
        let wanted = 2 * usize::from(asked);
        if let Some(queue) = (0..wanted).find(|q| !matches!(self.rings.get(*q), Some(Some(_)))) {
            return Err(NetCtrlError::RingNotSetUp { asked, queue });
        }
        for pair in 0..self.rings.len().div_ceil(2) {
            let on = pair < usize::from(asked);
            let mut switched_on = false;
            for queue in [2 * pair, 2 * pair + 1] {
                let Some(Some(ring)) = self.rings.get_mut(queue) else {
                    continue;
                };
                if stop.load(Ordering::Acquire) {
                    return Err(NetCtrlError::Stopping);
                }
                self.switch
                    .set_vring_enable(queue, on)
                    .map_err(|source| NetCtrlError::Backend { queue, source })?;
                switched_on |= on && !ring.enabled;
                ring.enabled = on;
            }
            if switched_on {
                for ring in self.rings[2 * pair..2 * pair + 2].iter().flatten() {
                    if let Err(e) = ring.kick.write(1) {
                        tracing::warn!(pair, "kicking a ring just enabled failed: {e}");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Counters of one device's control queue (over all its activations).
#[derive(Debug, Default)]
pub struct ControlQueueStats {
    /// Requests answered, OK or ERR.
    pub requests: AtomicU64,
    /// Requests answered VIRTIO_NET_ERR.
    pub errors: AtomicU64,
    /// Chains returned with used length 0: no ack byte could be written.
    pub unanswered: AtomicU64,
    /// VQ_PAIRS_SET carried out.
    pub pairs_set: AtomicU64,
    /// Interrupts sent to the driver.
    pub notifications: AtomicU64,
}

impl ControlQueueStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// At most one warning per WARN_INTERVAL; counts the ones held back.
#[derive(Default)]
struct WarnLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl WarnLimit {
    /// Some(warnings held back since the last one) if a warning may go now.
    fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < WARN_INTERVAL => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// The control queue of one device, as the driver set it up.
pub struct ControlQueue<S> {
    /// For logs: the device's socket.
    name: String,
    memory: GuestMemoryMmap,
    queue: Queue,
    /// The queue's MSI-X irqfd (or an eventfd nobody listens to).
    call: EventFd,
    pairs: QueuePairs<S>,
    stats: Arc<ControlQueueStats>,
    warn: WarnLimit,
}

impl<S: VringSwitch> ControlQueue<S> {
    /// Checks the rings of queue `index` (aligned, inside guest RAM).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        memory: GuestMemoryMmap,
        index: usize,
        config: QueueConfig,
        event_idx: bool,
        call: EventFd,
        pairs: QueuePairs<S>,
        stats: Arc<ControlQueueStats>,
    ) -> Result<Self, ActivateError> {
        let mut queue = Queue::new(config.size).map_err(|e| ActivateError::ControlQueue {
            index,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
        })?;
        let misaligned = |_| ActivateError::RingMisaligned { index };
        queue
            .try_set_desc_table_address(config.desc)
            .map_err(misaligned)?;
        queue
            .try_set_avail_ring_address(config.avail)
            .map_err(misaligned)?;
        queue
            .try_set_used_ring_address(config.used)
            .map_err(misaligned)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(&memory) {
            return Err(ActivateError::RingOutsideMemory { index });
        }
        Ok(Self {
            name,
            memory,
            queue,
            call,
            pairs,
            stats,
            warn: WarnLimit::default(),
        })
    }

    /// Answers every request the driver made available, then interrupts
    /// the driver if it wants to be. Returns early, leaving requests
    /// unanswered, once `stop` is set.
    pub fn on_kick(&mut self, stop: &AtomicBool) {
        let mut answered = 0usize;
        'ring: loop {
            if let Err(e) = self.queue.disable_notification(&self.memory) {
                self.warn(format_args!("cannot update the used ring: {e}"));
            }
            loop {
                if stop.load(Ordering::Acquire) {
                    break 'ring;
                }
                // iter() rereads the available index each time; it refuses
                // an index that claims more requests than the ring holds,
                // which would otherwise be served forever.
                let chain = match self.queue.iter(&self.memory) {
                    Ok(mut requests) => requests.next(),
                    Err(e) => {
                        self.warn(format_args!(
                            "the driver's available ring is unusable ({e}); \
                             served again at its next notification"
                        ));
                        break 'ring;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let request = parse_request(&self.memory, chain);
                let Some(used_len) = self.answer(request, stop) else {
                    break 'ring;
                };
                if let Err(e) = self.queue.add_used(&self.memory, head, used_len) {
                    self.warn(format_args!("cannot return request {head}: {e}"));
                    continue;
                }
                answered += 1;
            }
            match self.queue.enable_notification(&self.memory) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.warn(format_args!("cannot update the used ring: {e}"));
                    break;
                }
            }
        }
        if answered > 0 && self.queue.needs_notification(&self.memory).unwrap_or(true) {
            match self.call.write(1) {
                Ok(()) => ControlQueueStats::bump(&self.stats.notifications),
                Err(e) => self.warn(format_args!("cannot interrupt the driver: {e}")),
            }
        }
    }

    /// Carries out one request and writes its ack. Returns the used length
    /// (1 with an ack, 0 without), or None when a reset cut it short.
    fn answer(&mut self, request: Request, stop: &AtomicBool) -> Option<u32> {
        let Some(ack_addr) = request.ack else {
            // Without somewhere to say ERR, a request is not acted on.
            ControlQueueStats::bump(&self.stats.unanswered);
            let why = match &request.command {
                Err(e) => format!(" ({e})"),
                Ok(_) => String::new(),
            };
            self.warn(format_args!(
                "a control request without a device-writable ack byte in guest RAM{why}; \
                 returned unanswered"
            ));
            return Some(0);
        };
        let result = request.command.and_then(|command| match command {
            Command::SetPairs(n) => self.pairs.set_pairs(n, stop).map(|()| command),
        });
        let ack = match &result {
            Ok(Command::SetPairs(n)) => {
                ControlQueueStats::bump(&self.stats.pairs_set);
                tracing::info!(device = %self.name, pairs = n, "virtio-net queue pairs set");
                VIRTIO_NET_OK
            }
            Err(NetCtrlError::Stopping) => return None,
            Err(e) => {
                ControlQueueStats::bump(&self.stats.errors);
                self.warn(format_args!("control request answered VIRTIO_NET_ERR: {e}"));
                VIRTIO_NET_ERR
            }
        };
        match self.memory.write_obj(ack as u8, ack_addr) {
            Ok(()) => {
                ControlQueueStats::bump(&self.stats.requests);
                Some(1)
            }
            Err(e) => {
                ControlQueueStats::bump(&self.stats.unanswered);
                self.warn(format_args!("cannot write the ack byte: {e}"));
                Some(0)
            }
        }
    }

    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if let Some(held_back) = self.warn.admit() {
            tracing::warn!(device = %self.name, held_back, "virtio-net control queue: {what}");
        }
    }

    /// The thread's body: serves the queue at every kick until `stop`.
    fn run(mut self, mut poll: Poll, kick: EventFd, stop: &AtomicBool) {
        let mut events = Events::with_capacity(2);
        // Requests made available before the thread started.
        self.on_kick(stop);
        while !stop.load(Ordering::Acquire) {
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(device = %self.name, "control queue poll failed: {e}; the control queue stops");
                break;
            }
            if events.iter().any(|ev| ev.token() == KICK) {
                // Cleared before the ring is read: a kick while it is
                // served makes a new edge.
                let _ = kick.read();
                self.on_kick(stop);
            }
        }
        let s = &self.stats;
        tracing::debug!(
            device = %self.name,
            requests = s.requests.load(Ordering::Relaxed),
            errors = s.errors.load(Ordering::Relaxed),
            unanswered = s.unanswered.load(Ordering::Relaxed),
            pairs_set = s.pairs_set.load(Ordering::Relaxed),
            notifications = s.notifications.load(Ordering::Relaxed),
            "control queue stopped"
        );
    }
}

/// The thread serving one device's control queue, from DRIVER_OK to reset.
/// Dropping it stops the thread and waits for it: afterwards nothing
/// touches the queue's rings.
pub struct ControlQueueThread {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl ControlQueueThread {
    /// Starts serving `queue` at each signal of `kick` (a dup of the
    /// queue's notification eventfd).
    pub fn spawn<S: VringSwitch + 'static>(
        queue: ControlQueue<S>,
        kick: EventFd,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let poll = Poll::new()?;
        for (fd, token) in [(kick.as_raw_fd(), KICK), (wake.as_raw_fd(), STOP)] {
            poll.registry()
                .register(&mut SourceFd(&fd), token, Interest::READABLE)?;
        }
        let thread_stop = stop.clone();
        let handle = std::thread::Builder::new()
            .name("net-ctrlq".into())
            .spawn(move || queue.run(poll, kick, &thread_stop))?;
        Ok(Self {
            stop,
            wake,
            handle: Some(handle),
        })
    }
}

impl Drop for ControlQueueThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The thread is in epoll, or between two vhost-user messages (each
        // bounded by the socket timeout, and `stop` is checked between them).
        if let Err(e) = self.wake.write(1) {
            // Cannot happen to an eventfd written once; the thread then
            // still stops at the driver's next kick.
            tracing::error!("cannot wake the control queue thread: {e}");
        }
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("the virtio-net control queue thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_bindings::virtio_net::{
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC,
    };
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;

    use super::*;

    const RAM_BYTES: usize = 0x10_0000;
    const QUEUE_SIZE: u16 = 16;
    /// The rings, a page each. (virtio-queue's MockSplitQueue is not used:
    /// its used ring overlaps the end of its available ring.)
    const DESC: u64 = 0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    /// Request buffers, and an indirect table, well past the rings.
    const BUF: u64 = 0x8000;
    const INDIRECT: u64 = 0x9000;
    const OUTSIDE: u64 = 0x40_0000;
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    /// SET_VRING_ENABLE as the backend would have seen it.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<(usize, bool)>>>,
        fail: bool,
    }

    impl VringSwitch for Recorder {
        fn set_vring_enable(&mut self, queue: usize, enable: bool) -> Result<(), vhost::Error> {
            if self.fail {
                return Err(vhost::Error::IOError(std::io::Error::from_raw_os_error(
                    libc::EPIPE,
                )));
            }
            self.calls.lock().unwrap().push((queue, enable));
            Ok(())
        }
    }

    struct Rig {
        mem: GuestMemoryMmap,
        calls: Arc<Mutex<Vec<(usize, bool)>>>,
        kicks: Vec<EventFd>,
        call: EventFd,
        /// Taken by the thread test.
        cq: Option<ControlQueue<Recorder>>,
        stats: Arc<ControlQueueStats>,
        ring: QueueConfig,
        /// Descriptors written so far, and requests made available.
        next_desc: u16,
    }

    fn eventfd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    /// A device with `pairs` pairs whose driver set up `rings` data rings,
    /// pair 0 running.
    fn rig(multiqueue: bool, pairs: u16, rings: usize, fail: bool) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_BYTES)]).unwrap();
        let recorder = Recorder {
            fail,
            ..Default::default()
        };
        let kicks: Vec<EventFd> = (0..rings).map(|_| eventfd()).collect();
        let data_queues = if multiqueue {
            2 * usize::from(pairs)
        } else {
            2
        };
        let qp = QueuePairs::new(
            recorder.clone(),
            multiqueue,
            pairs,
            data_queues,
            kicks
                .iter()
                .enumerate()
                .map(|(i, k)| (i, k.try_clone().unwrap(), i < 2))
                .collect(),
        );
        let config = QueueConfig {
            size: QUEUE_SIZE,
            desc: GuestAddress(DESC),
            avail: GuestAddress(AVAIL),
            used: GuestAddress(USED),
            enabled: true,
        };
        let call = eventfd();
        let stats = Arc::new(ControlQueueStats::default());
        let cq = ControlQueue::new(
            "test".into(),
            mem.clone(),
            data_queues,
            config,
            false,
            call.try_clone().unwrap(),
            qp,
            stats.clone(),
        )
        .unwrap();
        Rig {
            mem,
            calls: recorder.calls,
            kicks,
            call,
            cq: Some(cq),
            stats,
            ring: config,
            next_desc: 0,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    impl Rig {
        fn at(&self, base: GuestAddress, offset: u64) -> GuestAddress {
            GuestAddress(base.0 + offset)
        }

        fn avail_idx(&self) -> u16 {
            self.mem.read_obj(self.at(self.ring.avail, 2)).unwrap()
        }

        fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx, self.at(self.ring.avail, 2))
                .unwrap();
        }

        /// Makes available a chain of (addr, len, flags) buffers, linked
        /// with NEXT; returns its head.
        fn push(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            let n = bufs.len() as u16;
            for (i, (addr, len, flags)) in bufs.iter().enumerate() {
                let last = i as u16 + 1 == n;
                let flags = if last {
                    *flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                let next = if last { 0 } else { head + i as u16 + 1 };
                self.store(head + i as u16, desc(*addr, *len, flags, next));
            }
            self.next_desc += n;
            self.make_available(head);
            head
        }

        fn store(&self, index: u16, d: RawDescriptor) {
            let addr = self.at(self.ring.desc, 16 * u64::from(index));
            self.mem.write_obj(d, addr).unwrap();
        }

        fn make_available(&self, head: u16) {
            let idx = self.avail_idx();
            let slot = 4 + 2 * u64::from(idx % QUEUE_SIZE);
            self.mem
                .write_obj(head, self.at(self.ring.avail, slot))
                .unwrap();
            self.set_avail_idx(idx.wrapping_add(1));
        }

        /// A VQ_PAIRS_SET request at BUF (header and data in one buffer),
        /// its ack at BUF + 0x100.
        fn pairs_set(&mut self, n: u16) -> u16 {
            let [lo, hi] = n.to_le_bytes();
            self.write(
                BUF,
                &[
                    VIRTIO_NET_CTRL_MQ as u8,
                    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                    lo,
                    hi,
                ],
            );
            self.push(&[(BUF, 4, R), (BUF + 0x100, 1, W)])
        }

        fn write(&self, addr: u64, bytes: &[u8]) {
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        }

        fn ack(&self) -> u8 {
            self.mem.read_obj(GuestAddress(BUF + 0x100)).unwrap()
        }

        fn serve(&mut self) {
            self.mem
                .write_obj(0xeeu8, GuestAddress(BUF + 0x100))
                .unwrap();
            self.cq().on_kick(&AtomicBool::new(false));
        }

        /// (head, len) of the n-th used entry.
        fn used(&self, n: u16) -> (u32, u32) {
            let slot = 4 + 8 * u64::from(n % QUEUE_SIZE);
            let e: [u32; 2] = self.mem.read_obj(self.at(self.ring.used, slot)).unwrap();
            (e[0], e[1])
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(self.at(self.ring.used, 2)).unwrap()
        }

        fn calls(&self) -> Vec<(usize, bool)> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }

        fn cq(&mut self) -> &mut ControlQueue<Recorder> {
            self.cq.as_mut().expect("the control queue is here")
        }

        /// Which data rings were kicked since the last look.
        fn kicked(&self) -> Vec<usize> {
            (0..self.kicks.len())
                .filter(|i| self.kicks[*i].read().is_ok())
                .collect()
        }
    }

    #[test]
    fn pairs_set_in_range_switches_pairs_and_kicks_those_turned_on() {
        let mut r = rig(true, 4, 8, false);
        let head = r.pairs_set(3);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_OK as u8);
        assert_eq!(r.used_idx(), 1);
        assert_eq!(r.used(0), (u32::from(head), 1), "one byte written: the ack");
        let on = |q: usize| (q, q < 6);
        assert_eq!(r.calls(), (0..8).map(on).collect::<Vec<_>>());
        assert_eq!(r.kicked(), vec![2, 3, 4, 5], "pair 0 was running already");
        assert_eq!(r.call.read().unwrap(), 1, "the driver is interrupted");

        r.pairs_set(1);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_OK as u8);
        assert_eq!(r.calls(), (0..8).map(|q| (q, q < 2)).collect::<Vec<_>>());
        assert!(r.kicked().is_empty(), "nothing was turned on");
        r.pairs_set(4);
        r.serve();
        assert_eq!(r.kicked(), (2..8).collect::<Vec<_>>());
        assert_eq!(r.stats.pairs_set.load(Ordering::Relaxed), 3);
        assert_eq!(r.stats.errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn pairs_set_out_of_range_or_without_mq_is_refused_and_changes_nothing() {
        let mut r = rig(true, 4, 8, false);
        for n in [0, 5, u16::MAX] {
            r.pairs_set(n);
            r.serve();
            assert_eq!(r.ack(), VIRTIO_NET_ERR as u8, "{n} pairs");
        }
        assert_eq!(r.used_idx(), 3);
        assert_eq!(r.used(2).1, 1);
        assert!(r.calls().is_empty());
        assert!(r.kicked().is_empty());
        assert_eq!(r.stats.errors.load(Ordering::Relaxed), 3);

        let mut r = rig(false, 4, 2, false);
        r.pairs_set(1);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8, "MQ not negotiated");
        assert!(r.calls().is_empty());
    }

    #[test]
    fn pairs_set_needs_every_ring_of_the_pairs_asked_for() {
        // The driver set up pair 0 and only the RX ring of pair 1.
        let mut r = rig(true, 2, 3, false);
        r.pairs_set(2);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8);
        assert!(r.calls().is_empty());
        r.pairs_set(1);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_OK as u8);
        assert_eq!(r.calls(), vec![(0, true), (1, true), (2, false)]);
    }

    #[test]
    fn a_backend_that_fails_gets_err() {
        let mut r = rig(true, 2, 4, true);
        r.pairs_set(2);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8);
        assert_eq!(r.used(0).1, 1);
        assert!(r.kicked().is_empty());
    }

    #[test]
    fn other_classes_and_commands_get_err() {
        let mut r = rig(true, 2, 4, false);
        for (class, command) in [
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC),
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG),
            (200, 0),
        ] {
            r.write(BUF, &[class as u8, command as u8, 1, 0]);
            r.push(&[(BUF, 4, R), (BUF + 0x100, 1, W)]);
            r.serve();
            assert_eq!(
                r.ack(),
                VIRTIO_NET_ERR as u8,
                "class {class} command {command}"
            );
        }
        assert!(r.calls().is_empty());
    }

    #[test]
    fn short_header_or_data_gets_err() {
        let mut r = rig(true, 2, 4, false);
        r.write(BUF, &[VIRTIO_NET_CTRL_MQ as u8]);
        r.push(&[(BUF, 1, R), (BUF + 0x100, 1, W)]);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8, "a 1-byte header");
        r.push(&[(BUF + 0x100, 1, W)]);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8, "no readable bytes at all");
        r.write(
            BUF,
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                2,
            ],
        );
        r.push(&[(BUF, 3, R), (BUF + 0x100, 1, W)]);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8, "one byte of virtqueue_pairs");
        assert!(r.calls().is_empty());
        // Header and data split over three buffers is fine.
        r.write(
            BUF,
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            ],
        );
        r.write(BUF + 0x40, &[2]);
        r.write(BUF + 0x80, &[0]);
        r.push(&[
            (BUF, 2, R),
            (BUF + 0x40, 1, R),
            (BUF + 0x80, 1, R),
            (BUF + 0x100, 1, W),
        ]);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_OK as u8);
        assert_eq!(r.calls().len(), 4);
    }

    #[test]
    fn no_writable_ack_returns_the_chain_unanswered_and_does_nothing() {
        let mut r = rig(true, 2, 4, false);
        r.write(
            BUF,
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                2,
                0,
                0,
            ],
        );
        // All readable: the would-be ack byte is not device-writable.
        let head = r.push(&[(BUF, 5, R)]);
        r.serve();
        assert_eq!(r.used(0), (u32::from(head), 0));
        // A writable buffer of 0 bytes.
        r.push(&[(BUF, 4, R), (BUF + 0x100, 0, W)]);
        r.serve();
        assert_eq!(r.used(1).1, 0);
        assert_eq!(r.ack(), 0xee, "nothing written");
        assert!(
            r.calls().is_empty(),
            "a request without an ack is not acted on"
        );
        assert_eq!(r.stats.unanswered.load(Ordering::Relaxed), 2);
        assert_eq!(
            r.call.read().unwrap(),
            2,
            "returned chains are still signalled"
        );
    }

    #[test]
    fn ack_outside_guest_ram_is_not_written() {
        let mut r = rig(true, 2, 4, false);
        r.pairs_set(2);
        r.store(1, desc(OUTSIDE, 1, W, 0));
        r.serve();
        assert_eq!(r.used(0).1, 0);
        assert!(r.calls().is_empty());
        // Straddling the end of RAM.
        r.pairs_set(2);
        r.store(3, desc(RAM_BYTES as u64 - 1, 2, W, 0));
        r.serve();
        assert_eq!(r.used(1).1, 0);
        assert!(r.calls().is_empty());
    }

    #[test]
    fn request_buffers_outside_guest_ram_get_err() {
        let mut r = rig(true, 2, 4, false);
        r.push(&[(OUTSIDE, 4, R), (BUF + 0x100, 1, W)]);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8);
        // A valid request followed by a second writable buffer outside RAM.
        r.pairs_set(2);
        r.push_tail_outside();
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8);
        assert_eq!(r.used(1).1, 1);
        // A header buffer running past the end of RAM.
        r.push(&[(BUF, RAM_BYTES as u32, R), (BUF + 0x100, 1, W)]);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8);
        assert_eq!(r.used(2).1, 1);
        // A chain of 4 GiB or more (2.7.5.2 forbids it): virtio-queue ends
        // it before the ack, so it goes back unanswered.
        r.push(&[(BUF, u32::MAX, R), (BUF + 0x100, 1, W)]);
        r.serve();
        assert_eq!(r.used(3).1, 0);
        assert_eq!(r.ack(), 0xee);
        assert!(r.calls().is_empty());
    }

    impl Rig {
        /// Rewrites the last chain's ack descriptor to chain on to a second
        /// writable buffer outside guest RAM.
        fn push_tail_outside(&mut self) {
            let ack = self.next_desc - 1;
            self.store(
                ack,
                desc(BUF + 0x100, 1, W | VRING_DESC_F_NEXT as u16, self.next_desc),
            );
            self.store(self.next_desc, desc(OUTSIDE, 64, W, 0));
            self.next_desc += 1;
        }
    }

    #[test]
    fn readable_after_writable_gets_err() {
        let mut r = rig(true, 2, 4, false);
        r.write(
            BUF,
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            ],
        );
        r.write(BUF + 0x40, &[2, 0]);
        r.push(&[(BUF, 2, R), (BUF + 0x100, 1, W), (BUF + 0x40, 2, R)]);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8);
        assert!(r.calls().is_empty());
    }

    #[test]
    fn indirect_chain_is_followed() {
        let mut r = rig(true, 2, 4, false);
        r.write(
            BUF,
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                2,
                0,
            ],
        );
        let table = [
            desc(BUF, 2, VRING_DESC_F_NEXT as u16, 1),
            desc(BUF + 2, 2, VRING_DESC_F_NEXT as u16, 2),
            desc(BUF + 0x100, 1, W, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            r.mem
                .write_obj(*d, GuestAddress(INDIRECT + 16 * i as u64))
                .unwrap();
        }
        let head = r.next_desc;
        r.store(head, desc(INDIRECT, 48, VRING_DESC_F_INDIRECT as u16, 0));
        r.next_desc += 1;
        r.make_available(head);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_OK as u8);
        assert_eq!(r.used(0), (u32::from(head), 1));
        assert_eq!(r.calls(), vec![(0, true), (1, true), (2, true), (3, true)]);

        // An indirect table whose length is not a whole number of
        // descriptors, and one outside guest RAM: broken chains, nothing
        // to write the ack to.
        for (addr, len) in [(INDIRECT, 40), (OUTSIDE, 48)] {
            let head = r.next_desc;
            r.store(head, desc(addr, len, VRING_DESC_F_INDIRECT as u16, 0));
            r.next_desc += 1;
            r.make_available(head);
        }
        r.serve();
        assert_eq!(r.used_idx(), 3);
        assert_eq!((r.used(1).1, r.used(2).1), (0, 0));
        assert!(r.calls().is_empty());
    }

    #[test]
    fn descriptor_loop_ends_and_gets_err() {
        let mut r = rig(true, 2, 4, false);
        r.write(
            BUF,
            &[
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                2,
                0,
            ],
        );
        // 0 -> 1 -> 0 -> ...: the header, then the ack, forever.
        r.store(0, desc(BUF, 4, VRING_DESC_F_NEXT as u16, 1));
        r.store(1, desc(BUF + 0x100, 1, W | VRING_DESC_F_NEXT as u16, 0));
        r.next_desc = 2;
        r.make_available(0);
        // A next index past the table.
        r.store(2, desc(BUF, 4, VRING_DESC_F_NEXT as u16, QUEUE_SIZE + 3));
        r.next_desc = 3;
        r.make_available(2);
        r.serve();
        assert_eq!(r.used_idx(), 2);
        assert_eq!(r.used(0).1, 1, "the loop's ack byte can be written");
        assert_eq!(r.ack(), VIRTIO_NET_ERR as u8);
        assert_eq!(r.used(1).1, 0, "no ack in a chain cut at its first buffer");
        assert!(r.calls().is_empty());
    }

    #[test]
    fn bogus_available_index_is_not_served_forever() {
        let mut r = rig(true, 2, 4, false);
        r.pairs_set(2);
        // The driver claims 40 requests in a ring of 16.
        r.set_avail_idx(40);
        r.serve();
        assert_eq!(r.used_idx(), 0);
        assert!(r.calls().is_empty());
        assert!(r.call.read().is_err(), "no interrupt for nothing");
    }

    #[test]
    fn requests_are_served_in_order_across_the_ring_wrapping() {
        let mut r = rig(true, 4, 8, false);
        for round in 0..(2 * QUEUE_SIZE) {
            r.next_desc = 0;
            let n = round % 4 + 1;
            r.pairs_set(n);
            r.serve();
            assert_eq!(r.ack(), VIRTIO_NET_OK as u8, "round {round}");
            let calls = r.calls();
            assert_eq!(calls.len(), 8);
            assert!(calls.iter().all(|(q, on)| *on == (*q < 2 * usize::from(n))));
        }
        assert_eq!(r.used_idx(), 2 * QUEUE_SIZE);
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asks() {
        let mut r = rig(true, 2, 4, false);
        r.cq().queue.set_event_idx(true);
        // used_event sits after the available ring's entries.
        let used_event = r.at(r.ring.avail, 4 + 2 * u64::from(QUEUE_SIZE));
        r.mem.write_obj(5u16, used_event).unwrap();
        r.pairs_set(2);
        r.serve();
        assert_eq!(r.ack(), VIRTIO_NET_OK as u8);
        assert!(r.call.read().is_err(), "used_event=5: not yet");
        r.mem.write_obj(1u16, used_event).unwrap();
        r.next_desc = 0;
        r.pairs_set(1);
        r.serve();
        assert_eq!(r.call.read().unwrap(), 1, "used_event=1 passed");
    }

    #[test]
    fn stop_leaves_requests_unanswered() {
        let mut r = rig(true, 2, 4, false);
        r.pairs_set(2);
        r.cq().on_kick(&AtomicBool::new(true));
        assert_eq!(r.used_idx(), 0);
        assert!(r.calls().is_empty());
    }

    #[test]
    fn rings_must_be_aligned_and_in_guest_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_BYTES)]).unwrap();
        let make = |desc: u64, used: u64| {
            let qp = QueuePairs::new(Recorder::default(), true, 1, 2, Vec::new());
            let config = QueueConfig {
                size: QUEUE_SIZE,
                desc: GuestAddress(desc),
                avail: GuestAddress(0x1000),
                used: GuestAddress(used),
                enabled: true,
            };
            ControlQueue::new(
                "t".into(),
                mem.clone(),
                2,
                config,
                false,
                eventfd(),
                qp,
                Default::default(),
            )
            .err()
        };
        assert!(make(0, 0x2000).is_none());
        assert!(matches!(
            make(8, 0x2000),
            Some(ActivateError::RingMisaligned { index: 2 })
        ));
        assert!(matches!(
            make(0, RAM_BYTES as u64 - 8),
            Some(ActivateError::RingOutsideMemory { index: 2 })
        ));
    }

    #[test]
    fn commands_parse() {
        let mq = VIRTIO_NET_CTRL_MQ as u8;
        let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
        assert_eq!(
            parse_command(&[mq, set, 0x34, 0x12], 4).unwrap(),
            Command::SetPairs(0x1234)
        );
        assert_eq!(
            parse_command(&[mq, set, 2, 0], 100).unwrap(),
            Command::SetPairs(2),
            "extra data is ignored"
        );
        assert!(matches!(
            parse_command(&[mq, set, 2], 3),
            Err(NetCtrlError::ShortPairs(1))
        ));
        assert!(matches!(
            parse_command(&[mq], 1),
            Err(NetCtrlError::ShortHeader(1))
        ));
        assert!(matches!(
            parse_command(&[], 0),
            Err(NetCtrlError::ShortHeader(0))
        ));
        assert!(matches!(
            parse_command(&[1, 1], 2),
            Err(NetCtrlError::Unsupported {
                class: 1,
                command: 1
            })
        ));
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut w = WarnLimit::default();
        assert_eq!(w.admit(), Some(0));
        assert_eq!(w.admit(), None);
        assert_eq!(w.admit(), None);
        w.last = Some(Instant::now() - WARN_INTERVAL);
        assert_eq!(w.admit(), Some(2), "the two held back are counted");
    }

    #[test]
    fn the_thread_serves_kicks_and_stops_when_dropped() {
        let mut driver = rig(true, 2, 4, false);
        let kick = eventfd();
        let cq = driver.cq.take().unwrap();
        let thread = ControlQueueThread::spawn(cq, kick.try_clone().unwrap()).unwrap();
        driver.pairs_set(2);
        driver.write(BUF + 0x100, &[0xee]);
        kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while driver.used_idx() == 0 {
            assert!(Instant::now() < deadline, "the kick was not served");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(driver.ack(), VIRTIO_NET_OK as u8);
        assert_eq!(driver.calls().len(), 4);
        drop(thread);
        // Stopped: a kick now is nobody's.
        driver.pairs_set(1);
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(driver.used_idx(), 1);
    }
}
