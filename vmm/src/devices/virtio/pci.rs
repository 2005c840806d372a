//! The virtio-pci modern (virtio 1.x) transport.
//!
//! One 64-bit memory BAR holds everything: common configuration, ISR,
//! device configuration, the notification area and the MSI-X table and PBA.
//! Each queue's notification address is a KVM ioeventfd (registered where
//! the BAR decodes, and moved with it), so a guest kick never exits to
//! ringvm; each MSI-X vector is an irqfd (interrupts.rs). On DRIVER_OK the
//! device (a vhost-user frontend) hands the kick and call eventfds to its
//! backend; from then on the data path bypasses this process.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::interrupts::{InterruptsError, MsiVectors};
use super::{ActiveQueue, QueueConfig, VirtioDevice};
use crate::devices::pci::msix::{self, Msix};
use crate::devices::pci::{ConfigHeader, ConfigSpace, ConfigSpaceError, PciDevice};
use crate::kvm::{KvmError, KvmVm};

/// The BAR everything lives in, and its layout.
pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 4;
pub const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
/// The table must end before the PBA.
const MSIX_MAX_VECTORS: u16 = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / msix::ENTRY_BYTES) as u16;

/// virtio-pci capability (virtio 1.2, 4.1.4): vendor-specific capability id and cfg_type values.
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// "No MSI-X vector" for config_msix_vector / queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// PCI ids: vendor 0x1af4, modern device ids are 0x1040 + device type.
const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_MODERN_DEVICE_BASE: u16 = 0x1040;
/// ISR bits: queue interrupt, configuration change.
const ISR_CONFIG_CHANGED: u8 = 0x2;

/// Common configuration register offsets (virtio 1.2, 4.1.4.3).
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("the device has {0} queues; the transport supports at most {max}", max = MSIX_MAX_VECTORS - 1)]
    TooManyQueues(usize),
    #[error(transparent)]
    ConfigSpace(#[from] ConfigSpaceError),
    #[error(transparent)]
    Interrupts(#[from] InterruptsError),
    #[error("creating the notification eventfd of queue {0} failed")]
    KickEventFd(usize, #[source] std::io::Error),
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

#[derive(Clone, Copy)]
struct QueueState {
    config: QueueConfig,
    vector: u16,
}

/// Counters of one transport, readable while the VM runs.
#[derive(Default, Debug, Clone, Copy)]
pub struct TransportStats {
    pub activations: u64,
    pub resets: u64,
    pub failed_activations: u64,
}

pub struct VirtioPciDevice {
    name: String,
    config: ConfigSpace,
    msix_cap: usize,
    msix: Msix,
    vectors: Arc<MsiVectors>,
    vm: Arc<KvmVm>,
    device: Box<dyn VirtioDevice>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueState>,
    isr: u8,
    kicks: Vec<EventFd>,
    /// Call eventfds for queues without an MSI-X vector: the backend
    /// signals them and nobody listens (the driver polls).
    silent_calls: Vec<EventFd>,
    /// BAR base the notification ioeventfds are registered at.
    notify_base: Option<u64>,
    active: bool,
    stats: TransportStats,
}

fn eventfd() -> std::io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

impl VirtioPciDevice {
    /// A transport for `device`, its BAR placed at `bar_base`.
    pub fn new(
        name: String,
        device: Box<dyn VirtioDevice>,
        vm: Arc<KvmVm>,
        bar_base: u64,
        class: (u8, u8),
    ) -> Result<Self, VirtioPciError> {
        let n = device.num_queues();
        // One vector per queue plus one for configuration changes.
        let num_vectors = u16::try_from(n + 1)
            .ok()
            .filter(|v| *v <= MSIX_MAX_VECTORS)
            .ok_or(VirtioPciError::TooManyQueues(n))?;
        let vectors = Arc::new(MsiVectors::new(vm.clone(), num_vectors)?);
        let msix = Msix::new(num_vectors, vectors.clone());
        let device_type = device.device_type() as u16;
        let mut config = ConfigSpace::new(&ConfigHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_MODERN_DEVICE_BASE + device_type,
            class_code: class.0,
            subclass: class.1,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40 + device_type,
        });
        config.add_mem_bar64(BAR_INDEX, bar_base, BAR_SIZE)?;
        let cap = |cfg_type: u8, offset: u64, len: u64, extra: &[u8]| -> Vec<u8> {
            // cap_len counts the whole capability, id and next included.
            let mut b = vec![16 + extra.len() as u8, cfg_type, BAR_INDEX as u8, 0, 0, 0];
            b.extend_from_slice(&(offset as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(extra);
            b
        };
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN, &[]),
        )?;
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, &[]),
        )?;
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_LEN, &[]),
        )?;
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
        )?;
        let mut msix_body = msix.control().to_le_bytes().to_vec();
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | BAR_INDEX as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | BAR_INDEX as u32).to_le_bytes());
        let msix_cap = config.add_capability(msix::CAPABILITY_ID, &msix_body)?;
        // Enable and function mask are the guest's to write.
        config.set_writable(msix_cap + 3, &[0xc0]);

        let mut kicks = Vec::with_capacity(n);
        let mut silent_calls = Vec::with_capacity(n);
        for q in 0..n {
            kicks.push(eventfd().map_err(|e| VirtioPciError::KickEventFd(q, e))?);
            silent_calls.push(eventfd().map_err(|e| VirtioPciError::KickEventFd(q, e))?);
        }
        let mut dev = Self {
            name,
            config,
            msix_cap,
            msix,
            vectors,
            vm,
            device,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: Vec::new(),
            isr: 0,
            kicks,
            silent_calls,
            notify_base: None,
            active: false,
            stats: TransportStats::default(),
        };
        dev.reset_state();
        Ok(dev)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> TransportStats {
        self.stats
    }

    fn reset_state(&mut self) {
        let max = self.device.max_queue_size();
        self.queues = vec![
            QueueState {
                config: QueueConfig {
                    size: max,
                    ..Default::default()
                },
                vector: VIRTIO_MSI_NO_VECTOR,
            };
            self.device.num_queues()
        ];
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        self.isr = 0;
    }

    /// The backend went away: the device needs a reset, and the driver is
    /// told through a configuration-change interrupt.
    pub fn on_backend_gone(&mut self) {
        tracing::error!(device = %self.name, "vhost-user backend disconnected; the device now reports NEEDS_RESET");
        self.needs_reset();
    }

    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET as u8;
        self.isr |= ISR_CONFIG_CHANGED;
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.config_vector != VIRTIO_MSI_NO_VECTOR {
            self.vectors.trigger(self.config_vector);
        }
    }

    /// Keeps the notification ioeventfds where the BAR decodes now.
    fn sync_notify(&mut self) {
        let want = self
            .config
            .decoded_bars()
            .into_iter()
            .find(|(i, _, _)| *i == BAR_INDEX)
            .map(|(_, base, _)| base);
        if want == self.notify_base {
            return;
        }
        let addr = |base: u64, q: usize| {
            base + NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
        };
        if let Some(old) = self.notify_base.take() {
            for (q, k) in self.kicks.iter().enumerate() {
                if let Err(e) = self.vm.unregister_ioevent(k, addr(old, q)) {
                    tracing::error!(device = %self.name, "{e}");
                }
            }
        }
        if let Some(base) = want {
            for (q, k) in self.kicks.iter().enumerate() {
                if let Err(e) = self.vm.register_ioevent(k, addr(base, q)) {
                    // Notifications still work, through MMIO exits.
                    tracing::error!(device = %self.name, "{e}");
                }
            }
            self.notify_base = want;
        }
    }

    fn features_ok(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        let active: Vec<ActiveQueue<'_>> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.config.enabled)
            .map(|(index, q)| ActiveQueue {
                index,
                config: q.config,
                kick: &self.kicks[index],
                call: self
                    .vectors
                    .eventfd(q.vector)
                    .unwrap_or(&self.silent_calls[index]),
            })
            .collect();
        let result = self.device.activate(self.driver_features, &active);
        drop(active);
        match result {
            Ok(()) => {
                self.active = true;
                self.stats.activations += 1;
            }
            Err(e) => {
                self.stats.failed_activations += 1;
                tracing::error!(device = %self.name, "starting the device failed: {:#}", anyhow_chain(&e));
                self.needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.stats.resets += 1;
        self.reset_state();
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut value = value | (old & VIRTIO_CONFIG_S_NEEDS_RESET as u8);
        let features_ok = VIRTIO_CONFIG_S_FEATURES_OK as u8;
        if value & features_ok != 0 && old & features_ok == 0 && !self.features_ok() {
            // The driver reads the status back and sees FEATURES_OK refused.
            value &= !features_ok;
        }
        self.status = value;
        let driver_ok = VIRTIO_CONFIG_S_DRIVER_OK as u8;
        if value & driver_ok == 0 || old & driver_ok != 0 || self.active {
            // Not a DRIVER_OK transition, or one after the driver cleared
            // DRIVER_OK of a running device (only a reset stops it).
            return;
        }
        if value & features_ok == 0 {
            // The driver skipped FEATURES_OK or ignored its refusal: its
            // features may be ones the device never offered.
            tracing::warn!(device = %self.name, "DRIVER_OK without accepted features; the device now reports NEEDS_RESET");
            self.needs_reset();
            return;
        }
        self.activate();
    }

    fn selected_queue(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select));
        let mut regs = [0u8; COMMON_LEN as usize];
        let mut put = |at: u64, bytes: &[u8]| {
            regs[at as usize..at as usize + bytes.len()].copy_from_slice(bytes)
        };
        let features = self.device.features();
        let feature_word = match self.device_feature_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        put(
            common::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(common::DEVICE_FEATURE, &feature_word.to_le_bytes());
        put(
            common::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        let driver_word = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(common::DRIVER_FEATURE, &driver_word.to_le_bytes());
        put(
            common::CONFIG_MSIX_VECTOR,
            &self.config_vector.to_le_bytes(),
        );
        put(
            common::NUM_QUEUES,
            &(self.queues.len() as u16).to_le_bytes(),
        );
        put(common::DEVICE_STATUS, &[self.status]);
        put(common::CONFIG_GENERATION, &[self.config_generation]);
        put(common::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(q) = q {
            put(common::QUEUE_SIZE, &q.config.size.to_le_bytes());
            put(common::QUEUE_MSIX_VECTOR, &q.vector.to_le_bytes());
            put(
                common::QUEUE_ENABLE,
                &u16::from(q.config.enabled).to_le_bytes(),
            );
            put(common::QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(common::QUEUE_DESC, &q.config.desc.0.to_le_bytes());
            put(common::QUEUE_DRIVER, &q.config.avail.0.to_le_bytes());
            put(common::QUEUE_DEVICE, &q.config.used.0.to_le_bytes());
        }
        let start = offset as usize;
        match regs.get(start..start + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(v);
        let max_size = self.device.max_queue_size();
        let num_vectors = self.msix.num_vectors();
        let vector_or_none = |v: u16| {
            if v < num_vectors {
                v
            } else {
                VIRTIO_MSI_NO_VECTOR
            }
        };
        // Queue registers can only change before the driver says DRIVER_OK.
        let queue_writable = self.status & VIRTIO_CONFIG_S_DRIVER_OK as u8 == 0;
        let set_half = |reg: &mut u64, at: u64, base: u64| {
            if data.len() == 8 && at == base {
                *reg = value;
            } else if data.len() == 4 && at == base {
                *reg = (*reg & !0xffff_ffff) | (value & 0xffff_ffff);
            } else if data.len() == 4 && at == base + 4 {
                *reg = (*reg & 0xffff_ffff) | (value << 32);
            }
        };
        match offset {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = value as u32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = value as u32,
            common::DRIVER_FEATURE if self.status & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 => {
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (value & 0xffff_ffff)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((value & 0xffff_ffff) << 32)
                    }
                    _ => {}
                }
            }
            common::CONFIG_MSIX_VECTOR => self.config_vector = vector_or_none(value as u16),
            common::DEVICE_STATUS => self.set_status(value as u8),
            common::QUEUE_SELECT => self.queue_select = value as u16,
            common::QUEUE_SIZE if queue_writable => {
                let size = value as u16;
                if let Some(q) = self.selected_queue() {
                    if size.is_power_of_two() && size <= max_size {
                        q.config.size = size;
                    }
                }
            }
            common::QUEUE_MSIX_VECTOR => {
                let vector = vector_or_none(value as u16);
                if let Some(q) = self.selected_queue() {
                    q.vector = vector;
                }
            }
            common::QUEUE_ENABLE if queue_writable && value == 1 => {
                if let Some(q) = self.selected_queue() {
                    q.config.enabled = true;
                }
            }
            at if queue_writable
                && (common::QUEUE_DESC..common::QUEUE_DEVICE + 8).contains(&at) =>
            {
                if let Some(q) = self.selected_queue() {
                    let (reg, base) = match at {
                        a if a < common::QUEUE_DRIVER => (&mut q.config.desc, common::QUEUE_DESC),
                        a if a < common::QUEUE_DEVICE => {
                            (&mut q.config.avail, common::QUEUE_DRIVER)
                        }
                        _ => (&mut q.config.used, common::QUEUE_DEVICE),
                    };
                    let mut raw = reg.0;
                    set_half(&mut raw, at, base);
                    *reg = GuestAddress(raw);
                }
            }
            _ => {}
        }
    }

    fn read_msix_control(&mut self) {
        let mut c = [0u8; 2];
        self.config.bytes(self.msix_cap + 2, &mut c);
        self.msix.set_control(u16::from_le_bytes(c));
    }
}

/// An error and its sources, joined with ": ".
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        let first = reg * 4 + offset;
        let control = self.msix_cap + 2..self.msix_cap + 4;
        if first < control.end && control.start < first + data.len() {
            self.read_msix_control();
        }
        self.sync_notify();
    }

    fn mmio_bars(&self) -> Vec<(usize, u64, u64)> {
        self.config.decoded_bars()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR_INDEX {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON_OFFSET + COMMON_LEN => self.read_common(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + ISR_LEN).contains(&o) => {
                // Reading the ISR clears it.
                data[0] = std::mem::take(&mut self.isr);
            }
            o if o >= DEVICE_OFFSET && o + len <= DEVICE_OFFSET + DEVICE_LEN => {
                let at = o - DEVICE_OFFSET;
                if at + len <= self.device.config_len() as u64 {
                    self.device.read_config(at, data);
                }
            }
            o if o >= MSIX_TABLE_OFFSET
                && o + len <= MSIX_TABLE_OFFSET + self.msix.table_bytes() =>
            {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if o >= MSIX_PBA_OFFSET && o + len <= MSIX_PBA_OFFSET + self.msix.pba_bytes() => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON_OFFSET + COMMON_LEN => {
                self.write_common(o - COMMON_OFFSET, data)
            }
            o if o >= DEVICE_OFFSET && o + len <= DEVICE_OFFSET + DEVICE_LEN => {
                let at = o - DEVICE_OFFSET;
                if at + len <= self.device.config_len() as u64 {
                    self.device.write_config(at, data);
                }
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // Only reached while the ioeventfds are not registered.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if o >= MSIX_TABLE_OFFSET
                && o + len <= MSIX_TABLE_OFFSET + self.msix.table_bytes() =>
            {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What the fake device saw.
    #[derive(Default)]
    struct Seen {
        activations: Vec<(u64, Vec<(usize, QueueConfig)>)>,
        resets: usize,
        fail_activation: bool,
    }

    struct FakeDevice(Arc<Mutex<Seen>>);

    const FAKE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 29) | 1;

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            FAKE_FEATURES
        }
        fn config_len(&self) -> usize {
            8
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0xa0 + offset as u8 + i as u8;
            }
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            features: u64,
            queues: &[ActiveQueue<'_>],
        ) -> Result<(), super::super::ActivateError> {
            let mut s = self.0.lock().unwrap();
            if s.fail_activation {
                return Err(super::super::ActivateError::BackendGone);
            }
            s.activations.push((
                features,
                queues.iter().map(|q| (q.index, q.config)).collect(),
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn device() -> (VirtioPciDevice, Arc<Mutex<Seen>>) {
        let vm = Arc::new(KvmVm::new(1).expect("/dev/kvm"));
        vm.setup_platform().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let dev = VirtioPciDevice::new(
            "test".into(),
            Box::new(FakeDevice(seen.clone())),
            vm,
            0xc000_0000,
            (1, 0),
        )
        .unwrap();
        (dev, seen)
    }

    fn w(d: &mut VirtioPciDevice, off: u64, bytes: &[u8]) {
        d.write_bar(BAR_INDEX, COMMON_OFFSET + off, bytes);
    }

    fn r8(d: &mut VirtioPciDevice, off: u64) -> u8 {
        let mut b = [0u8];
        d.read_bar(BAR_INDEX, COMMON_OFFSET + off, &mut b);
        b[0]
    }

    fn r16(d: &mut VirtioPciDevice, off: u64) -> u16 {
        let mut b = [0u8; 2];
        d.read_bar(BAR_INDEX, COMMON_OFFSET + off, &mut b);
        u16::from_le_bytes(b)
    }

    fn negotiate(d: &mut VirtioPciDevice, features: u64) -> u8 {
        w(d, common::DEVICE_STATUS, &[1 | 2]);
        w(d, common::DRIVER_FEATURE_SELECT, &0u32.to_le_bytes());
        w(d, common::DRIVER_FEATURE, &(features as u32).to_le_bytes());
        w(d, common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        w(
            d,
            common::DRIVER_FEATURE,
            &((features >> 32) as u32).to_le_bytes(),
        );
        w(d, common::DEVICE_STATUS, &[1 | 2 | 8]);
        r8(d, common::DEVICE_STATUS)
    }

    fn setup_queue(d: &mut VirtioPciDevice, q: u16, size: u16, base: u64) {
        w(d, common::QUEUE_SELECT, &q.to_le_bytes());
        w(d, common::QUEUE_SIZE, &size.to_le_bytes());
        for (reg, addr) in [
            (common::QUEUE_DESC, base),
            (common::QUEUE_DRIVER, base + 0x1000),
            (common::QUEUE_DEVICE, base + 0x2000),
        ] {
            w(d, reg, &(addr as u32).to_le_bytes());
            w(d, reg + 4, &((addr >> 32) as u32).to_le_bytes());
        }
        w(d, common::QUEUE_ENABLE, &1u16.to_le_bytes());
    }

    #[test]
    fn features_and_device_config_are_visible() {
        let (mut d, _) = device();
        let mut b = [0u8; 4];
        w(&mut d, common::DEVICE_FEATURE_SELECT, &1u32.to_le_bytes());
        d.read_bar(BAR_INDEX, common::DEVICE_FEATURE, &mut b);
        assert_eq!(u32::from_le_bytes(b), (FAKE_FEATURES >> 32) as u32);
        assert_eq!(r16(&mut d, common::NUM_QUEUES), 2);
        d.read_bar(BAR_INDEX, DEVICE_OFFSET + 2, &mut b[..2]);
        assert_eq!(b[..2], [0xa2, 0xa3]);
        d.read_bar(BAR_INDEX, DEVICE_OFFSET + 7, &mut b[..2]);
        assert_eq!(b[..2], [0, 0], "reads past the device config are zero");
        assert_eq!(r16(&mut d, common::QUEUE_SIZE), 256);
    }

    #[test]
    fn features_ok_is_refused_for_unoffered_or_legacy_features() {
        let (mut d, _) = device();
        assert_eq!(
            negotiate(&mut d, 1 << 40 | 1 << VIRTIO_F_VERSION_1) & 8,
            0,
            "unoffered bit"
        );
        w(&mut d, common::DEVICE_STATUS, &[0]);
        assert_eq!(negotiate(&mut d, 1) & 8, 0, "no VERSION_1");
        w(&mut d, common::DEVICE_STATUS, &[0]);
        assert_eq!(negotiate(&mut d, FAKE_FEATURES) & 8, 8);
    }

    #[test]
    fn driver_ok_activates_enabled_queues_and_reset_stops_them() {
        let (mut d, seen) = device();
        negotiate(&mut d, FAKE_FEATURES);
        setup_queue(&mut d, 1, 64, 0x10_0000);
        w(&mut d, common::QUEUE_SELECT, &1u16.to_le_bytes());
        w(&mut d, common::QUEUE_SIZE, &100u16.to_le_bytes()); // not a power of two: ignored
        assert_eq!(r16(&mut d, common::QUEUE_SIZE), 64);
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 8 | 4]);
        {
            let s = seen.lock().unwrap();
            assert_eq!(s.activations.len(), 1);
            let (features, queues) = &s.activations[0];
            assert_eq!(*features, FAKE_FEATURES);
            assert_eq!(queues.len(), 1, "queue 0 was never enabled");
            assert_eq!(queues[0].0, 1);
            assert_eq!(queues[0].1.size, 64);
            assert_eq!(queues[0].1.avail, GuestAddress(0x10_1000));
        }
        // Queue setup is frozen after DRIVER_OK.
        w(&mut d, common::QUEUE_SIZE, &32u16.to_le_bytes());
        assert_eq!(r16(&mut d, common::QUEUE_SIZE), 64);
        w(&mut d, common::DEVICE_STATUS, &[0]);
        assert_eq!(seen.lock().unwrap().resets, 1);
        assert_eq!(r8(&mut d, common::DEVICE_STATUS), 0);
        assert_eq!(
            r16(&mut d, common::QUEUE_SIZE),
            256,
            "reset restores the defaults"
        );
        assert_eq!(d.stats().activations, 1);
    }

    #[test]
    fn driver_ok_without_accepted_features_needs_reset() {
        // Found by the virtio_pci_registers fuzz target: DRIVER_OK after a
        // refused FEATURES_OK started the device with unoffered features.
        let (mut d, seen) = device();
        let unoffered = 1 << 40 | 1 << VIRTIO_F_VERSION_1;
        assert_eq!(negotiate(&mut d, unoffered) & 8, 0, "FEATURES_OK refused");
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 8 | 4]);
        assert!(seen.lock().unwrap().activations.is_empty());
        let status = r8(&mut d, common::DEVICE_STATUS);
        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        assert_eq!(status & 8, 0);
        // Without FEATURES_OK at all.
        w(&mut d, common::DEVICE_STATUS, &[0]);
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 4]);
        assert!(seen.lock().unwrap().activations.is_empty());
        assert_ne!(
            r8(&mut d, common::DEVICE_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET as u8,
            0
        );
        // A reset and a proper negotiation start it.
        w(&mut d, common::DEVICE_STATUS, &[0]);
        negotiate(&mut d, FAKE_FEATURES);
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 8 | 4]);
        assert_eq!(seen.lock().unwrap().activations.len(), 1);
        assert_eq!(
            r8(&mut d, common::DEVICE_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET as u8,
            0
        );
    }

    #[test]
    fn driver_ok_set_again_does_not_start_a_running_device_twice() {
        // Found by the virtio_pci_registers fuzz target: clearing DRIVER_OK
        // and setting it again activated the device a second time.
        let (mut d, seen) = device();
        negotiate(&mut d, FAKE_FEATURES);
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 8 | 4]);
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 8]);
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 8 | 4]);
        assert_eq!(seen.lock().unwrap().activations.len(), 1);
        w(&mut d, common::DEVICE_STATUS, &[0]);
        assert_eq!(seen.lock().unwrap().resets, 1);
        negotiate(&mut d, FAKE_FEATURES);
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 8 | 4]);
        assert_eq!(seen.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn failed_activation_or_lost_backend_reports_needs_reset() {
        let (mut d, seen) = device();
        seen.lock().unwrap().fail_activation = true;
        negotiate(&mut d, FAKE_FEATURES);
        w(&mut d, common::DEVICE_STATUS, &[1 | 2 | 8 | 4]);
        let status = r8(&mut d, common::DEVICE_STATUS);
        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
        let mut isr = [0u8];
        d.read_bar(BAR_INDEX, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_CONFIG_CHANGED);
        d.read_bar(BAR_INDEX, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], 0, "reading the ISR clears it");
        w(&mut d, common::DEVICE_STATUS, &[0]);
        assert_eq!(r8(&mut d, common::DEVICE_STATUS), 0);
        d.on_backend_gone();
        assert_ne!(
            r8(&mut d, common::DEVICE_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET as u8,
            0
        );
    }

    #[test]
    fn msix_vectors_are_checked_against_the_table_size() {
        let (mut d, _) = device();
        w(&mut d, common::QUEUE_SELECT, &0u16.to_le_bytes());
        w(&mut d, common::QUEUE_MSIX_VECTOR, &2u16.to_le_bytes());
        assert_eq!(r16(&mut d, common::QUEUE_MSIX_VECTOR), 2);
        w(&mut d, common::QUEUE_MSIX_VECTOR, &3u16.to_le_bytes());
        assert_eq!(
            r16(&mut d, common::QUEUE_MSIX_VECTOR),
            VIRTIO_MSI_NO_VECTOR,
            "3 vectors: 0..=2"
        );
        w(&mut d, common::CONFIG_MSIX_VECTOR, &0u16.to_le_bytes());
        assert_eq!(r16(&mut d, common::CONFIG_MSIX_VECTOR), 0);
    }

    #[test]
    fn bar_moves_with_its_notification_ioeventfds() {
        let (mut d, _) = device();
        assert!(d.mmio_bars().is_empty());
        d.write_config(1, 0, &[0x06]); // memory space + bus master
        assert_eq!(d.mmio_bars(), vec![(BAR_INDEX, 0xc000_0000, BAR_SIZE)]);
        assert_eq!(d.notify_base, Some(0xc000_0000));
        d.write_config(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(d.notify_base, Some(0xd000_0000));
        d.write_config(1, 0, &[0x04]); // memory space off
        assert_eq!(d.notify_base, None);
        // A notification while the ioeventfd is not registered is an MMIO write.
        d.write_bar(BAR_INDEX, NOTIFY_OFFSET + 4, &1u16.to_le_bytes());
        assert_eq!(d.kicks[1].read().unwrap(), 1);
    }
}
