//! `connect()`: a virtio-net device (a [`VhostUserDevice`]) whose queues a
//! vhost-user-net backend (ringvm-net) serves. ringvm only negotiates:
//! features offered to the guest are the backend's, restricted to what
//! ringvm supports; the configuration space is the backend's, with the MAC
//! address ringvm chose.
//!
//! One RX/TX queue pair, and no control virtqueue: virtio-net's multiqueue
//! (VIRTIO_NET_F_MQ) requires VIRTIO_NET_F_CTRL_VQ (virtio 1.2, 5.1.3.1),
//! and a driver turns extra pairs on only through the control queue's
//! VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (5.1.6.5.5); Linux refuses a device that
//! offers MQ without CTRL_VQ. ringvm-net serves no control queue, and ringvm
//! does not serve one itself yet, so MQ is never offered and `num_queues`
//! is 1.
//!
//! The MAC address the guest sees (VIRTIO_NET_F_MAC is always offered):
//! `mac=` from `--net`; else the backend's, when it offers
//! VIRTIO_NET_F_MAC; else one derived from the socket path, locally
//! administered (52:56:00 and three bytes of a hash of the path), so that
//! the same command line gives the guest the same address every time.

use std::path::PathBuf;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::{VhostUserConnection, VhostUserDevice, VhostUserError};
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
/// Queue pairs ringvm can give a guest: one, until ringvm serves the
/// control virtqueue that multiqueue needs (see the module documentation).
pub const MAX_QUEUE_PAIRS: u16 = 1;
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

/// Connects to `net`'s backend and checks it serves a virtio-net device.
pub fn connect(net: &NetConfig, ram: &GuestRam) -> Result<VhostUserDevice, VhostUserError> {
    let mut conn = VhostUserConnection::connect(&net.socket, ram)?;
    let mut config = conn.get_config(CONFIG_LEN, "vhost-user-net")?;
    let offered = conn.virtio_features();
    let backend_pairs = backend_queue_pairs(offered, &config, conn.queue_num())
        .map_err(|r| conn.bad_device(format!("{r}; is it a vhost-user-net backend?")))?;
    if net.num_queues > backend_pairs {
        return Err(conn.bad_device(format!(
            "--net asks for num_queues={} queue pairs, but the backend serves {backend_pairs}",
            net.num_queues
        )));
    }
    let mac = choose_mac(net, offered, &config);
    tracing::info!(socket = %net.socket.display(), mac = %format_mac(&mac), "virtio-net MAC");
    guest_config(&mut config, offered, &mac, net.num_queues);
    Ok(VhostUserDevice {
        conn,
        device_type: VIRTIO_ID_NET,
        features: guest_features(offered),
        config,
        num_queues: 2 * usize::from(net.num_queues),
        queue_size: net.queue_size,
    })
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

/// Features the guest is offered: the backend's that ringvm supports, with
/// MAC (ringvm fills it in), without those whose requirement is missing.
fn guest_features(offered: u64) -> u64 {
    let mut features = (offered & SUPPORTED_FEATURES) | (1 << VIRTIO_NET_F_MAC);
    for (feature, needs) in REQUIREMENTS {
        if features & (1 << needs) == 0 {
            features &= !(1 << feature);
        }
    }
    features
}

/// RX/TX pairs the backend serves: its virtqueues (GET_QUEUE_NUM, 2 without
/// the MQ protocol feature) in pairs, and no more than max_virtqueue_pairs
/// when it offers VIRTIO_NET_F_MQ.
fn backend_queue_pairs(offered: u64, config: &[u8], queue_num: Option<u64>) -> Result<u16, String> {
    let queues = queue_num.unwrap_or(2).min(super::MAX_QUEUES);
    if queues < 2 {
        return Err(format!(
            "it serves {queues} virtqueue, and virtio-net needs an RX and a TX queue"
        ));
    }
    let mut pairs = (queues / 2) as u16;
    if offered & (1 << VIRTIO_NET_F_MQ) != 0 {
        let max = u16::from_le_bytes([config[PAIRS_OFFSET], config[PAIRS_OFFSET + 1]]);
        if max == 0 {
            return Err("it offers multiqueue but reports max_virtqueue_pairs=0".into());
        }
        pairs = pairs.min(max);
    }
    Ok(pairs)
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
    fn guest_features_drop_mq_and_unmet_requirements() {
        let ringvm_net = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MQ)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        let f = guest_features(ringvm_net);
        assert_eq!(f & (1 << VIRTIO_NET_F_MQ), 0, "no MQ without a control vq");
        assert_ne!(f & (1 << VIRTIO_NET_F_MAC), 0, "ringvm always gives a MAC");
        assert_ne!(f & (1 << VIRTIO_NET_F_HOST_TSO4), 0, "CSUM is there");
        assert_eq!(
            f & (1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "GUEST_TSO4 needs GUEST_CSUM"
        );
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    }

    #[test]
    fn backend_pairs() {
        let mut c = vec![0u8; CONFIG_LEN];
        let mq = 1 << VIRTIO_NET_F_MQ;
        assert_eq!(backend_queue_pairs(0, &c, None), Ok(1));
        assert_eq!(backend_queue_pairs(0, &c, Some(8)), Ok(4));
        assert!(backend_queue_pairs(0, &c, Some(1))
            .unwrap_err()
            .contains("RX and a TX"));
        assert!(backend_queue_pairs(mq, &c, Some(8))
            .unwrap_err()
            .contains("max_virtqueue_pairs=0"));
        c[PAIRS_OFFSET] = 2;
        assert_eq!(backend_queue_pairs(mq, &c, Some(8)), Ok(2));
        assert_eq!(backend_queue_pairs(mq, &c, Some(2)), Ok(1));
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
