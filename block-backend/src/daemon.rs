//! The process around the device: [`run`] serves the image with the shared
//! daemon loop of `ringvm-backend` (the listening socket, one frontend at a
//! time, signals, clean ends, and the vhost-user-backend 0.24 workarounds:
//! see [`ringvm_backend::daemon`]).
//!
//! Each frontend gets a fresh [`BlkBackend`] and vhost-user daemon; the image
//! and the counters are shared. When the frontend disconnects, [`run`]
//! returns (or, with `--keep-listening`, waits for the next one). SIGTERM and
//! SIGINT end it the same way: the connection is shut down, the I/O in
//! flight completes, and [`run`] returns Ok. SIGUSR1 logs the counters.
//!
//! What is ringvm-blk's own:
//! - Worker threads are never joined and the backend hears nothing when they
//!   stop: before the daemon is dropped, [`BlkBackend::stop`] waits for the
//!   I/O in flight on every queue.
//! - The io_uring completion eventfd is a "listener" of the worker's epoll
//!   (`VringEpollHandler::register_listener`), whose data values must lie
//!   above the ones the crate reserves; see [`crate::backend::Token`].

use std::path::PathBuf;
use std::sync::Arc;

use ringvm_backend::counters::DaemonCounters;
use ringvm_backend::daemon::{self as common, Device, EpollHandlers};
use vmm_sys_util::epoll::EventSet;

pub use ringvm_backend::daemon::{error_chain, DaemonError};

use crate::backend::{BlkBackend, BlkOptions, Token};
use crate::counters::Counters;
use crate::image::ImageFormat;
use crate::queue::GuestRamAtomic;

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub keep_listening: bool,
    pub device: BlkOptions,
}

/// Serves `image` on `config.socket` until the frontend disconnects (every
/// frontend with `keep_listening`) or SIGTERM/SIGINT arrives.
pub fn run(
    image: Arc<dyn ImageFormat>,
    config: &DaemonConfig,
    counters: &Counters,
) -> Result<(), DaemonError> {
    let device = BlkDevice {
        image,
        config,
        counters,
    };
    common::run(&device, &config.socket, config.keep_listening)
}

/// The image served, and what each connection's backend is made from.
struct BlkDevice<'a> {
    image: Arc<dyn ImageFormat>,
    config: &'a DaemonConfig,
    counters: &'a Counters,
}

impl Device for BlkDevice<'_> {
    type Backend = BlkBackend;
    const NAME: &'static str = "ringvm-blk";

    fn describe(&self) -> String {
        format!(
            "{} image of {} sectors",
            self.image.name(),
            self.image.capacity_sectors()
        )
    }

    fn counters(&self) -> &dyn DaemonCounters {
        self.counters
    }

    fn new_backend(&self, mem: GuestRamAtomic) -> Result<Arc<BlkBackend>, DaemonError> {
        BlkBackend::new(
            Arc::clone(&self.image),
            &self.config.device,
            mem,
            self.counters,
        )
        .map(Arc::new)
        .map_err(|err| DaemonError::Backend(Box::new(err)))
    }

    fn attach(
        &self,
        backend: &Arc<BlkBackend>,
        handlers: &EpollHandlers<BlkBackend>,
    ) -> Result<(), DaemonError> {
        let num_queues = usize::from(self.config.device.num_queues);
        for (queue, handler) in handlers.iter().enumerate() {
            if let Some(fd) = backend.completion_fd(queue) {
                handler
                    .register_listener(fd, EventSet::IN, Token::Completion.device_event(num_queues))
                    .map_err(DaemonError::EventLoop)?;
            }
        }
        Ok(())
    }

    fn stop(&self, backend: &BlkBackend) -> Option<usize> {
        Some(backend.stop())
    }
}
