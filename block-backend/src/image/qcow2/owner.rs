//! The owner thread of a qcow2 image: the only thread that touches
//! qcow2-rs's state.
//!
//! qcow2-rs's `Qcow2Dev` is not Send (its futures hold `Rc`s and its caches
//! are shared through non-atomic cells), so one thread per image owns it,
//! and the queue workers send it requests ([`super::engine`]). Why one owner
//! rather than a metadata owner plus per-queue data paths: a queue that
//! wrote through a mapping it had cached could race with a discard freeing
//! that cluster and an allocation reusing it, and write one guest block's
//! data into another's cluster. With one owner, qcow2-rs's own locks order
//! every mapping change against every I/O, and the data still goes zero copy
//! between guest memory and the file through the owner's io_uring.
//!
//! The thread runs a single-threaded executor (`futures::LocalPool`): one
//! task per request, each awaiting qcow2-rs, whose I/O completes on the
//! owner's ring ([`super::io`]). A request that allocates (metadata reads,
//! refcount updates) only suspends its own task: other requests go on.
//!
//! Defects of qcow2-rs handled here:
//! - **No discard or write-zeroes with unmap.** A DISCARD of whole clusters
//!   is a barrier: the owner waits for the requests in flight, has qcow2-rs
//!   write its dirty tables, drops it (and its caches), rewrites the L2
//!   entries and refcounts itself in a crash-safe order
//!   ([`super::meta::unmap`]), and opens the image again.
//! - **Unvalidated table entries.** The image was scanned at open
//!   ([`super::meta::scan`]); a request touching a cluster whose entry
//!   failed validation never reaches qcow2-rs: it gets IOERR and the image
//!   is marked corrupt, so no write can follow a bad entry onto metadata.
//!   An entry pointing past the end of the file would map whatever the
//!   image allocates there once the file has grown: with such entries the
//!   image is marked corrupt at open. The rest of the image is still
//!   served: qcow2-rs, which refuses the corrupt bit, does not see it when
//!   a discard opens the image again, and keeps it in the headers it
//!   writes ([`super::io`]).
//! - **Copy on write of data clusters.** qcow2-rs writes part of a data
//!   cluster whose L2 entry lacks the COPIED flag (shared, or to be copied
//!   on write) into a new cluster without copying the rest: the scan
//!   poisons such entries, as bad ones.
//! - **An empty backing file name.** A header whose backing file offset
//!   is set with a name length of 0 has no backing file (QEMU, our parser);
//!   qcow2-rs would see one named "" and fail every write to an
//!   unallocated cluster: it is given the header without the offset.
//! - **Backing files smaller than the image above.** qcow2-rs leaves the
//!   part of a read past the end of a backing file unfilled, and reads a
//!   range that straddles its end wrongly: such reads go through a buffer
//!   of zeroes, in pieces split where backing files end. Its copy on write
//!   of a cluster that reaches past a backing file's end reads it that way
//!   too (and writes uninitialised memory): partial writes to such
//!   clusters run alone and write them whole, read correctly and merged.
//! - **Short compressed streams.** qcow2-rs accepts a compressed cluster
//!   that inflates to less than a cluster and leaves the rest of the buffer
//!   as it was: reads of clusters compressed at open go through a buffer of
//!   zeroes, and partial writes to them write them whole, as above.
//! - **Reads that stop early.** A read spanning clusters ends at the first
//!   cluster qcow2-rs cannot read (corrupt compressed data) and reports
//!   success with a short count: a read is answered OK only when all of it
//!   was read.
//! - **Panics.** Each task is polled under `catch_unwind`. A task that
//!   panics gets IOERR, and from then on every request does: qcow2-rs's
//!   locks and caches can no longer be trusted. Its I/O may still be in
//!   flight: metadata buffers belong to the ring's slots, not to the task
//!   ([`super::io`]), and no completion is answered until the ring is
//!   empty, so that guest buffers stay mapped.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use qcow2_rs::dev::{Qcow2Dev, Qcow2DevParams};
use qcow2_rs::error::Qcow2Result;
use qcow2_rs::meta::{MappingSource, Qcow2Header};
use tracing::{error, info, warn};

use super::engine::{Inbox, Mailbox, Request, VirtualOp};
use super::io::{ImageCounters, IoCore, RingIo};
use super::meta::{self, BadClusters, CompressedClusters, Qcow2Layout, UnmapMode};
use crate::engine::{best_engine, Completion, IoVec};
use crate::image::ImageError;

type Dev = Qcow2Dev<RingIo>;

/// io_uring entries of the owner's ring.
const RING_ENTRIES: u32 = 256;
/// Sector size qcow2-rs works in (its `bs_bits`).
const BLOCK_BITS: u8 = 9;
const BLOCK_BYTES: usize = 1 << BLOCK_BITS;
/// Zeroes are written in pieces of at most this size.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// The largest qcow2 header qcow2-rs parses (header plus extensions).
const HEADER_READ_BYTES: usize = 64 << 10;

/// One image of the chain: the top image first, then its backing files.
pub struct ChainImage {
    pub path: PathBuf,
    pub file: File,
    pub layout: Qcow2Layout,
}

/// What the owner thread is started with.
pub struct OwnerConfig {
    pub chain: Vec<ChainImage>,
    pub bad: BadClusters,
    /// Bad entries of the top image pointing past the end of its file
    /// ([`meta::ScanReport::bad_past_end`]).
    pub bad_past_end: u64,
    /// The top image's compressed clusters, as scanned at open.
    pub compressed: CompressedClusters,
    pub readonly: bool,
    pub counters: Arc<ImageCounters>,
}

/// The handle the image keeps: dropping it stops the thread, after it has
/// answered what was queued and written its metadata.
pub struct Owner {
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner").finish_non_exhaustive()
    }
}

impl Owner {
    /// Starts the thread and opens the image in it; returns once it is open.
    pub fn start(config: OwnerConfig) -> Result<Owner, ImageError> {
        let path = config.chain[0].path.clone();
        let inbox = Arc::new(Inbox::new().map_err(|source| ImageError::Open {
            path: path.clone(),
            source,
        })?);
        let stop = Arc::new(AtomicBool::new(false));
        let (opened_tx, opened_rx) = mpsc::channel();
        let thread = {
            let inbox = Arc::clone(&inbox);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("qcow2-owner".into())
                .spawn(move || run(config, inbox, stop, opened_tx))
                .map_err(|source| ImageError::Open {
                    path: path.clone(),
                    source,
                })?
        };
        match opened_rx.recv() {
            Ok(Ok(())) => Ok(Owner {
                inbox,
                stop,
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(message)) => {
                let _ = thread.join();
                Err(ImageError::Qcow2 { path, message })
            }
            Err(_) => {
                let _ = thread.join();
                Err(ImageError::Qcow2 {
                    path,
                    message: "the qcow2 owner thread died while opening the image".into(),
                })
            }
        }
    }

    pub fn inbox(&self) -> Arc<Inbox> {
        Arc::clone(&self.inbox)
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.inbox.event.write(1);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Drives `fut` to completion on this thread, waiting on the ring when it
/// is pending (opening and closing, when no other request runs).
fn drive<F: Future>(core: &IoCore, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(value) = fut.as_mut().poll(&mut cx) {
            return value;
        }
        if let Err(err) = core.wait() {
            error!("qcow2: cannot wait for I/O: {err}");
        }
        core.dispatch();
    }
}

/// Builds the qcow2-rs device for the chain (without loading its tables).
fn build_dev(core: &Rc<IoCore>, chain: &[ChainImage], readonly: bool) -> Result<Dev, String> {
    let mut below: Option<Dev> = None;
    for (slot, image) in chain.iter().enumerate().rev() {
        let is_backing = slot > 0;
        // Zeroes past the end of a shorter file, as qcow2-rs's own opening
        // reads its header.
        let mut buf = vec![0u8; HEADER_READ_BYTES];
        read_prefix(&image.file, &mut buf)
            .map_err(|err| format!("{}: cannot read the header: {err}", image.path.display()))?;
        meta::clear_empty_backing(&mut buf);
        if !is_backing && core.corrupt_marked() {
            // Opening again after a discard: the corrupt bit is ours (set on
            // a bad entry, which stays refused), and qcow2-rs refuses it.
            meta::set_corrupt_bit(&mut buf, 0, false);
        }
        // Our own parser validated this header (meta::read_layout): qcow2-rs
        // only sees headers it can parse without panicking.
        let header = Qcow2Header::from_buf(&buf)
            .map_err(|err| format!("{}: {err:?}", image.path.display()))?;
        let params = if is_backing {
            // Read only: evicting its (never dirty) cache entries is safe.
            Qcow2DevParams::new(BLOCK_BITS, None, None, true, false)
        } else {
            let (rb_cache, l2_cache) = cache_sizes(&image.layout);
            Qcow2DevParams::new(BLOCK_BITS, Some(rb_cache), Some(l2_cache), readonly, false)
        };
        if is_backing {
            params.mark_backing_dev(Some(true));
        }
        let io = RingIo::new(Rc::clone(core), (2 * slot) as u32);
        let mut dev = Dev::new(&image.path, header, &params, io)
            .map_err(|err| format!("{}: {err:?}", image.path.display()))?;
        if let Some(backing) = below.take() {
            dev.set_backing_dev(Box::new(backing));
        }
        below = Some(dev);
    }
    below.ok_or_else(|| "empty image chain".to_string())
}

/// qcow2-rs's cache sizes, as (slice bits, bytes) for refcount blocks and
/// for L2 tables: large enough that nothing is ever evicted.
///
/// qcow2-rs defect handled here: an evicted dirty slice is written while
/// another task may still hold it and change it (the change is then lost
/// with the slice), and after refcount blocks that are not synced. Without
/// eviction, tables are only written by FLUSH, which runs alone. Memory
/// grows with the tables the guest touches: 8 bytes per guest cluster for
/// L2, 2 per host cluster for refcounts (128 MiB + 32 MiB for a fully
/// written 1 TiB disk of 64 KiB clusters).
fn cache_sizes(layout: &Qcow2Layout) -> ((u8, usize), (u8, usize)) {
    let slice_bits = 12u8.min(layout.cluster_bits as u8);
    let slice = 1usize << slice_bits;
    let round = |bytes: u64| -> usize {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX / 2);
        bytes.max(2 * slice).next_multiple_of(slice)
    };
    let guest_clusters = layout.virtual_size.div_ceil(1 << layout.cluster_bits);
    let l2 = round(guest_clusters.saturating_mul(8));
    // The file holds the guest's clusters plus metadata; refcounts for
    // twice that, and for what the file already has.
    let host_clusters = (layout.file_len >> layout.cluster_bits)
        .saturating_add(guest_clusters.saturating_mul(2))
        .saturating_add(1024);
    let rb = round(host_clusters.saturating_mul(2));
    ((slice_bits, rb), (slice_bits, l2))
}

fn read_prefix(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Builds and loads the device, containing panics of qcow2-rs.
async fn open_dev(core: &Rc<IoCore>, chain: &[ChainImage], readonly: bool) -> Result<Dev, String> {
    let dev = catch_unwind(AssertUnwindSafe(|| build_dev(core, chain, readonly)))
        .map_err(|_| "qcow2-rs panicked while parsing the header".to_string())??;
    match (Contained {
        fut: Some(Box::pin(async {
            dev.qcow2_prep_io().await.map_err(|err| format!("{err:?}"))
        })),
    })
    .await
    {
        Some(Ok(())) => Ok(dev),
        Some(Err(err)) => Err(format!("cannot load the L1 and refcount tables: {err}")),
        None => Err("qcow2-rs panicked while loading the tables".into()),
    }
}

/// Polls the future under `catch_unwind`; the result of a future that
/// panics is `None`. What unwinding did not drop of it is leaked, not
/// dropped: qcow2-rs's lock guards in it must not be released into a state
/// that the panic left half changed. (Buffers the kernel may still use are
/// never the future's own: see `io.rs`.)
struct Contained<'a, T> {
    fut: Option<Pin<Box<dyn Future<Output = T> + 'a>>>,
}

impl<T> Future for Contained<'_, T> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let Some(fut) = self.fut.as_mut() else {
            return Poll::Ready(None);
        };
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(value)) => {
                self.fut = None;
                Poll::Ready(Some(value))
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => {
                std::mem::forget(self.fut.take());
                Poll::Ready(None)
            }
        }
    }
}

/// The owner thread's state, shared by its tasks.
struct State {
    core: Rc<IoCore>,
    chain: Vec<ChainImage>,
    bad: BadClusters,
    readonly: bool,
    dev: RefCell<Option<Rc<Dev>>>,
    cluster_bits: u32,
    /// A panic, or the image could not be opened again after a discard:
    /// every request fails.
    failed: Cell<bool>,
    /// Writing metadata failed (a full disk): FLUSH fails from now on, and
    /// writes are served only where no allocation is needed.
    metadata_failed: Cell<bool>,
    /// A request touched a bad entry (logged once).
    bad_logged: Cell<bool>,
    /// Guest offsets where a backing file of the chain ends, below the end
    /// of the top image (sorted, whole sectors).
    backing_ends: Vec<u64>,
    /// The first cluster of the top image that reaches past the end of a
    /// backing file: qcow2-rs copies those wrongly on write.
    copy_unsafe_from: Option<u64>,
    /// Compressed at open (later writes and discards may have replaced
    /// some): read into zeroed buffers, copied whole on partial writes.
    compressed: CompressedClusters,
    /// Tasks started and not finished.
    running: Cell<usize>,
    /// A barrier task runs: nothing else starts.
    barrier: Cell<bool>,
    finished: RefCell<Vec<(Arc<Mailbox>, Completion)>>,
}

fn run(
    config: OwnerConfig,
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
    opened: mpsc::Sender<Result<(), String>>,
) {
    block_signals();
    let OwnerConfig {
        chain,
        bad,
        bad_past_end,
        compressed,
        readonly,
        counters,
    } = config;
    let fds: Vec<_> = chain
        .iter()
        .flat_map(|image| [image.file.as_fd(), image.file.as_fd()])
        .collect();
    let engine = match best_engine(&fds, RING_ENTRIES) {
        Ok((engine, why_not)) => {
            if let Some(err) = why_not {
                warn!("qcow2: io_uring is not available ({err}); serving with blocking syscalls");
            }
            engine
        }
        Err(err) => {
            let _ = opened.send(Err(format!("cannot set up the I/O engine: {err}")));
            return;
        }
    };
    drop(fds);
    let core = IoCore::new(engine, counters);
    let dev = match drive(&core, open_dev(&core, &chain, readonly)) {
        Ok(dev) => dev,
        Err(message) => {
            let _ = opened.send(Err(message));
            return;
        }
    };
    if bad_past_end > 0 && !readonly {
        // Once the file grows over where they point, these entries would
        // map the clusters allocated there: after a restart, a read of their
        // guest clusters would return another cluster's data, and a write
        // would overwrite it (or a table). The corrupt bit keeps the image
        // from being opened again before a repair.
        error!(
            "{}: {bad_past_end} table entries point past the end of the file;              marking the image corrupt (the rest of it is served)",
            chain[0].path.display()
        );
        core.set_corrupt_marked();
        if let Err(err) = meta::mark_corrupt(&chain[0].file) {
            error!("cannot set the corrupt bit: {err}");
        }
    }
    let cluster_bits = chain[0].layout.cluster_bits;
    let top_bytes = chain[0].layout.virtual_size;
    let mut backing_ends: Vec<u64> = chain[1..]
        .iter()
        .map(|image| image.layout.virtual_size / BLOCK_BYTES as u64 * BLOCK_BYTES as u64)
        .filter(|&end| end < top_bytes)
        .collect();
    backing_ends.sort_unstable();
    backing_ends.dedup();
    let copy_unsafe_from = backing_ends.first().map(|&end| end >> cluster_bits);
    let state = Rc::new(State {
        core: Rc::clone(&core),
        chain,
        bad,
        readonly,
        dev: RefCell::new(Some(Rc::new(dev))),
        cluster_bits,
        failed: Cell::new(false),
        metadata_failed: Cell::new(false),
        bad_logged: Cell::new(false),
        backing_ends,
        copy_unsafe_from,
        compressed,
        running: Cell::new(0),
        barrier: Cell::new(false),
        finished: RefCell::new(Vec::new()),
    });
    let _ = opened.send(Ok(()));

    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    let mut arrived = Vec::new();
    let mut waiting: VecDeque<Request> = VecDeque::new();
    let mut batch: Vec<(Arc<Mailbox>, Completion)> = Vec::new();
    loop {
        inbox.take(&mut arrived);
        waiting.extend(arrived.drain(..));
        core.dispatch();
        // Start what may start: everything up to a barrier; a barrier alone.
        while let Some(front) = waiting.front() {
            if state.barrier.get() {
                break;
            }
            let is_barrier = front.op.is_barrier() || state.rewrites_clusters(&front.op);
            if is_barrier && state.running.get() > 0 {
                break;
            }
            let request = waiting.pop_front().expect("front exists");
            state.running.set(state.running.get() + 1);
            state.barrier.set(is_barrier);
            let task_state = Rc::clone(&state);
            let spawned = spawner.spawn_local(async move {
                let Request { mailbox, tag, op } = request;
                let result = match (Contained {
                    fut: Some(Box::pin(serve(&task_state, op))),
                })
                .await
                {
                    Some(result) => result,
                    None => {
                        error!("qcow2-rs panicked serving a request; the image now fails every request");
                        task_state.failed.set(true);
                        task_state
                            .core
                            .counters()
                            .panics
                            .fetch_add(1, Ordering::Relaxed);
                        -libc::EIO
                    }
                };
                task_state
                    .finished
                    .borrow_mut()
                    .push((mailbox, Completion { tag, result }));
                task_state.running.set(task_state.running.get() - 1);
                task_state.barrier.set(false);
            });
            if spawned.is_err() {
                error!("qcow2: cannot spawn a task");
            }
        }
        pool.run_until_stalled();
        if let Err(err) = core.submit() {
            error!("qcow2: cannot submit I/O: {err}");
        }
        batch.append(&mut state.finished.borrow_mut());
        // After a panic, I/O of the unwound task may still be in flight
        // into guest buffers: answer nothing until the ring is empty, so
        // that the queues keep those buffers mapped.
        let hold_back = state.failed.get() && core.in_flight() > 0;
        if !batch.is_empty() && !hold_back {
            // Group by queue: one eventfd signal per queue and batch.
            for (mailbox, completion) in &batch {
                mailbox.post(*completion);
            }
            let mut signalled: Vec<*const Mailbox> = Vec::new();
            for (mailbox, _) in &batch {
                let key = Arc::as_ptr(mailbox);
                if !signalled.contains(&key) {
                    signalled.push(key);
                    mailbox.deliver();
                }
            }
            batch.clear();
            // A barrier finished, or work may be waiting: go round again
            // before sleeping.
            if !waiting.is_empty() {
                continue;
            }
        }
        if stop.load(Ordering::Acquire) && waiting.is_empty() && state.running.get() == 0 {
            break;
        }
        if core.completion_fd().is_none() && core.in_flight() > 0 {
            // The synchronous engine: its completions are ready already.
            continue;
        }
        wait_for_events(inbox.event.as_raw_fd(), core.completion_fd());
    }
    close(&state);
}

/// The owner thread is started before the daemon blocks SIGTERM, SIGINT and
/// SIGUSR1 (to read them from a signalfd): it blocks every signal itself,
/// so that none is delivered to it (whose default action would end the
/// process without writing the metadata).
fn block_signals() {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises the set it is given; pthread_sigmask
    // reads the initialised set and does not ask for the old mask.
    let ret = unsafe {
        libc::sigfillset(set.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut())
    };
    if ret != 0 {
        warn!(
            "qcow2: cannot block signals in the owner thread: {}",
            std::io::Error::from_raw_os_error(ret)
        );
    }
}

/// Sleeps until a request arrives or the ring completes something.
fn wait_for_events(inbox: std::os::fd::RawFd, ring: Option<std::os::fd::RawFd>) {
    let mut fds = [
        libc::pollfd {
            fd: inbox,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: ring.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds for the duration of the call (a negative fd
    // is ignored by poll).
    let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if ret < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            error!("qcow2: poll failed: {err}");
        }
    }
}

/// The backend is going away: write the metadata qcow2-rs holds.
fn close(state: &Rc<State>) {
    if state.readonly || state.failed.get() || state.metadata_failed.get() {
        return;
    }
    let Some(dev) = state.dev.borrow_mut().take() else {
        return;
    };
    let flushed = drive(&state.core, async {
        (Contained {
            fut: Some(Box::pin(async {
                dev.flush_meta().await?;
                dev.fsync_range(0, usize::MAX).await
            })),
        })
        .await
    });
    match flushed {
        Some(Ok(())) => info!("qcow2: metadata written"),
        Some(Err(err)) => error!("qcow2: cannot write the metadata at exit: {err:?}"),
        None => error!("qcow2-rs panicked writing the metadata at exit"),
    }
}

async fn serve(state: &Rc<State>, op: VirtualOp) -> i32 {
    if state.failed.get() {
        return -libc::EIO;
    }
    match op {
        VirtualOp::Nop => 0,
        VirtualOp::Read { offset, iovecs } => state.read(offset, &iovecs).await,
        VirtualOp::Write { offset, iovecs } => state.write(offset, &iovecs).await,
        // Boxed: rare, and their futures (reopening the image) are large;
        // unboxed they would size every read and write task.
        VirtualOp::Flush => Box::pin(state.flush()).await,
        VirtualOp::Zero {
            offset,
            len_bytes,
            unmap,
        } => Box::pin(state.zero(offset, len_bytes, unmap)).await,
    }
}

/// A read of `want` bytes by qcow2-rs, which answers a read spanning
/// clusters with the bytes before the first cluster it could not read (a
/// corrupt compressed cluster) instead of an error; the rest of the buffer
/// is left as it was, and must not reach the guest as data.
fn read_whole(read: Qcow2Result<usize>, want: usize) -> Qcow2Result<()> {
    match read? {
        n if n == want => Ok(()),
        n => Err(std::io::Error::other(format!("qcow2-rs read {n} of {want} bytes")).into()),
    }
}

fn total_len(iovecs: &[IoVec]) -> u64 {
    iovecs.iter().map(|iov| iov.len_bytes() as u64).sum()
}

impl State {
    fn dev(&self) -> Option<Rc<Dev>> {
        self.dev.borrow().clone()
    }

    fn cluster_bytes(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// IOERR for requests touching an entry that failed validation; the
    /// first one marks the image corrupt on disk.
    fn touches_bad_entry(&self, offset: u64, len_bytes: u64) -> bool {
        if self.bad.is_empty() || len_bytes == 0 {
            return false;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len_bytes - 1) >> self.cluster_bits;
        if !self.bad.any_in(first, last - first + 1) {
            return false;
        }
        self.core
            .counters()
            .corrupt_entry_requests
            .fetch_add(1, Ordering::Relaxed);
        if !self.bad_logged.get() {
            self.bad_logged.set(true);
            let what = (first..=last)
                .find_map(|c| self.bad.describe(c))
                .unwrap_or_default();
            error!(
                "{}: bytes {offset}..+{len_bytes} use a corrupt table entry ({what}); \
                 refusing them and marking the image corrupt",
                self.chain[0].path.display()
            );
        }
        if !self.readonly && !self.core.corrupt_marked() {
            self.core.set_corrupt_marked();
            if let Err(err) = meta::mark_corrupt(&self.chain[0].file) {
                error!("cannot set the corrupt bit: {err}");
            }
        }
        true
    }

    async fn read(&self, offset: u64, iovecs: &[IoVec]) -> i32 {
        let len = total_len(iovecs);
        if self.touches_bad_entry(offset, len) {
            return -libc::EIO;
        }
        let Some(dev) = self.dev() else {
            return -libc::EIO;
        };
        let result = if self.backing_ends.iter().any(|&end| end < offset + len)
            || self.touches_compressed(offset, len)
        {
            self.read_through_zeroes(&dev, offset, len, iovecs).await
        } else if iovecs.iter().all(|iov| iov.len_bytes() % BLOCK_BYTES == 0) {
            let mut reads = Vec::with_capacity(iovecs.len());
            let mut at = offset;
            for iov in iovecs {
                // SAFETY: the iovec points into guest memory that the queue
                // worker keeps mapped until this request completes. qcow2-rs
                // hands the slice to the kernel (allocated clusters) or fills
                // it (zero, backing and compressed clusters); the guest may
                // touch the same bytes meanwhile, as it may with any device.
                let buf = unsafe { std::slice::from_raw_parts_mut(iov.base(), iov.len_bytes()) };
                let (ptr, len) = (buf.as_ptr(), buf.len());
                reads.push(self.core.with_data(ptr, len, false, dev.read_at(buf, at)));
                at += iov.len_bytes() as u64;
            }
            futures::future::join_all(reads)
                .await
                .into_iter()
                .zip(iovecs)
                .try_for_each(|(read, iov)| read_whole(read, iov.len_bytes()))
        } else {
            // Buffers that are not whole sectors: through a bounce buffer.
            let mut bounce = vec![0u8; len as usize];
            let (ptr, len) = (bounce.as_ptr(), bounce.len());
            let result = self
                .core
                .with_data(ptr, len, true, dev.read_at(&mut bounce, offset))
                .await;
            let result = read_whole(result, len);
            if result.is_ok() {
                let mut done = 0;
                for iov in iovecs {
                    // SAFETY: as above.
                    let buf =
                        unsafe { std::slice::from_raw_parts_mut(iov.base(), iov.len_bytes()) };
                    buf.copy_from_slice(&bounce[done..done + iov.len_bytes()]);
                    done += iov.len_bytes();
                }
            }
            result
        };
        match result {
            Ok(()) => len as i32,
            Err(err) => {
                warn!("qcow2: read at {offset:#x} failed: {err:?}");
                -libc::EIO
            }
        }
    }

    /// A read reaching past the end of a backing file (one smaller than
    /// the image above it), or into compressed clusters (qcow2-rs leaves
    /// what a short compressed stream does not fill as it was), through a
    /// bounce buffer of zeroes ([`Self::read_split`]).
    async fn read_through_zeroes(
        &self,
        dev: &Dev,
        offset: u64,
        len: u64,
        iovecs: &[IoVec],
    ) -> Qcow2Result<()> {
        let mut bounce = vec![0u8; len as usize];
        self.read_split(dev, offset, &mut bounce).await?;
        let mut done = 0;
        for iov in iovecs {
            // SAFETY: as in `read`.
            let buf = unsafe { std::slice::from_raw_parts_mut(iov.base(), iov.len_bytes()) };
            buf.copy_from_slice(&bounce[done..done + iov.len_bytes()]);
            done += iov.len_bytes();
        }
        Ok(())
    }

    /// Reads into `buf`, which holds zeroes, at `offset`. qcow2-rs answers
    /// the part of a backing file's read past its end without filling it,
    /// and reads one that straddles its end wrongly: the read goes in
    /// pieces that end where a backing file does, and what is past the end
    /// of every backing file keeps its zeroes.
    async fn read_split(&self, dev: &Dev, offset: u64, buf: &mut [u8]) -> Qcow2Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let piece_end = self
                .backing_ends
                .iter()
                .copied()
                .find(|&e| e > at && e < end)
                .unwrap_or(end);
            let piece = &mut buf[(at - offset) as usize..(piece_end - offset) as usize];
            let (ptr, n) = (piece.as_ptr(), piece.len());
            let read = self
                .core
                .with_data(ptr, n, true, dev.read_at(piece, at))
                .await;
            read_whole(read, n)?;
            at = piece_end;
        }
        Ok(())
    }

    /// Whether `len` bytes at `offset` touch a cluster that was compressed
    /// at open.
    fn touches_compressed(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        self.compressed.any_in(first, last - first + 1)
    }

    /// Whether a write of `len` bytes at `offset` must go through
    /// [`Self::write_whole_clusters`]: it writes part of a cluster that
    /// reaches past the end of a backing file, or of a compressed one.
    fn needs_whole_clusters(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let cluster = self.cluster_bytes();
        let end = offset + len;
        let disk_end = self.chain[0].layout.virtual_size;
        let partial = offset % cluster != 0 || (end % cluster != 0 && end < disk_end);
        let past_backing_end = self
            .copy_unsafe_from
            .is_some_and(|first| (end - 1) >> self.cluster_bits >= first);
        partial && (past_backing_end || self.touches_compressed(offset, len))
    }

    /// Whether `op` rewrites whole clusters: it runs alone.
    fn rewrites_clusters(&self, op: &VirtualOp) -> bool {
        match op {
            VirtualOp::Write { offset, iovecs } => {
                self.needs_whole_clusters(*offset, total_len(iovecs))
            }
            VirtualOp::Zero {
                offset, len_bytes, ..
            } => self.needs_whole_clusters(*offset, *len_bytes),
            _ => false,
        }
    }

    /// Writes `data` at `offset`, part of clusters that reach past the end
    /// of a backing file or are compressed. Before a partial write, qcow2-rs
    /// copies such a cluster into a buffer of uninitialised memory, with a
    /// backing file read straddling or past its end, or with a compressed
    /// stream that may be short, which leave part of it unfilled. So the
    /// whole clusters are read here ([`Self::read_split`]), merged with
    /// `data` and written whole: nothing qcow2-rs copies is kept. The
    /// request runs alone: no other write can fall between the read and
    /// the write.
    async fn write_whole_clusters(&self, dev: &Dev, offset: u64, data: &[u8]) -> Qcow2Result<()> {
        let cluster = self.cluster_bytes();
        let disk_end = self.chain[0].layout.virtual_size / BLOCK_BYTES as u64 * BLOCK_BYTES as u64;
        let start = offset & !(cluster - 1);
        let end = (offset + data.len() as u64)
            .next_multiple_of(cluster)
            .min(disk_end);
        let mut whole = vec![0u8; (end - start) as usize];
        self.read_split(dev, start, &mut whole).await?;
        let at = (offset - start) as usize;
        whole[at..at + data.len()].copy_from_slice(data);
        self.core
            .with_data(
                whole.as_ptr(),
                whole.len(),
                true,
                dev.write_at(&whole, start),
            )
            .await
    }

    /// After a metadata write failed, only writes that need no allocation
    /// are served.
    async fn all_allocated(&self, dev: &Dev, offset: u64, len: u64) -> bool {
        let cluster = self.cluster_bytes();
        let mut at = offset & !(cluster - 1);
        while at < offset + len {
            match dev.get_mapping(at).await {
                Ok(m) if m.source == MappingSource::DataFile && m.cluster_offset.is_some() => {}
                _ => return false,
            }
            at += cluster;
        }
        true
    }

    async fn write(&self, offset: u64, iovecs: &[IoVec]) -> i32 {
        let len = total_len(iovecs);
        if self.readonly || self.touches_bad_entry(offset, len) {
            return -libc::EIO;
        }
        let Some(dev) = self.dev() else {
            return -libc::EIO;
        };
        if self.metadata_failed.get() && !self.all_allocated(&dev, offset, len).await {
            return -libc::ENOSPC;
        }
        let whole_clusters = self.needs_whole_clusters(offset, len);
        let result =
            if !whole_clusters && iovecs.iter().all(|iov| iov.len_bytes() % BLOCK_BYTES == 0) {
                let mut writes = Vec::with_capacity(iovecs.len());
                let mut at = offset;
                for iov in iovecs {
                    // SAFETY: as in `read`; qcow2-rs only reads these bytes.
                    let buf = unsafe { std::slice::from_raw_parts(iov.base(), iov.len_bytes()) };
                    writes.push(self.core.with_data(
                        buf.as_ptr(),
                        buf.len(),
                        false,
                        dev.write_at(buf, at),
                    ));
                    at += iov.len_bytes() as u64;
                }
                futures::future::join_all(writes)
                    .await
                    .into_iter()
                    .collect::<Qcow2Result<Vec<()>>>()
                    .map(|_| ())
            } else {
                let mut bounce = Vec::with_capacity(len as usize);
                for iov in iovecs {
                    // SAFETY: as in `read`.
                    let buf = unsafe { std::slice::from_raw_parts(iov.base(), iov.len_bytes()) };
                    bounce.extend_from_slice(buf);
                }
                if whole_clusters {
                    self.write_whole_clusters(&dev, offset, &bounce).await
                } else {
                    self.core
                        .with_data(
                            bounce.as_ptr(),
                            bounce.len(),
                            true,
                            dev.write_at(&bounce, offset),
                        )
                        .await
                }
            };
        match result {
            Ok(()) => len as i32,
            Err(err) => {
                warn!("qcow2: write at {offset:#x} failed: {err:?}");
                -libc::EIO
            }
        }
    }

    /// FLUSH: qcow2-rs writes refcounts, syncs, then L2 and L1 tables (a
    /// table never points at a cluster whose refcount is not durable); then
    /// the file is synced, which makes the data and the last tables durable.
    async fn flush(&self) -> i32 {
        if self.readonly {
            return 0;
        }
        if self.metadata_failed.get() {
            return -libc::EIO;
        }
        let Some(dev) = self.dev() else {
            return -libc::EIO;
        };
        if let Err(err) = dev.flush_meta().await {
            error!("qcow2: cannot write metadata: {err:?}; FLUSH fails from now on");
            self.metadata_failed.set(true);
            return -libc::EIO;
        }
        if let Err(err) = dev.fsync_range(0, usize::MAX).await {
            // After a failed fsync the page cache may have dropped the
            // data: nothing written since can be promised either.
            error!("qcow2: fdatasync failed: {err:?}; FLUSH fails from now on");
            self.metadata_failed.set(true);
            return -libc::EIO;
        }
        0
    }

    async fn write_zeroes(&self, dev: &Dev, offset: u64, len: u64) -> Qcow2Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK_BYTES.min(len as usize)];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64);
            let chunk = &zeroes[..n as usize];
            if self.needs_whole_clusters(at, n) {
                self.write_whole_clusters(dev, at, chunk).await?;
            } else {
                self.core
                    .with_data(chunk.as_ptr(), chunk.len(), true, dev.write_at(chunk, at))
                    .await?;
            }
            at += n;
        }
        Ok(())
    }

    async fn zero(&self, offset: u64, len: u64, unmap: bool) -> i32 {
        if self.readonly || self.touches_bad_entry(offset, len) {
            return -libc::EIO;
        }
        let cluster = self.cluster_bytes();
        let end = offset + len;
        let first_whole = offset.div_ceil(cluster);
        let end_whole = end / cluster;
        let mut to_write: Vec<(u64, u64)> = Vec::new();
        if !unmap || first_whole >= end_whole {
            to_write.push((offset, len));
        } else {
            if offset < first_whole * cluster {
                to_write.push((offset, first_whole * cluster - offset));
            }
            match self.unmap(first_whole, end_whole - first_whole).await {
                Ok(unhandled) => to_write.extend(
                    unhandled
                        .into_iter()
                        .map(|(c, n)| (c * cluster, n * cluster)),
                ),
                Err(errno) => return errno,
            }
            if end_whole * cluster < end {
                to_write.push((end_whole * cluster, end - end_whole * cluster));
            }
        }
        let Some(dev) = self.dev() else {
            return -libc::EIO;
        };
        for (at, n) in to_write {
            if self.metadata_failed.get() && !self.all_allocated(&dev, at, n).await {
                return -libc::ENOSPC;
            }
            if let Err(err) = self.write_zeroes(&dev, at, n).await {
                warn!("qcow2: writing zeroes at {at:#x} failed: {err:?}");
                return -libc::EIO;
            }
        }
        0
    }

    /// Frees whole clusters (the barrier described in the module
    /// documentation). Returns the runs that must be zeroed by writing.
    async fn unmap(&self, first: u64, count: u64) -> Result<Vec<(u64, u64)>, i32> {
        if self.metadata_failed.get() {
            return Ok(vec![(first, count)]);
        }
        let Some(dev) = self.dev.borrow_mut().take() else {
            return Err(-libc::EIO);
        };
        if let Err(err) = dev.flush_meta().await {
            error!("qcow2: cannot write metadata before a discard: {err:?}");
            self.metadata_failed.set(true);
            *self.dev.borrow_mut() = Some(dev);
            return Ok(vec![(first, count)]);
        }
        // Nothing else runs during a barrier, so this is the last reference.
        drop(dev);
        let image = &self.chain[0];
        let outcome = meta::unmap(&image.file, &image.layout, first, count, UnmapMode::Discard);
        let reopened = open_dev(&self.core, &self.chain, self.readonly).await;
        match reopened {
            Ok(dev) => *self.dev.borrow_mut() = Some(Rc::new(dev)),
            Err(message) => {
                error!(
                    "{}: cannot open the image again after a discard: {message}; \
                     every request fails from now on",
                    image.path.display()
                );
                self.failed.set(true);
                return Err(-libc::EIO);
            }
        }
        match outcome {
            Ok(outcome) => {
                self.core
                    .counters()
                    .clusters_freed
                    .fetch_add(outcome.freed_clusters, Ordering::Relaxed);
                Ok(outcome.unhandled)
            }
            Err(err) => {
                error!("{}: discard failed: {err}", image.path.display());
                Err(-libc::EIO)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_future_is_contained() {
        let mut contained = Contained::<u32> {
            fut: Some(Box::pin(async {
                panic!("a qcow2-rs bug");
            })),
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let polled = catch_unwind(AssertUnwindSafe(|| Pin::new(&mut contained).poll(&mut cx)));
        assert!(matches!(polled, Ok(Poll::Ready(None))), "no panic escapes");
        // Polled again (a stray wakeup): still None, the future is gone.
        assert_eq!(Pin::new(&mut contained).poll(&mut cx), Poll::Ready(None));
    }

    /// One operation through a queue engine, waited for.
    fn serve_one(engine: &mut dyn crate::engine::Engine, op: crate::engine::EngineOp<'_>) -> i32 {
        // SAFETY: the callers' buffers outlive this call, which returns
        // only after the completion is reaped.
        unsafe { engine.push(op, 7) }.unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            engine.wait().unwrap();
            engine.reap(&mut done);
        }
        assert_eq!(done[0].tag, 7);
        done[0].result
    }

    fn read(engine: &mut dyn crate::engine::Engine, offset: u64, buf: &mut [u8]) -> i32 {
        let iovecs = [IoVec::new(buf.as_mut_ptr(), buf.len())];
        let op = crate::engine::EngineOp::Readv {
            file: 0,
            offset,
            iovecs: &iovecs,
        };
        serve_one(engine, op)
    }

    fn write(engine: &mut dyn crate::engine::Engine, offset: u64, buf: &mut [u8]) -> i32 {
        let iovecs = [IoVec::new(buf.as_mut_ptr(), buf.len())];
        let op = crate::engine::EngineOp::Writev {
            file: 0,
            offset,
            iovecs: &iovecs,
        };
        serve_one(engine, op)
    }

    /// Found by the qcow2_image fuzz target: after a request touched a bad
    /// L2 entry (and the corrupt bit was set), the next discard opened the
    /// image again through qcow2-rs, which refused the corrupt bit, and the
    /// whole disk failed every request from then on.
    #[test]
    fn a_discard_after_a_bad_entry_keeps_the_rest_of_the_image_served() {
        use crate::engine::{EngineOp, FallocateMode};
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, CLUSTER).unwrap();
        {
            let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x5a; 8 * CLUSTER as usize];
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        // Guest cluster 3's L2 entry gets a reserved bit.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_u64 = |at: u64| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, at).unwrap();
            u64::from_be_bytes(word)
        };
        let l2 = read_u64(read_u64(40)) & 0x00ff_ffff_ffff_fe00;
        let entry = read_u64(l2 + 3 * 8) | 2;
        file.write_all_at(&entry.to_be_bytes(), l2 + 3 * 8).unwrap();

        let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut buf = vec![0u8; CLUSTER as usize];
        assert_eq!(read(&mut *engine, 3 * CLUSTER, &mut buf), -libc::EIO);
        let discard = EngineOp::Fallocate {
            file: 0,
            offset: CLUSTER,
            len_bytes: CLUSTER,
            mode: FallocateMode::PunchHole,
        };
        assert_eq!(serve_one(&mut *engine, discard), 0, "the discard");
        assert_eq!(read(&mut *engine, 0, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0x5a), "cluster 0 kept its data");
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0), "cluster 1 was discarded");
        buf.fill(0xa5);
        assert_eq!(write(&mut *engine, 2 * CLUSTER, &mut buf), CLUSTER as i32);
        assert_eq!(read(&mut *engine, 3 * CLUSTER, &mut buf), -libc::EIO);
        let counters = image.counters().unwrap();
        drop(engine);
        drop(image);
        assert_eq!(counters.panics.load(Ordering::Relaxed), 0);
        // The bit stays for `qemu-img check -r` to see.
        let err = meta::read_layout(&file, &path).unwrap_err();
        assert!(err.to_string().contains("corrupt bit"), "{err}");
    }

    /// Found by the qcow2_image fuzz target: an L1 entry pointing past the
    /// end of the file was refused only while the file was shorter; the
    /// session's writes grew the file over its target, and the next open
    /// took the data cluster allocated there for that entry's L2 table.
    #[test]
    fn entries_past_the_end_of_the_file_mark_the_image_corrupt_at_open() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        const COPIED: u64 = 1 << 63;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        // 8 MiB: four L1 entries of 2 MiB.
        meta::create(&path, 8 << 20, CLUSTER).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, 40).unwrap();
        let l1 = u64::from_be_bytes(word);
        let len = file.metadata().unwrap().len();
        let target = len.next_multiple_of(CLUSTER) + 2 * CLUSTER;
        file.write_all_at(&(COPIED | target).to_be_bytes(), l1 + 8)
            .unwrap();
        let corrupt_bit = || {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, 79).unwrap();
            byte[0] & 2 != 0
        };

        let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        assert!(corrupt_bit(), "marked at open, before any request");
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut data = vec![0x5a; 4 * CLUSTER as usize];
        assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        let mut buf = vec![0u8; CLUSTER as usize];
        assert_eq!(read(&mut *engine, 2 << 20, &mut buf), -libc::EIO);
        let discard = crate::engine::EngineOp::Fallocate {
            file: 0,
            offset: 0,
            len_bytes: CLUSTER,
            mode: crate::engine::FallocateMode::PunchHole,
        };
        assert_eq!(serve_one(&mut *engine, discard), 0, "served after the mark");
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0x5a));
        drop(engine);
        drop(image);
        assert!(
            file.metadata().unwrap().len() > target,
            "the file grew over the entry's target"
        );
        let err = meta::read_layout(&file, &path).unwrap_err();
        assert!(err.to_string().contains("corrupt bit"), "{err}");
    }

    /// Found by the qcow2_image fuzz target: a read spanning clusters, one
    /// of which holds compressed data that does not inflate, was answered
    /// OK, with the bytes of that cluster and those after it never written.
    #[test]
    fn a_read_of_a_cluster_that_does_not_decompress_fails_whole() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, CLUSTER).unwrap();
        {
            let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x5a; 3 * CLUSTER as usize];
            // 0xff opens a deflate block of the reserved type 3.
            data[CLUSTER as usize..2 * CLUSTER as usize].fill(0xff);
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        // Guest cluster 1 becomes one compressed sector, at its own cluster.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_u64 = |at: u64| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, at).unwrap();
            u64::from_be_bytes(word)
        };
        let l2 = read_u64(read_u64(40)) & 0x00ff_ffff_ffff_fe00;
        let host = read_u64(l2 + 8) & 0x00ff_ffff_ffff_fe00;
        let compressed = 1u64 << 62 | host;
        file.write_all_at(&compressed.to_be_bytes(), l2 + 8)
            .unwrap();

        let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut buf = vec![0u8; CLUSTER as usize];
        assert_eq!(read(&mut *engine, 2 * CLUSTER, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0x5a));
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), -libc::EIO);
        let mut three = vec![0u8; 3 * CLUSTER as usize];
        assert_eq!(read(&mut *engine, 0, &mut three), -libc::EIO, "one iovec");
        // Unaligned iovecs go through the owner's bounce buffer.
        let (a, b) = three.split_at_mut(1000);
        let iovecs = [
            IoVec::new(a.as_mut_ptr(), a.len()),
            IoVec::new(b.as_mut_ptr(), b.len()),
        ];
        let op = crate::engine::EngineOp::Readv {
            file: 0,
            offset: 0,
            iovecs: &iovecs,
        };
        assert_eq!(serve_one(&mut *engine, op), -libc::EIO, "two iovecs");
    }

    /// Found by the qcow2_image fuzz target: a header with a backing file
    /// offset but a name length of 0 (no backing file, for QEMU and for
    /// read_layout) made every write to an unallocated cluster fail.
    #[test]
    fn a_backing_file_offset_without_a_name_is_no_backing_file() {
        use crate::image::{ImageFormat, OpenOptions};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, 4096).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&0x100u64.to_be_bytes(), 8).unwrap();
        let layout = meta::read_layout(&file, &path).unwrap();
        assert_eq!(layout.backing, None);

        let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut data = vec![0x5a; 6144];
        assert_eq!(write(&mut *engine, 2048, &mut data), data.len() as i32);
        let mut back = vec![0u8; 8192];
        assert_eq!(read(&mut *engine, 0, &mut back), back.len() as i32);
        assert!(back[..2048].iter().all(|&b| b == 0));
        assert!(back[2048..].iter().all(|&b| b == 0x5a));
    }

    /// Found by the qcow2_image fuzz target: a write to part of a data
    /// cluster whose L2 entry lacks the COPIED flag went to a new cluster,
    /// and the rest of the cluster read as zeroes. Such entries are
    /// poisoned by the scan: the write gets IOERR and loses nothing.
    #[test]
    fn a_data_cluster_without_the_copied_flag_is_not_written() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, CLUSTER).unwrap();
        {
            let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x5a; 2 * CLUSTER as usize];
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_u64 = |at: u64| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, at).unwrap();
            u64::from_be_bytes(word)
        };
        let l2 = read_u64(read_u64(40)) & 0x00ff_ffff_ffff_fe00;
        let entry = read_u64(l2) & !meta::entry::COPIED;
        file.write_all_at(&entry.to_be_bytes(), l2).unwrap();

        let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut part = vec![0xa5; 1024];
        assert_eq!(write(&mut *engine, 512, &mut part), -libc::EIO);
        let mut buf = vec![0u8; CLUSTER as usize];
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0x5a), "cluster 1 is served");
        drop(engine);
        drop(image);
        // Read by another implementation: cluster 0 kept all its data.
        let mut back = vec![0u8; CLUSTER as usize];
        file.read_exact_at(&mut back, entry & 0x00ff_ffff_ffff_fe00)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
    }

    /// A backing file of 1 MiB - 2 KiB (4 KiB clusters) full of 0x3c, and a
    /// 2 MiB image on it with `cluster` byte clusters.
    fn smaller_backing_file(dir: &std::path::Path, cluster: u64) -> std::path::PathBuf {
        use crate::image::{ImageFormat, OpenOptions};
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        meta::create(&base, SMALL_BASE_BYTES, 4096).unwrap();
        {
            let image = super::super::Qcow2Image::open(&base, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x3c; SMALL_BASE_BYTES as usize];
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .args(["-o", &format!("cluster_size={cluster}")])
            .args(["-b", "base.qcow2", "-F", "qcow2"])
            .arg(&top)
            .arg("2M")
            .output()
            .expect("qemu-img (qemu-utils)");
        assert!(out.status.success(), "{out:?}");
        top
    }

    const SMALL_BASE_BYTES: u64 = (1 << 20) - 2048;

    /// Found by the qcow2_image fuzz target: the part of a read past the
    /// end of a backing file smaller than the image came back unfilled
    /// (the guest saw its own buffer's old bytes), and a read straddling
    /// the backing file's end was read wrongly.
    #[test]
    fn past_the_end_of_a_smaller_backing_file_reads_zeroes() {
        use crate::image::{ImageFormat, OpenOptions};
        let dir = tempfile::tempdir().unwrap();
        let top = smaller_backing_file(dir.path(), 4096);
        let image = super::super::Qcow2Image::open(&top, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        // The top image's cluster at 1 MiB - 4 KiB straddles the end of
        // the backing file; 1 MiB on is past it.
        let start = (1 << 20) - 8192;
        let mut buf = vec![0xee; 16384];
        assert_eq!(read(&mut *engine, start, &mut buf), buf.len() as i32);
        let split = (SMALL_BASE_BYTES - start) as usize;
        assert!(
            buf[..split].iter().all(|&b| b == 0x3c),
            "the backing file's data"
        );
        assert!(buf[split..].iter().all(|&b| b == 0), "zeroes past its end");
        let mut past = vec![0xee; 8192];
        assert_eq!(read(&mut *engine, 3 << 19, &mut past), past.len() as i32);
        assert!(past.iter().all(|&b| b == 0), "zeroes far past its end");
    }

    /// Found by the qcow2_image fuzz target: a write to part of a cluster
    /// straddling the end of a smaller backing file (here 64 KiB, over 4
    /// KiB clusters) copied the cluster from the backing file with that
    /// straddling read, and the backing file's last bytes read as zeroes;
    /// past its end, the copy was uninitialised memory.
    #[test]
    fn clusters_reaching_past_the_end_of_a_backing_file_are_copied_right() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let top = smaller_backing_file(dir.path(), CLUSTER);
        let image = super::super::Qcow2Image::open(&top, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut data = vec![0xa5; 512];
        assert_eq!(write(&mut *engine, (1 << 20) - 512, &mut data), 512);
        let mut zeroes = crate::engine::EngineOp::Fallocate {
            file: 0,
            offset: (1 << 20) - 1024,
            len_bytes: 512,
            mode: crate::engine::FallocateMode::ZeroRange,
        };
        assert_eq!(serve_one(&mut *engine, zeroes), 0);
        let start = (1 << 20) - CLUSTER;
        let mut buf = vec![0xee; CLUSTER as usize];
        assert_eq!(read(&mut *engine, start, &mut buf), buf.len() as i32);
        let base_end = (SMALL_BASE_BYTES - start) as usize;
        assert!(
            buf[..base_end].iter().all(|&b| b == 0x3c),
            "the backing file's data"
        );
        assert!(buf[base_end..CLUSTER as usize - 512]
            .iter()
            .all(|&b| b == 0));
        assert!(buf[CLUSTER as usize - 512..].iter().all(|&b| b == 0xa5));
        // The next cluster, past the backing file's end: zeroes written.
        zeroes = crate::engine::EngineOp::Fallocate {
            file: 0,
            offset: 1 << 20,
            len_bytes: 512,
            mode: crate::engine::FallocateMode::ZeroRange,
        };
        assert_eq!(serve_one(&mut *engine, zeroes), 0);
        assert_eq!(read(&mut *engine, 1 << 20, &mut buf), buf.len() as i32);
        assert!(buf.iter().all(|&b| b == 0));
    }

    /// Found by the qcow2_image fuzz target: a compressed cluster whose
    /// stream inflates to less than a cluster was read with OK, the rest of
    /// the guest's buffer left as it was (and copied on write from
    /// uninitialised memory).
    #[test]
    fn a_short_compressed_cluster_reads_zeroes_after_its_data() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, CLUSTER).unwrap();
        {
            let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x5a; 2 * CLUSTER as usize];
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        // Guest cluster 1: one compressed sector at its own cluster, a
        // final stored deflate block of 10 bytes.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_u64 = |at: u64| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, at).unwrap();
            u64::from_be_bytes(word)
        };
        let l2 = read_u64(read_u64(40)) & 0x00ff_ffff_ffff_fe00;
        let host = read_u64(l2 + 8) & 0x00ff_ffff_ffff_fe00;
        let mut stream = vec![0x01, 10, 0, !10, 0xff];
        stream.extend_from_slice(b"0123456789");
        file.write_all_at(&stream, host).unwrap();
        file.write_all_at(&(1u64 << 62 | host).to_be_bytes(), l2 + 8)
            .unwrap();

        let image = super::super::Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut buf = vec![0xee; CLUSTER as usize];
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert_eq!(&buf[..10], b"0123456789");
        assert!(
            buf[10..].iter().all(|&b| b == 0),
            "zeroes, not the buffer's bytes"
        );
        let mut part = vec![0xa5; 512];
        assert_eq!(write(&mut *engine, CLUSTER + 1024, &mut part), 512);
        buf.fill(0xee);
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert_eq!(&buf[..10], b"0123456789");
        assert!(buf[10..1024].iter().all(|&b| b == 0));
        assert!(buf[1024..1536].iter().all(|&b| b == 0xa5));
        assert!(
            buf[1536..].iter().all(|&b| b == 0),
            "no uninitialised memory"
        );
    }

    #[test]
    fn a_future_that_completes_gives_its_value() {
        let mut contained = Contained {
            fut: Some(Box::pin(async { 7 })),
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(Pin::new(&mut contained).poll(&mut cx), Poll::Ready(Some(7)));
    }
}
