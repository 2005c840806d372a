//! `connect()`: a virtio-blk device (a [`VhostUserDevice`]) whose queues a vhost-user-blk
//! backend (ringvm-blk, qemu-storage-daemon) serves. ringvm only negotiates:
//! features offered to the guest are the backend's, restricted to what the
//! transport supports; the configuration space is the backend's, with
//! num_queues set to what `--disk` asked for.

use std::path::PathBuf;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::{VhostUserConnection, VhostUserDevice, VhostUserError};
use crate::memory::GuestRam;

/// The configuration space ringvm reads and shows: virtio_blk_config up to
/// and including write_zeroes_may_unmap and its padding (60 bytes, as QEMU
/// and the vhost-user-blk backends use), without the secure-erase and zoned
/// fields ringvm does not offer.
pub const CONFIG_LEN: usize = std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);
const NUM_QUEUES_OFFSET: usize = std::mem::offset_of!(virtio_blk_config, num_queues);
const BLK_SIZE_OFFSET: usize = std::mem::offset_of!(virtio_blk_config, blk_size);

/// Default and limits of `queue_size=`.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Feature bits ringvm passes through from a blk backend to the guest.
const SUPPORTED_FEATURES: u64 = (1 << VIRTIO_BLK_F_SIZE_MAX)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_GEOMETRY)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_TOPOLOGY)
    | (1 << VIRTIO_BLK_F_CONFIG_WCE)
    | (1 << VIRTIO_BLK_F_MQ)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1);

/// One `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub socket: PathBuf,
    /// None: as many as the backend serves.
    pub num_queues: Option<u16>,
    pub queue_size: u16,
}

/// Connects to `disk`'s backend and checks it serves a virtio-blk device.
pub fn connect(disk: &DiskConfig, ram: &GuestRam) -> Result<VhostUserDevice, VhostUserError> {
    let mut conn = VhostUserConnection::connect(&disk.socket, ram)?;
    let mut config = conn.get_config(CONFIG_LEN, "vhost-user-blk")?;
    let features = conn.virtio_features() & SUPPORTED_FEATURES;
    check_blk_config(&config, features)
        .map_err(|r| conn.bad_device(format!("{r}; is it a vhost-user-blk backend?")))?;
    let backend_queues = if features & (1 << VIRTIO_BLK_F_MQ) != 0 {
        u16::from_le_bytes([config[NUM_QUEUES_OFFSET], config[NUM_QUEUES_OFFSET + 1]])
    } else {
        1
    }
    .min(conn.queue_num().unwrap_or(1).min(super::MAX_QUEUES) as u16);
    let num_queues = disk.num_queues.unwrap_or(backend_queues);
    if num_queues > backend_queues {
        return Err(conn.bad_device(format!(
            "--disk asks for num_queues={num_queues}, but the backend serves {backend_queues}"
        )));
    }
    config[NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2].copy_from_slice(&num_queues.to_le_bytes());
    Ok(VhostUserDevice {
        conn,
        device_type: VIRTIO_ID_BLOCK,
        features,
        config,
        num_queues: usize::from(num_queues),
        queue_size: disk.queue_size,
    })
}

/// Sanity checks that tell a virtio-blk configuration space from another
/// device's (a vhost-user protocol has no device-type query).
fn check_blk_config(config: &[u8], features: u64) -> Result<(), String> {
    if config.len() != CONFIG_LEN {
        return Err(format!(
            "its configuration space is {} bytes, not {CONFIG_LEN}",
            config.len()
        ));
    }
    if features & (1 << VIRTIO_BLK_F_BLK_SIZE) != 0 {
        let bs = u32::from_le_bytes(
            config[BLK_SIZE_OFFSET..BLK_SIZE_OFFSET + 4]
                .try_into()
                .expect("4 bytes"),
        );
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(format!(
                "its block size {bs} is not a power of two from 512 to 64K"
            ));
        }
    }
    if features & (1 << VIRTIO_BLK_F_MQ) != 0 {
        let nq = u16::from_le_bytes([config[NUM_QUEUES_OFFSET], config[NUM_QUEUES_OFFSET + 1]]);
        if nq == 0 {
            return Err("it offers multiple queues but reports num_queues=0".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_len_is_the_classic_60_bytes() {
        assert_eq!(CONFIG_LEN, 60);
        assert_eq!(NUM_QUEUES_OFFSET, 34);
        assert_eq!(BLK_SIZE_OFFSET, 20);
    }

    #[test]
    fn blk_config_checks() {
        let mut c = vec![0u8; CONFIG_LEN];
        c[BLK_SIZE_OFFSET..BLK_SIZE_OFFSET + 4].copy_from_slice(&4096u32.to_le_bytes());
        c[NUM_QUEUES_OFFSET] = 2;
        let f = (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_MQ);
        assert!(check_blk_config(&c, f).is_ok());
        c[BLK_SIZE_OFFSET..BLK_SIZE_OFFSET + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(check_blk_config(&c, f).unwrap_err().contains("block size"));
        assert!(
            check_blk_config(&c, 0).is_ok(),
            "blk_size only counts when offered"
        );
        c[BLK_SIZE_OFFSET..BLK_SIZE_OFFSET + 4].copy_from_slice(&512u32.to_le_bytes());
        c[NUM_QUEUES_OFFSET] = 0;
        assert!(check_blk_config(&c, f)
            .unwrap_err()
            .contains("num_queues=0"));
        assert!(check_blk_config(&c[..20], 0).is_err());
    }
}
