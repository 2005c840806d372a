//! The tap device and the descriptors frames move through: [`open_tap`]
//! opens one queue per RX/TX pair (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR |
//! IFF_MULTI_QUEUE) and leaves them detached until their pair is enabled
//! ([`Tap::set_queue_attached`]), and [`FrameFd`] reads and writes whole
//! frames with readv/writev over [`IoVec`]s that point into guest memory.
//!
//! Why detached: the kernel steers each flow to one of the tap's attached
//! queues (by flow hash, or to the queue its packets came from), so a queue
//! that is attached but not served swallows flows. A detached queue takes
//! no frames, and detaching one drops the frames waiting in it.
//!
//! [`FrameFd`] is any descriptor that keeps frame boundaries: a tap queue in
//! the backend, a `socketpair(AF_UNIX, SOCK_SEQPACKET)` in the unit tests.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileSlice};

use crate::queue::GuestRam;

/// The virtio-net header the guest and the tap exchange: virtio_net_hdr_v1,
/// with num_buffers, since VIRTIO_F_VERSION_1 is always negotiated.
pub const VNET_HDR_BYTES: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap {name}: no such network interface")]
    Missing { name: String },
    #[error("cannot open {TUN_PATH} for tap {name}")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: not a multi-queue tap (create it with `ip tuntap add dev {name} mode tap multi_queue`), needed for {queues} queue pairs")]
    NotMultiQueue { name: String, queues: u16 },
    #[error(
        "tap {name}: cannot attach queue {queue} (is it a tap device, and may this user use it?)"
    )]
    Attach {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: cannot set the virtio-net header size")]
    VnetHdrSize {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: cannot detach queue {queue} until its pair is enabled")]
    Detach {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: cannot make queue {queue} non-blocking")]
    NonBlocking {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
}

/// One buffer of a frame, valid for `'a`: the guest memory (or test buffer)
/// it was made from is borrowed that long.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoVec<'a> {
    raw: libc::iovec,
    buffer: PhantomData<&'a mut [u8]>,
}

impl<'a> IoVec<'a> {
    /// A buffer in guest memory.
    pub fn from_volatile<B: BitmapSlice>(slice: &VolatileSlice<'a, B>) -> Self {
        IoVec {
            raw: libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            },
            buffer: PhantomData,
        }
    }

    /// A buffer in this process's own memory (tests, headers).
    pub fn from_mut(buffer: &'a mut [u8]) -> Self {
        IoVec {
            raw: libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            },
            buffer: PhantomData,
        }
    }

    pub fn len_bytes(&self) -> usize {
        self.raw.iov_len
    }
}

// SAFETY: an IoVec is a (pointer, length) pair into memory borrowed for 'a;
// this program only hands it to readv/writev. Sending the pair to another
// thread accesses no memory.
unsafe impl Send for IoVec<'_> {}

/// Buffers in guest memory kept as iovecs from one batch to the next, so
/// that a frame is read without looking its buffers up in the memory table
/// again. They hold the guest memory they were made from: its mappings
/// stay while they do, also after the frontend sends a new memory table
/// (the caller checks [`GuestIoVecs::is_from`] and makes them again).
#[derive(Debug, Default)]
pub struct GuestIoVecs {
    mem: Option<Arc<GuestRam>>,
    /// Made from `mem` only ([`GuestIoVecs::push_writable`]); the live ones
    /// start at `front`.
    raw: Vec<libc::iovec>,
    front: usize,
    /// Where a frame goes past the iovecs given to a read: one byte here.
    spill: [u8; 1],
    /// The iovecs of one read, spill included.
    scratch: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into the guest memory this holds an Arc of and
// into its own spill byte; moving them to another thread accesses nothing.
unsafe impl Send for GuestIoVecs {}

/// Above this many dropped iovecs at the front, they are given back.
const GUEST_IOVECS_COMPACT: usize = 1024;

impl GuestIoVecs {
    /// Whether the iovecs were made from `mem` (the same memory table).
    pub fn is_from(&self, mem: &Arc<GuestRam>) -> bool {
        self.mem.as_ref().is_some_and(|own| Arc::ptr_eq(own, mem))
    }

    /// Forgets every iovec; the next ones are made from `mem`.
    pub fn reset(&mut self, mem: &Arc<GuestRam>) {
        self.raw.clear();
        self.front = 0;
        self.mem = Some(Arc::clone(mem));
    }

    /// Forgets every iovec and lets the memory go.
    pub fn clear(&mut self) {
        self.raw.clear();
        self.front = 0;
        self.mem = None;
    }

    pub fn len(&self) -> usize {
        self.raw.len() - self.front
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the iovecs of the `len_bytes` at `addr` (more than one where
    /// they span memory regions): how many, or None when the range is not
    /// all in the memory given to [`GuestIoVecs::reset`] (then nothing is
    /// appended).
    pub fn push_writable(&mut self, addr: GuestAddress, len_bytes: usize) -> Option<usize> {
        let mem = self.mem.as_ref()?;
        let before = self.raw.len();
        let appended = (|| {
            for slice in mem.get_slices(addr, len_bytes, Permissions::Write).ok()? {
                let slice = slice.ok()?;
                self.raw.push(IoVec::from_volatile(&slice).raw);
            }
            Some(self.raw.len() - before)
        })();
        if appended.is_none() {
            self.raw.truncate(before);
        }
        appended
    }

    /// Keeps the first `len` iovecs.
    pub fn truncate(&mut self, len: usize) {
        self.raw.truncate(self.front + len);
    }

    /// Drops the first `count` iovecs.
    pub fn drop_front(&mut self, count: usize) {
        self.front = (self.front + count).min(self.raw.len());
        if self.front == self.raw.len() {
            self.raw.clear();
            self.front = 0;
        } else if self.front > GUEST_IOVECS_COMPACT {
            self.raw.drain(..self.front);
            self.front = 0;
        }
    }

    /// Reads one frame from `fd` into the first `count` iovecs (all if
    /// fewer), and one byte past them into a spill byte: `Ok(Some(n))` with
    /// `n` above their length when the frame did not fit. Ok(None) when no
    /// frame is waiting.
    pub fn read_frame(&mut self, fd: &FrameFd, count: usize) -> io::Result<Option<usize>> {
        let live = &self.raw[self.front..];
        self.scratch.clear();
        self.scratch
            .extend_from_slice(&live[..count.min(live.len())]);
        self.scratch.push(IoVec::from_mut(&mut self.spill).raw);
        // SAFETY: IoVec is repr(transparent) over libc::iovec (its other
        // field is a PhantomData), so the slices have the same layout. The
        // iovecs point into the mappings of `self.mem`, whose Arc this
        // struct holds (push_writable makes them from it and nothing
        // else), and into `self.spill`; both outlive the borrow of `self`
        // that the IoVecs are given.
        let iovecs = unsafe {
            std::slice::from_raw_parts(
                self.scratch.as_ptr().cast::<IoVec<'_>>(),
                self.scratch.len(),
            )
        };
        fd.read_frame(iovecs)
    }
}

/// A descriptor that carries one frame per read or write.
#[derive(Debug)]
pub struct FrameFd {
    fd: OwnedFd,
}

impl FrameFd {
    pub fn new(fd: OwnedFd) -> Self {
        FrameFd { fd }
    }

    /// Reads one frame into `iovecs`; Ok(None) when none is waiting.
    pub fn read_frame(&self, iovecs: &[IoVec<'_>]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: each iovec points to memory borrowed for the iovec's
            // lifetime, which covers this call (IoVec::from_volatile ties it
            // to the guest memory mapping, from_mut to a &mut buffer); the
            // kernel writes at most iov_len bytes into each. IoVec is
            // repr(transparent) over libc::iovec.
            let n = unsafe {
                libc::readv(
                    self.fd.as_raw_fd(),
                    iovecs.as_ptr().cast(),
                    iov_count(iovecs.len()),
                )
            };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(err),
            }
        }
    }

    /// Writes one frame made of `iovecs`; returns the bytes written.
    pub fn write_frame(&self, iovecs: &[IoVec<'_>]) -> io::Result<usize> {
        loop {
            // SAFETY: as in read_frame; the kernel only reads the buffers.
            let n = unsafe {
                libc::writev(
                    self.fd.as_raw_fd(),
                    iovecs.as_ptr().cast(),
                    iov_count(iovecs.len()),
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl AsRawFd for FrameFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn iov_count(len: usize) -> libc::c_int {
    libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX)
}

/// An open tap device: one queue per RX/TX pair.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub queues: Vec<Arc<FrameFd>>,
    /// IFF_MULTI_QUEUE: queues can be detached. A tap without it has one
    /// queue, always attached.
    pub multi_queue: bool,
}

impl Tap {
    /// Attaches queue `queue` to the tap (IFF_ATTACH_QUEUE): the kernel
    /// steers frames to it; or detaches it (IFF_DETACH_QUEUE): it gets none,
    /// and the frames waiting in it are dropped. On a tap without
    /// IFF_MULTI_QUEUE this does nothing: its one queue stays attached.
    pub fn set_queue_attached(&self, queue: usize, attached: bool) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let fd = self
            .queues
            .get(queue)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        set_queue(fd.as_raw_fd(), flag)
    }
}

/// TUNSETQUEUE on a tap queue's descriptor.
fn set_queue(fd: RawFd, flag: libc::c_int) -> io::Result<()> {
    // SAFETY: ifreq is plain data (integers, arrays and a union of them):
    // all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_ifru.ifru_flags = flag as libc::c_short;
    // SAFETY: TUNSETQUEUE reads one ifreq (only its flags) through the
    // pointer, which points to `req` on this stack frame.
    let ret = unsafe { libc::ioctl(fd, libc::TUNSETQUEUE, &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Offloads the guest accepts on RX (TUNSETOFFLOAD's TUN_F_* bits).
pub fn set_offload(queue: &FrameFd, tun_flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long
    // of flags), no pointer; the descriptor is an open tap queue.
    let ret = unsafe {
        libc::ioctl(
            queue.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(tun_flags),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `queues` queues of the existing tap `name`, each non-blocking,
/// with the 12-byte virtio-net header, and detached (on a multi-queue tap)
/// until [`Tap::set_queue_attached`]. One queue may come from a tap without
/// IFF_MULTI_QUEUE.
pub fn open_tap(name: &str, queues: u16) -> Result<Tap, TapError> {
    let c_name = CString::new(name).map_err(|_| TapError::Missing {
        name: name.to_string(),
    })?;
    // TUNSETIFF creates a tap that does not exist; the device must be the
    // one the administrator set up.
    // SAFETY: c_name is a NUL-terminated string that outlives the call.
    if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
        return Err(TapError::Missing {
            name: name.to_string(),
        });
    }
    let mut fds = Vec::with_capacity(usize::from(queues));
    let mut multi_queue = true;
    for queue in 0..queues {
        let multi = match attach(name, libc::IFF_MULTI_QUEUE) {
            Ok(fd) => fd,
            // EINVAL: not a multi-queue tap, or not a tap at all; the same
            // request without IFF_MULTI_QUEUE tells which.
            Err(TapError::Attach { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                let single = attach(name, 0).map_err(|err| match err {
                    TapError::Attach { source, .. } => TapError::Attach {
                        name: name.to_string(),
                        queue,
                        source,
                    },
                    other => other,
                })?;
                if queues > 1 {
                    return Err(TapError::NotMultiQueue {
                        name: name.to_string(),
                        queues,
                    });
                }
                multi_queue = false;
                single
            }
            Err(TapError::Attach { source, .. }) => {
                return Err(TapError::Attach {
                    name: name.to_string(),
                    queue,
                    source,
                })
            }
            Err(err) => return Err(err),
        };
        set_nonblocking(&multi).map_err(|source| TapError::NonBlocking {
            name: name.to_string(),
            queue,
            source,
        })?;
        let size = VNET_HDR_BYTES as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer,
        // which points to `size` on this stack frame.
        let ret = unsafe { libc::ioctl(multi.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(TapError::VnetHdrSize {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        fds.push(Arc::new(FrameFd::new(multi)));
    }
    // No frontend has enabled a pair yet: frames sent to the tap meanwhile
    // are dropped by the kernel rather than queued for a guest that may
    // never read them.
    if multi_queue {
        for (queue, fd) in (0..queues).zip(&fds) {
            set_queue(fd.as_raw_fd(), libc::IFF_DETACH_QUEUE).map_err(|source| {
                TapError::Detach {
                    name: name.to_string(),
                    queue,
                    source,
                }
            })?;
        }
    }
    Ok(Tap {
        name: name.to_string(),
        queues: fds,
        multi_queue,
    })
}

fn attach(name: &str, extra_flags: libc::c_int) -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|source| TapError::OpenTun {
            name: name.to_string(),
            source,
        })?;
    // SAFETY: ifreq is plain data (integers, arrays and a union of them):
    // all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | extra_flags) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq through the pointer,
    // which points to `req` on this stack frame; the name is NUL-terminated
    // (at most IFNAMSIZ - 1 bytes, checked by the CLI, the rest zeroes).
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if ret < 0 {
        return Err(TapError::Attach {
            name: name.to_string(),
            queue: 0,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: into_raw_fd hands over the open descriptor that the File owned.
    Ok(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(file)) })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument; the descriptor is open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an int of flags; the descriptor is open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connected `socketpair(AF_UNIX, SOCK_SEQPACKET)`, non-blocking: frames
/// keep their boundaries, as on a tap. For tests.
pub fn seqpacket_pair() -> io::Result<(FrameFd, FrameFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the two-element array.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two new descriptors that nothing else owns.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((FrameFd::new(a), FrameFd::new(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_their_boundaries() {
        let (a, b) = seqpacket_pair().unwrap();
        let mut first = *b"header+";
        let mut second = *b"payload";
        let n = a
            .write_frame(&[IoVec::from_mut(&mut first), IoVec::from_mut(&mut second)])
            .unwrap();
        assert_eq!(n, 14);
        let mut x = [0u8; 4];
        let mut y = [0u8; 32];
        let n = b
            .read_frame(&[IoVec::from_mut(&mut x), IoVec::from_mut(&mut y)])
            .unwrap();
        assert_eq!(n, Some(14));
        assert_eq!(&x, b"head");
        assert_eq!(&y[..10], b"er+payload");
        assert_eq!(b.read_frame(&[IoVec::from_mut(&mut y)]).unwrap(), None);
    }

    #[test]
    fn a_missing_tap_is_named() {
        let err = open_tap("rvm-no-such-9", 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tap rvm-no-such-9: no such network interface"
        );
    }
}
