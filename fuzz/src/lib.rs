//! What the fuzz targets share: a byte cursor over the input, a ringvm-blk
//! queue worker in-process (memfd image, sync engine, a vring over guest
//! memory), built as `BlkBackend` builds its workers, and a tap double for
//! ringvm-net ([`NetTapDouble`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ringvm_blk::backend::{queue_settings, BlkOptions};
use ringvm_blk::counters::QueueCounters;
use ringvm_blk::engine::sync::SyncEngine;
use ringvm_blk::image::{open, Format, ImageFormat, OpenOptions};
use ringvm_blk::queue::{engine_files, GuestRam, GuestRamAtomic, QueueWorker, Vring};
use vhost_user_backend::VringT;
use vm_memory::{Bytes as _, GuestAddress};

pub mod net;

/// Reads the input front to back; zeroes once it is exhausted, so every
/// input decodes to something.
pub struct Bytes<'a>(pub &'a [u8]);

impl Bytes<'_> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.u8();
        }
    }
    /// Up to `max` bytes, as many as are left.
    pub fn take(&mut self, max: usize) -> &[u8] {
        let n = max.min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }
}

/// The disk the blk targets serve: a memfd of [`IMAGE_BYTES`], opened by
/// ringvm-blk through /proc/self/fd as a raw image.
pub struct MemImage {
    pub file: File,
    pub image: Arc<dyn ImageFormat>,
}

pub const IMAGE_BYTES: u64 = 64 << 10;

/// Byte `offset` of a fresh image.
pub fn image_pattern(offset: u64) -> u8 {
    (offset / 512 * 7 + offset % 251) as u8
}

impl MemImage {
    /// The process's image (opened once: ringvm-blk's raw image and the
    /// engine's descriptors all refer to the same memfd).
    pub fn get() -> &'static MemImage {
        static IMAGE: OnceLock<MemImage> = OnceLock::new();
        IMAGE.get_or_init(|| {
            // SAFETY: memfd_create takes a NUL-terminated name and flags; it
            // returns a new descriptor that nothing else owns, or -1.
            let fd = unsafe { libc::memfd_create(c"ringvm-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` was just created and is owned by nobody else.
            let mut file = unsafe { File::from_raw_fd(fd) };
            let bytes: Vec<u8> = (0..IMAGE_BYTES).map(image_pattern).collect();
            file.write_all(&bytes).expect("fill the memfd image");
            let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            let options = OpenOptions {
                format: Some(Format::Raw),
                ..OpenOptions::default()
            };
            let image = open(&path, options).expect("open the memfd image");
            MemImage { file, image }
        })
    }

    /// Puts back the fresh image's bytes (and blocks, after punched holes).
    pub fn reset(&self) {
        static FRESH: OnceLock<Vec<u8>> = OnceLock::new();
        let fresh = FRESH.get_or_init(|| (0..IMAGE_BYTES).map(image_pattern).collect());
        self.file
            .write_all_at(fresh, 0)
            .expect("reset the memfd image");
    }

    pub fn contents(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; IMAGE_BYTES as usize];
        self.file
            .read_exact_at(&mut bytes, 0)
            .expect("read the memfd image");
        bytes
    }
}

/// One queue of a ringvm-blk device, served in-process by the sync engine.
pub struct BlkQueue {
    pub mem: GuestRamAtomic,
    pub vring: Vring,
    pub worker: QueueWorker,
    pub counters: Arc<QueueCounters>,
}

/// The serial every fuzzed device answers GET_ID with.
pub const SERIAL: &str = "fuzz-disk";

impl BlkQueue {
    /// A worker for a device of `max_queue_size` (as `--queue-size`) over
    /// `ram`, its vring not configured yet.
    pub fn new(ram: GuestRam, max_queue_size: u16, readonly: bool) -> BlkQueue {
        let image = Arc::clone(&MemImage::get().image);
        let options = BlkOptions {
            num_queues: 1,
            queue_size: max_queue_size,
            readonly,
            serial: Some(SERIAL.to_string()),
        };
        let settings = queue_settings(image.capacity_sectors(), &options);
        let engine = SyncEngine::new(&engine_files(&*image)).expect("sync engine");
        let mem = GuestRamAtomic::new(ram);
        let vring = Vring::new(mem.clone(), max_queue_size).expect("vring");
        let counters = Arc::new(QueueCounters::default());
        let worker = QueueWorker::new(
            0,
            image,
            Box::new(engine),
            mem.clone(),
            settings,
            max_queue_size,
            Arc::clone(&counters),
        );
        BlkQueue {
            mem,
            vring,
            worker,
            counters,
        }
    }

    /// What the vhost-user messages would set: size, ring addresses,
    /// EVENT_IDX, ready and enabled.
    pub fn configure(&self, size: u16, desc: u64, avail: u64, used: u64, event_idx: bool) {
        self.vring.set_queue_size(size);
        // Misaligned addresses are refused (and the queue keeps the old
        // ones), as with VHOST_USER_SET_VRING_ADDR.
        let _ = self.vring.set_queue_info(desc, avail, used);
        self.vring.set_queue_event_idx(event_idx);
        self.vring.set_queue_ready(true);
        self.vring.set_enabled(true);
    }

    pub fn ram(&self) -> Arc<GuestRam> {
        use vm_memory::GuestAddressSpace;
        self.mem.memory().into_inner()
    }
}

/// Copies `len` bytes of guest memory at `addr` (which must be mapped).
pub fn read_guest(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    ram.read_slice(&mut bytes, GuestAddress(addr))
        .expect("a mapped guest range");
    bytes
}

/// Whether RINGVM_FUZZ_TRACE is set: targets then print what each input
/// does (for reading a crash, or checking that a seed does what it says).
pub fn tracing() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("RINGVM_FUZZ_TRACE").is_some())
}

/// The tap of a ringvm-net device, as a double: one connected
/// `socketpair(AF_UNIX, SOCK_SEQPACKET)` per queue pair (frames keep their
/// boundaries, as on a tap queue). The backend gets one end of each as its
/// tap queue; the target keeps the other, the network side, in `peers`.
/// Unlike a tap, it does not take TUNSETOFFLOAD (the backend logs that and
/// goes on), its queues are never detached (it says it is not multi-queue),
/// and it hands over whatever the target writes, also frames shorter than
/// a virtio-net header.
pub struct NetTapDouble {
    pub tap: Arc<ringvm_net::tap::Tap>,
    pub peers: Vec<ringvm_net::tap::FrameFd>,
    /// The backend's ends can queue every frame a queue's worth of chains
    /// holds (the send buffers were raised past the system's limit, which
    /// needs CAP_NET_ADMIN); without it a write may fail with EAGAIN.
    pub roomy: bool,
}

/// Send buffer of each end of the tap double: 64 frames of 64 KiB with
/// the kernel's per-frame overhead.
const TAP_DOUBLE_SNDBUF_BYTES: libc::c_int = 16 << 20;

fn set_sndbuf(fd: &impl AsRawFd) -> bool {
    let set = |option: libc::c_int| {
        let size = TAP_DOUBLE_SNDBUF_BYTES;
        // SAFETY: setsockopt reads an int of `size_of::<c_int>()` bytes
        // through the pointer, which points to `size` on this stack frame;
        // the descriptor is an open socket.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        ret == 0
    };
    // SO_SNDBUF alone is capped at net.core.wmem_max.
    set(libc::SO_SNDBUFFORCE) || {
        set(libc::SO_SNDBUF);
        false
    }
}

impl NetTapDouble {
    pub fn new(pairs: u16) -> NetTapDouble {
        let mut queues = Vec::new();
        let mut peers = Vec::new();
        let mut roomy = true;
        for _ in 0..pairs {
            let (backend_end, peer) = ringvm_net::tap::seqpacket_pair().expect("socketpair");
            roomy &= set_sndbuf(&backend_end);
            set_sndbuf(&peer);
            queues.push(Arc::new(backend_end));
            peers.push(peer);
        }
        // Not multi-queue: attaching and detaching a queue (TUNSETQUEUE)
        // is then nothing, and frames stay in a detached pair's queue.
        let tap = ringvm_net::tap::Tap {
            name: "fuzz-tap".to_string(),
            queues,
            multi_queue: false,
        };
        NetTapDouble {
            tap: Arc::new(tap),
            peers,
            roomy,
        }
    }
}
