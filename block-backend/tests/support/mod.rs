//! A VMM's side of the vhost-user connection, for the backend tests: the
//! `ringvm-blk` binary on a real unix socket, the vhost crate's frontend,
//! guest memory in a memfd that both processes map, split-queue rings laid
//! out here by hand, and kick/call eventfds.

#![allow(dead_code)]

pub mod qcow2;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const IMAGE_BYTES: u64 = 4 << 20;
pub const MEM_BYTES: usize = 16 << 20;
pub const QUEUE_SIZE: u16 = 64;
/// Queue `q`'s rings: descriptors at `q * 0x4000`, then avail, then used.
const RING_STRIDE: u64 = 0x4000;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
pub const HDR: u64 = 0x10_0000;
pub const STATUS: u64 = 0x18_0000;
pub const DATA: u64 = 0x20_0000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The byte the test images hold at `offset`.
pub fn pattern(offset: u64) -> u8 {
    (offset / 512 * 7 + offset % 251) as u8
}

pub fn patterned(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern).collect()
}

/// A running `ringvm-blk` and the files it serves.
pub struct Backend {
    child: Child,
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
}

impl Backend {
    /// A patterned raw image of IMAGE_BYTES, served with `args`.
    pub fn start(args: &[&str]) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, patterned(0, IMAGE_BYTES as usize)).unwrap();
        Self::start_with(dir, image, args)
    }

    pub fn start_with(dir: tempfile::TempDir, image: PathBuf, args: &[&str]) -> Backend {
        let socket = dir.path().join("blk.sock");
        let mut backend = Self::spawn(dir, image, socket, args);
        let deadline = Instant::now() + TIMEOUT;
        while !backend.socket.exists() {
            if let Some(status) = backend.child.try_wait().unwrap() {
                panic!("ringvm-blk exited with {status}: {}", backend.stderr());
            }
            assert!(Instant::now() < deadline, "no socket: {}", backend.stderr());
            thread::sleep(Duration::from_millis(5));
        }
        backend
    }

    /// Spawns without waiting for the socket.
    pub fn spawn(
        dir: tempfile::TempDir,
        image: PathBuf,
        socket: PathBuf,
        args: &[&str],
    ) -> Backend {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringvm-blk"))
            .arg("--image")
            .arg(&image)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        Backend {
            child,
            dir,
            image,
            socket,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of our own child, which has not been
        // reaped yet (wait_exit reaps it), so the pid is still its.
        let ret = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(ret, 0);
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the exit and for the whole of stderr.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.stderr_reader.take() {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ringvm-blk did not exit: {}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The counters of the last `counters:` line on stderr.
    pub fn counters(&self) -> HashMap<String, u64> {
        let stderr = self.stderr();
        let line = stderr
            .lines()
            .rev()
            .find_map(|line| line.split_once("counters: ").map(|(_, c)| c.to_string()))
            .unwrap_or_else(|| panic!("no counters in: {stderr}"));
        line.split_whitespace()
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap();
                (name.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    /// SIGKILL, then waits for the exit: the process gets no chance to write
    /// anything out, as in a crash (the page cache keeps what it wrote).
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit()
    }

    /// Asks for a counter dump (SIGUSR1) and returns it once it is on stderr.
    pub fn dump_counters(&self) -> HashMap<String, u64> {
        let dumps = |stderr: &str| stderr.matches("counters: ").count();
        let before = dumps(&self.stderr());
        self.signal(libc::SIGUSR1);
        let deadline = Instant::now() + TIMEOUT;
        while dumps(&self.stderr()) == before {
            assert!(
                Instant::now() < deadline,
                "no counter dump after SIGUSR1: {}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
        self.counters()
    }

    pub fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let bytes = std::fs::read(&self.image).unwrap();
        bytes[offset as usize..offset as usize + len].to_vec()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A descriptor of a chain: device-readable or device-writable.
#[derive(Clone, Copy, Debug)]
pub enum Desc {
    R(u64, u32),
    W(u64, u32),
}

pub struct Queue {
    base: u64,
    pub kick: EventFd,
    pub call: EventFd,
    next_desc: u16,
    avail_idx: u16,
}

/// The guest side: memory, rings and the vhost-user frontend.
pub struct Guest {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub memfd: File,
    pub queues: Vec<Queue>,
    pub features: u64,
}

pub fn memfd(len: usize) -> File {
    // SAFETY: memfd_create with a NUL-terminated name returns a new fd (or
    // -1), which the File then owns.
    let file = unsafe {
        let fd = libc::memfd_create(c"ringvm-blk-test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        File::from_raw_fd(fd)
    };
    file.set_len(len as u64).unwrap();
    file
}

impl Guest {
    /// Connects and negotiates like a VMM, without setting up queues.
    pub fn negotiate(socket: &Path, num_queues: u64, event_idx: bool) -> Guest {
        let mut frontend = Frontend::connect(socket, num_queues).unwrap();
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let mut features = offered;
        if !event_idx {
            features &= !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
        }
        frontend.set_features(features).unwrap();
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let protocol = frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(
                protocol
                    & (VhostUserProtocolFeatures::CONFIG
                        | VhostUserProtocolFeatures::MQ
                        | VhostUserProtocolFeatures::REPLY_ACK
                        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
            )
            .unwrap();
        let memfd = memfd(MEM_BYTES);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_BYTES,
            Some(FileOffset::new(memfd.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Guest {
            frontend,
            mem,
            memfd,
            queues: Vec::new(),
            features,
        }
    }

    /// Connects, negotiates, shares memory and starts `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: u64, event_idx: bool) -> Guest {
        let mut guest = Self::negotiate(socket, num_queues, event_idx);
        guest.share_memory();
        for q in 0..num_queues as usize {
            guest.start_queue(q);
        }
        guest
    }

    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    pub fn share_memory(&mut self) {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_BYTES as u64,
            userspace_addr: self.host_addr(0),
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        };
        self.with_reply(|frontend| frontend.set_mem_table(&[region]).map(|_| ()));
    }

    /// Sends one message with NEED_REPLY and waits for the backend's ack, as
    /// QEMU does for memory table changes: the queues read guest memory
    /// without going through the socket, so a request kicked right after an
    /// unacknowledged change could race with it.
    pub fn with_reply(&mut self, message: impl FnOnce(&mut Frontend) -> vhost::Result<()>) {
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        message(&mut self.frontend).unwrap();
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    }

    pub fn start_queue(&mut self, q: usize) {
        let base = RING_STRIDE * q as u64;
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // Clean rings: avail and used indices at 0.
        self.mem
            .write_slice(&[0u8; RING_STRIDE as usize], GuestAddress(base))
            .unwrap();
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.host_addr(base),
            used_ring_addr: self.host_addr(base + USED_OFFSET),
            avail_ring_addr: self.host_addr(base + AVAIL_OFFSET),
            log_addr: None,
        };
        self.frontend.set_vring_num(q, QUEUE_SIZE).unwrap();
        self.frontend.set_vring_addr(q, &config).unwrap();
        self.frontend.set_vring_base(q, 0).unwrap();
        self.frontend.set_vring_call(q, &call).unwrap();
        self.frontend.set_vring_kick(q, &kick).unwrap();
        self.frontend.set_vring_enable(q, true).unwrap();
        let queue = Queue {
            base,
            kick,
            call,
            next_desc: 0,
            avail_idx: 0,
        };
        if q < self.queues.len() {
            self.queues[q] = queue;
        } else {
            assert_eq!(q, self.queues.len(), "queues start in order");
            self.queues.push(queue);
        }
    }

    /// Writes a chain and makes it available (no kick); returns its head.
    pub fn submit(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let queue = &mut self.queues[q];
        let head = queue.next_desc;
        for (i, desc) in descs.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_SIZE;
            let (addr, len, mut flags) = match *desc {
                Desc::R(addr, len) => (addr, len, 0),
                Desc::W(addr, len) => (addr, len, VRING_DESC_F_WRITE as u16),
            };
            let mut next = 0;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                next = (index + 1) % QUEUE_SIZE;
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&raw, GuestAddress(queue.base + 16 * u64::from(index)))
                .unwrap();
        }
        queue.next_desc = (head + descs.len() as u16) % QUEUE_SIZE;
        self.make_available(q, head);
        head
    }

    /// Writes a chain at descriptors `first..first + descs.len()` and makes
    /// it available (no kick); returns its head, `first`. For tests that keep
    /// several chains in flight, each in its own descriptor slots: `submit`
    /// hands out descriptors round-robin, which a chain that stays in flight
    /// longer than the others would see reused.
    pub fn submit_at(&mut self, q: usize, first: u16, descs: &[Desc]) -> u16 {
        assert!(usize::from(first) + descs.len() <= usize::from(QUEUE_SIZE));
        let saved = self.queues[q].next_desc;
        self.queues[q].next_desc = first;
        let head = self.submit(q, descs);
        self.queues[q].next_desc = saved;
        head
    }

    pub fn make_available(&mut self, q: usize, head: u16) {
        let queue = &mut self.queues[q];
        let avail = queue.base + AVAIL_OFFSET;
        let slot = avail + 4 + 2 * u64::from(queue.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(queue.avail_idx, GuestAddress(avail + 2))
            .unwrap();
    }

    pub fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).unwrap();
    }

    /// Sets used_event (EVENT_IDX): signal me once the used index passes it.
    pub fn set_used_event(&self, q: usize, value: u16) {
        let at = self.queues[q].base + AVAIL_OFFSET + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(value, GuestAddress(at)).unwrap();
    }

    /// avail_event (EVENT_IDX): where the backend wants the next kick.
    pub fn avail_event(&self, q: usize) -> u16 {
        let at = self.queues[q].base + USED_OFFSET + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.queues[q].base + USED_OFFSET + 2))
            .unwrap()
    }

    /// Used entry `i`: (head, length).
    pub fn used(&self, q: usize, i: u16) -> (u32, u32) {
        let at = self.queues[q].base + USED_OFFSET + 4 + 8 * u64::from(i % QUEUE_SIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Waits until the used index reaches `idx`; returns how many call
    /// signals arrived meanwhile.
    pub fn wait_used(&self, q: usize, idx: u16) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        let mut signals = 0;
        while self.used_idx(q) != idx {
            assert!(
                Instant::now() < deadline,
                "queue {q}: used index {} never reached {idx}",
                self.used_idx(q)
            );
            if wait_readable(self.queues[q].call.as_raw_fd(), Duration::from_millis(20)) {
                signals += self.queues[q].call.read().unwrap_or(0);
            }
        }
        signals
    }

    /// The used entries from `*seen` to the used index, without waiting;
    /// advances `*seen` past them.
    pub fn poll_used(&self, q: usize, seen: &mut u16) -> Vec<(u32, u32)> {
        let idx = self.used_idx(q);
        // The entries were written before the index: read them after it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut entries = Vec::new();
        while *seen != idx {
            entries.push(self.used(q, *seen));
            *seen = seen.wrapping_add(1);
        }
        entries
    }

    /// Waits until there is at least one used entry past `*seen`; returns
    /// them all (see `poll_used`).
    pub fn wait_used_entries(&self, q: usize, seen: &mut u16) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let entries = self.poll_used(q, seen);
            if !entries.is_empty() {
                return entries;
            }
            assert!(
                Instant::now() < deadline,
                "queue {q}: nothing used past {seen} in {TIMEOUT:?}"
            );
            if wait_readable(self.queues[q].call.as_raw_fd(), Duration::from_millis(20)) {
                let _ = self.queues[q].call.read();
            }
        }
    }

    pub fn signalled(&self, q: usize) -> bool {
        self.queues[q].call.read().is_ok()
    }

    /// Serves one chain on queue `q`: returns (status byte, used length).
    pub fn request(&mut self, q: usize, descs: &[Desc]) -> (u8, u32) {
        let status_at = descs.iter().rev().find_map(|d| match *d {
            Desc::W(addr, len) if len > 0 => Some(addr + u64::from(len) - 1),
            _ => None,
        });
        if let Some(at) = status_at {
            // Not there when the test puts the status outside memory.
            let _ = self.mem.write_obj(0xeeu8, GuestAddress(at));
        }
        let before = self.used_idx(q);
        let head = self.submit(q, descs);
        self.kick(q);
        self.wait_used(q, before.wrapping_add(1));
        let (id, len) = self.used(q, before);
        assert_eq!(id, u32::from(head));
        let status = status_at
            .and_then(|at| self.mem.read_obj(GuestAddress(at)).ok())
            .unwrap_or(0xee);
        (status, len)
    }

    /// WRITE of `data` at `sector` on queue 0, from DATA; the status byte.
    pub fn write_at(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.header(HDR, VIRTIO_BLK_T_OUT, sector);
        self.write_mem(DATA, data);
        let len = u32::try_from(data.len()).unwrap();
        self.request(
            0,
            &[Desc::R(HDR, 16), Desc::R(DATA, len), Desc::W(STATUS, 1)],
        )
        .0
    }

    /// READ of `len` bytes at `sector` on queue 0, into DATA: the status
    /// byte and the bytes (what DATA holds after the request).
    pub fn read_at(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.header(HDR, VIRTIO_BLK_T_IN, sector);
        self.fill(DATA, len, 0xee);
        let len_u32 = u32::try_from(len).unwrap();
        let (status, _) = self.request(
            0,
            &[Desc::R(HDR, 16), Desc::W(DATA, len_u32), Desc::W(STATUS, 1)],
        );
        (status, self.read(DATA, len))
    }

    /// FLUSH on queue 0: the status byte.
    pub fn flush(&mut self) -> u8 {
        self.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
        self.request(0, &[Desc::R(HDR, 16), Desc::W(STATUS, 1)]).0
    }

    /// DISCARD or WRITE_ZEROES (`request_type`) of one segment on queue 0:
    /// the status byte.
    pub fn segment_request(
        &mut self,
        request_type: u32,
        sector: u64,
        num_sectors: u32,
        flags: u32,
    ) -> u8 {
        self.header(HDR, request_type, 0);
        self.segment(HDR + 16, sector, num_sectors, flags);
        self.request(0, &[Desc::R(HDR, 32), Desc::W(STATUS, 1)]).0
    }

    pub fn header(&self, at: u64, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(at)).unwrap();
    }

    pub fn segment(&self, at: u64, sector: u64, num_sectors: u32, flags: u32) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    pub fn fill(&self, at: u64, len: usize, value: u8) {
        self.mem
            .write_slice(&vec![value; len], GuestAddress(at))
            .unwrap();
    }

    pub fn write_mem(&self, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    }

    pub fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
        buf
    }
}

pub fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack for the call's duration.
    unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as i32) == 1 }
}
