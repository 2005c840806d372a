//! [`QueueEngine`]: the engine a queue worker uses for a qcow2 image. Its
//! file is the *virtual* disk: offsets are guest offsets, and every
//! operation goes to the image's owner thread ([`super::owner`]), which
//! translates and moves the bytes. The queue worker stays as it is for raw
//! images: one submit per kick, one completion eventfd in its epoll.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::engine::{Completer, Completion, Engine, EngineError, EngineOp, FallocateMode, IoVec};

/// What a queue asks of the virtual disk.
#[derive(Debug)]
pub enum VirtualOp {
    Read {
        offset: u64,
        iovecs: Vec<IoVec>,
    },
    Write {
        offset: u64,
        iovecs: Vec<IoVec>,
    },
    /// FLUSH: data and the metadata it depends on made durable.
    Flush,
    /// DISCARD and WRITE_ZEROES: the range reads as zeroes afterwards. With
    /// `unmap` (DISCARD, WRITE_ZEROES with the unmap flag) whole clusters are
    /// given back; without it they stay allocated (zeroes are written).
    Zero {
        offset: u64,
        len_bytes: u64,
        unmap: bool,
    },
    /// Nothing to do (allocation of a range that already reads as zeroes).
    Nop,
}

impl VirtualOp {
    /// Whether the op needs the image to itself: DISCARD rewrites tables
    /// that qcow2-rs caches; FLUSH writes refcounts and then L2 tables, and
    /// an allocation between the two would put an L2 entry on disk whose
    /// refcount is not (qcow2-rs's `flush_meta` does not exclude them).
    pub fn is_barrier(&self) -> bool {
        matches!(self, VirtualOp::Zero { unmap: true, .. } | VirtualOp::Flush)
    }
}

/// Where the owner puts a queue's completions.
pub struct Mailbox {
    done: Mutex<Vec<Completion>>,
    event: EventFd,
    completer: Mutex<Option<Completer>>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox").finish_non_exhaustive()
    }
}

impl Mailbox {
    /// Called by the owner; `signal` once per batch.
    pub fn post(&self, completion: Completion) {
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(completion);
    }

    pub fn signal(&self) {
        // An eventfd write fails only when the counter would overflow,
        // which leaves it readable anyway.
        let _ = self.event.write(1);
    }

    /// Called by the owner after posting a batch: the queue reaps it from
    /// this thread if it can, else its thread is woken.
    pub fn deliver(&self) {
        let completer = self
            .completer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if !completer.is_some_and(|complete| complete()) {
            self.signal();
        }
    }
}

/// A request for the owner thread.
#[derive(Debug)]
pub struct Request {
    pub mailbox: Arc<Mailbox>,
    pub tag: u64,
    pub op: VirtualOp,
}

/// The owner thread's inbox, shared by all queues of the image.
#[derive(Debug)]
pub struct Inbox {
    requests: Mutex<Vec<Request>>,
    pub event: EventFd,
}

impl Inbox {
    pub fn new() -> std::io::Result<Self> {
        Ok(Inbox {
            requests: Mutex::new(Vec::new()),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Moves every waiting request into `out`.
    pub fn take(&self, out: &mut Vec<Request>) {
        let _ = self.event.read();
        out.append(&mut self.requests.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn post(&self, requests: &mut Vec<Request>) {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(requests);
        let _ = self.event.write(1);
    }
}

pub struct QueueEngine {
    inbox: Arc<Inbox>,
    mailbox: Arc<Mailbox>,
    pending: Vec<Request>,
    in_flight: usize,
}

impl QueueEngine {
    pub fn new(inbox: Arc<Inbox>) -> Result<Self, EngineError> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(EngineError::CompletionEventfd)?;
        Ok(QueueEngine {
            inbox,
            mailbox: Arc::new(Mailbox {
                done: Mutex::new(Vec::new()),
                event,
                completer: Mutex::new(None),
            }),
            pending: Vec::new(),
            in_flight: 0,
        })
    }
}

impl Engine for QueueEngine {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    unsafe fn push(&mut self, op: EngineOp<'_>, tag: u64) -> Result<(), EngineError> {
        let op = match op {
            EngineOp::Readv { offset, iovecs, .. } => VirtualOp::Read {
                offset,
                iovecs: iovecs.to_vec(),
            },
            EngineOp::Writev { offset, iovecs, .. } => VirtualOp::Write {
                offset,
                iovecs: iovecs.to_vec(),
            },
            EngineOp::Datasync { .. } => VirtualOp::Flush,
            EngineOp::Fallocate {
                offset,
                len_bytes,
                mode: FallocateMode::PunchHole,
                ..
            } => VirtualOp::Zero {
                offset,
                len_bytes,
                unmap: true,
            },
            EngineOp::Fallocate {
                offset,
                len_bytes,
                mode: FallocateMode::ZeroRange,
                ..
            } => VirtualOp::Zero {
                offset,
                len_bytes,
                unmap: false,
            },
            EngineOp::Fallocate { .. } => VirtualOp::Nop,
        };
        self.pending.push(Request {
            mailbox: Arc::clone(&self.mailbox),
            tag,
            op,
        });
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> Result<(), EngineError> {
        if !self.pending.is_empty() {
            self.inbox.post(&mut self.pending);
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let before = out.len();
        out.append(
            &mut self
                .mailbox
                .done
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.in_flight -= out.len() - before;
    }

    fn wait(&mut self) -> Result<(), EngineError> {
        self.submit()?;
        if self.in_flight == 0 {
            return Ok(());
        }
        loop {
            if !self
                .mailbox
                .done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
            {
                return Ok(());
            }
            let mut pollfd = libc::pollfd {
                fd: self.mailbox.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let ret = unsafe { libc::poll(&mut pollfd, 1, -1) };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(EngineError::Wait(err));
                }
            }
            let _ = self.mailbox.event.read();
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.mailbox.event.as_raw_fd())
    }

    fn clear_completion_fd(&self) {
        let _ = self.mailbox.event.read();
    }

    fn set_completer(&mut self, complete: Completer) {
        *self
            .mailbox
            .completer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(complete);
    }
}

impl Drop for QueueEngine {
    /// The iovecs of requests in flight point into guest memory that the
    /// queue worker unmaps after its engine is gone: wait for them.
    fn drop(&mut self) {
        let mut scratch = Vec::new();
        while self.in_flight > 0 {
            if self.wait().is_err() {
                break;
            }
            scratch.clear();
            self.reap(&mut scratch);
        }
    }
}
