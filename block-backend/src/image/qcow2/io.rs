//! qcow2-rs's I/O trait ([`Qcow2IoOps`]) on our own engine: every read,
//! write, fallocate and fsync qcow2-rs issues becomes one operation on the
//! owner thread's io_uring, and the future qcow2-rs awaits completes when the
//! owner reaps that operation. No other runtime's event loop is involved.
//!
//! Buffers are used where qcow2-rs points: for data of allocated clusters
//! that is guest memory, so those reads and writes are zero copy.
//!
//! Two defects of qcow2-rs 0.1.6 are handled here:
//! - **fallocate flags.** Before the first write to a new cluster it calls
//!   `fallocate(offset, cluster, flags)` to make the cluster read as zeroes;
//!   its own implementations pass PUNCH_HOLE without KEEP_SIZE (or with
//!   ZERO_RANGE), which the kernel rejects, and it then falls back to
//!   writing a whole zeroed cluster: a 4 KiB write to a new 64 KiB cluster
//!   wrote 68 KiB. [`RingIo::fallocate`] punches the range (stale bytes of a
//!   reused cluster go) and then allocates it, growing the file when the
//!   cluster lies past its end. Space is reserved at allocation, so on a full
//!   disk the write to a new cluster fails, while writes to clusters already
//!   allocated never need space.
//! - **metadata write order.** qcow2-rs syncs between refcount and table
//!   writes in `flush_meta`, but not everywhere: a cache eviction can write
//!   an L2 slice after refcount blocks that an earlier eviction wrote
//!   without a sync, and the refcount table is written without one; a crash
//!   could then leave an L2 entry pointing at a cluster whose refcount is
//!   not on disk. [`RingIo`] puts every metadata write (any write that is not
//!   guest data) after an fdatasync of every metadata write and fallocate
//!   that completed before it was issued: metadata reaches the disk in the
//!   order qcow2-rs issues it. The syncs qcow2-rs does itself count, so
//!   `flush_meta` needs no extra one.
//! - **short reads.** A data cluster may end past the end of the file (its
//!   tail was never written); qcow2-rs reports the short count and leaves
//!   the rest of the buffer as it was. [`RingIo::read_to`] reads on after a
//!   short read and fills what lies past the end of the file with zeroes.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use qcow2_rs::error::{Qcow2Error, Qcow2Result};
use qcow2_rs::ops::Qcow2IoOps;

use crate::engine::{Completion, Engine, EngineError, EngineOp, FallocateMode, FileSlot, IoVec};

/// What the owner thread did to the image file (printed with the device's
/// counters). `host_bytes_written / bytes_written` is the write
/// amplification.
#[derive(Debug, Default)]
pub struct ImageCounters {
    /// Bytes written to the image files: guest data and metadata.
    pub host_bytes_written: AtomicU64,
    /// Bytes of new clusters zeroed by fallocate (no data written).
    pub host_bytes_zeroed: AtomicU64,
    /// Clusters given back by DISCARD and WRITE_ZEROES.
    pub clusters_freed: AtomicU64,
    /// Requests answered IOERR because they touch a table entry that failed
    /// validation.
    pub corrupt_entry_requests: AtomicU64,
    /// Panics inside qcow2-rs, contained (the image then fails every request).
    pub panics: AtomicU64,
}

impl ImageCounters {
    pub fn values(&self) -> [(&'static str, u64); 5] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("host_bytes_written", get(&self.host_bytes_written)),
            ("host_bytes_zeroed", get(&self.host_bytes_zeroed)),
            ("clusters_freed", get(&self.clusters_freed)),
            ("corrupt_entry_requests", get(&self.corrupt_entry_requests)),
            ("qcow2_panics", get(&self.panics)),
        ]
    }
}

enum SlotState {
    Free,
    /// In the engine; the waker of the future awaiting it.
    Pending(Option<Waker>),
    /// In the engine, and nobody awaits it any more (its future was leaked
    /// after a panic): the slot is freed when the completion arrives.
    Orphaned,
    Done(i32),
}

struct OpSlot {
    state: SlotState,
    /// The iovec of a read or write, boxed so that it stays where the
    /// kernel was told it is while `ops` grows.
    iovec: Box<IoVec>,
}

/// The owner thread's engine and the operations in flight on it.
pub struct IoCore {
    engine: RefCell<Box<dyn Engine>>,
    /// Guest buffers (and zero buffers) being written, as address ranges:
    /// writes from them are data, every other write is metadata.
    data: RefCell<Vec<(usize, usize)>>,
    /// Metadata writes and fallocates completed so far.
    meta_completed: Cell<u64>,
    /// All of the first `meta_synced` of them are durable.
    meta_synced: Cell<u64>,
    /// One ordering sync at a time.
    sync_lock: futures::lock::Mutex<()>,
    ops: RefCell<Vec<OpSlot>>,
    free: RefCell<Vec<usize>>,
    completions: RefCell<Vec<Completion>>,
    counters: Arc<ImageCounters>,
}

impl IoCore {
    pub fn new(engine: Box<dyn Engine>, counters: Arc<ImageCounters>) -> Rc<Self> {
        Rc::new(IoCore {
            engine: RefCell::new(engine),
            data: RefCell::new(Vec::new()),
            meta_completed: Cell::new(0),
            meta_synced: Cell::new(0),
            sync_lock: futures::lock::Mutex::new(()),
            ops: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            completions: RefCell::new(Vec::new()),
            counters,
        })
    }

    /// Marks `buf` as guest data while `f` writes it (see the module
    /// documentation: data writes are not ordered against metadata).
    pub async fn with_data<F: Future>(&self, buf: &[u8], f: F) -> F::Output {
        let range = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
        self.data.borrow_mut().push(range);
        let output = f.await;
        let mut data = self.data.borrow_mut();
        if let Some(i) = data.iter().position(|r| *r == range) {
            data.swap_remove(i);
        }
        output
    }

    fn is_data(&self, buf: &[u8]) -> bool {
        let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
        self.data
            .borrow()
            .iter()
            .any(|&(s, e)| start >= s && end <= e)
    }

    fn meta_done(&self) {
        self.meta_completed.set(self.meta_completed.get() + 1);
    }

    pub fn counters(&self) -> &ImageCounters {
        &self.counters
    }

    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.engine.borrow().completion_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.engine.borrow().in_flight()
    }

    /// Hands what the futures queued to the kernel.
    pub fn submit(&self) -> Result<(), EngineError> {
        self.engine.borrow_mut().submit()
    }

    /// Blocks until a completion is ready (submitting first).
    pub fn wait(&self) -> Result<(), EngineError> {
        self.engine.borrow_mut().wait()
    }

    /// Reaps what the kernel completed and wakes the futures awaiting it.
    /// Returns the number of completions.
    pub fn dispatch(&self) -> usize {
        let mut completions = self.completions.take();
        {
            let engine = &mut *self.engine.borrow_mut();
            engine.clear_completion_fd();
            engine.reap(&mut completions);
        }
        let count = completions.len();
        let mut wakers = Vec::with_capacity(count);
        {
            let mut ops = self.ops.borrow_mut();
            let mut free = self.free.borrow_mut();
            for completion in completions.drain(..) {
                let index = completion.tag as usize;
                let Some(slot) = ops.get_mut(index) else {
                    continue;
                };
                match std::mem::replace(&mut slot.state, SlotState::Done(completion.result)) {
                    SlotState::Pending(waker) => wakers.extend(waker),
                    SlotState::Orphaned => {
                        slot.state = SlotState::Free;
                        free.push(index);
                    }
                    // Not ours: put it back as it was.
                    other => slot.state = other,
                }
            }
        }
        *self.completions.borrow_mut() = completions;
        for waker in wakers {
            waker.wake();
        }
        count
    }

    /// Queues `op` (built around the slot's iovec) and returns the future
    /// that resolves to its result.
    ///
    /// # Safety
    ///
    /// The memory `iovec` points to must stay valid until the returned
    /// future has resolved, or forever if it is leaked instead.
    unsafe fn start(
        self: &Rc<Self>,
        iovec: Option<IoVec>,
        op: impl FnOnce(&[IoVec]) -> EngineOp<'_>,
    ) -> OpFuture {
        let index = {
            let mut ops = self.ops.borrow_mut();
            let index = match self.free.borrow_mut().pop() {
                Some(index) => index,
                None => {
                    ops.push(OpSlot {
                        state: SlotState::Free,
                        iovec: Box::new(IoVec::new(std::ptr::null_mut(), 0)),
                    });
                    ops.len() - 1
                }
            };
            let slot = &mut ops[index];
            *slot.iovec = iovec.unwrap_or(IoVec::new(std::ptr::null_mut(), 0));
            slot.state = SlotState::Pending(None);
            let iovecs: &[IoVec] = std::slice::from_ref(&*slot.iovec);
            // The boxed iovec does not move when `ops` grows: take a slice
            // that outlives the borrow of `ops`.
            // SAFETY: the box is freed only when the slot is reused, which
            // happens after its completion is reaped.
            let iovecs: &[IoVec] = unsafe { std::slice::from_raw_parts(iovecs.as_ptr(), 1) };
            let pushed = {
                let engine = &mut *self.engine.borrow_mut();
                // SAFETY: the iovec lives in its slot until the completion is
                // reaped (above); the memory it points to is the caller's
                // promise.
                unsafe { engine.push(op(iovecs), index as u64) }
            };
            if let Err(err) = pushed {
                slot.state = SlotState::Done(-err_errno(&err));
            }
            index
        };
        OpFuture {
            core: Rc::clone(self),
            index,
        }
    }
}

fn err_errno(err: &EngineError) -> i32 {
    std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
        .unwrap_or(libc::EIO)
}

/// Resolves to the result of one engine operation (bytes, or `-errno`).
struct OpFuture {
    core: Rc<IoCore>,
    index: usize,
}

impl Future for OpFuture {
    type Output = i32;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let mut ops = self.core.ops.borrow_mut();
        let slot = &mut ops[self.index];
        match slot.state {
            SlotState::Done(result) => {
                slot.state = SlotState::Free;
                self.core.free.borrow_mut().push(self.index);
                Poll::Ready(result)
            }
            SlotState::Pending(ref mut waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            SlotState::Free | SlotState::Orphaned => Poll::Ready(-libc::EIO),
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        let mut ops = self.core.ops.borrow_mut();
        if let Some(slot) = ops.get_mut(self.index) {
            if let SlotState::Pending(_) = slot.state {
                slot.state = SlotState::Orphaned;
            }
        }
    }
}

fn io_error(what: &str, offset: u64, errno: i32) -> Qcow2Error {
    let err = std::io::Error::from_raw_os_error(errno);
    Qcow2Error::from(err).prepend(&format!("{what} at {offset:#x}"))
}

/// One host file of the image, as qcow2-rs does its I/O on it.
pub struct RingIo {
    core: Rc<IoCore>,
    file: FileSlot,
}

impl RingIo {
    pub fn new(core: Rc<IoCore>, file: FileSlot) -> Self {
        RingIo { core, file }
    }

    /// fdatasync; on success everything completed before it started is
    /// durable.
    async fn sync(&self) -> i32 {
        let covers = self.core.meta_completed.get();
        let file = self.file;
        // SAFETY: no memory is involved.
        let result = unsafe { self.core.start(None, |_| EngineOp::Datasync { file }) }.await;
        if result == 0 && covers > self.core.meta_synced.get() {
            self.core.meta_synced.set(covers);
        }
        result
    }

    /// Waits until every metadata write and fallocate completed so far is
    /// durable (syncing if need be).
    async fn order_after_completed_metadata(&self) -> Result<(), i32> {
        let need = self.core.meta_completed.get();
        if self.core.meta_synced.get() >= need {
            return Ok(());
        }
        let _one_at_a_time = self.core.sync_lock.lock().await;
        if self.core.meta_synced.get() >= need {
            return Ok(());
        }
        match self.sync().await {
            0 => Ok(()),
            errno => Err(errno),
        }
    }

    async fn fallocate_op(&self, offset: u64, len: u64, mode: FallocateMode) -> i32 {
        let file = self.file;
        // SAFETY: no memory is involved.
        let op = unsafe {
            self.core.start(None, |_| EngineOp::Fallocate {
                file,
                offset,
                len_bytes: len,
                mode,
            })
        };
        let result = op.await;
        self.core.meta_done();
        result
    }
}

impl Qcow2IoOps for RingIo {
    async fn read_to(&self, offset: u64, buf: &mut [u8]) -> Qcow2Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iovec = IoVec::new(rest.as_mut_ptr(), rest.len());
            let at = offset + done as u64;
            let file = self.file;
            // SAFETY: `buf` is borrowed by this future, which the owner never
            // drops before it resolves (a panicking one is leaked).
            let op = unsafe {
                self.core.start(Some(iovec), |iovecs| EngineOp::Readv {
                    file,
                    offset: at,
                    iovecs,
                })
            };
            match op.await {
                // End of file: a cluster whose tail was never written.
                0 => {
                    buf[done..].fill(0);
                    break;
                }
                n if n > 0 => done += n as usize,
                errno => return Err(io_error("read", at, -errno)),
            }
        }
        Ok(buf.len())
    }

    async fn write_from(&self, offset: u64, buf: &[u8]) -> Qcow2Result<()> {
        let metadata = !self.core.is_data(buf);
        if metadata {
            self.order_after_completed_metadata()
                .await
                .map_err(|errno| io_error("fdatasync before a metadata write", offset, -errno))?;
        }
        let result = self.write_all(offset, buf).await;
        if metadata {
            self.core.meta_done();
        }
        result
    }

    /// qcow2-rs calls this to make a new cluster (data, or a table) read as
    /// zeroes before it is used; see the module documentation.
    async fn fallocate(&self, offset: u64, len: usize, _flags: u32) -> Qcow2Result<()> {
        let len = len as u64;
        match self
            .fallocate_op(offset, len, FallocateMode::PunchHole)
            .await
        {
            0 => {}
            errno => return Err(io_error("punch hole", offset, -errno)),
        }
        match self.fallocate_op(offset, len, FallocateMode::Grow).await {
            0 => {
                self.core
                    .counters
                    .host_bytes_zeroed
                    .fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            errno => Err(io_error("allocate", offset, -errno)),
        }
    }

    async fn fsync(&self, offset: u64, _len: usize, _flags: u32) -> Qcow2Result<()> {
        match self.sync().await {
            0 => Ok(()),
            errno => Err(io_error("fdatasync", offset, -errno)),
        }
    }
}

impl RingIo {
    async fn write_all(&self, offset: u64, buf: &[u8]) -> Qcow2Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let iovec = IoVec::new(rest.as_ptr().cast_mut(), rest.len());
            let at = offset + done as u64;
            let file = self.file;
            // SAFETY: as in read_to; the kernel only reads this memory.
            let op = unsafe {
                self.core.start(Some(iovec), |iovecs| EngineOp::Writev {
                    file,
                    offset: at,
                    iovecs,
                })
            };
            match op.await {
                0 => return Err(io_error("write", at, libc::ENOSPC)),
                n if n > 0 => {
                    done += n as usize;
                    self.core
                        .counters
                        .host_bytes_written
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                errno => return Err(io_error("write", at, -errno)),
            }
        }
        Ok(())
    }
}
