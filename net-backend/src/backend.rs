//! [`NetBackend`]: the `VhostUserBackend` of a virtio-net device
//! (vhost-user-backend 0.24): features, config space, offloads, and the
//! events of its worker threads, one per RX/TX queue pair.
//!
//! Queue `2n` is pair n's RX queue and `2n + 1` its TX queue (virtio 1.2,
//! 5.1.2). [`NetBackend::queues_per_thread`] gives each pair its own thread,
//! whose epoll numbers the pair's RX kick 0 and TX kick 1; the pair's tap
//! queue is a listener of the same epoll ([`Token::Tap`]), added and removed
//! by the worker as the guest's receive buffers come and go, and so is the
//! eventfd its rings signal when the frontend enables, disables, starts or
//! stops them ([`Token::RingState`], see [`crate::vring`]). Every event
//! first brings the pair up to date with its rings' state
//! ([`PairWorker::follow_enable`]).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ringvm_backend::vhost_user;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::counters::Counters;
use crate::queue::{GuestRamAtomic, PairWorker, TapWatch, Vring};
use crate::tap::{set_offload, Tap};

/// Device options from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mac: Option<[u8; 6]>,
}

/// The events of a pair's worker thread, as `VringEpollHandler` numbers
/// them: its vrings from 0 (RX, then TX), `num_queues` for the crate's own
/// exit and vring-enable events, and anything above for listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    RxKick,
    TxKick,
    /// The pair's tap queue is readable.
    Tap,
    /// The frontend changed the state of one of the pair's rings.
    RingState,
}

impl Token {
    pub fn from_device_event(device_event: u16, num_queues: usize) -> Option<Token> {
        match usize::from(device_event) {
            0 => Some(Token::RxKick),
            1 => Some(Token::TxKick),
            n if n == num_queues + 1 => Some(Token::Tap),
            n if n == num_queues + 2 => Some(Token::RingState),
            _ => None,
        }
    }

    /// The epoll data value; `register_listener` refuses values up to
    /// `num_queues`.
    pub fn device_event(self, num_queues: usize) -> u64 {
        match self {
            Token::RxKick => 0,
            Token::TxKick => 1,
            Token::Tap => num_queues as u64 + 1,
            Token::RingState => num_queues as u64 + 2,
        }
    }
}

/// The offloads the guest accepts on RX, as TUNSETOFFLOAD flags.
pub fn tun_offloads(acked_features: u64) -> libc::c_uint {
    let has = |bit: u32| acked_features & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        // The kernel takes TSO only along with checksum offload.
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

pub struct NetBackend {
    num_queues: usize,
    queue_size: u16,
    features: u64,
    config: Vec<u8>,
    tap: Arc<Tap>,
    acked_features: Arc<AtomicU64>,
    workers: Vec<Mutex<PairWorker>>,
    /// Per pair: signalled by its rings on a state change.
    ring_state_events: Vec<Arc<EventFd>>,
}

impl NetBackend {
    /// A device moving frames between the guest and `tap` (one tap queue
    /// per pair); `mem` is the guest memory the daemon fills from the
    /// frontend's memory table.
    pub fn new(
        tap: Arc<Tap>,
        options: &NetOptions,
        mem: GuestRamAtomic,
        counters: &Counters,
    ) -> io::Result<Self> {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if options.mac.is_some() {
            features |= 1 << VIRTIO_NET_F_MAC;
        }
        // virtio_net_config (virtio 1.2, 5.1.4): mac, status,
        // max_virtqueue_pairs, little-endian.
        let mut config = Vec::with_capacity(10);
        config.extend_from_slice(&options.mac.unwrap_or([0; 6]));
        config.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config.extend_from_slice(&options.queue_pairs.to_le_bytes());

        let acked_features = Arc::new(AtomicU64::new(0));
        let ring_state_events = (0..options.queue_pairs)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let workers = (0..options.queue_pairs)
            .zip(&ring_state_events)
            .map(|(pair, changes)| {
                Mutex::new(PairWorker::new(
                    pair,
                    Arc::clone(&tap),
                    mem.clone(),
                    Arc::clone(&acked_features),
                    Arc::clone(&counters.pairs[usize::from(pair)]),
                    Arc::clone(changes),
                ))
            })
            .collect();
        Ok(NetBackend {
            num_queues: 2 * usize::from(options.queue_pairs),
            queue_size: options.queue_size,
            features,
            config,
            tap,
            acked_features,
            workers,
            ring_state_events,
        })
    }

    /// The eventfd pair `pair`'s rings signal on a state change, for its
    /// thread's epoll ([`Token::RingState`]).
    pub fn ring_state_event(&self, pair: usize) -> Option<&EventFd> {
        self.ring_state_events.get(pair).map(|event| &**event)
    }

    fn worker(&self, pair: usize) -> Option<MutexGuard<'_, PairWorker>> {
        self.workers
            .get(pair)
            .map(|w| w.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Gives pair `pair`'s worker the way to put its tap queue into its
    /// thread's epoll and take it out.
    pub fn set_tap_watch(&self, pair: usize, watch: TapWatch) {
        if let Some(mut worker) = self.worker(pair) {
            worker.set_tap_watch(watch);
        }
    }

    /// Leaves every tap queue unread and detached for good: the frontend
    /// is gone and so is the backend (its worker threads may still be
    /// handling a last event, which must not attach a queue again).
    pub fn stop(&self) {
        for pair in 0..self.workers.len() {
            if let Some(mut worker) = self.worker(pair) {
                worker.close();
            }
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        debug!("frontend acked features {features:#x}");
        self.acked_features.store(features, Ordering::Relaxed);
        let flags = tun_offloads(features);
        if let Err(err) = set_offload(&self.tap.queues[0], flags) {
            warn!(
                "tap {}: cannot set offloads {flags:#x}: {err}; the guest may receive frames it cannot take",
                self.tap.name
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        vhost_user::protocol_features()
    }

    /// RESET_DEVICE: the crate has disabled every ring; the frontend may
    /// set the device up again.
    fn reset_device(&self) {
        for pair in 0..self.workers.len() {
            if let Some(mut worker) = self.worker(pair) {
                worker.reset();
            }
        }
        info!("device reset by the frontend");
    }

    /// The crate sets EVENT_IDX on every vring itself.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        vhost_user::config_window(&self.config, offset, size)
    }

    /// A region past the end of its file would kill the backend with
    /// SIGBUS at the first frame: refused.
    fn update_memory(&self, mem: GuestRamAtomic) -> io::Result<()> {
        vhost_user::check_memory_table(&mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len())
            .map(|pair| 0b11u64 << (2 * pair))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        vhost_user::exit_event()
    }

    /// GET_VRING_BASE: the pair goes off, and on an RX queue the receive
    /// chains taken and not used go back to the guest first.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(mut worker) = self.worker(queue_index as usize / 2) {
            worker.stop_ring(queue_index % 2 == 0);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Guest input never fails the worker thread: an error here would
        // end it, and with it the queue pair.
        let (Some(mut worker), Some(rx), Some(tx)) =
            (self.worker(thread_id), vrings.first(), vrings.get(1))
        else {
            warn!(thread_id, device_event, "event for a thread without a pair");
            return Ok(());
        };
        let token = Token::from_device_event(device_event, self.num_queues);
        if token == Some(Token::RingState) {
            worker.on_state_change();
        }
        if worker.follow_enable(rx, tx) {
            worker.on_enabled(rx, tx);
            return Ok(());
        }
        match token {
            Some(Token::RxKick) => worker.on_rx_kick(rx),
            Some(Token::TxKick) => worker.on_tx_kick(tx),
            Some(Token::Tap) => worker.on_tap_readable(rx),
            Some(Token::RingState) => {}
            None => warn!(thread_id, device_event, "unexpected event"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for num_queues in [2, 8, 128] {
            for token in [Token::RxKick, Token::TxKick, Token::Tap, Token::RingState] {
                let event = token.device_event(num_queues);
                let listener = matches!(token, Token::Tap | Token::RingState);
                assert!(!listener || event > num_queues as u64);
                assert_eq!(
                    Token::from_device_event(event as u16, num_queues),
                    Some(token)
                );
            }
            assert_eq!(
                Token::from_device_event(num_queues as u16, num_queues),
                None
            );
        }
    }

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(tun_offloads(0), 0);
        assert_eq!(tun_offloads(1 << VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tun_offloads(
                1 << VIRTIO_NET_F_GUEST_CSUM
                    | 1 << VIRTIO_NET_F_GUEST_TSO4
                    | 1 << VIRTIO_NET_F_GUEST_TSO6
            ),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        // TSO without checksum offload is not something the tap accepts.
        assert_eq!(tun_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        // HOST_* features are about TX and change nothing here.
        assert_eq!(tun_offloads(1 << VIRTIO_NET_F_HOST_TSO4), 0);
    }
}
