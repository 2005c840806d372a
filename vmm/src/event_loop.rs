//! The control-side event loop (mio): console input for the UART, signals
//! that end ringvm, and the exit request raised by a device or vCPU.
//! Nothing on the I/O data path ever passes through here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialConsole;
use crate::devices::virtio::pci::VirtioPciDevice;
use crate::devices::{ExitReason, ExitSignal};

/// Signals that end the VM cleanly (terminal restored, vCPUs stopped).
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
/// Console input read per wakeup; the UART FIFO takes 64 bytes at a time.
const STDIN_CHUNK_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventToken {
    Exit,
    Signal,
    Stdin,
    InputDrained,
    /// The vhost-user socket of the n-th device backend.
    Backend(usize),
}

/// Tokens from here on are backends.
const FIRST_BACKEND_TOKEN: usize = 16;

impl EventToken {
    fn token(self) -> Token {
        Token(match self {
            Self::Exit => 0,
            Self::Signal => 1,
            Self::Stdin => 2,
            Self::InputDrained => 3,
            Self::Backend(i) => FIRST_BACKEND_TOKEN + i,
        })
    }

    fn from_token(t: Token) -> Option<Self> {
        match t.0 {
            0 => Some(Self::Exit),
            1 => Some(Self::Signal),
            2 => Some(Self::Stdin),
            3 => Some(Self::InputDrained),
            n if n >= FIRST_BACKEND_TOKEN => Some(Self::Backend(n - FIRST_BACKEND_TOKEN)),
            _ => None,
        }
    }
}

/// A device whose backend socket the loop watches: when the backend hangs
/// up, the device is told (it then reports NEEDS_RESET to the driver).
pub struct BackendWatch {
    pub fd: RawFd,
    pub device: Arc<Mutex<VirtioPciDevice>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("creating the event loop failed")]
    Poll(#[source] io::Error),
    #[error("registering {what} with the event loop failed")]
    Register {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("blocking the stop signals failed")]
    SignalMask(#[source] io::Error),
    #[error("signalfd for the stop signals failed")]
    SignalFd(#[source] io::Error),
}

/// Blocks STOP_SIGNALS in the calling thread (and the threads it spawns
/// afterwards), so they are only ever seen through the event loop's signalfd.
pub fn block_stop_signals() -> Result<libc::sigset_t, EventLoopError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the signal
    // numbers are valid; pthread_sigmask only reads `set`.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(EventLoopError::SignalMask(io::Error::from_raw_os_error(rc)));
    }
    Ok(set)
}

fn signalfd(set: &libc::sigset_t) -> Result<OwnedFd, EventLoopError> {
    // SAFETY: `set` is an initialised sigset_t; -1 asks for a new fd, which
    // is checked before use.
    let fd = unsafe { libc::signalfd(-1, set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(EventLoopError::SignalFd(io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by signalfd and belongs to nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Console input: stdin forwarded to the UART's receive FIFO.
pub struct ConsoleInput {
    pub serial: Arc<Mutex<SerialConsole>>,
    /// Signalled by the UART when the guest emptied its receive FIFO.
    pub drained: EventFd,
}

pub struct EventLoop {
    poll: Poll,
    exit: Arc<ExitSignal>,
    signals: OwnedFd,
    console: Option<ConsoleInput>,
    backends: Vec<BackendWatch>,
    /// Input read from stdin that did not fit in the FIFO yet.
    pending: Vec<u8>,
    stdin_open: bool,
}

impl EventLoop {
    /// `signal_set` must be what block_stop_signals() returned.
    pub fn new(
        exit: Arc<ExitSignal>,
        signal_set: &libc::sigset_t,
        console: Option<ConsoleInput>,
        backends: Vec<BackendWatch>,
    ) -> Result<Self, EventLoopError> {
        let poll = Poll::new().map_err(EventLoopError::Poll)?;
        let signals = signalfd(signal_set)?;
        let reg = |fd: RawFd, t: EventToken, what| {
            poll.registry()
                .register(&mut SourceFd(&fd), t.token(), Interest::READABLE)
                .map_err(|source| EventLoopError::Register { what, source })
        };
        reg(
            exit.eventfd().as_raw_fd(),
            EventToken::Exit,
            "the exit eventfd",
        )?;
        reg(signals.as_raw_fd(), EventToken::Signal, "the signalfd")?;
        for (i, b) in backends.iter().enumerate() {
            reg(b.fd, EventToken::Backend(i), "a vhost-user backend socket")?;
        }
        let mut stdin_open = false;
        if let Some(c) = &console {
            reg(
                c.drained.as_raw_fd(),
                EventToken::InputDrained,
                "the serial input eventfd",
            )?;
            // epoll refuses regular files and /dev/null: such a stdin has
            // nothing interactive to forward.
            match poll.registry().register(
                &mut SourceFd(&libc::STDIN_FILENO),
                EventToken::Stdin.token(),
                Interest::READABLE,
            ) {
                Ok(()) => stdin_open = true,
                Err(e) => tracing::debug!("stdin is not pollable ({e}); console input disabled"),
            }
        }
        Ok(Self {
            poll,
            exit,
            signals,
            console,
            backends,
            pending: Vec::new(),
            stdin_open,
        })
    }

    /// Runs until something asks the VM to exit; returns why.
    pub fn run(&mut self) -> ExitReason {
        let mut events = Events::with_capacity(16);
        loop {
            if let Some(reason) = self.exit.reason() {
                return reason;
            }
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return ExitReason::Fault(format!("event loop poll failed: {e}"));
            }
            for ev in events.iter() {
                match EventToken::from_token(ev.token()) {
                    Some(EventToken::Exit) => {
                        let _ = self.exit.eventfd().read();
                    }
                    Some(EventToken::Signal) => self.on_signal(),
                    Some(EventToken::Stdin) => self.on_stdin(),
                    Some(EventToken::InputDrained) => self.on_input_drained(),
                    Some(EventToken::Backend(i)) if ev.is_read_closed() || ev.is_error() => {
                        self.on_backend_gone(i)
                    }
                    // Replies the frontend reads on its own thread.
                    Some(EventToken::Backend(_)) => {}
                    None => tracing::warn!(token = ev.token().0, "event for an unknown token"),
                }
            }
        }
    }

    fn on_signal(&mut self) {
        // SAFETY: signalfd_siginfo is plain data, valid when zeroed.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is `size` bytes long.
        let n = unsafe {
            libc::read(
                self.signals.as_raw_fd(),
                std::ptr::addr_of_mut!(info).cast(),
                size,
            )
        };
        if n == size as isize {
            tracing::info!(signal = info.ssi_signo, "stop signal received");
            self.exit.request(ExitReason::Signal(info.ssi_signo as i32));
        }
    }

    fn on_backend_gone(&mut self, i: usize) {
        let Some(b) = self.backends.get(i) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut SourceFd(&b.fd));
        b.device
            .lock()
            .expect("device lock poisoned")
            .on_backend_gone();
    }

    fn on_stdin(&mut self) {
        // Edge-triggered: read everything there is, unless the guest FIFO is
        // still full, in which case on_input_drained() comes back here.
        while self.stdin_open && self.pending.is_empty() {
            let mut buf = [0u8; STDIN_CHUNK_BYTES];
            // SAFETY: reads at most buf.len() bytes into `buf`.
            let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::warn!("reading stdin failed: {e}; console input disabled");
                    self.close_stdin();
                }
                return;
            }
            if n == 0 {
                self.close_stdin();
                return;
            }
            self.pending.extend_from_slice(&buf[..n as usize]);
            self.feed_guest();
            if !stdin_has_more() {
                return;
            }
        }
    }

    fn on_input_drained(&mut self) {
        if let Some(c) = &self.console {
            let _ = c.drained.read();
        }
        self.feed_guest();
        if self.pending.is_empty() && stdin_has_more() {
            self.on_stdin();
        }
    }

    fn feed_guest(&mut self) {
        let Some(c) = &self.console else { return };
        if self.pending.is_empty() {
            return;
        }
        let n = c
            .serial
            .lock()
            .expect("serial lock poisoned")
            .enqueue_input(&self.pending);
        self.pending.drain(..n);
    }

    fn close_stdin(&mut self) {
        self.stdin_open = false;
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&libc::STDIN_FILENO));
    }
}

/// Whether stdin has bytes waiting (FIONREAD); false when unknown.
fn stdin_has_more() -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer given, which is `n`.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::FIONREAD, &mut n) };
    rc == 0 && n > 0
}

/// Puts a terminal on stdin into raw-ish mode (no line buffering, no echo;
/// signals still work so Ctrl-C stops ringvm) and restores it on drop.
pub struct TerminalGuard {
    saved: libc::termios,
}

impl TerminalGuard {
    /// Returns None when stdin is not a terminal.
    pub fn raw_stdin() -> Option<Self> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON | libc::INLCR | libc::IGNCR);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // SAFETY: restores the termios read in raw_stdin() on the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let all = [
            EventToken::Exit,
            EventToken::Signal,
            EventToken::Stdin,
            EventToken::InputDrained,
            EventToken::Backend(0),
            EventToken::Backend(7),
        ];
        for t in all {
            assert_eq!(EventToken::from_token(t.token()), Some(t));
        }
        assert_eq!(EventToken::from_token(Token(9)), None);
    }

    #[test]
    fn exit_request_ends_the_loop() {
        let exit = ExitSignal::new().unwrap();
        // SAFETY: an empty sigset_t for a signalfd that watches nothing.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is valid to initialise.
        unsafe { libc::sigemptyset(&mut set) };
        let mut el = EventLoop::new(exit.clone(), &set, None, Vec::new()).unwrap();
        let e2 = exit.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            e2.request(ExitReason::PowerOff);
        });
        assert_eq!(el.run(), ExitReason::PowerOff);
        t.join().unwrap();
    }
}
