//! virtio devices: the PCI transport (pci.rs), the MSI-X delivery it uses
//! (interrupts.rs), and the devices behind it, all served by vhost-user
//! backends (vhost_user/).

pub mod interrupts;
pub mod pci;
pub mod vhost_user;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// One virtqueue as the driver set it up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub enabled: bool,
}

/// A started queue: where it is, which eventfd the guest kicks and which
/// one the backend signals.
#[derive(Clone, Copy)]
pub struct ActiveQueue<'a> {
    pub index: usize,
    pub config: QueueConfig,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index}: its rings are not inside guest RAM")]
    RingOutsideMemory { index: usize },
    #[error("queue {index}: its rings are not aligned as virtio 1.2 2.7 requires")]
    RingMisaligned { index: usize },
    #[error("setting up the control queue (queue {index}) failed")]
    ControlQueue {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the backend refused the device setup")]
    Backend(#[source] vhost::Error),
    #[error("the backend is gone")]
    BackendGone,
}

/// The device behind a virtio-pci transport.
pub trait VirtioDevice: Send {
    /// VIRTIO_ID_* of the device.
    fn device_type(&self) -> u32;
    fn num_queues(&self) -> usize;
    fn max_queue_size(&self) -> u16;
    /// Features offered to the driver (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Size of the device-specific configuration space.
    fn config_len(&self) -> usize;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start serving `queues` with the negotiated `features`.
    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), ActivateError>;
    /// The driver reset the device: stop every queue.
    fn reset(&mut self);
}
