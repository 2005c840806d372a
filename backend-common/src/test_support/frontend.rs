//! The guest's side of a vhost-user connection, as a VMM would drive it:
//! the vhost crate's frontend, guest memory in a memfd that both processes
//! map, split-queue rings laid out here by hand, and kick/call eventfds.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::TIMEOUT;

pub const MEM_BYTES: usize = 16 << 20;
pub const QUEUE_SIZE: u16 = 64;
/// Queue `q`'s rings: descriptors at `q * 0x4000`, then avail, then used.
const RING_STRIDE: u64 = 0x4000;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;

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
        let fd = libc::memfd_create(c"ringvm-backend-test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        File::from_raw_fd(fd)
    };
    file.set_len(len as u64).unwrap();
    file
}

impl Guest {
    /// Connects and negotiates like a VMM (every offered feature, EVENT_IDX
    /// as asked), without setting up queues.
    pub fn negotiate(socket: &Path, num_queues: u64, event_idx: bool) -> Guest {
        Self::negotiate_without(socket, num_queues, event_idx, 0)
    }

    /// Negotiates every offered feature but those in `refused`.
    pub fn negotiate_without(
        socket: &Path,
        num_queues: u64,
        event_idx: bool,
        refused: u64,
    ) -> Guest {
        let mut frontend = Frontend::connect(socket, num_queues).unwrap();
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        let mut features = offered & !refused;
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
        Self::connect_without(socket, num_queues, event_idx, 0)
    }

    /// `connect`, refusing the features in `refused`.
    pub fn connect_without(socket: &Path, num_queues: u64, event_idx: bool, refused: u64) -> Guest {
        let mut guest = Self::negotiate_without(socket, num_queues, event_idx, refused);
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

    /// Sets queue `q` up and enables it (SET_VRING_ENABLE), as a frontend
    /// does for the queues the guest uses from the start.
    pub fn start_queue(&mut self, q: usize) {
        self.set_up_queue(q);
        self.frontend.set_vring_enable(q, true).unwrap();
    }

    /// Sets queue `q` up (size, addresses, base, call and kick eventfds)
    /// without enabling it: with VHOST_USER_F_PROTOCOL_FEATURES the backend
    /// leaves it alone until SET_VRING_ENABLE, as virtio-net's pairs beyond
    /// the first before the guest asks for them.
    pub fn set_up_queue(&mut self, q: usize) {
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
