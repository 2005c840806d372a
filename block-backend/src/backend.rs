//! [`BlkBackend`]: the `VhostUserBackend` of a virtio-blk device
//! (vhost-user-backend 0.24): features, config space, and the events of its
//! worker threads, one per virtqueue.
//!
//! # One request, from kick to used ring
//!
//! 1. The guest puts a chain (header, data buffers, status byte) in the
//!    available ring of queue 2 and writes the queue's notify address; KVM
//!    turns that write into a signal on the kick eventfd the VMM gave us with
//!    VHOST_USER_SET_VRING_KICK.
//! 2. Queue 2's worker thread (vhost-user-backend's `VringEpollHandler`,
//!    one per queue because [`BlkBackend::queues_per_thread`] says so) wakes
//!    in epoll, reads the kick eventfd and calls [`BlkBackend::handle_event`]
//!    with [`Token::Kick`].
//! 3. [`QueueWorker::on_kick`] takes every available chain: `request.rs`
//!    parses it into a `BlkRequest` (or answers it at once when it is bad),
//!    the image maps its sectors to host extents, and the worker queues one
//!    io_uring readv/writev per extent whose iovecs point straight into the
//!    guest memory the frontend shared with VHOST_USER_SET_MEM_TABLE. The
//!    whole kick is one `io_uring_enter`.
//! 4. The kernel completes the I/O and signals the ring's eventfd, which sits
//!    in the same thread's epoll (registered with
//!    `VringEpollHandler::register_listener` as [`Token::Completion`]).
//! 5. [`QueueWorker::on_completion`] reaps the completions, writes each
//!    status byte, adds the chains to the used ring and, once for the batch,
//!    signals the call eventfd if `needs_notification` says the guest wants
//!    it (EVENT_IDX). KVM turns the call eventfd into the queue's MSI-X
//!    interrupt through the irqfd the VMM registered.

use std::error::Error as _;
use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ringvm_backend::vhost_user;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::counters::Counters;
use crate::engine::{best_engine, Completer, EngineError};
use crate::image::ImageFormat;
use crate::queue::{engine_files, GuestRamAtomic, QueueSettings, QueueWorker, Vring, ID_BYTES};
use crate::request::{RequestLimits, SECTOR_BYTES, SECTOR_SHIFT};

/// Largest DISCARD/WRITE_ZEROES segment: 2 GiB. fallocate(2) takes any size
/// in one call; the bound only keeps one request from occupying an io_uring
/// worker for very long on file systems that zero slowly.
const MAX_ZEROING_SECTORS: u32 = 1 << 22;
/// Segments per DISCARD/WRITE_ZEROES request; Linux merges adjacent discards
/// into one request up to this many.
const MAX_ZEROING_SEGMENTS: u32 = 16;
/// Data buffers per request: the descriptors of a full queue minus header
/// and status (as QEMU does), at most what one readv takes (IOV_MAX) minus
/// room for buffers split at guest memory region boundaries.
const MAX_SEG_MAX: u32 = 1022;
/// io_uring submission entries per queue. The submission queue only holds
/// the operations of one kick between two submits (a fuller batch submits
/// early); completions have twice as many entries, and the kernel keeps the
/// overflow rather than dropping it.
const MAX_RING_ENTRIES: u32 = 1024;

/// Device options from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    pub serial: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot set up the I/O engine of queue {queue}")]
    Engine {
        queue: u16,
        #[source]
        source: EngineError,
    },
}

/// The events of a worker thread, as `VringEpollHandler` numbers them:
/// its vrings from 0 (one per thread here, so the kick is always 0),
/// `num_queues` for the crate's own exit and vring-enable events (never
/// passed to the backend), and anything above for listeners we register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// The thread's vring was kicked (or enabled).
    Kick,
    /// The thread's io_uring posted completions.
    Completion,
}

impl Token {
    pub fn from_device_event(device_event: u16, num_queues: usize) -> Option<Token> {
        match usize::from(device_event) {
            0 => Some(Token::Kick),
            n if n == num_queues + 1 => Some(Token::Completion),
            _ => None,
        }
    }

    /// The epoll data value; `register_listener` refuses values up to
    /// `num_queues`.
    pub fn device_event(self, num_queues: usize) -> u64 {
        match self {
            Token::Kick => 0,
            Token::Completion => num_queues as u64 + 1,
        }
    }
}

pub struct BlkBackend {
    num_queues: usize,
    queue_size: u16,
    features: u64,
    config: Vec<u8>,
    workers: Vec<Arc<Mutex<QueueWorker>>>,
    completion_fds: Vec<Option<RawFd>>,
}

impl BlkBackend {
    /// A device serving `image` with `options`; `mem` is the guest memory
    /// the vhost-user daemon fills from the frontend's memory table.
    pub fn new(
        image: Arc<dyn ImageFormat>,
        options: &BlkOptions,
        mem: GuestRamAtomic,
        counters: &Counters,
    ) -> Result<Self, BackendError> {
        let capacity_sectors = image.capacity_sectors();
        let settings = queue_settings(capacity_sectors, options);
        let seg_max = settings.limits.seg_max;

        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if options.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }

        let discard_alignment_sectors =
            (image.discard_granularity_bytes() >> SECTOR_SHIFT).max(1) as u32;
        let config = virtio_blk_config {
            capacity: capacity_sectors.to_le(),
            seg_max: seg_max.to_le(),
            blk_size: (SECTOR_BYTES as u32).to_le(),
            num_queues: options.num_queues.to_le(),
            max_discard_sectors: MAX_ZEROING_SECTORS.to_le(),
            max_discard_seg: MAX_ZEROING_SEGMENTS.to_le(),
            discard_sector_alignment: discard_alignment_sectors.to_le(),
            max_write_zeroes_sectors: MAX_ZEROING_SECTORS.to_le(),
            max_write_zeroes_seg: MAX_ZEROING_SEGMENTS.to_le(),
            write_zeroes_may_unmap: 1,
            ..virtio_blk_config::default()
        };

        let entries = u32::from(options.queue_size)
            .next_power_of_two()
            .min(MAX_RING_ENTRIES);
        let mut workers = Vec::with_capacity(usize::from(options.num_queues));
        let mut completion_fds = Vec::with_capacity(usize::from(options.num_queues));
        for queue in 0..options.num_queues {
            let (engine, why_not_uring) = match image.queue_engine() {
                Some(engine) => engine.map(|engine| (engine, None)),
                None => best_engine(&engine_files(&*image), entries),
            }
            .map_err(|source| BackendError::Engine { queue, source })?;
            if let Some(err) = why_not_uring {
                warn!(
                    queue,
                    "io_uring is not available ({err}: {}); serving with blocking syscalls",
                    err.source().map(|e| e.to_string()).unwrap_or_default()
                );
            }
            completion_fds.push(engine.completion_fd());
            workers.push(Arc::new(Mutex::new(QueueWorker::new(
                queue,
                Arc::clone(&image),
                engine,
                mem.clone(),
                settings,
                options.queue_size,
                Arc::clone(&counters.queues[usize::from(queue)]),
            ))));
        }
        for worker in &workers {
            let weak = Arc::downgrade(worker);
            let complete: Completer = Arc::new(move || {
                weak.upgrade().is_some_and(|worker| {
                    // Busy (its thread is serving a kick or draining): it
                    // gets the eventfd signal instead.
                    worker
                        .try_lock()
                        .is_ok_and(|mut worker| worker.on_completion_elsewhere())
                })
            });
            worker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_completer(complete);
        }
        Ok(BlkBackend {
            num_queues: usize::from(options.num_queues),
            queue_size: options.queue_size,
            features,
            config: config_bytes(&config),
            workers,
            completion_fds,
        })
    }

    /// The completion eventfd of queue `queue`'s engine, for the worker
    /// thread's epoll (None for the synchronous engine).
    pub fn completion_fd(&self, queue: usize) -> Option<RawFd> {
        self.completion_fds.get(queue).copied().flatten()
    }

    fn worker(&self, queue: usize) -> Option<MutexGuard<'_, QueueWorker>> {
        self.workers
            .get(queue)
            .map(|w| w.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits for all I/O in flight, answers it, and ignores later kicks.
    /// Returns the number of requests that were in flight.
    pub fn stop(&self) -> usize {
        (0..self.workers.len())
            .filter_map(|queue| self.worker(queue).map(|mut w| w.stop()))
            .sum()
    }
}

/// What every queue of a device with `options` serves: the limits its
/// config space promises and its GET_ID answer. Public for the fuzz targets,
/// which build queue workers as [`BlkBackend::new`] does.
pub fn queue_settings(capacity_sectors: u64, options: &BlkOptions) -> QueueSettings {
    let seg_max = u32::from(options.queue_size)
        .saturating_sub(2)
        .clamp(1, MAX_SEG_MAX);
    let limits = RequestLimits {
        capacity_sectors,
        seg_max,
        max_discard_sectors: MAX_ZEROING_SECTORS,
        max_discard_seg: MAX_ZEROING_SEGMENTS,
        max_write_zeroes_sectors: MAX_ZEROING_SECTORS,
        max_write_zeroes_seg: MAX_ZEROING_SEGMENTS,
        readonly: options.readonly,
    };
    let mut serial = [0u8; ID_BYTES];
    if let Some(id) = &options.serial {
        let len = id.len().min(ID_BYTES);
        serial[..len].copy_from_slice(&id.as_bytes()[..len]);
    }
    QueueSettings { limits, serial }
}

/// The config space as the guest reads it (virtio 1.2, 5.2.4; the fields
/// were stored little-endian).
fn config_bytes(config: &virtio_blk_config) -> Vec<u8> {
    // SAFETY: virtio_blk_config is repr(C, packed) and made of integers only:
    // it has no padding, so all of its size_of bytes are initialised, and the
    // slice lives no longer than the borrow of `config`.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (config as *const virtio_blk_config).cast::<u8>(),
            size_of::<virtio_blk_config>(),
        )
    };
    bytes.to_vec()
}

impl VhostUserBackend for BlkBackend {
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
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        vhost_user::protocol_features()
    }

    fn reset_device(&self) {
        let drained: usize = (0..self.workers.len())
            .filter_map(|queue| self.worker(queue).map(|mut w| w.drain()))
            .sum();
        info!("device reset by the frontend ({drained} requests were in flight)");
    }

    /// The crate sets EVENT_IDX on every vring itself.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        vhost_user::config_window(&self.config, offset, size)
    }

    /// The workers read guest memory through the same `GuestMemoryAtomic`
    /// the crate has just updated; what is left is to check it.
    /// vhost-user-backend 0.24 maps each region of the frontend's table as
    /// given (vm-memory 0.18 does not check the file's length), so a region
    /// that reaches past the end of its file would kill the process with
    /// SIGBUS at the first access to that part. Such a table is refused and
    /// replaced by no memory at all; the error ends the connection.
    fn update_memory(&self, mem: GuestRamAtomic) -> io::Result<()> {
        vhost_user::check_memory_table(&mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|queue| 1u64 << queue).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        vhost_user::exit_event()
    }

    /// GET_VRING_BASE: requests in flight must reach the used ring before
    /// the frontend reads where the queue stopped.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(mut worker) = self.worker(queue_index as usize) {
            let drained = worker.drain();
            debug!(
                queue = queue_index,
                "vring stopped; {drained} requests drained"
            );
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
        // end it, and with it the queue.
        let (Some(mut worker), Some(vring)) = (self.worker(thread_id), vrings.first()) else {
            warn!(
                thread_id,
                device_event, "event for a thread without a queue"
            );
            return Ok(());
        };
        match Token::from_device_event(device_event, self.num_queues) {
            Some(Token::Kick) => worker.on_kick(vring),
            Some(Token::Completion) => worker.on_completion(vring),
            None => warn!(thread_id, device_event, "unexpected event"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{open, OpenOptions};
    use crate::queue::GuestRam;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
    use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

    fn new_backend(options: &BlkOptions) -> (tempfile::NamedTempFile, BlkBackend) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(64 << 20).unwrap();
        let image = open(tmp.path(), OpenOptions::default()).unwrap();
        let counters = Counters::new(usize::from(options.num_queues));
        let mem = GuestRamAtomic::new(GuestRam::new());
        let backend = BlkBackend::new(image, options, mem, &counters).unwrap();
        (tmp, backend)
    }

    fn options() -> BlkOptions {
        BlkOptions {
            num_queues: 4,
            queue_size: 256,
            readonly: false,
            serial: Some("disk-7".into()),
        }
    }

    fn config_u32(backend: &BlkBackend, offset: usize) -> u32 {
        u32::from_le_bytes(backend.get_config(offset as u32, 4).try_into().unwrap())
    }

    #[test]
    fn features_offered() {
        let (_tmp, backend) = new_backend(&options());
        let features = backend.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(features & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_CONFIG_WCE), 0);
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let protocol = backend.protocol_features();
        assert!(protocol.contains(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        ));
        let (_tmp, readonly) = new_backend(&BlkOptions {
            readonly: true,
            ..options()
        });
        assert_ne!(readonly.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn config_space() {
        let (_tmp, backend) = new_backend(&options());
        let capacity = backend.get_config(offset_of!(virtio_blk_config, capacity) as u32, 8);
        assert_eq!(u64::from_le_bytes(capacity.try_into().unwrap()), 131072);
        assert_eq!(
            config_u32(&backend, offset_of!(virtio_blk_config, seg_max)),
            254
        );
        assert_eq!(
            config_u32(&backend, offset_of!(virtio_blk_config, blk_size)),
            512
        );
        let queues = backend.get_config(offset_of!(virtio_blk_config, num_queues) as u32, 2);
        assert_eq!(queues, 4u16.to_le_bytes());
        for field in [
            offset_of!(virtio_blk_config, max_discard_sectors),
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        ] {
            assert_eq!(config_u32(&backend, field), MAX_ZEROING_SECTORS);
        }
        for field in [
            offset_of!(virtio_blk_config, max_discard_seg),
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
        ] {
            assert_eq!(config_u32(&backend, field), MAX_ZEROING_SEGMENTS);
        }
        assert!(
            config_u32(
                &backend,
                offset_of!(virtio_blk_config, discard_sector_alignment)
            ) >= 1
        );
        let unmap = backend.get_config(
            offset_of!(virtio_blk_config, write_zeroes_may_unmap) as u32,
            1,
        );
        assert_eq!(unmap, [1]);
        // A read past the fields gets zeroes, as long as asked for.
        let all = backend.get_config(0, 256);
        assert_eq!(all.len(), 256);
        assert!(all[size_of::<virtio_blk_config>()..]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn one_thread_per_queue() {
        let (_tmp, backend) = new_backend(&options());
        assert_eq!(backend.queues_per_thread(), [1, 2, 4, 8]);
        assert_eq!(backend.num_queues(), 4);
        assert_eq!(backend.max_queue_size(), 256);
        for queue in 0..4 {
            assert!(backend.completion_fd(queue).is_some());
        }
        assert!(backend.exit_event(0).is_some());
    }

    #[test]
    fn tiny_queues_still_offer_one_segment() {
        let (_tmp, backend) = new_backend(&BlkOptions {
            queue_size: 2,
            ..options()
        });
        assert_eq!(
            config_u32(&backend, offset_of!(virtio_blk_config, seg_max)),
            1
        );
    }

    #[test]
    fn memory_regions_past_the_end_of_their_file_are_refused() {
        // Found by the vhost_user_messages fuzz target: a SET_MEM_TABLE
        // region longer than its memfd was mapped, and the next access to
        // the ring (SET_VRING_ADDR reads the used index) died of SIGBUS.
        use vm_memory::{FileOffset, GuestAddress};
        let (_tmp, backend) = new_backend(&options());
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 << 10).unwrap();
        let ram = |len: usize, offset: u64| {
            let ranges = [(
                GuestAddress(0x10_0000),
                len,
                Some(FileOffset::new(file.try_clone().unwrap(), offset)),
            )];
            GuestRamAtomic::new(GuestRam::from_ranges_with_files(ranges).unwrap())
        };
        let fits = ram(32 << 10, 32 << 10);
        backend.update_memory(fits.clone()).unwrap();
        assert_eq!(fits.memory().num_regions(), 1);
        for (len, offset) in [(128 << 10, 0), (64 << 10, 4096)] {
            let past = ram(len, offset);
            let err = backend.update_memory(past.clone()).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "the region at guest address 0x100000 maps {len} bytes from offset {offset} \
                     of a file of 65536 bytes"
                )
            );
            assert_eq!(past.memory().num_regions(), 0, "no memory left to fault on");
        }
    }

    #[test]
    fn tokens_round_trip() {
        for num_queues in [1, 4, 64] {
            for token in [Token::Kick, Token::Completion] {
                let event = token.device_event(num_queues);
                assert!(token == Token::Kick || event > num_queues as u64);
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
}
