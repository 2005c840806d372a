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
//! - **buffers freed under the kernel.** A task that panics is unwound,
//!   and its frames' buffers freed, while the kernel may still be reading
//!   or writing them. Metadata buffers (everything that is not guest
//!   memory) therefore never reach the kernel: the operation's slot owns a
//!   copy, freed only when the completion arrives.
//! - **the corrupt bit.** qcow2-rs refuses headers with the corrupt bit,
//!   and writes its own copy of the header when a table grows. Once the
//!   owner has set the bit on a bad entry ([`IoCore::set_corrupt_marked`]),
//!   every header qcow2-rs writes to the top image gets the bit again
//!   ([`RingIo::write_from`]); the owner hides it from qcow2-rs when it
//!   opens the image again.
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

use super::meta::set_corrupt_bit;
use crate::engine::{Completion, Engine, EngineError, EngineOp, FallocateMode, FileSlot, IoVec};

/// The engine slot of the top image of the chain (the owner's `build_dev`
/// gives image `i` of the chain slot `2i`).
pub const TOP_IMAGE_SLOT: FileSlot = 0;

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
    /// The buffer of a metadata read or write: owned by the slot until the
    /// completion arrives, whatever happens to the future.
    bounce: Vec<u8>,
}

/// The owner thread's engine and the operations in flight on it.
pub struct IoCore {
    engine: RefCell<Box<dyn Engine>>,
    /// Data buffers being read or written, as address ranges, and whether
    /// they belong to the owner (then they are copied like metadata
    /// buffers, as a panic could free them): writes from them are data,
    /// every other write is metadata.
    data: RefCell<Vec<(usize, usize, bool)>>,
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
    /// The owner set the corrupt bit in the top image's header.
    corrupt_marked: Cell<bool>,
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
            corrupt_marked: Cell::new(false),
        })
    }

    /// Whether the owner set the corrupt bit in the top image's header.
    pub fn corrupt_marked(&self) -> bool {
        self.corrupt_marked.get()
    }

    /// From now on the top image's header keeps the corrupt bit.
    pub fn set_corrupt_marked(&self) {
        self.corrupt_marked.set(true);
    }

    /// Marks `len` bytes at `ptr` as data while `f` reads or writes them:
    /// writes from them are not ordered against metadata, and guest memory
    /// (`owned` false) goes to the kernel as it is, zero copy.
    pub async fn with_data<F: Future>(
        &self,
        ptr: *const u8,
        len: usize,
        owned: bool,
        f: F,
    ) -> F::Output {
        let range = (ptr as usize, ptr as usize + len, owned);
        self.data.borrow_mut().push(range);
        let output = f.await;
        let mut data = self.data.borrow_mut();
        if let Some(i) = data.iter().position(|r| *r == range) {
            data.swap_remove(i);
        }
        output
    }

    /// None for metadata; Some(owned) for data.
    fn data_kind(&self, buf: &[u8]) -> Option<bool> {
        let (start, end) = (buf.as_ptr() as usize, buf.as_ptr() as usize + buf.len());
        self.data
            .borrow()
            .iter()
            .find(|&&(s, e, _)| start >= s && end <= e)
            .map(|&(_, _, owned)| owned)
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
        bounce: Option<Vec<u8>>,
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
                        bounce: Vec::new(),
                    });
                    ops.len() - 1
                }
            };
            let slot = &mut ops[index];
            *slot.iovec = iovec.unwrap_or(IoVec::new(std::ptr::null_mut(), 0));
            match bounce {
                Some(bounce) => {
                    slot.bounce = bounce;
                    *slot.iovec = IoVec::new(slot.bounce.as_mut_ptr(), slot.bounce.len());
                }
                None => slot.bounce = Vec::new(),
            }
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

impl OpFuture {
    /// The result, and the slot's bounce buffer (empty without one).
    async fn with_bounce(self) -> (i32, Vec<u8>) {
        let index = self.index;
        let core = Rc::clone(&self.core);
        let result = self.await;
        let bounce = std::mem::take(&mut core.ops.borrow_mut()[index].bounce);
        (result, bounce)
    }
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
        let result = unsafe { self.core.start(None, None, |_| EngineOp::Datasync { file }) }.await;
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
            self.core.start(None, None, |_| EngineOp::Fallocate {
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
        let zero_copy = self.core.data_kind(buf) == Some(false);
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iovec = IoVec::new(rest.as_mut_ptr(), rest.len());
            let bounce = (!zero_copy).then(|| vec![0u8; rest.len()]);
            let at = offset + done as u64;
            let file = self.file;
            // SAFETY: a data buffer is guest memory (or the owner's own
            // buffer), which outlives the request even if its task is
            // unwound; any other buffer is replaced by the slot's bounce
            // buffer, which the slot owns until the completion.
            let op = unsafe {
                self.core
                    .start(Some(iovec), bounce, |iovecs| EngineOp::Readv {
                        file,
                        offset: at,
                        iovecs,
                    })
            };
            let (result, bounce) = op.with_bounce().await;
            if result > 0 && !zero_copy {
                let n = result as usize;
                buf[done..done + n].copy_from_slice(&bounce[..n]);
            }
            match result {
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
        let metadata = self.core.data_kind(buf).is_none();
        let patched;
        let buf = if metadata && self.file == TOP_IMAGE_SLOT && self.core.corrupt_marked() {
            // A header qcow2-rs writes (it does not know the bit).
            let mut copy = buf.to_vec();
            set_corrupt_bit(&mut copy, offset, true);
            patched = copy;
            &patched[..]
        } else {
            buf
        };
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
        let zero_copy = self.core.data_kind(buf) == Some(false);
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let iovec = IoVec::new(rest.as_ptr().cast_mut(), rest.len());
            let bounce = (!zero_copy).then(|| rest.to_vec());
            let at = offset + done as u64;
            let file = self.file;
            // SAFETY: as in read_to; the kernel only reads this memory.
            let op = unsafe {
                self.core
                    .start(Some(iovec), bounce, |iovecs| EngineOp::Writev {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sync::SyncEngine;
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;

    /// The sync engine, recording each operation's kind.
    struct Recording {
        inner: SyncEngine,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Engine for Recording {
        fn name(&self) -> &'static str {
            "recording"
        }
        unsafe fn push(&mut self, op: EngineOp<'_>, tag: u64) -> Result<(), EngineError> {
            let kind = match op {
                EngineOp::Readv { .. } => "read".to_string(),
                EngineOp::Writev { offset, .. } => format!("write@{offset}"),
                EngineOp::Datasync { .. } => "sync".to_string(),
                EngineOp::Fallocate { mode, .. } => format!("{mode:?}"),
            };
            self.log.lock().unwrap().push(kind);
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { self.inner.push(op, tag) }
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

    fn setup(file: &File) -> (RingIo, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let engine = Recording {
            inner: SyncEngine::new(&[file.as_fd()]).unwrap(),
            log: Arc::clone(&log),
        };
        let core = IoCore::new(Box::new(engine), Arc::default());
        (RingIo::new(core, 0), log)
    }

    /// Polls `fut`, dispatching completions, until it is ready (the sync
    /// engine completes everything at push).
    fn run<F: Future>(io: &RingIo, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..1000 {
            if let Poll::Ready(value) = fut.as_mut().poll(&mut cx) {
                return value;
            }
            io.core.dispatch();
        }
        panic!("the future did not complete");
    }

    fn file_with(len: usize, byte: u8) -> (tempfile::NamedTempFile, File) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().write_all_at(&vec![byte; len], 0).unwrap();
        let file = tmp.reopen().unwrap();
        (tmp, file)
    }

    #[test]
    fn a_read_past_the_end_of_the_file_reads_zeroes() {
        let (_tmp, file) = file_with(6000, 0xab);
        let (io, _) = setup(&file);
        let mut buf = vec![0xffu8; 8192];
        assert_eq!(run(&io, io.read_to(4096, &mut buf)).unwrap(), 8192);
        assert!(buf[..6000 - 4096].iter().all(|&b| b == 0xab));
        assert!(buf[6000 - 4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_new_cluster_is_punched_and_allocated_not_written() {
        let (_tmp, file) = file_with(65536, 0xcd);
        let (io, log) = setup(&file);
        // A reused cluster inside the file, and a new one past its end.
        run(&io, io.fallocate(0, 65536, 0)).unwrap();
        run(&io, io.fallocate(131072, 65536, 1)).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["PunchHole", "Grow", "PunchHole", "Grow"],
            "no zeroes written"
        );
        let mut back = vec![0xffu8; 65536];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0), "stale bytes are gone");
        assert_eq!(file.metadata().unwrap().len(), 196608, "grown to cover");
        assert_eq!(
            io.core.counters().host_bytes_zeroed.load(Ordering::Relaxed),
            131072
        );
    }

    #[test]
    fn metadata_is_written_after_the_metadata_before_it_is_durable() {
        let (_tmp, file) = file_with(1 << 20, 0);
        let (io, log) = setup(&file);
        let table = vec![1u8; 4096];
        let data = vec![2u8; 4096];
        run(&io, io.write_from(0, &table)).unwrap();
        run(&io, io.write_from(4096, &table)).unwrap();
        // Guest data is not ordered; nor is metadata after qcow2-rs's own
        // sync.
        run(
            &io,
            io.core
                .with_data(data.as_ptr(), data.len(), false, io.write_from(8192, &data)),
        )
        .unwrap();
        run(&io, io.fsync(0, usize::MAX, 0)).unwrap();
        run(&io, io.write_from(12288, &table)).unwrap();
        // A fallocate counts as metadata too.
        run(&io, io.fallocate(65536, 4096, 0)).unwrap();
        run(&io, io.write_from(16384, &table)).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "write@0",
                "sync",
                "write@4096",
                "write@8192",
                "sync",
                "write@12288",
                "PunchHole",
                "Grow",
                "sync",
                "write@16384"
            ]
        );
        assert_eq!(
            io.core
                .counters()
                .host_bytes_written
                .load(Ordering::Relaxed),
            5 * 4096
        );
    }

    #[test]
    fn headers_keep_the_corrupt_bit_once_the_owner_set_it() {
        let (_tmp, file) = file_with(8192, 0);
        let (io, _) = setup(&file);
        let header = vec![0u8; 104];
        let byte_79 = || {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, 79).unwrap();
            byte[0]
        };
        run(&io, io.write_from(0, &header)).unwrap();
        assert_eq!(byte_79(), 0, "written as given");
        io.core.set_corrupt_marked();
        run(&io, io.write_from(0, &header)).unwrap();
        assert_eq!(byte_79(), 2, "the corrupt bit (incompatible feature bit 1)");
        // Metadata elsewhere, and writes that end before the byte, as given.
        let table = vec![0u8; 4096];
        run(&io, io.write_from(4096, &table)).unwrap();
        run(&io, io.write_from(0, &header[..72])).unwrap();
        let mut back = vec![0xffu8; 8192];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back
            .iter()
            .enumerate()
            .all(|(i, &b)| b == if i == 79 { 2 } else { 0 }));
    }

    #[test]
    fn metadata_buffers_are_copies_and_guest_buffers_are_not() {
        let (_tmp, file) = file_with(8192, 0x5a);
        let (io, _) = setup(&file);
        let mut table = vec![0u8; 4096];
        let table_ptr = table.as_ptr() as u64;
        let addresses = Rc::new(RefCell::new(Vec::new()));
        // The address the kernel is given is in the slot's iovec.
        let seen = Rc::clone(&addresses);
        let read = async {
            let result = io.read_to(0, &mut table).await;
            seen.borrow_mut()
                .push(io.core.ops.borrow()[0].iovec.base() as u64);
            result
        };
        run(&io, read).unwrap();
        assert!(table.iter().all(|&b| b == 0x5a), "copied back");
        assert_ne!(
            addresses.borrow()[0],
            table_ptr,
            "a metadata read is bounced"
        );

        let mut guest = vec![0u8; 4096];
        let guest_ptr = guest.as_ptr();
        let seen = Rc::clone(&addresses);
        let read = io.core.with_data(guest_ptr, 4096, false, async {
            let result = io.read_to(4096, &mut guest).await;
            seen.borrow_mut()
                .push(io.core.ops.borrow()[0].iovec.base() as u64);
            result
        });
        run(&io, read).unwrap();
        assert_eq!(
            addresses.borrow()[1],
            guest_ptr as u64,
            "guest reads are zero copy"
        );
        assert!(guest.iter().all(|&b| b == 0x5a));
    }
}
