//! A VMM's side of the vhost-user connection, for the backends' tests
//! (feature `test-support`): the backend binary on a real unix socket
//! ([`BackendProcess`]) and the guest ([`Guest`]): the vhost crate's
//! frontend, memfd guest memory, hand-laid split-queue rings, and kick/call
//! eventfds. What is device-specific (requests, the tap's side) stays in
//! each backend's `tests/support`.

mod frontend;
mod process;

use std::time::Duration;

pub use frontend::{memfd, wait_readable, Desc, Guest, Queue, MEM_BYTES, QUEUE_SIZE};
pub use process::BackendProcess;

/// How long a test waits for the backend: a socket, an exit, a used entry.
pub const TIMEOUT: Duration = Duration::from_secs(10);
