//! The synchronous engine: each operation is one blocking syscall, done in
//! `push`. It serves the unit tests (deterministic, no ring) and is the
//! fallback where io_uring cannot be set up.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::{duplicate, Completion, Engine, EngineError, EngineOp, IoVec};

pub struct SyncEngine {
    files: Vec<OwnedFd>,
    done: VecDeque<Completion>,
}

impl SyncEngine {
    pub fn new(files: &[BorrowedFd<'_>]) -> Result<Self, EngineError> {
        Ok(SyncEngine {
            files: duplicate(files)?,
            done: VecDeque::new(),
        })
    }

    fn fd(&self, slot: u32) -> Option<RawFd> {
        self.files.get(slot as usize).map(|f| f.as_raw_fd())
    }
}

/// The syscall's return value, or `-errno` as io_uring reports it.
fn result(ret: i64) -> i32 {
    if ret < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        // Transfers are bounded by the chain length (< 4 GiB) and, in one
        // syscall, by Linux's MAX_RW_COUNT (< 2 GiB).
        ret as i32
    }
}

impl Engine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    unsafe fn push(&mut self, op: EngineOp<'_>, tag: u64) -> Result<(), EngineError> {
        let file = match op {
            EngineOp::Readv { file, .. }
            | EngineOp::Writev { file, .. }
            | EngineOp::Datasync { file }
            | EngineOp::Fallocate { file, .. } => file,
        };
        let Some(fd) = self.fd(file) else {
            self.done.push_back(Completion {
                tag,
                result: -libc::EBADF,
            });
            return Ok(());
        };
        let ret = match op {
            // SAFETY: the caller guarantees that the iovecs and the memory
            // they point to are valid for the duration of the call.
            EngineOp::Readv { offset, iovecs, .. } => unsafe {
                libc::preadv(
                    fd,
                    IoVec::as_raw(iovecs),
                    iovecs.len() as i32,
                    offset as libc::off_t,
                ) as i64
            },
            // SAFETY: as for Readv.
            EngineOp::Writev { offset, iovecs, .. } => unsafe {
                libc::pwritev(
                    fd,
                    IoVec::as_raw(iovecs),
                    iovecs.len() as i32,
                    offset as libc::off_t,
                ) as i64
            },
            // SAFETY: fdatasync on a descriptor this engine owns.
            EngineOp::Datasync { .. } => unsafe { libc::fdatasync(fd) as i64 },
            EngineOp::Fallocate {
                offset,
                len_bytes,
                mode,
                ..
            } => {
                // SAFETY: fallocate on a descriptor this engine owns; no
                // memory is passed.
                unsafe {
                    libc::fallocate(
                        fd,
                        mode.flags(),
                        offset as libc::off_t,
                        len_bytes as libc::off_t,
                    ) as i64
                }
            }
        };
        self.done.push_back(Completion {
            tag,
            result: result(ret),
        });
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.done.drain(..));
    }

    fn wait(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn clear_completion_fd(&self) {}
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use std::os::fd::AsFd;

    fn engine(file: &std::fs::File) -> SyncEngine {
        SyncEngine::new(&[file.as_fd()]).unwrap()
    }

    #[test]
    fn write_read() {
        let (_tmp, file) = image(1 << 20);
        write_read_roundtrip(&mut engine(&file), &file);
    }

    #[test]
    fn datasync_punch_zero_allocate() {
        let (_tmp, file) = image(1 << 20);
        datasync_and_fallocate(&mut engine(&file), &file);
    }

    #[test]
    fn bad_file_slot_completes_with_ebadf() {
        let (_tmp, file) = image(4096);
        errors_are_completions(&mut engine(&file));
    }

    #[test]
    fn many_ops() {
        let (_tmp, file) = image(1 << 20);
        many_ops_in_one_batch(&mut engine(&file), &file);
    }
}
