//! Virtio over PCI, driver side: the modern PCI transport ([`pci`]), split
//! virtqueues ([`queue`]), the block device ([`blk`]) and the network device
//! ([`net`]).

pub mod blk;
pub mod net;
pub mod pci;
pub mod queue;

/// VIRTIO_F_INDIRECT_DESC (6): descriptors may point to descriptor tables.
pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_F_EVENT_IDX (6): used_event / avail_event suppress interrupts and
/// notifications.
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_F_ACCESS_PLATFORM (6): DMA goes through the platform's IOMMU, if
/// any. Accepted when offered: there is none, addresses are physical.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
