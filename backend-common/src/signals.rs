//! SIGTERM, SIGINT and SIGUSR1 as readable events: blocked in every thread
//! and read from a signalfd by the daemon's event loop.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `signals` in the calling thread, which every thread spawned
    /// later inherits, and returns a non-blocking signalfd that reads them.
    /// Call it before any other thread exists.
    pub fn new(signals: &[libc::c_int]) -> io::Result<Self> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is given.
        if unsafe { libc::sigemptyset(set.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: initialised by sigemptyset above.
        let mut set = unsafe { set.assume_init() };
        for &signal in signals {
            // SAFETY: `set` is an initialised sigset_t.
            if unsafe { libc::sigaddset(&mut set, signal) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `set` is initialised; the old mask is not asked for.
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        // SAFETY: -1 asks for a new descriptor; `set` is initialised.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// The next pending signal, or None when there is none.
    pub fn read(&self) -> io::Result<Option<libc::c_int>> {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        loop {
            // SAFETY: reads at most one signalfd_siginfo into `info`, which
            // is that large.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    info.as_mut_ptr().cast(),
                    size_of::<libc::signalfd_siginfo>(),
                )
            };
            if n == size_of::<libc::signalfd_siginfo>() as isize {
                // SAFETY: the kernel filled the whole structure.
                let info = unsafe { info.assume_init() };
                return Ok(Some(info.ssi_signo as libc::c_int));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(err),
            }
        }
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_blocked_signal() {
        // SIGUSR2 is used by nothing else in this test binary; the mask is
        // per thread, so only this test thread blocks it.
        let signals = SignalFd::new(&[libc::SIGUSR2]).unwrap();
        assert_eq!(signals.read().unwrap(), None);
        // SAFETY: raises a signal blocked in this thread: it stays pending
        // for the signalfd instead of running a handler.
        unsafe {
            libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2);
        }
        assert_eq!(signals.read().unwrap(), Some(libc::SIGUSR2));
        assert_eq!(signals.read().unwrap(), None);
    }
}
