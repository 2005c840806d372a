//! The virtio-pci modern transport (virtio 1.2 4.1), driver side: vendor
//! capabilities (common, notify, device config; the ISR is not used, MSI-X
//! replaces it), device status and feature negotiation, queue setup, MSI-X.
//!
//! Register offsets and bits are typed in from the spec (sections named at
//! each group): virtio-bindings needs `std` and has no virtio_pci module.

use core::fmt;

use super::queue::SplitQueue;
use crate::mmio::Mmio;
use crate::pci::{BarWindow, PciError, PciFunction};
use crate::start;

/// PCI vendor ID of virtio devices (4.1.2).
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;

// Vendor-specific capability (4.1.4): cap_vndr, cap_next, cap_len, cfg_type,
// bar, id, padding[2], offset (u32), length (u32); notify adds the multiplier.
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const CAP_CFG_TYPE: u8 = 3;
const CAP_BAR: u8 = 4;
const CAP_OFFSET: u8 = 8;
const CAP_LENGTH: u8 = 12;
const CAP_NOTIFY_OFF_MULTIPLIER: u8 = 16;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

// struct virtio_pci_common_cfg (4.1.4.3).
const COMMON_DFSELECT: u64 = 0x00;
const COMMON_DF: u64 = 0x04;
const COMMON_GFSELECT: u64 = 0x08;
const COMMON_GF: u64 = 0x0c;
const COMMON_MSIX_CONFIG: u64 = 0x10;
const COMMON_NUM_QUEUES: u64 = 0x12;
const COMMON_STATUS: u64 = 0x14;
const COMMON_CFG_GENERATION: u64 = 0x15;
const COMMON_Q_SELECT: u64 = 0x16;
const COMMON_Q_SIZE: u64 = 0x18;
const COMMON_Q_MSIX_VECTOR: u64 = 0x1a;
const COMMON_Q_ENABLE: u64 = 0x1c;
const COMMON_Q_NOTIFY_OFF: u64 = 0x1e;
const COMMON_Q_DESC: u64 = 0x20;
const COMMON_Q_DRIVER: u64 = 0x28;
const COMMON_Q_DEVICE: u64 = 0x30;
/// Bytes of the common config this driver uses (through queue_device).
const COMMON_CFG_BYTES: u64 = 0x38;
/// Bytes a queue's notify register takes (the queue index, 16 bits).
const NOTIFY_BYTES: u64 = 2;
/// "No vector" for msix_config and queue_msix_vector (4.1.4.3).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

// Device status (2.1).
const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 128;
/// Status reads while waiting for a reset to finish (each an exit, ~16 µs on
/// PVM: about 1.6 s; QEMU and ringvm finish at once).
const RESET_POLL_LIMIT: u32 = 100_000;

/// VIRTIO_F_VERSION_1 (6): a modern device; required.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

// MSI-X capability (PCI 3.0 6.8.2): message control at +2, table
// offset/BIR at +4, PBA offset/BIR at +8; table entries of 16 bytes.
const PCI_CAP_ID_MSIX: u8 = 0x11;
const MSIX_CONTROL: u8 = 2;
const MSIX_TABLE: u8 = 4;
const MSIX_CONTROL_TABLE_SIZE: u16 = 0x7ff;
const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
const MSIX_BIR_MASK: u32 = 0x7;
const MSIX_ENTRY_BYTES: u64 = 16;
const MSIX_ENTRY_ADDR_LO: u64 = 0;
const MSIX_ENTRY_ADDR_HI: u64 = 4;
const MSIX_ENTRY_DATA: u64 = 8;
const MSIX_ENTRY_VECTOR_CONTROL: u64 = 12;
const MSIX_ENTRY_MASKED: u32 = 1;
/// MSI address: the LAPIC's window, destination APIC ID in bits 19:12,
/// physical destination mode, no redirection hint (Intel SDM 11.11.1).
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;
const MSI_ADDRESS_DEST_SHIFT: u32 = 12;

pub enum VirtioPciError {
    Pci(PciError),
    MissingCapability(&'static str),
    Unreachable {
        what: &'static str,
        base: u64,
        len: u64,
    },
    ResetTimeout,
    NoVersion1,
    FeaturesRejected,
    QueueUnavailable(u16),
    VectorRejected {
        queue: u16,
        entry: u16,
    },
    BadNotifyOffset(u16),
    OutOfMemory(&'static str),
}

impl From<PciError> for VirtioPciError {
    fn from(e: PciError) -> Self {
        VirtioPciError::Pci(e)
    }
}

impl fmt::Display for VirtioPciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VirtioPciError::Pci(e) => e.fmt(f),
            VirtioPciError::MissingCapability(what) => write!(f, "no virtio {what} capability"),
            VirtioPciError::Unreachable { what, base, len } => write!(
                f,
                "virtio {what} registers at {base:#x}+{len:#x} are outside the MMIO hole"
            ),
            VirtioPciError::ResetTimeout => write!(f, "device reset did not finish"),
            VirtioPciError::NoVersion1 => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            VirtioPciError::FeaturesRejected => {
                write!(f, "device rejected the features (FEATURES_OK not set)")
            }
            VirtioPciError::QueueUnavailable(queue) => write!(f, "queue {queue} has size 0"),
            VirtioPciError::VectorRejected { queue, entry } => {
                write!(f, "queue {queue} rejected MSI-X entry {entry}")
            }
            VirtioPciError::BadNotifyOffset(queue) => {
                write!(
                    f,
                    "queue {queue}'s notify address is outside the notify region"
                )
            }
            VirtioPciError::OutOfMemory(what) => write!(f, "out of memory for {what}"),
        }
    }
}

struct Msix {
    /// Offset of the capability in config space.
    cap: u8,
    table: Mmio,
    entries: u16,
}

pub struct VirtioPci {
    pub function: PciFunction,
    common: Mmio,
    notify: Mmio,
    notify_off_multiplier: u32,
    device_cfg: Option<Mmio>,
    msix: Option<Msix>,
}

/// The first function on bus 0 with the virtio vendor ID and one of
/// `device_ids`.
pub fn find(device_ids: &[u16]) -> Option<PciFunction> {
    crate::pci::bus0_functions()
        .find(|f| f.vendor_id() == VIRTIO_PCI_VENDOR && device_ids.contains(&f.device_id()))
}

/// The registers a vendor capability at `cap` points to.
fn cap_region(
    function: PciFunction,
    cap: u8,
    what: &'static str,
    window: &mut BarWindow,
) -> Result<Mmio, VirtioPciError> {
    let bar = function.read8(cap + CAP_BAR);
    let offset = u64::from(function.read32(cap + CAP_OFFSET));
    let len = u64::from(function.read32(cap + CAP_LENGTH));
    let base = function.memory_bar(bar, window)? + offset;
    // SAFETY: the device's own capability says its registers are there; the
    // driver (this module and its users) only hands the device memory meant
    // for it.
    unsafe { Mmio::new(base, len) }.ok_or(VirtioPciError::Unreachable { what, base, len })
}

impl VirtioPci {
    /// Finds the device's register windows (placing BARs if needed) and
    /// turns on memory decoding and bus mastering.
    pub fn open(function: PciFunction, window: &mut BarWindow) -> Result<Self, VirtioPciError> {
        let mut common = None;
        let mut notify = None;
        let mut device_cfg = None;
        let mut msix = None;
        for (cap, id) in function.capabilities() {
            match id {
                PCI_CAP_ID_VENDOR => match function.read8(cap + CAP_CFG_TYPE) {
                    VIRTIO_PCI_CAP_COMMON_CFG if common.is_none() => {
                        common = Some(cap_region(function, cap, "common config", window)?);
                    }
                    VIRTIO_PCI_CAP_NOTIFY_CFG if notify.is_none() => {
                        let region = cap_region(function, cap, "notify", window)?;
                        let multiplier = function.read32(cap + CAP_NOTIFY_OFF_MULTIPLIER);
                        notify = Some((region, multiplier));
                    }
                    VIRTIO_PCI_CAP_DEVICE_CFG if device_cfg.is_none() => {
                        device_cfg = Some(cap_region(function, cap, "device config", window)?);
                    }
                    _ => {}
                },
                PCI_CAP_ID_MSIX if msix.is_none() => {
                    let control = function.read16(cap + MSIX_CONTROL);
                    let entries = (control & MSIX_CONTROL_TABLE_SIZE) + 1;
                    let table = function.read32(cap + MSIX_TABLE);
                    let bar = (table & MSIX_BIR_MASK) as u8;
                    let base =
                        function.memory_bar(bar, window)? + u64::from(table & !MSIX_BIR_MASK);
                    let len = u64::from(entries) * MSIX_ENTRY_BYTES;
                    // SAFETY: the MSI-X capability says the table is there;
                    // entries only ever get LAPIC addresses (no DMA to RAM).
                    let table =
                        unsafe { Mmio::new(base, len) }.ok_or(VirtioPciError::Unreachable {
                            what: "MSI-X table",
                            base,
                            len,
                        })?;
                    msix = Some(Msix {
                        cap,
                        table,
                        entries,
                    });
                }
                _ => {}
            }
        }
        let common = common.ok_or(VirtioPciError::MissingCapability("common config"))?;
        if common.len() < COMMON_CFG_BYTES {
            return Err(VirtioPciError::MissingCapability(
                "common config (too short)",
            ));
        }
        let (notify, notify_off_multiplier) =
            notify.ok_or(VirtioPciError::MissingCapability("notify"))?;
        // SAFETY: the device gets DMA only to memory its driver hands it
        // (queues and request buffers from the heap).
        unsafe { function.enable_memory_and_dma() };
        Ok(VirtioPci {
            function,
            common,
            notify,
            notify_off_multiplier,
            device_cfg,
            msix,
        })
    }

    pub fn status(&self) -> u8 {
        self.common.read8(COMMON_STATUS)
    }

    fn add_status(&self, bits: u8) {
        self.common.write8(COMMON_STATUS, self.status() | bits);
    }

    /// Resets the device and waits for the reset to finish (4.1.4.3.2: the
    /// status reads back 0).
    pub fn reset(&self) -> Result<(), VirtioPciError> {
        self.common.write8(COMMON_STATUS, 0);
        for _ in 0..RESET_POLL_LIMIT {
            if self.status() == 0 {
                return Ok(());
            }
        }
        Err(VirtioPciError::ResetTimeout)
    }

    /// Tells the device the driver gave up (FAILED).
    pub fn fail(&self) {
        self.add_status(STATUS_FAILED);
    }

    /// Device initialization up to FEATURES_OK (3.1.1): reset, ACKNOWLEDGE,
    /// DRIVER, features = offered & `wanted` (VERSION_1 required),
    /// FEATURES_OK, re-read. Returns the negotiated features.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, VirtioPciError> {
        self.reset()?;
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        let mut offered = 0u64;
        for select in 0..2u32 {
            self.common.write32(COMMON_DFSELECT, select);
            offered |= u64::from(self.common.read32(COMMON_DF)) << (32 * select);
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            self.fail();
            return Err(VirtioPciError::NoVersion1);
        }
        let features = offered & (wanted | VIRTIO_F_VERSION_1);
        for select in 0..2u32 {
            self.common.write32(COMMON_GFSELECT, select);
            self.common
                .write32(COMMON_GF, (features >> (32 * select)) as u32);
        }
        self.add_status(STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err(VirtioPciError::FeaturesRejected);
        }
        Ok(features)
    }

    /// Queues the device has (common config num_queues).
    pub fn num_queues(&self) -> u16 {
        self.common.read16(COMMON_NUM_QUEUES)
    }

    /// MSI-X table entries (0 without MSI-X).
    pub fn msix_entries(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| m.entries)
    }

    /// Enables MSI-X with table entry `i` sending `vectors[i]` (`None`:
    /// masked) to this CPU's LAPIC, every other entry masked, and the
    /// configuration-change interrupt off. Without MSI-X this does nothing
    /// (and the device's INTx stays disabled: start.S masks the PICs).
    pub fn enable_msix(&self, vectors: &[Option<u8>]) {
        let Some(msix) = &self.msix else { return };
        let function = self.function;
        let control = function.read16(msix.cap + MSIX_CONTROL);
        // SAFETY: MSI-X enable with the function masked: no message can be
        // sent while the table is programmed; messages only go to the LAPIC.
        unsafe {
            function.write16(
                msix.cap + MSIX_CONTROL,
                control | MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK,
            );
        }
        let address = MSI_ADDRESS_BASE | u32::from(start::lapic_id()) << MSI_ADDRESS_DEST_SHIFT;
        for entry in 0..msix.entries {
            let at = u64::from(entry) * MSIX_ENTRY_BYTES;
            match vectors.get(usize::from(entry)).copied().flatten() {
                Some(vector) => {
                    msix.table.write32(at + MSIX_ENTRY_ADDR_LO, address);
                    msix.table.write32(at + MSIX_ENTRY_ADDR_HI, 0);
                    // Fixed delivery, edge triggered: just the vector.
                    msix.table.write32(at + MSIX_ENTRY_DATA, u32::from(vector));
                    msix.table.write32(at + MSIX_ENTRY_VECTOR_CONTROL, 0);
                }
                None => msix
                    .table
                    .write32(at + MSIX_ENTRY_VECTOR_CONTROL, MSIX_ENTRY_MASKED),
            }
        }
        self.common
            .write16(COMMON_MSIX_CONFIG, VIRTIO_MSI_NO_VECTOR);
        // SAFETY: as above; unmasking lets the programmed entries fire.
        unsafe {
            function.write16(
                msix.cap + MSIX_CONTROL,
                (control | MSIX_CONTROL_ENABLE) & !MSIX_CONTROL_FUNCTION_MASK,
            );
        }
    }

    /// Sets up and enables queue `index` (4.1.5.1.3) with at most
    /// `wanted_size` entries (the largest power of two within both that and
    /// the device's maximum), interrupting through MSI-X table entry
    /// `msix_entry` (`None`: VIRTIO_MSI_NO_VECTOR).
    pub fn setup_queue(
        &self,
        index: u16,
        wanted_size: u16,
        msix_entry: Option<u16>,
        event_idx: bool,
    ) -> Result<SplitQueue, VirtioPciError> {
        let common = &self.common;
        common.write16(COMMON_Q_SELECT, index);
        let max = common.read16(COMMON_Q_SIZE);
        let size = max.min(wanted_size.max(1));
        if size == 0 {
            return Err(VirtioPciError::QueueUnavailable(index));
        }
        let size = 1u16 << (15 - size.leading_zeros());
        let notify_off = u64::from(common.read16(COMMON_Q_NOTIFY_OFF));
        let notify = self
            .notify
            .sub(
                notify_off * u64::from(self.notify_off_multiplier),
                NOTIFY_BYTES,
            )
            .ok_or(VirtioPciError::BadNotifyOffset(index))?;
        let queue = SplitQueue::new(index, size, notify, event_idx)
            .ok_or(VirtioPciError::OutOfMemory("a virtqueue"))?;
        common.write16(COMMON_Q_SIZE, size);
        let vector = msix_entry.unwrap_or(VIRTIO_MSI_NO_VECTOR);
        common.write16(COMMON_Q_MSIX_VECTOR, vector);
        if common.read16(COMMON_Q_MSIX_VECTOR) != vector {
            return Err(VirtioPciError::VectorRejected {
                queue: index,
                entry: vector,
            });
        }
        common.write64_split(COMMON_Q_DESC, queue.desc_paddr());
        common.write64_split(COMMON_Q_DRIVER, queue.avail_paddr());
        common.write64_split(COMMON_Q_DEVICE, queue.used_paddr());
        common.write16(COMMON_Q_ENABLE, 1);
        Ok(queue)
    }

    /// The end of initialization: the device may now process queues.
    pub fn driver_ok(&self) {
        self.add_status(STATUS_DRIVER_OK);
    }

    /// The device-specific configuration registers, if the device has them.
    pub fn device_cfg(&self) -> Option<&Mmio> {
        self.device_cfg.as_ref()
    }

    /// config_generation: changes when the device changes its configuration.
    pub fn config_generation(&self) -> u8 {
        self.common.read8(COMMON_CFG_GENERATION)
    }
}
