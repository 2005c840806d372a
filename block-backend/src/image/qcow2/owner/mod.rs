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
use qcow2_rs::meta::Qcow2Header;
use tracing::{error, info, warn};

use super::engine::{Inbox, Mailbox, Request};
use super::io::{ImageCounters, IoCore, RingIo};
use super::meta::{self, BadClusters, CompressedClusters, Qcow2Layout};
use crate::engine::{best_engine, Completion};
use crate::image::ImageError;

mod serve;

use serve::serve;

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
