//! One [`QueueWorker`] per virtqueue, run by that queue's worker thread:
//! chains in, engine operations out, status bytes and the used ring back.
//!
//! Per kick, [`QueueWorker::on_kick`] takes every available chain, parses it
//! ([`crate::request`]), maps its sectors to host extents ([`crate::image`]),
//! builds iovecs that point straight into guest memory and queues one engine
//! operation per extent; then it submits the whole batch at once. Per
//! completion wakeup, [`QueueWorker::on_completion`] reaps what the engine
//! finished, writes status bytes, adds the chains to the used ring and
//! signals the guest once for the batch (if EVENT_IDX says it wants it).
//!
//! Hot path allocations: none once warm. Request state lives in slots indexed
//! by the chain's head descriptor (a head cannot be in flight twice), each
//! with vectors that keep their capacity from one request to the next.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, warn};
use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::counters::{add, inc, QueueCounters};
use crate::engine::{Completion, Engine, IoVec};
use crate::image::{DioAlignment, Extent, ImageFormat};
use crate::request::{parse_request, BadRequest, BlkRequest, RequestLimits, RequestType};

mod op;

use op::{build_ops, next_step, Next, Op, OpContext};

/// Guest RAM as the backend maps it from the frontend's memory table (no
/// dirty bitmap: VHOST_USER_PROTOCOL_F_LOG_SHMFD is not offered).
pub type GuestRam = GuestMemoryMmap<()>;
pub type GuestRamAtomic = GuestMemoryAtomic<GuestRam>;
pub type Vring = VringMutex<GuestRamAtomic>;

pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Guest-triggered warnings: at most one per second per queue (the others
/// are counted and their number logged with the next one).
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Passes over the available ring per kick. Each pass takes at most a
/// queue's worth of chains; another pass follows only when chains arrived
/// meanwhile. Past this many the worker kicks itself and returns to its
/// event loop, so that neither a busy guest nor a ring that the device's
/// own writes keep changing (rings overlapping each other or a buffer) can
/// hold the queue's thread, which GET_VRING_BASE and the exit need.
const MAX_PASSES_PER_KICK: u32 = 4;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// What every queue of a device serves.
#[derive(Clone, Copy, Debug)]
pub struct QueueSettings {
    pub limits: RequestLimits,
    /// GET_ID answer: the serial, NUL-padded.
    pub serial: [u8; ID_BYTES],
}

/// The state of the request whose chain starts at one descriptor head.
#[derive(Default)]
struct Slot {
    /// Operations in flight; the head must not be reused until it is done.
    busy: bool,
    request: BlkRequest,
    iovecs: Vec<IoVec>,
    ops: Vec<Op>,
    pending_ops: usize,
    status: u8,
    /// Bytes the device wrote into the chain's buffers before the status.
    data_written: u32,
    /// The guest memory `iovecs` point into, held while operations are in
    /// flight: a new memory table from the frontend cannot unmap it.
    mem: Option<Arc<GuestRam>>,
}

/// Rate limit for guest-triggered warnings.
#[derive(Default)]
struct LogLimiter {
    quiet_until: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// Some(number of warnings suppressed since the last one) if this one
    /// may be logged.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.quiet_until.is_some_and(|until| now < until) {
            self.suppressed += 1;
            return None;
        }
        self.quiet_until = Some(now + LOG_INTERVAL);
        Some(std::mem::take(&mut self.suppressed))
    }
}

pub struct QueueWorker {
    index: u16,
    settings: QueueSettings,
    /// Per host file: the O_DIRECT alignment under `--direct`.
    dio: Vec<Option<DioAlignment>>,
    mem: GuestRamAtomic,
    /// The queue's vring, kept from the first event for drains that do not
    /// come with one (GET_VRING_BASE, reset, exit).
    vring: Option<Vring>,
    slots: Vec<Slot>,
    extents: Vec<Extent>,
    completions: Vec<Completion>,
    /// (head, used length) to add to the used ring in this batch.
    used: Vec<(u16, u32)>,
    counters: Arc<QueueCounters>,
    /// Learned at the first EOPNOTSUPP: WRITE_ZEROES goes straight to punch
    /// hole + allocate.
    zero_range_unsupported: bool,
    /// After `stop`: kicks are ignored.
    stopped: bool,
    /// Operations were pushed since the last submit.
    unsubmitted: bool,
    log: LogLimiter,
    // Declared last: dropped after the engine, which waits for what is in
    // flight, so the image's files outlive every operation.
    engine: Box<dyn Engine>,
    image: Arc<dyn ImageFormat>,
}

/// Engine file slots: host file `i` is slot `2i`, and `2i + 1` is its
/// page-cache twin under `--direct` (the same file otherwise).
pub fn engine_files(image: &dyn ImageFormat) -> Vec<std::os::fd::BorrowedFd<'_>> {
    use std::os::fd::AsFd;
    image
        .files()
        .iter()
        .flat_map(|host| {
            [
                host.file.as_fd(),
                host.buffered.as_ref().unwrap_or(&host.file).as_fd(),
            ]
        })
        .collect()
}

fn tag(head: u16, op: usize) -> u64 {
    (u64::from(head) << 32) | op as u64
}

fn untag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

impl QueueWorker {
    pub fn new(
        index: u16,
        image: Arc<dyn ImageFormat>,
        engine: Box<dyn Engine>,
        mem: GuestRamAtomic,
        settings: QueueSettings,
        max_queue_size: u16,
        counters: Arc<QueueCounters>,
    ) -> Self {
        QueueWorker {
            index,
            settings,
            dio: image.files().iter().map(|f| f.dio).collect(),
            mem,
            vring: None,
            slots: (0..max_queue_size).map(|_| Slot::default()).collect(),
            extents: Vec::new(),
            completions: Vec::new(),
            used: Vec::new(),
            counters,
            zero_range_unsupported: false,
            stopped: false,
            unsubmitted: false,
            log: LogLimiter::default(),
            engine,
            image,
        }
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.engine.completion_fd()
    }

    /// The guest kicked (or the queue was enabled): serve every available
    /// chain and submit them as one batch. After `MAX_PASSES_PER_KICK`
    /// passes over the ring the rest waits for the kick this leaves.
    pub fn on_kick(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        if self.stopped {
            return;
        }
        inc(&self.counters.kicks);
        let mem = self.mem.memory().into_inner();
        let mut state = vring.get_mut();
        let mut passes = 0;
        loop {
            passes += 1;
            if let Err(err) = state.disable_notification() {
                self.warn(format_args!("cannot disable notifications: {err}"));
            }
            match state.get_queue_mut().iter(&*mem) {
                Ok(chains) => {
                    for chain in chains {
                        self.start_request(chain, &mem);
                    }
                }
                // Not ready: reset, or stopped by GET_VRING_BASE.
                Err(virtio_queue::Error::QueueNotReady) => break,
                Err(err) => {
                    self.warn(format_args!("cannot read the available ring: {err}"));
                    break;
                }
            }
            match state.enable_notification() {
                // More chains arrived while notifications were off.
                Ok(true) if passes < MAX_PASSES_PER_KICK => continue,
                Ok(true) => {
                    if let Err(err) = kick_again(&state) {
                        self.warn(format_args!("cannot kick the queue again: {err}"));
                    }
                    break;
                }
                Ok(false) => break,
                Err(err) => {
                    self.warn(format_args!("cannot enable notifications: {err}"));
                    break;
                }
            }
        }
        self.submit();
        // Operations the kernel completed during the submit (page cache
        // hits) are answered now rather than after another wakeup. Their
        // completions also signalled the eventfd: clear it, then reap once
        // more for what completed in between, so that the worker does not
        // wake up again for nothing.
        if self.reap() > 0 {
            self.engine.clear_completion_fd();
            self.reap();
        }
        self.publish(&mut state);
    }

    /// The engine's completion eventfd fired.
    pub fn on_completion(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        inc(&self.counters.completion_events);
        self.engine.clear_completion_fd();
        self.reap();
        let mut state = vring.get_mut();
        self.publish(&mut state);
    }

    /// Reaps and answers completions from the thread that produced them
    /// (see `Engine::set_completer`); false when the queue has not seen
    /// its vring yet or is stopped.
    pub fn on_completion_elsewhere(&mut self) -> bool {
        let Some(vring) = self.vring.clone() else {
            return false;
        };
        if self.stopped {
            return false;
        }
        self.on_completion(&vring);
        true
    }

    pub fn set_completer(&mut self, complete: crate::engine::Completer) {
        self.engine.set_completer(complete);
    }

    /// Waits for every operation in flight and puts its chain in the used
    /// ring (GET_VRING_BASE, reset, exit). Returns the number of chains.
    pub fn drain(&mut self) -> usize {
        let mut drained = 0;
        while self.engine.in_flight() > 0 {
            self.submit();
            if let Err(err) = self.engine.wait() {
                error!(queue = self.index, "cannot wait for I/O in flight: {err}");
                break;
            }
            self.reap();
            drained += self.used.len();
            if let Some(vring) = self.vring.clone() {
                let mut state = vring.get_mut();
                self.publish(&mut state);
            }
        }
        drained
    }

    /// Drains, then ignores kicks: the backend is going away.
    pub fn stop(&mut self) -> usize {
        let drained = self.drain();
        self.stopped = true;
        drained
    }

    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log.allow() {
            if suppressed > 0 {
                warn!(
                    queue = self.index,
                    "{message} ({suppressed} similar warnings suppressed)"
                );
            } else {
                warn!(queue = self.index, "{message}");
            }
        }
    }

    fn start_request(&mut self, chain: DescriptorChain<&GuestRam>, mem: &Arc<GuestRam>) {
        let head = chain.head_index();
        let index = usize::from(head);
        if self.slots.get(index).is_none_or(|slot| slot.busy) {
            // Out of range, or a head the guest made available twice: there
            // is no slot to answer from, and answering would confuse the
            // request in flight.
            inc(&self.counters.chains_dropped);
            self.warn(format_args!(
                "dropped a chain whose head {head} is out of range or already in flight"
            ));
            return;
        }
        if let Err(bad) =
            parse_request(chain, &self.settings.limits, &mut self.slots[index].request)
        {
            self.answer_bad_request(head, bad, mem);
            return;
        }
        let request_type = self.slots[index].request.request_type;
        let counter = match request_type {
            RequestType::In => &self.counters.reads,
            RequestType::Out => &self.counters.writes,
            RequestType::Flush => &self.counters.flushes,
            RequestType::GetId => &self.counters.get_ids,
            RequestType::Discard => &self.counters.discards,
            RequestType::WriteZeroes => &self.counters.write_zeroes,
        };
        inc(counter);
        if request_type == RequestType::GetId {
            let written = self.write_id(index, mem);
            self.complete_now(head, STATUS_OK, written, mem);
            return;
        }
        let context = OpContext {
            image: &*self.image,
            dio: &self.dio,
            counters: &self.counters,
            zero_range_unsupported: self.zero_range_unsupported,
        };
        let slot = &mut self.slots[index];
        let built = build_ops(
            &context,
            &slot.request,
            mem,
            &mut self.extents,
            &mut slot.iovecs,
            &mut slot.ops,
        );
        match built {
            Ok(data_written) => slot.data_written = data_written,
            Err(err) => {
                inc(&self.counters.io_errors);
                self.warn(format_args!("request at head {head} failed: {err}"));
                self.complete_now(head, STATUS_IOERR, 0, mem);
                return;
            }
        }
        if slot.ops.is_empty() {
            let written = slot.data_written;
            self.complete_now(head, STATUS_OK, written, mem);
            return;
        }
        slot.busy = true;
        slot.status = STATUS_OK;
        slot.mem = Some(Arc::clone(mem));
        slot.pending_ops = 0;
        for op_index in 0..slot.ops.len() {
            let op = slot.ops[op_index];
            // SAFETY: the iovecs point into `slot.mem`, which the slot holds
            // until `finish` runs after the last completion of this head is
            // reaped; `slot.iovecs` is neither resized nor written while
            // `slot.busy` (only `next_step` advances the entries of an op
            // whose own completion it is handling, before resubmitting it).
            let pushed = unsafe {
                self.engine
                    .push(op.engine_op(&slot.iovecs), tag(head, op_index))
            };
            match pushed {
                Ok(()) => {
                    slot.pending_ops += 1;
                    self.unsubmitted = true;
                }
                Err(err) => {
                    slot.status = STATUS_IOERR;
                    error!(queue = self.index, "cannot queue I/O: {err}");
                    break;
                }
            }
        }
        if slot.pending_ops == 0 {
            self.finish(index);
        }
    }

    /// Answers a chain that is not a servable request.
    fn answer_bad_request(&mut self, head: u16, bad: BadRequest, mem: &GuestRam) {
        self.counters.bad_request(bad.error.kind());
        self.warn(format_args!("bad request at head {head}: {}", bad.error));
        match bad.status_addr {
            Some(addr) => {
                let len = write_status(mem, addr, bad.error.status());
                self.used.push((head, len));
            }
            None => {
                inc(&self.counters.chains_returned_unused);
                self.used.push((head, 0));
            }
        }
    }

    /// Completes a request that needed no engine operation.
    fn complete_now(&mut self, head: u16, status: u8, data_written: u32, mem: &GuestRam) {
        let status_addr = self.slots[usize::from(head)].request.status_addr;
        let len = match write_status(mem, status_addr, status) {
            0 => 0,
            _ if status == STATUS_OK => data_written + 1,
            _ => 1,
        };
        self.used.push((head, len));
    }

    /// GET_ID: the serial, cut to the guest's buffer. Returns bytes written.
    fn write_id(&mut self, index: usize, mem: &GuestRam) -> u32 {
        let request = &self.slots[index].request;
        let mut id = &self.settings.serial[..];
        for segment in &request.data {
            let take = id.len().min(segment.len_bytes as usize);
            if take == 0 {
                break;
            }
            if mem.write_slice(&id[..take], segment.addr).is_err() {
                break;
            }
            id = &id[take..];
        }
        (ID_BYTES - id.len()) as u32
    }

    fn submit(&mut self) {
        if !self.unsubmitted {
            return;
        }
        self.unsubmitted = false;
        if let Err(err) = self.engine.submit() {
            error!(queue = self.index, "cannot submit I/O: {err}");
            return;
        }
        inc(&self.counters.submits);
    }

    /// Reaps every completion that is ready, resubmitting what must go on,
    /// and finishes the requests whose last operation completed. Returns the
    /// number of completions.
    fn reap(&mut self) -> usize {
        let mut completions = std::mem::take(&mut self.completions);
        let mut reaped = 0;
        loop {
            completions.clear();
            self.engine.reap(&mut completions);
            if completions.is_empty() {
                break;
            }
            reaped += completions.len();
            let mut resubmitted = false;
            for completion in &completions {
                resubmitted |= self.on_op_done(*completion);
            }
            if resubmitted {
                self.submit();
            }
        }
        self.completions = completions;
        reaped
    }

    /// Returns whether the op was queued again.
    fn on_op_done(&mut self, completion: Completion) -> bool {
        let (index, op_index) = untag(completion.tag);
        let valid = self
            .slots
            .get(index)
            .is_some_and(|slot| slot.busy && op_index < slot.ops.len());
        if !valid {
            error!(
                queue = self.index,
                tag = completion.tag,
                "completion for no request"
            );
            return false;
        }
        let slot = &mut self.slots[index];
        let next = next_step(
            &mut slot.ops[op_index],
            completion.result,
            &mut slot.iovecs,
            &mut self.zero_range_unsupported,
            &self.counters,
        );
        let failure = match next {
            Next::Done => None,
            Next::Failed(errno) => Some(errno),
            Next::Resubmit => {
                let op = slot.ops[op_index];
                // SAFETY: as in start_request: the slot still holds the guest
                // memory and its iovecs until `finish`.
                let pushed =
                    unsafe { self.engine.push(op.engine_op(&slot.iovecs), completion.tag) };
                match pushed {
                    Ok(()) => {
                        self.unsubmitted = true;
                        return true;
                    }
                    Err(_) => Some(libc::EIO),
                }
            }
        };
        if let Some(errno) = failure {
            slot.status = STATUS_IOERR;
            let kind = slot.ops[op_index].kind;
            let err = std::io::Error::from_raw_os_error(errno);
            self.warn(format_args!("{kind:?} at head {index} failed: {err}"));
        }
        let slot = &mut self.slots[index];
        slot.pending_ops -= 1;
        if slot.pending_ops == 0 {
            self.finish(index);
        }
        false
    }

    /// The request at `slots[index]` is done: status byte, used entry.
    fn finish(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let mem = slot
            .mem
            .take()
            .expect("a busy slot holds the guest memory of its buffers");
        slot.busy = false;
        let ok = slot.status == STATUS_OK;
        if ok {
            match slot.request.request_type {
                RequestType::In => add(&self.counters.bytes_read, slot.request.data_len_bytes),
                RequestType::Out => add(&self.counters.bytes_written, slot.request.data_len_bytes),
                _ => {}
            }
        } else {
            inc(&self.counters.io_errors);
        }
        let len = match write_status(&mem, slot.request.status_addr, slot.status) {
            0 => 0,
            _ if ok => slot.data_written + 1,
            _ => 1,
        };
        self.used.push((index as u16, len));
    }

    /// Adds this batch's chains to the used ring and signals the guest once,
    /// if it asked to be (EVENT_IDX: `needs_notification` compares the used
    /// index with the guest's used_event).
    fn publish(&mut self, state: &mut VringState<GuestRamAtomic>) {
        if self.used.is_empty() {
            return;
        }
        // A used ring the guest placed outside its memory fails every
        // entry: one rate-limited warning per batch.
        let mut failed = None;
        for (head, len) in self.used.drain(..) {
            if let Err(err) = state.add_used(head, len) {
                failed = Some((head, err));
            }
        }
        if let Some((head, err)) = failed {
            self.warn(format_args!(
                "cannot add head {head} to the used ring: {err}"
            ));
        }
        let notify = state.needs_notification().unwrap_or(true);
        if !notify {
            inc(&self.counters.notifications_suppressed);
            return;
        }
        match state.signal_used_queue() {
            Ok(()) => inc(&self.counters.notifications),
            Err(err) => self.warn(format_args!("cannot signal the guest: {err}")),
        }
    }
}

/// Signals the vring's kick eventfd, so that the worker thread's event
/// loop calls `on_kick` again after its other events.
fn kick_again(state: &VringState<GuestRamAtomic>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let Some(kick) = state.get_kick() else {
        return Ok(());
    };
    // SAFETY: the descriptor is the vring's kick eventfd, which `state`
    // keeps open while it is borrowed here; eventfd_write passes the value,
    // no pointer.
    if unsafe { libc::eventfd_write(kick.as_raw_fd(), 1) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes a status byte; returns 1, or 0 if guest memory refused it.
fn write_status(mem: &GuestRam, addr: GuestAddress, status: u8) -> u32 {
    u32::from(mem.write_obj(status, addr).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sync::SyncEngine;
    use crate::engine::uring::UringEngine;
    use crate::engine::{EngineError, EngineOp};
    use crate::image::{open, Access, HostFile, ImageError, OpenOptions};
    use crate::request::tests::{
        memory, readable, writable, write_header, write_segment, DATA, HDR, STATUS,
    };
    use crate::request::SECTOR_SHIFT;
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::path::Path;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const QUEUE_SIZE: u16 = 16;
    const DESC_TABLE: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const IMAGE_BYTES: u64 = 1 << 20;

    /// Wraps the raw test image in another format.
    type Wrap = fn(Arc<dyn ImageFormat>) -> Arc<dyn ImageFormat>;

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum EngineKind {
        Sync,
        Uring,
    }

    struct Harness {
        mem: GuestRamAtomic,
        vring: Vring,
        call: EventFd,
        worker: QueueWorker,
        counters: Arc<QueueCounters>,
        image_file: File,
        next_desc: u16,
        _dir: tempfile::TempDir,
    }

    fn pattern(offset: u64) -> u8 {
        (offset / 512 * 7 + offset % 251) as u8
    }

    fn limits(capacity_sectors: u64, readonly: bool) -> RequestLimits {
        RequestLimits {
            capacity_sectors,
            seg_max: 8,
            max_discard_sectors: 1024,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_seg: 4,
            readonly,
        }
    }

    impl Harness {
        fn new(engine: EngineKind) -> Self {
            Self::with(
                engine,
                std::env::temp_dir().as_path(),
                OpenOptions::default(),
                None,
            )
        }

        /// A raw image in `dir` filled with `pattern`, or `format` over it.
        fn with(
            engine: EngineKind,
            dir: &Path,
            options: OpenOptions,
            format: Option<Wrap>,
        ) -> Self {
            let dir = tempfile::tempdir_in(dir).unwrap();
            let path = dir.path().join("disk.raw");
            let bytes: Vec<u8> = (0..IMAGE_BYTES).map(pattern).collect();
            std::fs::write(&path, bytes).unwrap();
            let mut image = open(&path, options).unwrap();
            if let Some(format) = format {
                image = format(image);
            }
            let image_file = File::open(&path).unwrap();
            let engine: Box<dyn Engine> = match engine {
                EngineKind::Sync => Box::new(SyncEngine::new(&engine_files(&*image)).unwrap()),
                EngineKind::Uring => Box::new(UringEngine::new(&engine_files(&*image), 8).unwrap()),
            };
            let mem = GuestRamAtomic::new(memory());
            let vring = Vring::new(mem.clone(), QUEUE_SIZE).unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            vring.set_queue_info(DESC_TABLE, AVAIL, USED).unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            // SAFETY: into_raw_fd hands over a descriptor that nothing else
            // owns; the File takes it.
            let call_file = unsafe { File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
            vring.set_call(Some(call_file));
            let counters = Arc::new(QueueCounters::default());
            let mut serial = [0u8; ID_BYTES];
            serial[..6].copy_from_slice(b"disk-7");
            let settings = QueueSettings {
                limits: limits(image.capacity_sectors(), options.readonly),
                serial,
            };
            let worker = QueueWorker::new(
                0,
                image,
                engine,
                mem.clone(),
                settings,
                QUEUE_SIZE,
                Arc::clone(&counters),
            );
            Harness {
                mem,
                vring,
                call,
                worker,
                counters,
                image_file,
                next_desc: 0,
                _dir: dir,
            }
        }

        fn ram(&self) -> Arc<GuestRam> {
            self.mem.memory().into_inner()
        }

        /// Writes `descs` as one chain at the next free descriptors and makes
        /// it available; returns its head.
        fn add(&mut self, descs: &[RawDescriptor]) -> u16 {
            let ram = self.ram();
            let head = self.next_desc;
            for (i, desc) in descs.iter().enumerate() {
                let index = (head + i as u16) % QUEUE_SIZE;
                let desc = SplitDescriptor::from(*desc);
                let (flags, next) = if i + 1 < descs.len() {
                    (
                        desc.flags() | VRING_DESC_F_NEXT as u16,
                        (index + 1) % QUEUE_SIZE,
                    )
                } else {
                    (desc.flags() & !(VRING_DESC_F_NEXT as u16), 0)
                };
                let raw = RawDescriptor::from(SplitDescriptor::new(
                    desc.addr().0,
                    desc.len(),
                    flags,
                    next,
                ));
                ram.write_obj(raw, GuestAddress(DESC_TABLE + 16 * u64::from(index)))
                    .unwrap();
            }
            self.next_desc = (head + descs.len() as u16) % QUEUE_SIZE;
            self.make_available(head);
            head
        }

        fn make_available(&self, head: u16) {
            let ram = self.ram();
            let idx: u16 = ram.read_obj(GuestAddress(AVAIL + 2)).unwrap();
            let slot = AVAIL + 4 + 2 * u64::from(idx % QUEUE_SIZE);
            ram.write_obj(head, GuestAddress(slot)).unwrap();
            ram.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
                .unwrap();
        }

        fn kick(&mut self) {
            self.worker.on_kick(&self.vring);
        }

        /// (head, length) of every used entry so far.
        fn used(&self) -> Vec<(u32, u32)> {
            let ram = self.ram();
            let idx: u16 = ram.read_obj(GuestAddress(USED + 2)).unwrap();
            (0..idx)
                .map(|i| {
                    let at = USED + 4 + 8 * u64::from(i % QUEUE_SIZE);
                    let id: u32 = ram.read_obj(GuestAddress(at)).unwrap();
                    let len: u32 = ram.read_obj(GuestAddress(at + 4)).unwrap();
                    (id, len)
                })
                .collect()
        }

        fn byte(&self, addr: u64) -> u8 {
            self.ram().read_obj(GuestAddress(addr)).unwrap()
        }

        fn fill(&self, addr: u64, len: usize, value: u8) {
            self.ram()
                .write_slice(&vec![value; len], GuestAddress(addr))
                .unwrap();
        }

        fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.ram().read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        fn disk(&self, offset: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.image_file.read_exact_at(&mut buf, offset).unwrap();
            buf
        }

        /// Signals taken from the call eventfd since the last look.
        fn signals(&self) -> u64 {
            self.call.read().unwrap_or(0)
        }

        fn counter(&self, counter: fn(&QueueCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
            counter(&self.counters).load(std::sync::atomic::Ordering::Relaxed)
        }

        /// Serves one request and returns (status byte, used length).
        fn serve(&mut self, descs: &[RawDescriptor], status_at: u64) -> (u8, u32) {
            self.fill(status_at, 1, 0xee);
            let before = self.used().len();
            let head = self.add(descs);
            self.kick();
            self.worker.drain();
            let used = self.used();
            assert_eq!(used.len(), before + 1, "one chain answered");
            assert_eq!(used[before].0, u32::from(head));
            (self.byte(status_at), used[before].1)
        }
    }

    fn ok() -> u8 {
        STATUS_OK
    }

    fn read_request(h: &Harness, sector: u64) {
        write_header(&h.ram(), HDR, VIRTIO_BLK_T_IN, sector);
    }

    fn each_engine(test: impl Fn(EngineKind)) {
        test(EngineKind::Sync);
        test(EngineKind::Uring);
    }

    #[test]
    fn read_returns_the_image_bytes() {
        each_engine(|engine| {
            let mut h = Harness::new(engine);
            read_request(&h, 8);
            let (status, len) = h.serve(
                &[
                    readable(HDR, 16),
                    writable(DATA, 512),
                    writable(DATA + 0x1000, 1024),
                    writable(STATUS, 1),
                ],
                STATUS,
            );
            assert_eq!((status, len), (ok(), 1537));
            assert_eq!(h.guest(DATA, 512), h.disk(4096, 512));
            assert_eq!(h.guest(DATA + 0x1000, 1024), h.disk(4608, 1024));
            assert_eq!(h.counter(|c| &c.reads), 1);
            assert_eq!(h.counter(|c| &c.bytes_read), 1536);
            assert_eq!(h.worker.in_flight(), 0);
        });
    }

    #[test]
    fn write_lands_in_the_image() {
        each_engine(|engine| {
            let mut h = Harness::new(engine);
            write_header(&h.ram(), HDR, VIRTIO_BLK_T_OUT, 2046);
            h.fill(DATA, 512, 0x11);
            h.fill(DATA + 0x3000, 512, 0x22);
            let (status, len) = h.serve(
                &[
                    readable(HDR, 16),
                    readable(DATA, 512),
                    readable(DATA + 0x3000, 512),
                    writable(STATUS, 1),
                ],
                STATUS,
            );
            assert_eq!((status, len), (ok(), 1));
            assert_eq!(h.disk(2046 * 512, 512), vec![0x11; 512]);
            assert_eq!(h.disk(2047 * 512, 512), vec![0x22; 512]);
            let untouched: Vec<u8> = (2045 * 512..2046 * 512).map(pattern).collect();
            assert_eq!(h.disk(2045 * 512, 512), untouched);
            assert_eq!(h.counter(|c| &c.bytes_written), 1024);
        });
    }

    #[test]
    fn flush_and_get_id() {
        each_engine(|engine| {
            let mut h = Harness::new(engine);
            write_header(&h.ram(), HDR, VIRTIO_BLK_T_FLUSH, 0);
            let (status, len) = h.serve(&[readable(HDR, 16), writable(STATUS, 1)], STATUS);
            assert_eq!((status, len), (ok(), 1));
            assert_eq!(h.counter(|c| &c.flushes), 1);

            write_header(&h.ram(), HDR, VIRTIO_BLK_T_GET_ID, 0);
            h.fill(DATA, 20, 0xff);
            let (status, len) = h.serve(
                &[readable(HDR, 16), writable(DATA, 20), writable(STATUS, 1)],
                STATUS,
            );
            assert_eq!((status, len), (ok(), 21));
            assert_eq!(
                &h.guest(DATA, 20)[..],
                b"disk-7\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
            );
            // A buffer shorter than the id gets what fits.
            h.fill(DATA, 8, 0xff);
            let (status, len) = h.serve(
                &[readable(HDR, 16), writable(DATA, 4), writable(STATUS, 1)],
                STATUS,
            );
            assert_eq!((status, len), (ok(), 5));
            assert_eq!(h.guest(DATA, 8), b"disk\xff\xff\xff\xff");
        });
    }

    #[test]
    fn discard_and_write_zeroes() {
        each_engine(|engine| {
            let mut h = Harness::new(engine);
            let ram = h.ram();
            write_header(&ram, HDR, VIRTIO_BLK_T_DISCARD, 0);
            write_segment(&ram, HDR + 16, 0, 64, 0);
            write_segment(&ram, HDR + 32, 128, 8, 0);
            let blocks_before = h.image_file.metadata().unwrap().blocks();
            let (status, len) = h.serve(&[readable(HDR, 48), writable(STATUS, 1)], STATUS);
            assert_eq!((status, len), (ok(), 1));
            assert_eq!(h.disk(0, 32768), vec![0; 32768]);
            assert_eq!(h.disk(128 * 512, 4096), vec![0; 4096]);
            assert_eq!(
                h.disk(32768, 512),
                (32768..33280).map(pattern).collect::<Vec<_>>()
            );
            assert!(h.image_file.metadata().unwrap().blocks() < blocks_before);

            write_header(&ram, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            write_segment(&ram, HDR + 16, 256, 3, 0);
            write_segment(&ram, HDR + 32, 512, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
            let (status, _) = h.serve(&[readable(HDR, 48), writable(STATUS, 1)], STATUS);
            assert_eq!(status, ok());
            assert_eq!(h.disk(256 * 512, 1536), vec![0; 1536]);
            assert_eq!(
                h.disk(259 * 512, 512),
                (259 * 512..260 * 512).map(pattern).collect::<Vec<_>>()
            );
            assert_eq!(h.disk(512 * 512, 8192), vec![0; 8192]);
            assert_eq!(h.counter(|c| &c.discards), 1);
            assert_eq!(h.counter(|c| &c.write_zeroes), 1);
        });
    }

    #[test]
    fn write_zeroes_without_zero_range_punches_and_allocates() {
        // tmpfs has punch hole but not FALLOC_FL_ZERO_RANGE.
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        each_engine(|engine| {
            let mut h = Harness::with(engine, shm, OpenOptions::default(), None);
            let ram = h.ram();
            for round in 0..2 {
                write_header(&ram, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
                write_segment(&ram, HDR + 16, 8 + 8 * round, 8, 0);
                let (status, _) = h.serve(&[readable(HDR, 32), writable(STATUS, 1)], STATUS);
                assert_eq!(status, ok());
                assert_eq!(h.disk((8 + 8 * round) * 512, 4096), vec![0; 4096]);
            }
            // Learned once, then straight to punch + allocate.
            assert_eq!(h.counter(|c| &c.zero_range_fallbacks), 1);
            assert_eq!(
                h.disk(24 * 512, 512),
                (24 * 512..25 * 512).map(pattern).collect::<Vec<_>>()
            );
        });
    }

    /// Every bad request gets an answer, with the status the spec asks for,
    /// and is counted.
    #[test]
    fn bad_requests_are_answered() {
        let mut h = Harness::new(EngineKind::Sync);
        let ram = h.ram();
        let ioerr = STATUS_IOERR;
        let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
        type Setup = fn(&GuestRam);
        let cases: Vec<(&str, Setup, Vec<RawDescriptor>, Option<u8>)> = vec![
            (
                "no header",
                |_| {},
                vec![readable(HDR, 8), writable(STATUS, 1)],
                Some(ioerr),
            ),
            (
                "no status",
                |m| write_header(m, HDR, VIRTIO_BLK_T_FLUSH, 0),
                vec![readable(HDR, 16)],
                None,
            ),
            (
                "read into device-readable buffer",
                |m| write_header(m, HDR, VIRTIO_BLK_T_IN, 0),
                vec![readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)],
                Some(ioerr),
            ),
            (
                "write from device-writable buffer",
                |m| write_header(m, HDR, VIRTIO_BLK_T_OUT, 0),
                vec![readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)],
                Some(ioerr),
            ),
            (
                "length not whole sectors",
                |m| write_header(m, HDR, VIRTIO_BLK_T_IN, 0),
                vec![readable(HDR, 16), writable(DATA, 100), writable(STATUS, 1)],
                Some(ioerr),
            ),
            (
                "past the capacity",
                |m| write_header(m, HDR, VIRTIO_BLK_T_IN, 2048),
                vec![readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)],
                Some(ioerr),
            ),
            (
                "overflowing u64",
                |m| write_header(m, HDR, VIRTIO_BLK_T_OUT, u64::MAX),
                vec![readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)],
                Some(ioerr),
            ),
            (
                "discard with reserved flags",
                |m| {
                    write_header(m, HDR, VIRTIO_BLK_T_DISCARD, 0);
                    write_segment(m, HDR + 16, 0, 8, 4);
                },
                vec![readable(HDR, 32), writable(STATUS, 1)],
                Some(unsupp),
            ),
            (
                "buffer outside guest memory",
                |m| write_header(m, HDR, VIRTIO_BLK_T_IN, 0),
                vec![
                    readable(HDR, 16),
                    writable(0x28_0000, 512),
                    writable(STATUS, 1),
                ],
                Some(ioerr),
            ),
            (
                "status outside guest memory",
                |m| write_header(m, HDR, VIRTIO_BLK_T_FLUSH, 0),
                vec![readable(HDR, 16), writable(0x28_0000, 1)],
                None,
            ),
            (
                "unsupported type",
                |m| write_header(m, HDR, 14, 0),
                vec![readable(HDR, 16), writable(STATUS, 1)],
                Some(unsupp),
            ),
        ];
        let disk_before = h.disk(0, IMAGE_BYTES as usize);
        for (name, setup, descs, expected) in &cases {
            setup(&ram);
            h.fill(DATA, 512, 0xee);
            let (status, len) = h.serve(descs, STATUS);
            match expected {
                Some(expected) => {
                    assert_eq!((status, len), (*expected, 1), "{name}");
                }
                None => {
                    assert_eq!((status, len), (0xee, 0), "{name}: returned unused");
                }
            }
            assert_eq!(h.guest(DATA, 512), vec![0xee; 512], "{name}: no data moved");
        }
        assert_eq!(h.disk(0, IMAGE_BYTES as usize), disk_before);
        let bad: u64 = h
            .counters
            .bad
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        assert_eq!(bad, cases.len() as u64);
        assert_eq!(h.counter(|c| &c.chains_returned_unused), 2);
        assert_eq!(h.counter(|c| &c.reads) + h.counter(|c| &c.writes), 0);
    }

    #[test]
    fn writes_to_a_readonly_disk_get_ioerr() {
        let readonly = OpenOptions {
            readonly: true,
            ..OpenOptions::default()
        };
        let mut h = Harness::with(EngineKind::Uring, &std::env::temp_dir(), readonly, None);
        write_header(&h.ram(), HDR, VIRTIO_BLK_T_OUT, 0);
        let before = h.disk(0, 512);
        let (status, len) = h.serve(
            &[readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)],
            STATUS,
        );
        assert_eq!((status, len), (STATUS_IOERR, 1));
        assert_eq!(h.disk(0, 512), before);
        read_request(&h, 0);
        let (status, _) = h.serve(
            &[readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)],
            STATUS,
        );
        assert_eq!(status, ok());
    }

    #[test]
    fn one_kick_is_one_submit_and_one_signal() {
        each_engine(|engine| {
            let mut h = Harness::new(engine);
            for i in 0..4u64 {
                let hdr = HDR + 0x100 * i;
                write_header(&h.ram(), hdr, VIRTIO_BLK_T_IN, i * 8);
                h.add(&[
                    readable(hdr, 16),
                    writable(DATA + 0x1000 * i, 4096),
                    writable(STATUS + i, 1),
                ]);
            }
            h.kick();
            h.worker.drain();
            assert_eq!(h.used().len(), 4);
            assert_eq!(h.counter(|c| &c.kicks), 1);
            if engine == EngineKind::Sync {
                // Everything completed within the kick: one batch, one signal.
                assert_eq!(h.counter(|c| &c.submits), 1);
                assert_eq!(h.signals(), 1);
            } else {
                // Completions that were not ready at the kick come in later
                // batches; still at most one signal per batch.
                assert!(h.signals() <= h.counter(|c| &c.submits) + 1);
            }
            for i in 0..4u64 {
                assert_eq!(h.byte(STATUS + i), ok());
                assert_eq!(h.guest(DATA + 0x1000 * i, 4096), h.disk(i * 4096, 4096));
            }
        });
    }

    #[test]
    fn event_idx_suppresses_unwanted_signals() {
        let mut h = Harness::new(EngineKind::Sync);
        h.vring.set_queue_event_idx(true);
        // used_event = 1: the guest wants a signal once entry 1 is used,
        // i.e. when the used index passes 1.
        let used_event = AVAIL + 4 + 2 * u64::from(QUEUE_SIZE);
        h.ram().write_obj(1u16, GuestAddress(used_event)).unwrap();
        write_header(&h.ram(), HDR, VIRTIO_BLK_T_FLUSH, 0);
        h.serve(&[readable(HDR, 16), writable(STATUS, 1)], STATUS);
        assert_eq!(h.signals(), 0, "used index 1 has not passed used_event");
        assert_eq!(h.counter(|c| &c.notifications_suppressed), 1);
        h.serve(&[readable(HDR, 16), writable(STATUS, 1)], STATUS);
        assert_eq!(h.signals(), 1, "used index 2 passed used_event");
        // And the device asked to be kicked again at the next entry.
        let avail_event = USED + 4 + 8 * u64::from(QUEUE_SIZE);
        let asked: u16 = h.ram().read_obj(GuestAddress(avail_event)).unwrap();
        assert_eq!(asked, 2);
    }

    #[test]
    fn uring_drain_completes_everything_in_flight() {
        let mut h = Harness::new(EngineKind::Uring);
        let ram = h.ram();
        for i in 0..5u64 {
            let hdr = HDR + 0x100 * i;
            write_header(&ram, hdr, VIRTIO_BLK_T_OUT, i * 16);
            h.add(&[
                readable(hdr, 16),
                readable(DATA, 8192),
                writable(STATUS + i, 1),
            ]);
        }
        h.fill(DATA, 8192, 0x5c);
        h.kick();
        h.worker.drain();
        assert_eq!(h.worker.in_flight(), 0);
        assert_eq!(h.used().len(), 5);
        for i in 0..5u64 {
            assert_eq!(h.byte(STATUS + i), ok());
            assert_eq!(h.disk(i * 16 * 512, 8192), vec![0x5c; 8192]);
        }
        // Stopped: later kicks are not served.
        h.worker.stop();
        write_header(&ram, HDR, VIRTIO_BLK_T_FLUSH, 0);
        h.add(&[readable(HDR, 16), writable(STATUS, 1)]);
        h.kick();
        assert_eq!(h.used().len(), 5);
    }

    #[test]
    fn a_ring_the_device_rewrites_does_not_hold_the_worker() {
        // Found by the virtqueue fuzz target: with the used ring's flags on
        // the available index, disabling notifications makes one chain
        // available and enabling them takes it back, so "more chains
        // arrived" held forever and on_kick never returned.
        let mut h = Harness::new(EngineKind::Sync);
        let (avail, used) = (USED - 2, USED);
        h.vring.set_queue_info(DESC_TABLE, avail, used).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: into_raw_fd hands over a descriptor that nothing else
        // owns; the File takes it.
        let kick_file = unsafe { File::from_raw_fd(kick.try_clone().unwrap().into_raw_fd()) };
        h.vring.set_kick(Some(kick_file));
        // The available ring's first entry is the used index: head 0.
        write_header(&h.ram(), HDR, VIRTIO_BLK_T_FLUSH, 0);
        let ram = h.ram();
        let chain = [
            (HDR, 16, VRING_DESC_F_NEXT as u16),
            (STATUS, 1, VRING_DESC_F_WRITE as u16),
        ];
        for (index, (addr, len, flags)) in chain.into_iter().enumerate() {
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 1));
            ram.write_obj(raw, GuestAddress(DESC_TABLE + 16 * index as u64))
                .unwrap();
        }
        h.fill(STATUS, 1, 0xee);
        h.kick();
        assert_eq!(h.byte(STATUS), ok(), "the chain was served");
        assert_eq!(h.counter(|c| &c.flushes), 1);
        assert_eq!(kick.read().unwrap(), 1, "the worker kicked itself");
    }

    #[test]
    fn duplicate_and_out_of_range_heads_are_dropped() {
        let mut h = Harness::new(EngineKind::Uring);
        write_header(&h.ram(), HDR, VIRTIO_BLK_T_IN, 0);
        let head = h.add(&[
            readable(HDR, 16),
            writable(DATA, 65536),
            writable(STATUS, 1),
        ]);
        h.make_available(head);
        h.make_available(200);
        h.kick();
        h.worker.drain();
        assert_eq!(h.used(), [(u32::from(head), 65537)]);
        assert_eq!(h.counter(|c| &c.chains_dropped), 2);
    }

    /// A format that stores guest 4 KiB blocks in reverse order and leaves
    /// every fourth one a hole: several extents per request, zero reads.
    #[derive(Debug)]
    struct Reversed(Arc<dyn ImageFormat>);

    impl ImageFormat for Reversed {
        fn name(&self) -> &'static str {
            "reversed"
        }
        fn capacity_sectors(&self) -> u64 {
            self.0.capacity_sectors()
        }
        fn files(&self) -> &[HostFile] {
            self.0.files()
        }
        fn map(
            &self,
            access: Access,
            offset: u64,
            len_bytes: u64,
            extents: &mut Vec<Extent>,
        ) -> Result<(), ImageError> {
            let capacity = self.capacity_sectors() << SECTOR_SHIFT;
            let (mut at, end) = (offset, offset + len_bytes);
            while at < end {
                let block = at / 4096;
                let next = ((block + 1) * 4096).min(end);
                let len = next - at;
                if block % 4 == 3 && access != Access::Write {
                    extents.push(Extent::Zero { len_bytes: len });
                } else {
                    extents.push(Extent::Data {
                        file: 0,
                        offset: capacity - (block + 1) * 4096 + at % 4096,
                        len_bytes: len,
                    });
                }
                at = next;
            }
            Ok(())
        }
        fn discard_granularity_bytes(&self) -> u64 {
            4096
        }
    }

    #[test]
    fn a_format_with_many_extents_and_holes() {
        each_engine(|engine| {
            let reversed: Wrap = |raw| Arc::new(Reversed(raw));
            let mut h = Harness::with(
                engine,
                &std::env::temp_dir(),
                OpenOptions::default(),
                Some(reversed),
            );
            // Guest bytes 2048..18432: blocks 0 (half), 1, 2, 3 (hole), 4 (half),
            // through buffers that do not line up with the blocks.
            read_request(&h, 4);
            h.fill(DATA, 0x2000 + 14848, 0xee);
            let (status, len) = h.serve(
                &[
                    readable(HDR, 16),
                    writable(DATA, 1536),
                    writable(DATA + 0x2000, 14848),
                    writable(STATUS, 1),
                ],
                STATUS,
            );
            assert_eq!((status, len), (ok(), 16385));
            let mut seen = h.guest(DATA, 1536);
            seen.extend(h.guest(DATA + 0x2000, 14848));
            let expected: Vec<u8> = (2048..18432u64)
                .map(|guest| {
                    let block = guest / 4096;
                    if block % 4 == 3 {
                        0
                    } else {
                        pattern(IMAGE_BYTES - (block + 1) * 4096 + guest % 4096)
                    }
                })
                .collect();
            assert_eq!(seen, expected);

            write_header(&h.ram(), HDR, VIRTIO_BLK_T_OUT, 7);
            h.fill(DATA, 1024, 0x42);
            let (status, _) = h.serve(
                &[readable(HDR, 16), readable(DATA, 1024), writable(STATUS, 1)],
                STATUS,
            );
            assert_eq!(status, ok());
            // Guest bytes 3584..4608: the end of block 0, the start of block 1.
            assert_eq!(h.disk(IMAGE_BYTES - 512, 512), vec![0x42; 512]);
            assert_eq!(h.disk(IMAGE_BYTES - 8192, 512), vec![0x42; 512]);
        });
    }

    /// A format that points into a file the engine does not have.
    #[derive(Debug)]
    struct Broken(Arc<dyn ImageFormat>);

    impl ImageFormat for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        fn capacity_sectors(&self) -> u64 {
            self.0.capacity_sectors()
        }
        fn files(&self) -> &[HostFile] {
            self.0.files()
        }
        fn map(
            &self,
            _access: Access,
            offset: u64,
            len_bytes: u64,
            extents: &mut Vec<Extent>,
        ) -> Result<(), ImageError> {
            extents.push(Extent::Data {
                file: 5,
                offset,
                len_bytes,
            });
            Ok(())
        }
        fn discard_granularity_bytes(&self) -> u64 {
            4096
        }
    }

    #[test]
    fn host_io_errors_are_ioerr() {
        each_engine(|engine| {
            let broken: Wrap = |raw| Arc::new(Broken(raw));
            let mut h = Harness::with(
                engine,
                &std::env::temp_dir(),
                OpenOptions::default(),
                Some(broken),
            );
            read_request(&h, 0);
            let (status, len) = h.serve(
                &[readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)],
                STATUS,
            );
            assert_eq!((status, len), (STATUS_IOERR, 1));
            assert_eq!(h.counter(|c| &c.io_errors), 1);
            assert_eq!(h.counter(|c| &c.bytes_read), 0);
        });
    }

    /// Transfers at most 512 bytes of the first `short` reads and writes.
    struct ShortEngine {
        inner: SyncEngine,
        short: usize,
    }

    impl Engine for ShortEngine {
        fn name(&self) -> &'static str {
            "short"
        }
        unsafe fn push(&mut self, op: EngineOp<'_>, tag: u64) -> Result<(), EngineError> {
            let cut = |iovecs: &[IoVec]| {
                let mut left = 512;
                let mut cut = Vec::new();
                for iov in iovecs {
                    let take = iov.len_bytes().min(left);
                    if take == 0 {
                        break;
                    }
                    cut.push(IoVec::new(iov.base(), take));
                    left -= take;
                }
                cut
            };
            let short = self.short > 0;
            self.short = self.short.saturating_sub(1);
            // SAFETY: forwarded from our caller; the sync engine is done with
            // `cut` before push returns.
            unsafe {
                match op {
                    EngineOp::Readv {
                        file,
                        offset,
                        iovecs,
                    } if short => self.inner.push(
                        EngineOp::Readv {
                            file,
                            offset,
                            iovecs: &cut(iovecs),
                        },
                        tag,
                    ),
                    EngineOp::Writev {
                        file,
                        offset,
                        iovecs,
                    } if short => self.inner.push(
                        EngineOp::Writev {
                            file,
                            offset,
                            iovecs: &cut(iovecs),
                        },
                        tag,
                    ),
                    op => self.inner.push(op, tag),
                }
            }
        }
        fn submit(&mut self) -> Result<(), EngineError> {
            self.inner.submit()
        }
        fn reap(&mut self, out: &mut Vec<Completion>) {
            self.inner.reap(out)
        }
        fn wait(&mut self) -> Result<(), EngineError> {
            self.inner.wait()
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
        fn clear_completion_fd(&self) {}
    }

    #[test]
    fn short_transfers_go_on_where_they_stopped() {
        let mut h = Harness::new(EngineKind::Sync);
        let image = Arc::clone(&h.worker.image);
        h.worker.engine = Box::new(ShortEngine {
            inner: SyncEngine::new(&engine_files(&*image)).unwrap(),
            short: 4,
        });
        read_request(&h, 2);
        let (status, len) = h.serve(
            &[
                readable(HDR, 16),
                writable(DATA, 700),
                writable(DATA + 0x1000, 836),
                writable(STATUS, 1),
            ],
            STATUS,
        );
        assert_eq!((status, len), (ok(), 1537));
        let mut seen = h.guest(DATA, 700);
        seen.extend(h.guest(DATA + 0x1000, 836));
        assert_eq!(seen, h.disk(1024, 1536));

        write_header(&h.ram(), HDR, VIRTIO_BLK_T_OUT, 100);
        h.fill(DATA, 2048, 0x99);
        let (status, _) = h.serve(
            &[readable(HDR, 16), readable(DATA, 2048), writable(STATUS, 1)],
            STATUS,
        );
        assert_eq!(status, ok());
        assert_eq!(h.disk(100 * 512, 2048), vec![0x99; 2048]);
    }

    #[test]
    fn direct_requests_that_o_direct_cannot_take_use_the_page_cache() {
        let direct = OpenOptions {
            direct: true,
            ..OpenOptions::default()
        };
        each_engine(|engine| {
            let mut h = Harness::with(engine, &std::env::temp_dir(), direct, None);
            // Page-aligned buffer and offset: O_DIRECT.
            read_request(&h, 8);
            let (status, _) = h.serve(
                &[readable(HDR, 16), writable(DATA, 4096), writable(STATUS, 1)],
                STATUS,
            );
            assert_eq!(status, ok());
            assert_eq!(h.guest(DATA, 4096), h.disk(4096, 4096));
            assert_eq!(h.counter(|c| &c.direct_fallbacks), 0);
            // A buffer at an odd address: through the page cache.
            write_header(&h.ram(), HDR, VIRTIO_BLK_T_OUT, 8);
            h.fill(DATA + 1, 512, 0x3c);
            let (status, _) = h.serve(
                &[
                    readable(HDR, 16),
                    readable(DATA + 1, 512),
                    writable(STATUS, 1),
                ],
                STATUS,
            );
            assert_eq!(status, ok());
            assert_eq!(h.counter(|c| &c.direct_fallbacks), 1);
            // And O_DIRECT reads see what went through the page cache.
            read_request(&h, 8);
            let (status, _) = h.serve(
                &[
                    readable(HDR, 16),
                    writable(DATA + 0x4000, 4096),
                    writable(STATUS, 1),
                ],
                STATUS,
            );
            assert_eq!(status, ok());
            assert_eq!(h.guest(DATA + 0x4000, 512), vec![0x3c; 512]);
        });
    }

    #[test]
    fn log_limiter_counts_what_it_suppresses() {
        let mut limiter = LogLimiter::default();
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        limiter.quiet_until = Some(Instant::now());
        assert_eq!(limiter.allow(), Some(2));
    }
}
