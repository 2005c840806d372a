//! `connect()`: a virtio-net device ([`VhostUserNetDevice`]). A
//! vhost-user-net backend (ringvm-net) serves its RX/TX queues; ringvm
//! serves its control queue (net_ctrl.rs). For the data queues ringvm only
//! negotiates: the guest is offered the backend's features that ringvm
//! supports, and sees the backend's configuration space with the MAC
//! address ringvm chose.
//!
//! Queues (virtio 1.2 5.1.2), with N = `num_queues` pairs: receiveq1,
//! transmitq1, ..., receiveqN, transmitqN, controlq, so the transport shows
//! 2N+1 queues. VIRTIO_NET_F_CTRL_VQ is ringvm's own feature: it is always
//! offered and never passed to the backend. VIRTIO_NET_F_MQ is offered when
//! the backend offers it, with `max_virtqueue_pairs` = N. The backend must
//! serve at least 2N queues. Once the features are negotiated:
//!
//! - MQ (with CTRL_VQ): queues 0..2N are data rings and 2N is the control
//!   queue. At DRIVER_OK the backend gets every data ring the driver set
//!   up, but only pair 0 is enabled (SET_VRING_ENABLE 1 for queues 0 and 1,
//!   0 for the rest). More pairs run only once the driver asks with
//!   VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (5.1.6.5.5), which the control queue
//!   carries out.
//! - CTRL_VQ without MQ: one pair (queues 0 and 1), and the control queue
//!   is queue 2; it answers every command VIRTIO_NET_ERR.
//! - Neither: one pair and no control queue, as a device without them.
//!
//! The MAC address the guest sees (VIRTIO_NET_F_MAC is always offered):
//! `mac=` from `--net`; else the backend's, when it offers
//! VIRTIO_NET_F_MAC; else one derived from the socket path, locally
//! administered (52:56:00 and three bytes of a hash of the path), so that
//! the same command line gives the guest the same address every time.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use vhost::vhost_user::Frontend;
use vmm_sys_util::eventfd::EventFd;

use super::net_ctrl::{ControlQueue, ControlQueueStats, ControlQueueThread, QueuePairs};
use super::{VhostUserConnection, VhostUserDevice, VhostUserError};
use crate::devices::virtio::{ActivateError, ActiveQueue, VirtioDevice};
use crate::memory::GuestRam;

/// The configuration space ringvm reads and shows: mac, status and
/// max_virtqueue_pairs (10 bytes), what ringvm-net and QEMU's vhost-user-net
/// backends serve; mtu and the later fields belong to features ringvm does
/// not offer.
pub const CONFIG_LEN: usize = std::mem::offset_of!(virtio_net_config, mtu);
const MAC_OFFSET: usize = std::mem::offset_of!(virtio_net_config, mac);
const STATUS_OFFSET: usize = std::mem::offset_of!(virtio_net_config, status);
const PAIRS_OFFSET: usize = std::mem::offset_of!(virtio_net_config, max_virtqueue_pairs);

/// Default and limits of `queue_size=`.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Queue pairs a `--net` may ask for: the vhost-user frontend addresses at
/// most MAX_QUEUES (64) rings. The transport's limit is far above this:
/// its MSI-X table holds 512 vectors, one per queue (2N+1 of them) plus one
/// for configuration changes.
pub const MAX_QUEUE_PAIRS: u16 = (super::MAX_QUEUES / 2) as u16;
/// First three bytes of a generated MAC: locally administered (bit 1 set),
/// unicast (bit 0 clear).
const GENERATED_MAC_PREFIX: [u8; 3] = [0x52, 0x56, 0x00];

/// Feature bits ringvm passes through from a net backend to the guest.
const SUPPORTED_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN)
    | (1 << VIRTIO_NET_F_HOST_UFO)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_MQ)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1);

/// Feature requirements (virtio 1.2, 5.1.3.1): a feature is offered only
/// with the one it requires.
const REQUIREMENTS: [(u32, u32); 8] = [
    (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_CSUM),
    (VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_CSUM),
    (VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_CSUM),
    (VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_CSUM),
    (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_CSUM),
    (VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_CSUM),
    (VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_CSUM),
    (VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_CSUM),
];

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub socket: PathBuf,
    /// RX/TX queue pairs.
    pub num_queues: u16,
    pub queue_size: u16,
    /// None: the backend's, or a generated one.
    pub mac: Option<[u8; 6]>,
}

/// Connects to `net`'s backend and checks it serves a virtio-net device
/// with the queue pairs `net` asks for.
pub fn connect(net: &NetConfig, ram: &GuestRam) -> Result<VhostUserNetDevice, VhostUserError> {
    let mut conn = VhostUserConnection::connect(&net.socket, ram)?;
    let mut config = conn.get_config(CONFIG_LEN, "vhost-user-net")?;
    let offered = conn.virtio_features();
    let backend_pairs = backend_queue_pairs(offered, &config, conn.queue_num())
        .map_err(|r| conn.bad_device(format!("{r}; is it a vhost-user-net backend?")))?;
    if net.num_queues > backend_pairs {
        let why = if offered & (1 << VIRTIO_NET_F_MQ) == 0 {
            " (it does not offer multiqueue, VIRTIO_NET_F_MQ)"
        } else {
            ""
        };
        return Err(conn.bad_device(format!(
            "--net asks for num_queues={} queue pairs, but the backend serves {backend_pairs}{why}",
            net.num_queues
        )));
    }
    let mac = choose_mac(net, offered, &config);
    tracing::info!(socket = %net.socket.display(), mac = %format_mac(&mac), pairs = net.num_queues, "virtio-net MAC");
    guest_config(&mut config, offered, &mac, net.num_queues);
    Ok(VhostUserNetDevice {
        device: VhostUserDevice {
            conn,
            device_type: VIRTIO_ID_NET,
            features: guest_features(offered),
            config,
            num_queues: 2 * usize::from(net.num_queues) + 1,
            queue_size: net.queue_size,
        },
        pairs: net.num_queues,
        control: None,
        control_stats: Arc::new(ControlQueueStats::default()),
    })
}

/// Which queue is what once the driver negotiated its features (virtio 1.2
/// 5.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// VIRTIO_NET_F_MQ: N pairs, only pair 0 enabled until VQ_PAIRS_SET.
    pub multiqueue: bool,
    /// Queues below this are RX/TX rings: 2N with MQ, else 2.
    pub data_queues: usize,
    /// The control queue's index, with VIRTIO_NET_F_CTRL_VQ: right after
    /// the data rings.
    pub control: Option<usize>,
}

impl QueueLayout {
    /// For a device of `pairs` pairs driven with `features`.
    pub fn negotiated(pairs: u16, features: u64) -> Self {
        let multiqueue = features & (1 << VIRTIO_NET_F_MQ) != 0;
        let data_queues = 2 * if multiqueue { usize::from(pairs) } else { 1 };
        Self {
            multiqueue,
            data_queues,
            control: (features & (1 << VIRTIO_NET_F_CTRL_VQ) != 0).then_some(data_queues),
        }
    }

    /// Whether data ring `queue` is enabled at DRIVER_OK: all of them (one
    /// pair) without MQ, pair 0 with it (5.1.6.5.5: multiqueue is off until
    /// the driver asks).
    pub fn enabled_at_driver_ok(&self, queue: usize) -> bool {
        !self.multiqueue || queue < 2
    }
}

/// A virtio-net device: the data queues go to a vhost-user-net backend;
/// ringvm serves the control queue on a thread of its own while the device
/// runs (net_ctrl.rs).
pub struct VhostUserNetDevice {
    device: VhostUserDevice,
    /// RX/TX pairs the guest may use (`max_virtqueue_pairs`).
    pairs: u16,
    /// Present from DRIVER_OK, if the driver set the control queue up, to
    /// the reset.
    control: Option<ControlQueueThread>,
    control_stats: Arc<ControlQueueStats>,
}

impl VhostUserNetDevice {
    pub fn raw_fd(&self) -> RawFd {
        self.device.raw_fd()
    }

    pub fn socket(&self) -> &Path {
        self.device.socket()
    }

    /// The control queue's counters, over every activation.
    pub fn control_stats(&self) -> &ControlQueueStats {
        &self.control_stats
    }

    fn start(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), ActivateError> {
        let layout = QueueLayout::negotiated(self.pairs, features);
        let data: Vec<ActiveQueue<'_>> = queues
            .iter()
            .filter(|q| q.index < layout.data_queues)
            .copied()
            .collect();
        let unserved: Vec<usize> = queues
            .iter()
            .map(|q| q.index)
            .filter(|i| *i >= layout.data_queues && Some(*i) != layout.control)
            .collect();
        if !unserved.is_empty() {
            tracing::warn!(
                socket = %self.socket().display(),
                queues = ?unserved,
                "the driver set up queues that its features do not include; they are not served"
            );
        }
        // Everything the control queue needs is checked and made before the
        // backend starts, so that only spawning the thread can fail after.
        let control = layout
            .control
            .and_then(|index| queues.iter().find(|q| q.index == index))
            .map(|q| self.control_queue(features, &layout, &data, q))
            .transpose()?;
        // CTRL_VQ is ringvm's; a backend that offered it would expect to
        // serve the control queue itself.
        self.device
            .conn
            .start(features & !(1 << VIRTIO_NET_F_CTRL_VQ), &data, |q| {
                layout.enabled_at_driver_ok(q)
            })?;
        if let Some((index, queue, kick)) = control {
            let thread = ControlQueueThread::spawn(queue, kick)
                .map_err(|source| ActivateError::ControlQueue { index, source })?;
            self.control = Some(thread);
        }
        Ok(())
    }

    /// The control queue `q` over the data rings `data`, and a dup of its
    /// kick eventfd.
    fn control_queue(
        &self,
        features: u64,
        layout: &QueueLayout,
        data: &[ActiveQueue<'_>],
        q: &ActiveQueue<'_>,
    ) -> Result<(usize, ControlQueue<Frontend>, EventFd), ActivateError> {
        let dup = |fd: &EventFd| {
            fd.try_clone()
                .map_err(|source| ActivateError::ControlQueue {
                    index: q.index,
                    source,
                })
        };
        let rings = data
            .iter()
            .map(|d| Ok((d.index, dup(d.kick)?, layout.enabled_at_driver_ok(d.index))))
            .collect::<Result<Vec<_>, ActivateError>>()?;
        let pairs = QueuePairs::new(
            self.device.conn.frontend(),
            layout.multiqueue,
            self.pairs,
            layout.data_queues,
            rings,
        );
        let queue = ControlQueue::new(
            self.socket().display().to_string(),
            self.device.conn.memory().clone(),
            q.index,
            q.config,
            features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            dup(q.call)?,
            pairs,
            self.control_stats.clone(),
        )?;
        Ok((q.index, queue, dup(q.kick)?))
    }

    /// Stops the control queue (joining its thread: it may be sending
    /// SET_VRING_ENABLE, and must be done with its ring before the
    /// transport forgets it), then the backend's rings.
    fn stop(&mut self) {
        self.control = None;
        self.device.conn.stop();
    }
}

impl VirtioDevice for VhostUserNetDevice {
    fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> u16 {
        self.device.max_queue_size()
    }

    fn features(&self) -> u64 {
        self.device.features()
    }

    fn config_len(&self) -> usize {
        self.device.config_len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data)
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), ActivateError> {
        let started = self.start(features, queues);
        if started.is_err() {
            // The transport does not reset a device that failed to start.
            self.stop();
        }
        started
    }

    fn reset(&mut self) {
        self.stop();
    }
}

/// The MAC the guest sees: `mac=`, else the backend's (when it offers
/// VIRTIO_NET_F_MAC), else one derived from the socket path.
fn choose_mac(net: &NetConfig, offered: u64, config: &[u8]) -> [u8; 6] {
    match net.mac {
        Some(mac) => mac,
        None if offered & (1 << VIRTIO_NET_F_MAC) != 0 => config[MAC_OFFSET..MAC_OFFSET + 6]
            .try_into()
            .expect("CONFIG_LEN holds the mac"),
        None => generated_mac(&net.socket),
    }
}

/// The backend's configuration space as the guest sees it: ringvm's MAC and
/// pair count; status is the backend's when it offers VIRTIO_NET_F_STATUS,
/// else zero (the field does not exist then).
fn guest_config(config: &mut [u8], offered: u64, mac: &[u8; 6], pairs: u16) {
    config[MAC_OFFSET..MAC_OFFSET + 6].copy_from_slice(mac);
    if offered & (1 << VIRTIO_NET_F_STATUS) == 0 {
        config[STATUS_OFFSET..STATUS_OFFSET + 2].fill(0);
    }
    config[PAIRS_OFFSET..PAIRS_OFFSET + 2].copy_from_slice(&pairs.to_le_bytes());
}

/// Features the guest is offered: the backend's that ringvm supports (MQ
/// among them), with MAC (ringvm fills it in) and CTRL_VQ (ringvm serves
/// it), without those whose requirement is missing.
fn guest_features(offered: u64) -> u64 {
    let mut features =
        (offered & SUPPORTED_FEATURES) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_CTRL_VQ);
    for (feature, needs) in REQUIREMENTS {
        if features & (1 << needs) == 0 {
            features &= !(1 << feature);
        }
    }
    features
}

/// RX/TX pairs the backend serves: with VIRTIO_NET_F_MQ, its virtqueues
/// (GET_QUEUE_NUM) in pairs and no more than its max_virtqueue_pairs;
/// without it, one (a device without MQ has one pair, whatever its queue
/// count).
fn backend_queue_pairs(offered: u64, config: &[u8], queue_num: Option<u64>) -> Result<u16, String> {
    let queues = queue_num.unwrap_or(2).min(super::MAX_QUEUES);
    if queues < 2 {
        return Err(format!(
            "it serves {queues} virtqueue, and virtio-net needs an RX and a TX queue"
        ));
    }
    if offered & (1 << VIRTIO_NET_F_MQ) == 0 {
        return Ok(1);
    }
    let max = u16::from_le_bytes([config[PAIRS_OFFSET], config[PAIRS_OFFSET + 1]]);
    if max == 0 {
        return Err("it offers multiqueue but reports max_virtqueue_pairs=0".into());
    }
    Ok(((queues / 2) as u16).min(max))
}

/// A locally administered unicast MAC derived from `socket` (FNV-1a).
fn generated_mac(socket: &std::path::Path) -> [u8; 6] {
    let mut hash: u32 = 0x811c_9dc5;
    for b in socket.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = hash.to_be_bytes();
    let [p0, p1, p2] = GENERATED_MAC_PREFIX;
    [p0, p1, p2, a, b, c]
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, either case): a unicast address, not
/// all zeroes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let form = || format!("mac={s}: use six hex bytes separated by ':', e.g. 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(form)?;
        if part.len() != 2 {
            return Err(form());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| form())?;
    }
    if parts.next().is_some() {
        return Err(form());
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "mac={s}: a multicast address (the first byte is odd); use a unicast one"
        ));
    }
    if mac == [0; 6] {
        return Err(format!("mac={s}: the zero address; use another"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_is_mac_status_pairs() {
        assert_eq!((MAC_OFFSET, STATUS_OFFSET, PAIRS_OFFSET), (0, 6, 8));
        assert_eq!(CONFIG_LEN, 10);
    }

    fn net(mac: Option<[u8; 6]>) -> NetConfig {
        NetConfig {
            socket: "/run/net0.sock".into(),
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            mac,
        }
    }

    #[test]
    fn mac_from_option_then_backend_then_generated() {
        let mut backend = vec![0u8; CONFIG_LEN];
        backend[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        let f_mac = 1 << VIRTIO_NET_F_MAC;
        let ours = [0x52, 0x54, 0, 1, 2, 3];
        assert_eq!(choose_mac(&net(Some(ours)), f_mac, &backend), ours);
        assert_eq!(choose_mac(&net(None), f_mac, &backend), [2, 0, 0, 0, 0, 9]);
        assert_eq!(
            choose_mac(&net(None), 0, &backend),
            generated_mac(std::path::Path::new("/run/net0.sock")),
            "a MAC the backend does not offer is not used"
        );
    }

    #[test]
    fn config_space_reads_show_mac_status_and_pairs() {
        let mut config = vec![0u8; CONFIG_LEN];
        config[STATUS_OFFSET] = 1; // LINK_UP, from the backend
        config[PAIRS_OFFSET] = 4;
        let mut without_status = config.clone();
        guest_config(&mut without_status, 0, &[2, 0, 0, 0, 0, 1], 1);
        assert_eq!(&without_status[STATUS_OFFSET..STATUS_OFFSET + 2], [0, 0]);
        guest_config(
            &mut config,
            1 << VIRTIO_NET_F_STATUS,
            &[0x52, 0x54, 0, 1, 2, 3],
            1,
        );
        let mut mac = [0u8; 6];
        super::super::read_config_bytes(&config, 0, &mut mac);
        assert_eq!(mac, [0x52, 0x54, 0, 1, 2, 3]);
        let mut word = [0u8; 2];
        super::super::read_config_bytes(&config, STATUS_OFFSET as u64, &mut word);
        assert_eq!(u16::from_le_bytes(word), 1, "the backend's link status");
        super::super::read_config_bytes(&config, PAIRS_OFFSET as u64, &mut word);
        assert_eq!(u16::from_le_bytes(word), 1, "the pairs ringvm gives");
        super::super::read_config_bytes(&config, CONFIG_LEN as u64, &mut word);
        assert_eq!(word, [0, 0], "mtu and beyond read as zero");
    }

    #[test]
    fn guest_features_add_ctrl_vq_keep_mq_and_drop_unmet_requirements() {
        let ringvm_net = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MQ)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        let f = guest_features(ringvm_net);
        assert_ne!(f & (1 << VIRTIO_NET_F_MQ), 0, "the backend's MQ");
        assert_ne!(f & (1 << VIRTIO_NET_F_CTRL_VQ), 0, "ringvm's control queue");
        assert_ne!(f & (1 << VIRTIO_NET_F_MAC), 0, "ringvm always gives a MAC");
        assert_ne!(f & (1 << VIRTIO_NET_F_HOST_TSO4), 0, "CSUM is there");
        assert_eq!(
            f & (1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "GUEST_TSO4 needs GUEST_CSUM"
        );
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        let without_mq = guest_features(ringvm_net & !(1 << VIRTIO_NET_F_MQ));
        assert_eq!(
            without_mq & (1 << VIRTIO_NET_F_MQ),
            0,
            "MQ only from the backend"
        );
        assert_ne!(without_mq & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
        // Control-queue features ringvm does not serve are never offered.
        let ctrl_rx = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_RX;
        assert_eq!(guest_features(ringvm_net | ctrl_rx) & ctrl_rx, 0);
    }

    #[test]
    fn queue_layout_follows_the_negotiated_features() {
        let mq = 1 << VIRTIO_NET_F_MQ;
        let cvq = 1 << VIRTIO_NET_F_CTRL_VQ;
        let l = QueueLayout::negotiated(4, mq | cvq);
        assert_eq!((l.multiqueue, l.data_queues, l.control), (true, 8, Some(8)));
        assert!(l.enabled_at_driver_ok(0) && l.enabled_at_driver_ok(1));
        assert!(!l.enabled_at_driver_ok(2) && !l.enabled_at_driver_ok(7));
        let l = QueueLayout::negotiated(4, cvq);
        assert_eq!(
            (l.multiqueue, l.data_queues, l.control),
            (false, 2, Some(2)),
            "CTRL_VQ without MQ: one pair, the control queue at 2"
        );
        assert!(l.enabled_at_driver_ok(0) && l.enabled_at_driver_ok(1));
        let l = QueueLayout::negotiated(4, 0);
        assert_eq!((l.multiqueue, l.data_queues, l.control), (false, 2, None));
        let l = QueueLayout::negotiated(1, mq | cvq);
        assert_eq!((l.data_queues, l.control), (2, Some(2)));
        let l = QueueLayout::negotiated(MAX_QUEUE_PAIRS, mq | cvq);
        assert_eq!(l.control, Some(2 * usize::from(MAX_QUEUE_PAIRS)));
    }

    #[test]
    fn backend_pairs() {
        let mut c = vec![0u8; CONFIG_LEN];
        let mq = 1 << VIRTIO_NET_F_MQ;
        assert_eq!(backend_queue_pairs(0, &c, None), Ok(1));
        assert_eq!(
            backend_queue_pairs(0, &c, Some(8)),
            Ok(1),
            "without VIRTIO_NET_F_MQ a device has one pair"
        );
        assert!(backend_queue_pairs(0, &c, Some(1))
            .unwrap_err()
            .contains("RX and a TX"));
        assert!(backend_queue_pairs(mq, &c, Some(8))
            .unwrap_err()
            .contains("max_virtqueue_pairs=0"));
        c[PAIRS_OFFSET] = 2;
        assert_eq!(backend_queue_pairs(mq, &c, Some(8)), Ok(2));
        assert_eq!(backend_queue_pairs(mq, &c, Some(2)), Ok(1));
        c[PAIRS_OFFSET] = 64;
        assert_eq!(
            backend_queue_pairs(mq, &c, Some(128)),
            Ok(MAX_QUEUE_PAIRS),
            "ringvm addresses 64 rings"
        );
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:0f"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:0:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
            "52-54-00-ab-cd-ef",
        ] {
            assert!(
                parse_mac(bad).unwrap_err().contains("six hex bytes"),
                "{bad}"
            );
        }
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("00:00:00:00:00:00").unwrap_err().contains("zero"));
        let m = generated_mac(std::path::Path::new("/tmp/net0.sock"));
        assert_eq!(m, generated_mac(std::path::Path::new("/tmp/net0.sock")));
        assert_ne!(m, generated_mac(std::path::Path::new("/tmp/net1.sock")));
        assert_eq!(m[0] & 3, 2, "locally administered unicast");
        assert_eq!(format_mac(&m).len(), 17);
        assert_eq!(parse_mac(&format_mac(&m)), Ok(m));
    }
}
