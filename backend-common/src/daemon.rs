//! The process around a vhost-user device: the listening socket, one
//! frontend at a time, signals, and clean ends. Generic over the device: a
//! backend describes itself with a [`Device`].
//!
//! [`run`] binds the socket and waits for a frontend (or a signal). Each
//! frontend gets a fresh backend ([`Device::new_backend`]) and vhost-user
//! daemon; a second frontend that connects meanwhile is accepted and closed
//! at once. When the frontend disconnects, [`run`] returns (or, with
//! `keep_listening`, waits for the next one). SIGTERM and SIGINT end it the
//! same way: the connection is shut down, the backend stopped
//! ([`Device::stop`]), and [`run`] returns Ok. SIGUSR1 logs the counters.
//!
//! # What vhost-user-backend 0.24 does not do for us, and the workarounds
//!
//! - A `VhostUserDaemon` serves one connection: its handler stays "owned"
//!   (a second SET_OWNER fails) and its worker threads end with the exit
//!   event sent after the connection. So each connection gets a new daemon
//!   and a new backend (new worker threads and rings); what the device
//!   serves and its counters are shared. Each such daemon leaks one eventfd
//!   per worker thread: `VringEpollHandler::new` turns our exit-event
//!   consumer into a raw fd that nothing closes.
//! - `VhostUserDaemon::wait` blocks until the connection ends, with no way to
//!   also watch signals or the listener, and there is no shutdown method on
//!   the daemon itself: a waiter thread owns the daemon and signals an
//!   eventfd when `wait` returns; the `ShutdownHandle` taken before ends the
//!   connection on SIGTERM.
//! - `VhostUserDaemon::start` accepts in a loop that blocks (or spins on a
//!   non-blocking listener): it is called only once the listener is readable.
//! - Worker threads are never joined and the backend hears nothing when they
//!   stop: before the daemon is dropped, the exit events are sent and
//!   [`Device::stop`] runs, from this thread.
//! - A device's own event sources (ringvm-blk's io_uring completion eventfd,
//!   ringvm-net's tap queues) are "listeners" of the worker's epoll
//!   (`VringEpollHandler::register_listener`), whose data values must lie
//!   above the ones the crate reserves; [`Device::attach`] registers them.
//! - `vhost_user_backend::Error` is not a `std::error::Error`: its message
//!   is kept as text.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use tracing::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{
    Error as DaemonLibError, VhostUserBackend, VhostUserDaemon, VringEpollHandler,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::counters::{inc, DaemonCounters};
use crate::signals::SignalFd;

/// Guest memory as both backends map it: no dirty bitmap.
pub type GuestRam = GuestMemoryMmap<()>;
pub type GuestRamAtomic = GuestMemoryAtomic<GuestRam>;

/// The worker epoll handlers of one connection's daemon.
pub type EpollHandlers<B> = [Arc<VringEpollHandler<Arc<B>>>];

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--socket {path}: exists and is not a unix socket")]
    NotASocket { path: PathBuf },
    #[error("--socket {path}: cannot listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("cannot set up the event loop")]
    EventLoop(#[source] io::Error),
    /// The device's backend could not be made ([`Device::new_backend`]).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("the frontend broke the connection: {0}")]
    Connection(String),
}

/// What the daemon loop needs from a device.
pub trait Device {
    /// The `VhostUserBackend` made for each connection.
    type Backend: VhostUserBackend<Bitmap = ()> + 'static;

    /// The process name: names the vhost-user daemon and, with `-conn`, the
    /// connection's waiter thread.
    const NAME: &'static str;

    /// What is served, for the "serving ... on SOCKET" log line.
    fn describe(&self) -> String;

    fn counters(&self) -> &dyn DaemonCounters;

    /// A fresh backend for one connection, on guest memory the daemon fills.
    fn new_backend(&self, mem: GuestRamAtomic) -> Result<Arc<Self::Backend>, DaemonError>;

    /// Registers the device's own event sources with the connection's worker
    /// epolls, before the daemon starts.
    fn attach(
        &self,
        backend: &Arc<Self::Backend>,
        handlers: &EpollHandlers<Self::Backend>,
    ) -> Result<(), DaemonError>;

    /// Stops the backend after its workers were told to exit and before its
    /// daemon is dropped; returns the requests that were in flight, for a
    /// device that counts them.
    fn stop(&self, backend: &Self::Backend) -> Option<usize>;
}

/// The daemon loop's epoll tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// A frontend is connecting.
    Listener,
    /// A signal is pending.
    Signal,
    /// The connection's vhost-user thread ended.
    ConnectionDone,
}

impl Event {
    const ALL: [Event; 3] = [Event::Listener, Event::Signal, Event::ConnectionDone];

    fn data(self) -> u64 {
        self as u64
    }

    fn from_data(data: u64) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.data() == data)
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Disconnected,
    Terminated,
}

/// Serves `device` on `socket` until the frontend disconnects (every
/// frontend with `keep_listening`) or SIGTERM/SIGINT arrives.
pub fn run<D>(device: &D, socket: &Path, keep_listening: bool) -> Result<(), DaemonError>
where
    D: Device,
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    let signals = SignalFd::new(&[libc::SIGTERM, libc::SIGINT, libc::SIGUSR1])
        .map_err(DaemonError::Signals)?;
    let mut listener = bind(socket)?;
    let epoll = Epoll::new().map_err(DaemonError::EventLoop)?;
    watch(&epoll, listener.as_raw_fd(), Event::Listener)?;
    watch(&epoll, signals.as_raw_fd(), Event::Signal)?;
    info!("serving {} on {}", device.describe(), socket.display());
    loop {
        match wait(&epoll)? {
            Event::Signal => {
                if on_signal(&signals, device.counters()) {
                    return Ok(());
                }
            }
            Event::Listener => match serve_connection(device, &mut listener, &signals, &epoll) {
                Ok(Ended::Terminated) => return Ok(()),
                Ok(Ended::Disconnected) if !keep_listening => return Ok(()),
                Ok(Ended::Disconnected) => info!("waiting for the next frontend"),
                Err(err) if keep_listening => {
                    error!("{}; waiting for the next frontend", error_chain(&err));
                }
                Err(err) => return Err(err),
            },
            Event::ConnectionDone => {}
        }
    }
}

/// The error and its sources, on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Listens on `path`, replacing a stale socket file but nothing else.
fn bind(path: &Path) -> Result<Listener, DaemonError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket file left by a backend that did not end cleanly (or
            // one still serving: like the vhost-user-backend crate, the new
            // backend takes the path over).
            fs::remove_file(path).map_err(|source| DaemonError::Bind {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(DaemonError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DaemonError::Bind {
                path: path.to_owned(),
                source,
            })
        }
    }
    Listener::new(path, false).map_err(|err| DaemonError::Bind {
        path: path.to_owned(),
        source: match err {
            VhostUserError::SocketError(source) => source,
            other => io::Error::other(other.to_string()),
        },
    })
}

fn watch(epoll: &Epoll, fd: i32, event: Event) -> Result<(), DaemonError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, event.data()),
        )
        .map_err(DaemonError::EventLoop)
}

fn unwatch(epoll: &Epoll, fd: i32) {
    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
}

fn wait(epoll: &Epoll) -> Result<Event, DaemonError> {
    let mut events = [EpollEvent::default(); 1];
    loop {
        match epoll.wait(-1, &mut events) {
            Ok(1) => {
                if let Some(event) = Event::from_data(events[0].data()) {
                    return Ok(event);
                }
            }
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(DaemonError::EventLoop(err)),
        }
    }
}

/// Handles the pending signals; true when one of them asks to exit.
fn on_signal(signals: &SignalFd, counters: &dyn DaemonCounters) -> bool {
    let mut exit = false;
    loop {
        match signals.read() {
            Ok(Some(libc::SIGUSR1)) => info!("counters: {}", counters.snapshot()),
            Ok(Some(signal)) => {
                info!("signal {signal}: exiting once the I/O in flight completes");
                exit = true;
            }
            Ok(None) => return exit,
            Err(err) => {
                error!("cannot read signals: {err}");
                return exit;
            }
        }
    }
}

/// Accepts the frontend that made the listener readable and serves it until
/// it disconnects or a signal ends the process.
fn serve_connection<D>(
    device: &D,
    listener: &mut Listener,
    signals: &SignalFd,
    epoll: &Epoll,
) -> Result<Ended, DaemonError>
where
    D: Device,
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    let counters = device.counters();
    let mem = GuestRamAtomic::new(GuestRam::new());
    let backend = device.new_backend(mem.clone())?;
    let mut daemon = VhostUserDaemon::new(D::NAME.to_string(), Arc::clone(&backend), mem)
        .map_err(|err| DaemonError::Daemon(err.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    device.attach(&backend, &handlers)?;
    daemon
        .start(listener)
        .map_err(|err| DaemonError::Daemon(err.to_string()))?;
    inc(&counters.frontend_counters().frontends);
    info!("frontend connected");
    let shutdown = daemon
        .shutdown_handle()
        .expect("a started daemon has a connection");

    let done = EventFd::new(EFD_NONBLOCK).map_err(DaemonError::EventLoop)?;
    let done_signal = done.try_clone().map_err(DaemonError::EventLoop)?;
    let waiter = thread::Builder::new()
        .name(format!("{}-conn", D::NAME))
        .spawn(move || {
            let result = daemon.wait();
            let _ = done_signal.write(1);
            (daemon, result)
        })
        .map_err(DaemonError::EventLoop)?;
    watch(epoll, done.as_raw_fd(), Event::ConnectionDone)?;

    let mut terminated = false;
    loop {
        match wait(epoll)? {
            Event::ConnectionDone => break,
            Event::Signal => {
                if on_signal(signals, counters) && !terminated {
                    terminated = true;
                    shutdown.shutdown();
                }
            }
            Event::Listener => refuse_frontend(listener, counters),
        }
    }
    unwatch(epoll, done.as_raw_fd());
    let (daemon, result) = waiter.join().expect("the connection waiter does not panic");
    for handler in &handlers {
        handler.send_exit_event();
    }
    let drained = device.stop(&backend);
    drop(daemon);
    match drained {
        Some(drained) => info!("frontend disconnected ({drained} requests were in flight)"),
        None => info!("frontend disconnected"),
    }
    match result {
        Ok(()) => {}
        Err(DaemonLibError::HandleRequest(
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_),
        )) => {}
        Err(_) if terminated => {}
        Err(err) => return Err(DaemonError::Connection(err.to_string())),
    }
    Ok(if terminated {
        Ended::Terminated
    } else {
        Ended::Disconnected
    })
}

/// A second frontend while one is served: accepted and closed at once, so
/// it sees end-of-file rather than waiting in the backlog.
fn refuse_frontend(listener: &Listener, counters: &dyn DaemonCounters) {
    match listener.accept() {
        Ok(Some(stream)) => {
            drop(stream);
            inc(&counters.frontend_counters().frontends_refused);
            warn!("refused a second frontend: one is connected already");
        }
        Ok(None) => {}
        Err(err) => warn!("cannot accept a frontend: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn bind_replaces_a_stale_socket_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backend.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a stale socket file");
        let listener = bind(&path).unwrap();
        drop(listener);
        assert!(!path.exists(), "removed when the listener is dropped");

        let file = dir.path().join("disk.img");
        fs::write(&file, b"precious").unwrap();
        let Err(err) = bind(&file) else {
            panic!("bound over a regular file")
        };
        assert_eq!(
            err.to_string(),
            format!(
                "--socket {}: exists and is not a unix socket",
                file.display()
            )
        );
        assert_eq!(fs::read(&file).unwrap(), b"precious");

        let Err(err) = bind(&dir.path().join("missing/backend.sock")) else {
            panic!("bound in a missing directory")
        };
        assert!(err.to_string().contains("cannot listen"), "{err}");
    }

    #[test]
    fn event_tokens_round_trip() {
        for event in Event::ALL {
            assert_eq!(Event::from_data(event.data()), Some(event));
        }
        assert_eq!(Event::from_data(99), None);
    }
}
