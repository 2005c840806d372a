//! PCI: the configuration mechanism #1 ports (0xCF8 address, 0xCFC data),
//! bus 0 with one function per slot, and the host bridge at 00:00.0.
//!
//! Accesses to an empty slot, another bus or a non-zero function read as all
//! ones (no device) and writes to them are dropped, as on real hardware.

pub mod host_bridge;

use std::sync::{Arc, Mutex};

use super::PioDevice;

/// Dwords in a conventional (non-extended) PCI configuration space.
pub const CONFIG_DWORDS: usize = 64;
/// Slots on bus 0.
pub const NUM_SLOTS: usize = 32;

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of CONFIG_ADDRESS that hold state (reserved bits 30:24 and 1:0 read as zero).
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// A function on the bus, shared by the bus and whoever owns the device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// A function's configuration space as the bus sees it.
pub trait PciDevice: Send {
    /// Reads dword `reg` (0..CONFIG_DWORDS).
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within dword `reg`.
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]);
}

/// A configuration space with a write mask: bits set in `writable` take
/// what the guest writes, all others are read-only.
pub struct ConfigSpace {
    regs: [u32; CONFIG_DWORDS],
    writable: [u32; CONFIG_DWORDS],
}

/// Header fields of a type-0 function.
pub struct ConfigHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub class_code: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

const REG_ID: usize = 0;
const REG_COMMAND_STATUS: usize = 1;
const REG_CLASS_REVISION: usize = 2;
const REG_SUBSYSTEM: usize = 11;
const REG_INTERRUPT: usize = 15;
/// Command register bits a simple function lets the guest set: I/O, memory,
/// bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;

impl ConfigSpace {
    pub fn new(h: &ConfigHeader) -> Self {
        let mut regs = [0u32; CONFIG_DWORDS];
        let mut writable = [0u32; CONFIG_DWORDS];
        regs[REG_ID] = u32::from(h.vendor_id) | (u32::from(h.device_id) << 16);
        regs[REG_CLASS_REVISION] = (u32::from(h.class_code) << 24)
            | (u32::from(h.subclass) << 16)
            | (u32::from(h.prog_if) << 8)
            | u32::from(h.revision);
        regs[REG_SUBSYSTEM] = u32::from(h.subsystem_vendor_id) | (u32::from(h.subsystem_id) << 16);
        writable[REG_COMMAND_STATUS] = COMMAND_WRITABLE;
        // Interrupt line is scratch space for the guest's drivers.
        writable[REG_INTERRUPT] = 0xff;
        Self { regs, writable }
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let (Some(cur), Some(mask)) =
            (self.regs.get(reg).copied(), self.writable.get(reg).copied())
        else {
            return;
        };
        if offset + data.len() > 4 {
            return;
        }
        let mut bytes = cur.to_le_bytes();
        bytes[offset..offset + data.len()].copy_from_slice(data);
        let new = u32::from_le_bytes(bytes);
        self.regs[reg] = (cur & !mask) | (new & mask);
    }
}

/// Bus 0: one function per slot.
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("PCI bus 0 has no free slot left (32 slots)")]
    BusFull,
}

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(host_bridge::HostBridge::new())));
        Self { slots }
    }

    /// Puts `device` in the first free slot and returns the slot number.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<usize, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::BusFull)?;
        self.slots[slot] = Some(device);
        Ok(slot)
    }

    fn device(&self, bus: u8, slot: usize, function: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(slot)?.as_ref()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

/// The 0xCF8-0xCFF port pair.
pub struct PciConfigIo {
    address: u32,
    bus: Arc<Mutex<PciBus>>,
}

/// Offset of CONFIG_DATA within the device's 8 ports.
const DATA_OFFSET: u16 = 4;

impl PciConfigIo {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { address: 0, bus }
    }

    /// For a CONFIG_DATA access of `len` bytes at port `offset`: the selected
    /// function and (register, byte within it), or None when CONFIG_ADDRESS
    /// is disabled, the access crosses the dword, or no function is there.
    fn data_target(&self, offset: u16, len: usize) -> Option<(SharedPciDevice, usize, usize)> {
        let byte = usize::from(offset.checked_sub(DATA_OFFSET)?);
        if byte + len > 4 || self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bus = ((self.address >> 16) & 0xff) as u8;
        let slot = ((self.address >> 11) & 0x1f) as usize;
        let function = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        let pci = self.bus.lock().expect("PCI bus lock poisoned");
        Some((pci.device(bus, slot, function)?.clone(), reg, byte))
    }
}

impl PioDevice for PciConfigIo {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if offset < DATA_OFFSET {
            // CONFIG_ADDRESS is a dword register; only dword reads see it.
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            }
            return;
        }
        if let Some((dev, reg, byte)) = self.data_target(offset, data.len()) {
            let value = dev
                .lock()
                .expect("PCI device lock poisoned")
                .read_config(reg);
            data.copy_from_slice(&value.to_le_bytes()[byte..byte + data.len()]);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset < DATA_OFFSET {
            if offset == 0 && data.len() == 4 {
                self.address =
                    u32::from_le_bytes(data.try_into().expect("4 bytes")) & CONFIG_ADDRESS_MASK;
            }
            return;
        }
        if let Some((dev, reg, byte)) = self.data_target(offset, data.len()) {
            dev.lock()
                .expect("PCI device lock poisoned")
                .write_config(reg, byte, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(
        io: &mut PciConfigIo,
        slot: u32,
        function: u32,
        reg_byte: u32,
        width: usize,
    ) -> u32 {
        let addr = CONFIG_ADDRESS_ENABLE | (slot << 11) | (function << 8) | (reg_byte & 0xfc);
        io.write(0, &addr.to_le_bytes());
        let mut d = vec![0u8; width];
        io.read(DATA_OFFSET + (reg_byte & 3) as u16, &mut d);
        let mut v = [0u8; 4];
        v[..width].copy_from_slice(&d);
        u32::from_le_bytes(v)
    }

    #[test]
    fn host_bridge_is_at_00_0_and_other_slots_are_empty() {
        let mut io = PciConfigIo::new(Arc::new(Mutex::new(PciBus::new())));
        let id = cfg_read(&mut io, 0, 0, 0, 4);
        assert_eq!(id & 0xffff, u32::from(host_bridge::VENDOR_ID_INTEL));
        assert_eq!(cfg_read(&mut io, 0, 0, 0xb, 1), 0x06, "class: bridge");
        assert_eq!(
            cfg_read(&mut io, 0, 0, 0xa, 1),
            0x00,
            "subclass: host bridge"
        );
        assert_eq!(cfg_read(&mut io, 1, 0, 0, 4), 0xffff_ffff);
        assert_eq!(cfg_read(&mut io, 0, 1, 0, 2), 0xffff);
    }

    #[test]
    fn config_address_reads_back_without_reserved_bits() {
        let mut io = PciConfigIo::new(Arc::new(Mutex::new(PciBus::new())));
        io.write(0, &0xffff_ffffu32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), CONFIG_ADDRESS_MASK);
        // A byte write to 0xCF8 (not a config cycle) leaves it alone.
        io.write(0, &[0]);
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), CONFIG_ADDRESS_MASK);
    }

    #[test]
    fn disabled_address_reads_all_ones() {
        let mut io = PciConfigIo::new(Arc::new(Mutex::new(PciBus::new())));
        io.write(0, &0u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(DATA_OFFSET, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn write_mask_protects_read_only_bits() {
        let mut c = ConfigSpace::new(&ConfigHeader {
            vendor_id: 1,
            device_id: 2,
            class_code: 3,
            subclass: 4,
            prog_if: 5,
            revision: 6,
            subsystem_vendor_id: 7,
            subsystem_id: 8,
        });
        c.write(REG_ID, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read(REG_ID), 0x0002_0001);
        c.write(REG_COMMAND_STATUS, 0, &[0xff, 0xff]);
        assert_eq!(c.read(REG_COMMAND_STATUS), COMMAND_WRITABLE);
        c.write(REG_INTERRUPT, 0, &[11]);
        assert_eq!(c.read(REG_INTERRUPT) & 0xff, 11);
        c.write(REG_INTERRUPT, 3, &[1, 2]); // runs past the dword: dropped
        assert_eq!(c.read(99), 0xffff_ffff);
    }

    #[test]
    fn bus_fills_slots_in_order() {
        let mut bus = PciBus::new();
        let dev = Arc::new(Mutex::new(host_bridge::HostBridge::new()));
        assert_eq!(bus.add(dev.clone()).unwrap(), 1);
        for _ in 2..NUM_SLOTS {
            bus.add(dev.clone()).unwrap();
        }
        assert!(matches!(bus.add(dev), Err(PciError::BusFull)));
    }
}
