//! Engines move bytes between host files and guest memory; they know nothing
//! of virtio or of image formats.
//!
//! An engine takes operations tagged by its caller, hands them to the kernel
//! in batches and returns their results as [`Completion`]s:
//! - [`uring::UringEngine`]: one io_uring per virtqueue, with the image files
//!   registered as fixed files and an eventfd that fires on completions.
//! - [`sync::SyncEngine`]: plain syscalls, completed before `push` returns;
//!   for tests, and the fallback when io_uring is not available.
//!
//! Files are addressed by [`FileSlot`]: the index of a file in the list the
//! engine was built with.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

pub mod sync;
pub mod uring;

/// Index of a file in the list an engine was built with.
pub type FileSlot = u32;

/// One `struct iovec`: a buffer in guest memory that the kernel reads or
/// writes directly.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoVec(libc::iovec);

// SAFETY: an IoVec is a (pointer, length) pair that this program never
// dereferences; only the kernel does, during an I/O whose caller upholds the
// contract of `Engine::push` (the memory stays mapped until the completion is
// reaped). Moving or sharing the pair between threads accesses no memory.
unsafe impl Send for IoVec {}
// SAFETY: as for Send: sharing a reference to the pair accesses no memory.
unsafe impl Sync for IoVec {}

impl IoVec {
    pub fn new(base: *mut u8, len_bytes: usize) -> Self {
        IoVec(libc::iovec {
            iov_base: base.cast(),
            iov_len: len_bytes,
        })
    }

    pub fn base(&self) -> *mut u8 {
        self.0.iov_base.cast()
    }

    pub fn len_bytes(&self) -> usize {
        self.0.iov_len
    }

    /// Drops the first `len_bytes` bytes (at most the whole buffer).
    pub fn advance(&mut self, len_bytes: usize) {
        let len_bytes = len_bytes.min(self.0.iov_len);
        self.0.iov_base = self.base().wrapping_add(len_bytes).cast();
        self.0.iov_len -= len_bytes;
    }

    fn as_raw(iovecs: &[IoVec]) -> *const libc::iovec {
        // IoVec is repr(transparent) over libc::iovec.
        iovecs.as_ptr().cast()
    }
}

/// What `fallocate(2)` does to a range; the file size never changes, except
/// with [`FallocateMode::Grow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocateMode {
    /// Deallocate: the range reads as zeroes afterwards.
    PunchHole,
    /// Zero the range, keeping (or making) it allocated.
    ZeroRange,
    /// Allocate the range (holes become allocated zeroes).
    Allocate,
    /// Allocate the range and grow the file to its end if it is shorter
    /// (qcow2: a new cluster past the end of the image file).
    Grow,
}

impl FallocateMode {
    fn flags(self) -> i32 {
        match self {
            FallocateMode::PunchHole => libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            FallocateMode::ZeroRange => libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_ZERO_RANGE,
            FallocateMode::Allocate => libc::FALLOC_FL_KEEP_SIZE,
            FallocateMode::Grow => 0,
        }
    }
}

/// One operation; its result comes back as a [`Completion`] with its tag.
#[derive(Clone, Copy, Debug)]
pub enum EngineOp<'a> {
    Readv {
        file: FileSlot,
        offset: u64,
        iovecs: &'a [IoVec],
    },
    Writev {
        file: FileSlot,
        offset: u64,
        iovecs: &'a [IoVec],
    },
    /// fdatasync(2): the data written before, and the metadata needed to
    /// read it back, are durable.
    Datasync { file: FileSlot },
    Fallocate {
        file: FileSlot,
        offset: u64,
        len_bytes: u64,
        mode: FallocateMode,
    },
}

/// The result of one operation: what the syscall returned, or `-errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub result: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot create an io_uring of {entries} entries")]
    CreateRing {
        entries: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot register the image files with the io_uring")]
    RegisterFiles(#[source] io::Error),
    #[error("cannot create or register the completion eventfd")]
    CompletionEventfd(#[source] io::Error),
    #[error("cannot duplicate the image file descriptor")]
    DuplicateFile(#[source] io::Error),
    #[error("cannot submit to the io_uring")]
    Submit(#[source] io::Error),
    #[error("cannot wait for io_uring completions")]
    Wait(#[source] io::Error),
    #[error("the submission queue is still full after submitting")]
    SubmissionQueueFull,
}

/// Hands an engine's completions to its queue from the thread they arrive
/// on; returns false when the queue is busy (see
/// [`Engine::set_completer`]).
pub type Completer = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

pub trait Engine: Send {
    /// For logs: "io_uring" or "sync".
    fn name(&self) -> &'static str;

    /// Queues `op`; it reaches the kernel at the next [`Engine::submit`], or
    /// now if the submission queue is full. Every pushed operation yields
    /// exactly one completion, also when it fails.
    ///
    /// # Safety
    ///
    /// For `Readv`/`Writev`, the `iovecs` slice itself and the memory its
    /// entries point to must stay valid (allocated, mapped, not moved, not
    /// modified) until [`Engine::reap`] has returned the completion of `tag`.
    unsafe fn push(&mut self, op: EngineOp<'_>, tag: u64) -> Result<(), EngineError>;

    /// Hands every queued operation to the kernel (one syscall).
    fn submit(&mut self) -> Result<(), EngineError>;

    /// Appends the completions that are ready to `out`, without blocking.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// Blocks until at least one completion can be reaped (submitting what is
    /// queued). Returns at once when nothing is in flight.
    fn wait(&mut self) -> Result<(), EngineError>;

    /// Operations pushed and not yet reaped.
    fn in_flight(&self) -> usize;

    /// An eventfd that becomes readable when completions arrive, for engines
    /// that complete asynchronously.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Resets the completion eventfd; call before reaping.
    fn clear_completion_fd(&self);

    /// For engines whose completions are produced by another thread (the
    /// qcow2 owner): that thread calls `complete` to have the queue reap
    /// them at once, and signals the completion eventfd only when it
    /// returns false. Saves the queue thread a wakeup per batch. Engines
    /// completed by the kernel ignore it.
    fn set_completer(&mut self, _complete: Completer) {}
}

/// Duplicates `files` so that an engine owns its descriptors: closing the
/// image elsewhere cannot pull a file from under an operation in flight.
fn duplicate(files: &[BorrowedFd<'_>]) -> Result<Vec<OwnedFd>, EngineError> {
    files
        .iter()
        .map(|fd| fd.try_clone_to_owned().map_err(EngineError::DuplicateFile))
        .collect()
}

/// Builds the io_uring engine, or the sync engine when io_uring cannot be
/// set up here (old kernel, `kernel.io_uring_disabled`, seccomp); the second
/// value says why io_uring was not used.
pub fn best_engine(
    files: &[BorrowedFd<'_>],
    entries: u32,
) -> Result<(Box<dyn Engine>, Option<EngineError>), EngineError> {
    match uring::UringEngine::new(files, entries) {
        Ok(engine) => Ok((Box::new(engine), None)),
        Err(err @ EngineError::CreateRing { .. }) => {
            Ok((Box::new(sync::SyncEngine::new(files)?), Some(err)))
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! One suite, run against both engines.

    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    pub(crate) fn image(len_bytes: u64) -> (tempfile::NamedTempFile, File) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(len_bytes).unwrap();
        let file = tmp.reopen().unwrap();
        (tmp, file)
    }

    /// Pushes one op, submits, waits and reaps its completion.
    fn run(engine: &mut dyn Engine, op: EngineOp<'_>, tag: u64) -> i32 {
        // SAFETY: the iovecs in `op` borrow buffers of the caller that live
        // until this function returns, and it returns only after reaping.
        unsafe { engine.push(op, tag) }.unwrap();
        engine.submit().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            engine.wait().unwrap();
            engine.reap(&mut done);
        }
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].tag, tag);
        assert_eq!(engine.in_flight(), 0);
        done[0].result
    }

    fn iovec(buf: &mut [u8]) -> IoVec {
        IoVec::new(buf.as_mut_ptr(), buf.len())
    }

    pub(crate) fn write_read_roundtrip(engine: &mut dyn Engine, file: &File) {
        let mut a = vec![0xa5u8; 512];
        let mut b = vec![0x5au8; 1024];
        let iovecs = [iovec(&mut a), iovec(&mut b)];
        let op = EngineOp::Writev {
            file: 0,
            offset: 4096,
            iovecs: &iovecs,
        };
        assert_eq!(run(engine, op, 7), 1536);
        let mut on_disk = vec![0u8; 1536];
        file.read_exact_at(&mut on_disk, 4096).unwrap();
        assert!(on_disk[..512].iter().all(|&x| x == 0xa5));
        assert!(on_disk[512..].iter().all(|&x| x == 0x5a));

        let mut back = vec![0u8; 1536];
        let iovecs = [iovec(&mut back)];
        let op = EngineOp::Readv {
            file: 0,
            offset: 4096,
            iovecs: &iovecs,
        };
        assert_eq!(run(engine, op, u64::MAX), 1536);
        assert_eq!(back, on_disk);
    }

    pub(crate) fn datasync_and_fallocate(engine: &mut dyn Engine, file: &File) {
        file.write_all_at(&[0xffu8; 16384], 0).unwrap();
        assert_eq!(run(engine, EngineOp::Datasync { file: 0 }, 1), 0);
        let op = EngineOp::Fallocate {
            file: 0,
            offset: 4096,
            len_bytes: 4096,
            mode: FallocateMode::PunchHole,
        };
        assert_eq!(run(engine, op, 2), 0);
        let op = EngineOp::Fallocate {
            file: 0,
            offset: 8192,
            len_bytes: 512,
            mode: FallocateMode::ZeroRange,
        };
        let zeroed = run(engine, op, 3);
        // tmpfs has no FALLOC_FL_ZERO_RANGE; the temp dir may be one.
        assert!(zeroed == 0 || zeroed == -libc::EOPNOTSUPP, "{zeroed}");
        let mut on_disk = vec![0u8; 16384];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(on_disk[..4096].iter().all(|&x| x == 0xff));
        assert!(on_disk[4096..8192].iter().all(|&x| x == 0));
        if zeroed == 0 {
            assert!(on_disk[8192..8704].iter().all(|&x| x == 0));
        }
        assert!(on_disk[8704..].iter().all(|&x| x == 0xff));
        assert_eq!(file.metadata().unwrap().len(), 1 << 20, "size kept");
        let op = EngineOp::Fallocate {
            file: 0,
            offset: 4096,
            len_bytes: 4096,
            mode: FallocateMode::Allocate,
        };
        assert_eq!(run(engine, op, 4), 0);
    }

    pub(crate) fn errors_are_completions(engine: &mut dyn Engine) {
        // A file slot that was never registered.
        assert_eq!(run(engine, EngineOp::Datasync { file: 9 }, 5), -libc::EBADF);
    }

    pub(crate) fn many_ops_in_one_batch(engine: &mut dyn Engine, file: &File) {
        let mut bufs: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 512]).collect();
        let iovecs: Vec<IoVec> = bufs.iter_mut().map(|b| iovec(b)).collect();
        for (i, iov) in iovecs.iter().enumerate() {
            let op = EngineOp::Writev {
                file: 0,
                offset: 512 * i as u64,
                iovecs: std::slice::from_ref(iov),
            };
            // SAFETY: `bufs` and `iovecs` outlive the loop below that reaps
            // every completion.
            unsafe { engine.push(op, i as u64) }.unwrap();
        }
        engine.submit().unwrap();
        let mut done = Vec::new();
        while done.len() < 100 {
            engine.wait().unwrap();
            engine.reap(&mut done);
        }
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort();
        assert_eq!(tags, (0..100).collect::<Vec<_>>());
        assert!(done.iter().all(|c| c.result == 512));
        let mut on_disk = vec![0u8; 512 * 100];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        for (i, chunk) in on_disk.chunks(512).enumerate() {
            assert!(chunk.iter().all(|&x| x == i as u8));
        }
    }

    #[test]
    fn iovec_advance() {
        let mut buf = [0u8; 100];
        let mut iov = iovec(&mut buf);
        iov.advance(40);
        assert_eq!(iov.len_bytes(), 60);
        assert_eq!(iov.base(), buf[40..].as_mut_ptr());
        iov.advance(100);
        assert_eq!(iov.len_bytes(), 0);
    }

    #[test]
    fn best_engine_is_io_uring_here() {
        let (_tmp, file) = image(4096);
        let (engine, why_not) = best_engine(&[file.as_fd()], 8).unwrap();
        assert_eq!(engine.name(), "io_uring", "{why_not:?}");
    }
}
