//! A `--net` device driven through its virtio-pci transport, as a driver
//! would, against a vhost-user-net backend made here that records what
//! ringvm tells it. No guest runs (the test guest has no control-queue
//! driver yet). The test checks the queue numbering and feature handling,
//! the rings and SET_VRING_ENABLE the backend gets at DRIVER_OK, what a
//! VQ_PAIRS_SET on the control queue changes (and its ack), and that a reset
//! stops the control queue. Needs /dev/kvm, as the transport's own tests do.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringvm::devices::pci::PciDevice;
use ringvm::devices::virtio::pci::{
    common, VirtioPciDevice, BAR_INDEX, COMMON_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET,
    NOTIFY_OFF_MULTIPLIER,
};
use ringvm::devices::virtio::vhost_user::net::{self, NetConfig};
use ringvm::kvm::KvmVm;
use ringvm::memory::GuestRam;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_ERR, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;
/// Queue q's rings: descriptors, available ring, used ring, a page each.
const RINGS: u64 = 0x10_0000;
/// The control request: class, command and data at REQUEST, ack at ACK.
const REQUEST: u64 = 0x30_0000;
const ACK: u64 = REQUEST + 0x100;
const WAIT: Duration = Duration::from_secs(10);
const MQ: u64 = 1 << VIRTIO_NET_F_MQ;
const CTRL_VQ: u64 = 1 << VIRTIO_NET_F_CTRL_VQ;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// What the backend was told.
#[derive(Default)]
struct Seen {
    features: Option<u64>,
    enables: Vec<(u32, bool)>,
    kicks: BTreeMap<u8, File>,
    bases_taken: Vec<u32>,
}

/// A vhost-user-net backend serving `pairs` pairs, that only records.
struct RecordingBackend {
    pairs: u16,
    offer_mq: bool,
    seen: Arc<Mutex<Seen>>,
}

impl RecordingBackend {
    fn virtio_features(&self) -> u64 {
        let mq = if self.offer_mq { MQ } else { 0 };
        VERSION_1
            | (1 << VIRTIO_NET_F_STATUS)
            | mq
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }
}

fn refused<T>() -> VuResult<T> {
    Err(VuError::InvalidOperation("not used by ringvm"))
}

impl VhostUserBackendReqHandlerMut for RecordingBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        Ok(())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        refused()
    }
    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.virtio_features())
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.seen().features = Some(features);
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        _: &[VhostUserMemoryRegion],
        _: Vec<File>,
        _: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        Ok(None)
    }
    fn set_vring_num(&mut self, _: u32, _: u32) -> VuResult<()> {
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        _: u32,
        _: VhostUserVringAddrFlags,
        _: u64,
        _: u64,
        _: u64,
        _: u64,
    ) -> VuResult<()> {
        Ok(())
    }
    fn set_vring_base(&mut self, _: u32, _: u32) -> VuResult<()> {
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.seen().bases_taken.push(index);
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        if let Some(fd) = fd {
            self.seen().kicks.insert(index, fd);
        }
        Ok(())
    }
    fn set_vring_call(&mut self, _: u8, _: Option<File>) -> VuResult<()> {
        Ok(())
    }
    fn set_vring_err(&mut self, _: u8, _: Option<File>) -> VuResult<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG)
    }
    fn set_protocol_features(&mut self, _: u64) -> VuResult<()> {
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(2 * u64::from(self.pairs))
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.seen().enables.push((index, enable));
        Ok(())
    }
    fn get_config(&mut self, offset: u32, size: u32, _: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        // mac, status (LINK_UP), max_virtqueue_pairs.
        let mut config = vec![0x52, 0x54, 0, 0, 0, 1, 1, 0];
        config.extend_from_slice(&self.pairs.to_le_bytes());
        let start = offset as usize;
        Ok(config
            .get(start..start + size as usize)
            .map(<[u8]>::to_vec)
            .unwrap_or_default())
    }
    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
        refused()
    }
    fn set_gpu_socket(&mut self, _: GpuBackend) -> VuResult<()> {
        refused()
    }
    fn get_shared_object(&mut self, _: VhostUserSharedMsg) -> VuResult<File> {
        refused()
    }
    fn get_inflight_fd(&mut self, _: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        refused()
    }
    fn set_inflight_fd(&mut self, _: &VhostUserInflight, _: File) -> VuResult<()> {
        refused()
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        refused()
    }
    fn add_mem_region(
        &mut self,
        _: &VhostUserSingleMemoryRegion,
        _: File,
        _: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        refused()
    }
    fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        refused()
    }
    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> VuResult<Option<File>> {
        refused()
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        refused()
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        refused()
    }
    fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> VuResult<()> {
        refused()
    }
}

/// The backend listening on a socket in a temporary directory; it serves
/// one frontend until it hangs up.
struct Backend {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Arc<Mutex<Seen>>,
}

impl Backend {
    fn start(pairs: u16, offer_mq: bool) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("net.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let backend = Arc::new(Mutex::new(RecordingBackend {
            pairs,
            offer_mq,
            seen: seen.clone(),
        }));
        // Ends when ringvm's side of the socket closes.
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut handler = BackendReqHandler::from_stream(stream, backend);
            while handler.handle_request().is_ok() {}
        });
        Backend {
            _dir: dir,
            socket,
            seen,
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    /// The SET_VRING_ENABLE messages since the last look, once there are
    /// `n`. ringvm does not wait for the backend to handle them (no
    /// REPLY_ACK), so they may still be on their way.
    fn enables(&self, n: usize) -> Vec<(u32, bool)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut seen = self.seen();
            if seen.enables.len() >= n {
                return std::mem::take(&mut seen.enables);
            }
            drop(seen);
            assert!(Instant::now() < deadline, "fewer than {n} SET_VRING_ENABLE");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether the kick eventfd the backend got for `queue` was signalled
    /// (and clears it).
    fn kicked(&self, queue: u8) -> bool {
        let seen = self.seen();
        let Some(mut fd) = seen.kicks.get(&queue) else {
            return false;
        };
        let mut count = [0u8; 8];
        fd.read(&mut count).is_ok()
    }
}

/// A device and its transport, as vm.rs builds them.
struct Rig {
    ram: GuestRam,
    dev: VirtioPciDevice,
    backend: Backend,
}

fn rig(pairs_asked: u16, backend_pairs: u16) -> Rig {
    let backend = Backend::start(backend_pairs, true);
    let (ram, result) = connect(&backend.socket, pairs_asked);
    let device = result.unwrap();
    let vm = Arc::new(KvmVm::new(1).expect("/dev/kvm"));
    vm.setup_platform().unwrap();
    let dev =
        VirtioPciDevice::new("net0".into(), Box::new(device), vm, 0xc000_0000, (2, 0)).unwrap();
    Rig { ram, dev, backend }
}

fn connect(
    socket: &Path,
    num_queues: u16,
) -> (
    GuestRam,
    Result<net::VhostUserNetDevice, ringvm::devices::virtio::vhost_user::VhostUserError>,
) {
    let ram = GuestRam::new(64 << 20).unwrap();
    let net = NetConfig {
        socket: socket.to_owned(),
        num_queues,
        queue_size: 256,
        mac: None,
    };
    let device = net::connect(&net, &ram);
    (ram, device)
}

impl Rig {
    fn w(&mut self, off: u64, bytes: &[u8]) {
        self.dev.write_bar(BAR_INDEX, COMMON_OFFSET + off, bytes);
    }

    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev
            .read_bar(BAR_INDEX, COMMON_OFFSET + off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn device_features(&mut self) -> u64 {
        let mut features = 0;
        for select in 0..2u32 {
            self.w(common::DEVICE_FEATURE_SELECT, &select.to_le_bytes());
            features |= self.r(common::DEVICE_FEATURE, 4) << (32 * select);
        }
        features
    }

    /// Up to FEATURES_OK with `features`; asserts they were accepted.
    fn negotiate(&mut self, features: u64) {
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.w(common::DEVICE_STATUS, &[status as u8]);
        for select in 0..2u32 {
            self.w(common::DRIVER_FEATURE_SELECT, &select.to_le_bytes());
            let word = (features >> (32 * select)) as u32;
            self.w(common::DRIVER_FEATURE, &word.to_le_bytes());
        }
        let status = status | VIRTIO_CONFIG_S_FEATURES_OK;
        self.w(common::DEVICE_STATUS, &[status as u8]);
        assert_eq!(self.r(common::DEVICE_STATUS, 1), u64::from(status));
    }

    fn rings(q: u16) -> (u64, u64, u64) {
        let base = RINGS + u64::from(q) * 0x1_0000;
        (base, base + 0x1000, base + 0x2000)
    }

    fn setup_queue(&mut self, q: u16) {
        self.w(common::QUEUE_SELECT, &q.to_le_bytes());
        self.w(common::QUEUE_SIZE, &QUEUE_SIZE.to_le_bytes());
        let (desc, avail, used) = Self::rings(q);
        for (reg, addr) in [
            (common::QUEUE_DESC, desc),
            (common::QUEUE_DRIVER, avail),
            (common::QUEUE_DEVICE, used),
        ] {
            self.w(reg, &(addr as u32).to_le_bytes());
            self.w(reg + 4, &((addr >> 32) as u32).to_le_bytes());
        }
        self.w(common::QUEUE_ENABLE, &1u16.to_le_bytes());
    }

    fn driver_ok(&mut self) {
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        self.w(common::DEVICE_STATUS, &[status as u8]);
        assert_eq!(self.r(common::DEVICE_STATUS, 1), u64::from(status));
    }

    fn mem_write<T: vm_memory::ByteValued>(&self, addr: u64, value: T) {
        self.ram
            .memory()
            .write_obj(value, GuestAddress(addr))
            .unwrap();
    }

    fn mem_read<T: vm_memory::ByteValued>(&self, addr: u64) -> T {
        self.ram.memory().read_obj(GuestAddress(addr)).unwrap()
    }

    fn used_idx(&self, q: u16) -> u16 {
        self.mem_read(Self::rings(q).2 + 2)
    }

    /// Makes `bytes` (class, command, data) a request on control queue
    /// `q` and notifies it through the notification area, as a driver
    /// does. Returns the used index the answer will bring.
    fn send(&mut self, q: u16, bytes: &[u8]) -> u16 {
        let (desc, avail, _) = Self::rings(q);
        self.ram
            .memory()
            .write_slice(bytes, GuestAddress(REQUEST))
            .unwrap();
        self.mem_write(ACK, 0xeeu8);
        // Descriptors 0 (the request) and 1 (the ack), every time.
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        for (i, (addr, len, flags, n)) in [
            (REQUEST, bytes.len() as u32, next, 1u16),
            (ACK, 1, write, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let d = desc + 16 * i as u64;
            self.mem_write(d, addr);
            self.mem_write(d + 8, len);
            self.mem_write(d + 12, flags);
            self.mem_write(d + 14, n);
        }
        let idx: u16 = self.mem_read(avail + 2);
        self.mem_write(avail + 4 + 2 * u64::from(idx % QUEUE_SIZE), 0u16);
        self.mem_write(avail + 2, idx.wrapping_add(1));
        let notify = NOTIFY_OFFSET + u64::from(q) * u64::from(NOTIFY_OFF_MULTIPLIER);
        self.dev.write_bar(BAR_INDEX, notify, &q.to_le_bytes());
        idx.wrapping_add(1)
    }

    /// The ack of the request that brings control queue `q`'s used index
    /// to `idx`, with its used length.
    fn answer(&self, q: u16, idx: u16) -> (u8, u32) {
        let deadline = Instant::now() + WAIT;
        while self.used_idx(q) != idx {
            assert!(Instant::now() < deadline, "no answer on queue {q}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let used = Self::rings(q).2 + 4 + 8 * u64::from((idx - 1) % QUEUE_SIZE);
        (self.mem_read(ACK), self.mem_read(used + 4))
    }

    fn pairs_set(&mut self, q: u16, n: u16) -> (u8, u32) {
        let [lo, hi] = n.to_le_bytes();
        let mq = VIRTIO_NET_CTRL_MQ as u8;
        let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
        let idx = self.send(q, &[mq, set, lo, hi]);
        self.answer(q, idx)
    }
}

const OK: (u8, u32) = (VIRTIO_NET_OK as u8, 1);
const ERR: (u8, u32) = (VIRTIO_NET_ERR as u8, 1);

#[test]
fn two_pairs_start_with_one_and_vq_pairs_set_switches_the_second() {
    let mut r = rig(2, 4);
    assert_eq!(
        r.r(common::NUM_QUEUES, 2),
        5,
        "2 pairs and the control queue"
    );
    let offered = r.device_features();
    assert_ne!(offered & MQ, 0);
    assert_ne!(offered & CTRL_VQ, 0);
    let mut pairs = [0u8; 2];
    r.dev.read_bar(BAR_INDEX, DEVICE_OFFSET + 8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 2, "max_virtqueue_pairs");

    r.negotiate(VERSION_1 | MQ | CTRL_VQ);
    for q in 0..5 {
        r.setup_queue(q);
    }
    r.driver_ok();
    assert_eq!(
        r.backend.enables(4),
        vec![(0, true), (1, true), (2, false), (3, false)],
        "only pair 0 runs until the driver asks"
    );
    let features = r.backend.seen().features.expect("SET_FEATURES");
    assert_eq!(features & CTRL_VQ, 0, "CTRL_VQ is ringvm's own");
    assert_ne!(features & MQ, 0);
    let rings: Vec<u8> = r.backend.seen().kicks.keys().copied().collect();
    assert_eq!(
        rings,
        vec![0, 1, 2, 3],
        "the control queue stays with ringvm"
    );

    assert_eq!(r.pairs_set(4, 2), OK);
    assert_eq!(
        r.backend.enables(4),
        vec![(0, true), (1, true), (2, true), (3, true)]
    );
    assert!(
        r.backend.kicked(2) && r.backend.kicked(3),
        "pair 1 kicked once"
    );
    assert!(!r.backend.kicked(0) && !r.backend.kicked(1));

    assert_eq!(r.pairs_set(4, 3), ERR, "more pairs than the device has");
    assert_eq!(r.pairs_set(4, 0), ERR);
    let promisc = [
        VIRTIO_NET_CTRL_RX as u8,
        VIRTIO_NET_CTRL_RX_PROMISC as u8,
        1,
    ];
    let idx = r.send(4, &promisc);
    assert_eq!(r.answer(4, idx), ERR, "CTRL_RX is not offered");

    assert_eq!(r.pairs_set(4, 1), OK);
    assert_eq!(
        r.backend.enables(4),
        vec![(0, true), (1, true), (2, false), (3, false)],
        "only these: the refused requests sent nothing"
    );
    assert!(!r.backend.kicked(2) && !r.backend.kicked(3));

    // Reset: the backend's rings are stopped and the control queue is no
    // longer served.
    r.w(common::DEVICE_STATUS, &[0]);
    let mut taken = r.backend.seen().bases_taken.clone();
    taken.sort_unstable();
    assert_eq!(taken, vec![0, 1, 2, 3]);
    let before = r.used_idx(4);
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    r.send(4, &[mq, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, 2, 0]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.used_idx(4), before, "nobody serves a reset device");
    assert_eq!(
        r.backend.enables(4),
        vec![(0, false), (1, false), (2, false), (3, false)],
        "the reset stopped every ring"
    );

    // A second activation starts from pair 0 again.
    r.negotiate(VERSION_1 | MQ | CTRL_VQ);
    for q in 0..5 {
        r.setup_queue(q);
        r.mem_write(Rig::rings(q).1 + 2, 0u16);
        r.mem_write(Rig::rings(q).2 + 2, 0u16);
    }
    r.driver_ok();
    assert_eq!(
        r.backend.enables(4),
        vec![(0, true), (1, true), (2, false), (3, false)]
    );
    assert_eq!(r.pairs_set(4, 2), OK);
    assert_eq!(r.backend.enables(4).len(), 4);
}

#[test]
fn ctrl_vq_without_mq_puts_the_control_queue_at_2() {
    let mut r = rig(2, 4);
    r.negotiate(VERSION_1 | CTRL_VQ);
    for q in 0..3 {
        r.setup_queue(q);
    }
    r.driver_ok();
    assert_eq!(r.backend.enables(2), vec![(0, true), (1, true)]);
    assert_eq!(r.backend.seen().features.unwrap() & (MQ | CTRL_VQ), 0);
    let rings: Vec<u8> = r.backend.seen().kicks.keys().copied().collect();
    assert_eq!(rings, vec![0, 1]);
    assert_eq!(r.pairs_set(2, 1), ERR, "VQ_PAIRS_SET needs MQ");
    // A reset's SET_VRING_ENABLE 0 come right after: nothing in between.
    r.w(common::DEVICE_STATUS, &[0]);
    assert_eq!(r.backend.enables(2), vec![(0, false), (1, false)]);
}

#[test]
fn without_ctrl_vq_one_pair_runs_and_no_queue_is_served_as_control() {
    let mut r = rig(2, 4);
    r.negotiate(VERSION_1);
    for q in 0..3 {
        r.setup_queue(q);
    }
    r.driver_ok();
    assert_eq!(r.backend.enables(2), vec![(0, true), (1, true)]);
    let rings: Vec<u8> = r.backend.seen().kicks.keys().copied().collect();
    assert_eq!(rings, vec![0, 1], "queue 2 is neither data nor control");
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    r.send(2, &[mq, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, 1, 0]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.used_idx(2), 0);
}

#[test]
fn more_pairs_than_the_backend_serves_are_refused() {
    let backend = Backend::start(2, true);
    let (_, result) = connect(&backend.socket, 3);
    let err = result
        .err()
        .expect("3 pairs of a 2-pair backend")
        .to_string();
    assert!(
        err.contains("num_queues=3") && err.contains("serves 2"),
        "{err}"
    );
    assert!(err.contains(backend.socket.to_str().unwrap()), "{err}");

    let backend = Backend::start(2, false);
    let (_, result) = connect(&backend.socket, 2);
    let err = result.err().expect("2 pairs without MQ").to_string();
    assert!(err.contains("VIRTIO_NET_F_MQ"), "{err}");
}
