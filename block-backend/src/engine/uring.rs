//! The io_uring engine: one ring per virtqueue, driven by that queue's
//! worker thread only.
//!
//! Kernel features used, all from Linux 5.6 or older: IORING_OP_READV,
//! IORING_OP_WRITEV, IORING_OP_FSYNC with IORING_FSYNC_DATASYNC,
//! IORING_OP_FALLOCATE, fixed files (IORING_REGISTER_FILES) and a completion
//! eventfd (IORING_REGISTER_EVENTFD). No SQPOLL, no registered buffers (guest
//! memory can be remapped by the frontend at any time).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{duplicate, Completion, Engine, EngineError, EngineOp, IoVec};

pub struct UringEngine {
    ring: IoUring,
    /// Signalled by the kernel for every completion posted to the ring.
    completion_event: EventFd,
    /// Pushed and not yet reaped.
    in_flight: usize,
    /// The fixed files: the kernel holds its own references to them until the
    /// ring is closed, which `Drop` does only after nothing is in flight.
    _files: Vec<OwnedFd>,
}

impl UringEngine {
    /// A ring of `entries` submission entries (a power of two; the
    /// completion queue is twice as large, and the kernel keeps overflowing
    /// completions rather than dropping them: IORING_FEAT_NODROP, Linux 5.5).
    pub fn new(files: &[BorrowedFd<'_>], entries: u32) -> Result<Self, EngineError> {
        let ring =
            IoUring::new(entries).map_err(|source| EngineError::CreateRing { entries, source })?;
        let files = duplicate(files)?;
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        if !raw.is_empty() {
            ring.submitter()
                .register_files(&raw)
                .map_err(EngineError::RegisterFiles)?;
        }
        let completion_event =
            EventFd::new(EFD_NONBLOCK).map_err(EngineError::CompletionEventfd)?;
        ring.submitter()
            .register_eventfd(completion_event.as_raw_fd())
            .map_err(EngineError::CompletionEventfd)?;
        Ok(UringEngine {
            ring,
            completion_event,
            in_flight: 0,
            _files: files,
        })
    }
}

impl Engine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    unsafe fn push(&mut self, op: EngineOp<'_>, tag: u64) -> Result<(), EngineError> {
        let entry = match op {
            EngineOp::Readv {
                file,
                offset,
                iovecs,
            } => opcode::Readv::new(
                types::Fixed(file),
                IoVec::as_raw(iovecs),
                iovecs.len() as u32,
            )
            .offset(offset)
            .build(),
            EngineOp::Writev {
                file,
                offset,
                iovecs,
            } => opcode::Writev::new(
                types::Fixed(file),
                IoVec::as_raw(iovecs),
                iovecs.len() as u32,
            )
            .offset(offset)
            .build(),
            EngineOp::Datasync { file } => opcode::Fsync::new(types::Fixed(file))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            EngineOp::Fallocate {
                file,
                offset,
                len_bytes,
                mode,
            } => opcode::Fallocate::new(types::Fixed(file), len_bytes)
                .offset(offset)
                .mode(mode.flags())
                .build(),
        }
        .user_data(tag);
        for attempt in 0..2 {
            // SAFETY: the entry points at the iovec array of `op` (if any);
            // the caller of this unsafe fn keeps it and its buffers valid
            // until the completion of `tag` is reaped, which is later than
            // the kernel reads the entry.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            if attempt == 0 {
                // Full: hand the queued entries to the kernel to make room.
                self.submit()?;
            }
        }
        Err(EngineError::SubmissionQueueFull)
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                // The completion queue is full (EBUSY) or the kernel is short
                // of memory (EAGAIN): the entries stay queued and go in with
                // the next submit, after the caller has reaped.
                Err(err)
                    if matches!(err.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) =>
                {
                    return Ok(())
                }
                Err(err) => return Err(EngineError::Submit(err)),
            }
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            out.push(Completion {
                tag: cqe.user_data(),
                result: cqe.result(),
            });
            self.in_flight -= 1;
        }
    }

    fn wait(&mut self) -> Result<(), EngineError> {
        if self.in_flight == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(EngineError::Wait(err)),
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.completion_event.as_raw_fd())
    }

    fn clear_completion_fd(&self) {
        // EAGAIN only says that it was already clear.
        let _ = self.completion_event.read();
    }
}

impl Drop for UringEngine {
    /// Closing a ring cancels what is in flight; wait for it instead, so that
    /// no write is lost and no guest buffer is written after its owner let go.
    fn drop(&mut self) {
        let mut done = Vec::new();
        while self.in_flight > 0 {
            if self.wait().is_err() {
                break;
            }
            self.reap(&mut done);
            done.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn engine(file: &std::fs::File, entries: u32) -> UringEngine {
        UringEngine::new(&[file.as_fd()], entries).unwrap()
    }

    #[test]
    fn write_read() {
        let (_tmp, file) = image(1 << 20);
        write_read_roundtrip(&mut engine(&file, 8), &file);
    }

    #[test]
    fn datasync_punch_zero_allocate() {
        let (_tmp, file) = image(1 << 20);
        datasync_and_fallocate(&mut engine(&file, 8), &file);
    }

    #[test]
    fn bad_file_slot_completes_with_ebadf() {
        let (_tmp, file) = image(4096);
        errors_are_completions(&mut engine(&file, 8));
    }

    #[test]
    fn more_ops_than_ring_entries() {
        let (_tmp, file) = image(1 << 20);
        many_ops_in_one_batch(&mut engine(&file, 8), &file);
    }

    #[test]
    fn completion_eventfd_fires() {
        let (_tmp, file) = image(1 << 20);
        let mut engine = engine(&file, 8);
        let fd = engine.completion_fd().unwrap();
        let readable = |timeout: Duration| {
            let mut pollfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack for the call's duration.
            let n = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as i32) };
            n == 1
        };
        assert!(!readable(Duration::ZERO));
        // SAFETY: a datasync carries no buffers.
        unsafe { engine.push(EngineOp::Datasync { file: 0 }, 1) }.unwrap();
        engine.submit().unwrap();
        assert!(readable(Duration::from_secs(5)));
        engine.clear_completion_fd();
        let mut done = Vec::new();
        engine.reap(&mut done);
        assert_eq!(done, [Completion { tag: 1, result: 0 }]);
        assert!(!readable(Duration::ZERO));
    }

    #[test]
    fn drop_waits_for_in_flight_writes() {
        let (_tmp, file) = image(1 << 20);
        let mut engine = engine(&file, 8);
        let mut buf = vec![0x77u8; 65536];
        let iovecs = [IoVec::new(buf.as_mut_ptr(), buf.len())];
        let op = EngineOp::Writev {
            file: 0,
            offset: 0,
            iovecs: &iovecs,
        };
        // SAFETY: `buf` and `iovecs` outlive `engine`, whose drop reaps.
        unsafe { engine.push(op, 1) }.unwrap();
        engine.submit().unwrap();
        drop(engine);
        let mut on_disk = vec![0u8; 65536];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 0).unwrap();
        assert_eq!(on_disk, buf);
    }
}
