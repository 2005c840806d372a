//! The process around the device: the listening socket, one frontend,
//! signals, and clean ends.
//!
//! [`run`] binds the socket and waits for a frontend (or a signal), serves
//! it with a fresh [`NetBackend`] and vhost-user daemon, and returns when it
//! disconnects; a second frontend that connects meanwhile is accepted and
//! closed at once. SIGTERM and SIGINT end the connection and [`run`]
//! returns Ok. SIGUSR1 logs the counters.
//!
//! The vhost-user-backend 0.24 workarounds are ringvm-blk's (see its
//! daemon.rs): `wait` runs on a waiter thread that signals an eventfd,
//! `start` is called only once the listener is readable, the exit events
//! are sent and the backend stopped before the daemon is dropped. Besides,
//! each pair's tap queue is a listener of that pair's worker epoll, which
//! the worker adds and removes itself through a weak reference to the
//! crate's `VringEpollHandler`.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

use tracing::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonLibError, VhostUserDaemon};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{NetBackend, NetOptions, Token};
use crate::counters::{inc, Counters};
use crate::queue::{GuestRam, GuestRamAtomic};
use crate::signals::SignalFd;
use crate::tap::Tap;

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub device: NetOptions,
}

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
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("the frontend broke the connection: {0}")]
    Connection(String),
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

/// Serves `tap` on `config.socket` until the frontend disconnects or
/// SIGTERM/SIGINT arrives.
pub fn run(tap: Arc<Tap>, config: &DaemonConfig, counters: &Counters) -> Result<(), DaemonError> {
    let signals = SignalFd::new(&[libc::SIGTERM, libc::SIGINT, libc::SIGUSR1])
        .map_err(DaemonError::Signals)?;
    let mut listener = bind(&config.socket)?;
    let epoll = Epoll::new().map_err(DaemonError::EventLoop)?;
    watch(&epoll, listener.as_raw_fd(), Event::Listener)?;
    watch(&epoll, signals.as_raw_fd(), Event::Signal)?;
    info!(
        "serving tap {} ({} queue pairs) on {}",
        tap.name,
        config.device.queue_pairs,
        config.socket.display()
    );
    loop {
        match wait(&epoll)? {
            Event::Signal => {
                if on_signal(&signals, counters) {
                    return Ok(());
                }
            }
            Event::Listener => {
                serve_connection(&tap, config, counters, &mut listener, &signals, &epoll)?;
                return Ok(());
            }
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
fn on_signal(signals: &SignalFd, counters: &Counters) -> bool {
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
fn serve_connection(
    tap: &Arc<Tap>,
    config: &DaemonConfig,
    counters: &Counters,
    listener: &mut Listener,
    signals: &SignalFd,
    epoll: &Epoll,
) -> Result<Ended, DaemonError> {
    let num_queues = 2 * usize::from(config.device.queue_pairs);
    let mem = GuestRamAtomic::new(GuestRam::new());
    let backend = Arc::new(NetBackend::new(
        Arc::clone(tap),
        &config.device,
        mem.clone(),
        counters,
    ));
    let mut daemon = VhostUserDaemon::new("ringvm-net".to_string(), Arc::clone(&backend), mem)
        .map_err(|err| DaemonError::Daemon(err.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    for (pair, handler) in handlers.iter().enumerate() {
        let handler = Arc::downgrade(handler);
        let fd = tap.queues[pair].as_raw_fd();
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
    daemon
        .start(listener)
        .map_err(|err| DaemonError::Daemon(err.to_string()))?;
    inc(&counters.frontends);
    info!("frontend connected");
    let shutdown = daemon
        .shutdown_handle()
        .expect("a started daemon has a connection");

    let done = EventFd::new(EFD_NONBLOCK).map_err(DaemonError::EventLoop)?;
    let done_signal = done.try_clone().map_err(DaemonError::EventLoop)?;
    let waiter = thread::Builder::new()
        .name("ringvm-net-conn".to_string())
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
    backend.stop();
    drop(daemon);
    info!("frontend disconnected");
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
fn refuse_frontend(listener: &Listener, counters: &Counters) {
    match listener.accept() {
        Ok(Some(stream)) => {
            drop(stream);
            inc(&counters.frontends_refused);
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
        let path = dir.path().join("net.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a stale socket file");
        let listener = bind(&path).unwrap();
        drop(listener);
        assert!(!path.exists(), "removed when the listener is dropped");

        let file = dir.path().join("data.bin");
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

        let Err(err) = bind(&dir.path().join("missing/net.sock")) else {
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
