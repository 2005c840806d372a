//! The PCI host bridge at 00:00.0: a header with nothing to configure, so
//! a guest that scans bus 0 finds a root complex.

use super::{ConfigHeader, ConfigSpace, PciDevice};

pub const VENDOR_ID_INTEL: u16 = 0x8086;
/// An Intel host bridge id, as Cloud Hypervisor also uses for its root.
const DEVICE_ID_HOST_BRIDGE: u16 = 0x0d57;
const CLASS_BRIDGE: u8 = 0x06;
const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(&ConfigHeader {
                vendor_id: VENDOR_ID_INTEL,
                device_id: DEVICE_ID_HOST_BRIDGE,
                class_code: CLASS_BRIDGE,
                subclass: SUBCLASS_HOST_BRIDGE,
                prog_if: 0,
                revision: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}
