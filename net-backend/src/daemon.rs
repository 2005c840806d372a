//! The process around the device: [`run`] serves the tap with the shared
//! daemon loop of `ringvm-backend` (the listening socket, one frontend,
//! signals, clean ends, and the vhost-user-backend 0.24 workarounds: see
//! [`ringvm_backend::daemon`]).
//!
//! [`run`] binds the socket and waits for a frontend (or a signal), serves
//! it with a fresh [`NetBackend`] and vhost-user daemon, and returns when it
//! disconnects; a second frontend that connects meanwhile is accepted and
//! closed at once. SIGTERM and SIGINT end the connection and [`run`]
//! returns Ok. SIGUSR1 logs the counters.
//!
//! What is ringvm-net's own: each pair's tap queue is a listener of that
//! pair's worker epoll, which the worker adds and removes itself through a
//! weak reference to the crate's `VringEpollHandler`; and so is the eventfd
//! the pair's rings signal when the frontend changes their state (see
//! [`crate::vring`]), registered here for the whole connection.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use ringvm_backend::counters::DaemonCounters;
use ringvm_backend::daemon::{self as common, Device, EpollHandlers};
use vmm_sys_util::epoll::EventSet;

pub use ringvm_backend::daemon::{error_chain, DaemonError};

use crate::backend::{NetBackend, NetOptions, Token};
use crate::counters::Counters;
use crate::queue::GuestRamAtomic;
use crate::tap::Tap;

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub device: NetOptions,
}

/// Serves `tap` on `config.socket` until the frontend disconnects or
/// SIGTERM/SIGINT arrives.
pub fn run(tap: Arc<Tap>, config: &DaemonConfig, counters: &Counters) -> Result<(), DaemonError> {
    let device = NetDevice {
        tap,
        config,
        counters,
    };
    common::run(&device, &config.socket, false)
}

/// The tap served, and what each connection's backend is made from.
struct NetDevice<'a> {
    tap: Arc<Tap>,
    config: &'a DaemonConfig,
    counters: &'a Counters,
}

impl Device for NetDevice<'_> {
    type Backend = NetBackend;
    const NAME: &'static str = "ringvm-net";

    fn describe(&self) -> String {
        format!(
            "tap {} ({} queue pairs)",
            self.tap.name, self.config.device.queue_pairs
        )
    }

    fn counters(&self) -> &dyn DaemonCounters {
        self.counters
    }

    fn new_backend(&self, mem: GuestRamAtomic) -> Result<Arc<NetBackend>, DaemonError> {
        NetBackend::new(
            Arc::clone(&self.tap),
            &self.config.device,
            mem,
            self.counters,
        )
        .map(Arc::new)
        .map_err(DaemonError::EventLoop)
    }

    fn attach(
        &self,
        backend: &Arc<NetBackend>,
        handlers: &EpollHandlers<NetBackend>,
    ) -> Result<(), DaemonError> {
        let num_queues = 2 * usize::from(self.config.device.queue_pairs);
        for (pair, handler) in handlers.iter().enumerate() {
            if let Some(event) = backend.ring_state_event(pair) {
                handler
                    .register_listener(
                        event.as_raw_fd(),
                        EventSet::IN,
                        Token::RingState.device_event(num_queues),
                    )
                    .map_err(DaemonError::EventLoop)?;
            }
            let handler = Arc::downgrade(handler);
            let fd = self.tap.queues[pair].as_raw_fd();
            let data = Token::Tap.device_event(num_queues);
            backend.set_tap_watch(
                pair,
                Box::new(move |on| {
                    let Some(handler) = handler.upgrade() else {
                        return Ok(());
                    };
                    if on {
                        handler.register_listener(fd, EventSet::IN, data)
                    } else {
                        handler.unregister_listener(fd, EventSet::IN, data)
                    }
                }),
            );
        }
        Ok(())
    }

    fn stop(&self, backend: &NetBackend) -> Option<usize> {
        backend.stop();
        None
    }
}
