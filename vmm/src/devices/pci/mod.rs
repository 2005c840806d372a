//! PCI: the configuration mechanism #1 ports (0xCF8 address, 0xCFC data),
//! bus 0 with one function per slot, and the host bridge at 00:00.0.
//!
//! Accesses to an empty slot, another bus or a non-zero function read as all
//! ones (no device) and writes to them are dropped, as on real hardware.

pub mod host_bridge;
pub mod msix;

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

/// A function's configuration space and memory BARs as the bus sees them.
pub trait PciDevice: Send {
    /// Reads dword `reg` (0..CONFIG_DWORDS).
    fn read_config(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within dword `reg`.
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]);
    /// The memory BARs the function decodes now: (BAR index, base, size).
    /// Empty while memory space is disabled in the command register.
    fn mmio_bars(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
    /// A read of `data.len()` bytes at `offset` into BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }
    /// A write at `offset` into BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }
}

/// A configuration space with a write mask: bits set in `writable` take
/// what the guest writes, all others are read-only.
pub struct ConfigSpace {
    regs: [u32; CONFIG_DWORDS],
    writable: [u32; CONFIG_DWORDS],
    /// Size of each 64-bit memory BAR (indexed by its first BAR number).
    bar_sizes: [u64; 6],
    /// Byte offset of the last capability added, to link the next one.
    last_capability: Option<usize>,
    next_capability: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigSpaceError {
    #[error("capability of {0} bytes does not fit in the configuration space")]
    CapabilityTooLarge(usize),
    #[error("BAR {index} of {size} bytes is not a power of two of at least 4 KiB, or not a free BAR pair")]
    BadBar { index: usize, size: u64 },
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
const REG_BAR0: usize = 4;
const REG_SUBSYSTEM: usize = 11;
const REG_CAPABILITIES: usize = 13;
const REG_INTERRUPT: usize = 15;
/// Command register: memory space decoding enabled.
pub const COMMAND_MEMORY: u32 = 1 << 1;
/// Status register (upper half of dword 1): capabilities list present.
const STATUS_CAPABILITIES: u32 = 1 << (16 + 4);
/// BAR type bits: 64-bit memory BAR, not prefetchable.
const BAR_MEM64: u32 = 0x4;
/// Where the capability list starts (right after the type-0 header).
const FIRST_CAPABILITY: usize = 0x40;
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
        Self {
            regs,
            writable,
            bar_sizes: [0; 6],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        }
    }

    /// Declares a 64-bit memory BAR at `index` (and `index + 1`) of `size`
    /// bytes, placed at `base`. The guest can move it (and size it by
    /// writing all ones) like any BAR.
    pub fn add_mem_bar64(
        &mut self,
        index: usize,
        base: u64,
        size: u64,
    ) -> Result<(), ConfigSpaceError> {
        let bad = ConfigSpaceError::BadBar { index, size };
        if index + 1 >= 6 || !size.is_power_of_two() || size < 4096 || self.bar_sizes[index] != 0 {
            return Err(bad);
        }
        if base % size != 0 {
            return Err(bad);
        }
        let lo = REG_BAR0 + index;
        self.regs[lo] = (base as u32 & !0xf) | BAR_MEM64;
        self.regs[lo + 1] = (base >> 32) as u32;
        self.writable[lo] = !(size as u32 - 1) & !0xf;
        self.writable[lo + 1] = !((size - 1) >> 32) as u32;
        self.bar_sizes[index] = size;
        Ok(())
    }

    /// The current base address of the 64-bit memory BAR at `index`.
    pub fn bar_base(&self, index: usize) -> u64 {
        let lo = REG_BAR0 + index;
        u64::from(self.regs[lo] & !0xf) | (u64::from(self.regs[lo + 1]) << 32)
    }

    /// The memory BARs that decode now (memory space enabled): (index, base, size).
    pub fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        if self.regs[REG_COMMAND_STATUS] & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        (0..6)
            .filter(|&i| self.bar_sizes[i] != 0)
            .map(|i| (i, self.bar_base(i), self.bar_sizes[i]))
            .collect()
    }

    /// Appends a capability (`id`, then `body` after the two link bytes) to
    /// the list; returns its byte offset in configuration space.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, ConfigSpaceError> {
        let len = (2 + body.len()).next_multiple_of(4);
        let at = self.next_capability;
        if at + len > CONFIG_DWORDS * 4 {
            return Err(ConfigSpaceError::CapabilityTooLarge(body.len()));
        }
        let mut bytes = vec![0u8; len];
        bytes[0] = id;
        bytes[2..2 + body.len()].copy_from_slice(body);
        self.set_bytes(at, &bytes);
        match self.last_capability {
            None => {
                self.regs[REG_CAPABILITIES] = at as u32;
                self.regs[REG_COMMAND_STATUS] |= STATUS_CAPABILITIES;
            }
            Some(prev) => self.set_bytes(prev + 1, &[at as u8]),
        }
        self.last_capability = Some(at);
        self.next_capability = at + len;
        Ok(at)
    }

    /// Lets the guest write the bits of `mask` in the bytes at `byte_offset`.
    pub fn set_writable(&mut self, byte_offset: usize, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            let b = byte_offset + i;
            let shift = (b % 4) * 8;
            self.writable[b / 4] |= u32::from(*m) << shift;
        }
    }

    /// Reads `data.len()` bytes at `byte_offset` (device-side view).
    pub fn bytes(&self, byte_offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let b = byte_offset + i;
            *d = (self.regs[b / 4] >> ((b % 4) * 8)) as u8;
        }
    }

    /// Writes bytes at `byte_offset`, ignoring the write mask (device-side).
    pub fn set_bytes(&mut self, byte_offset: usize, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            let b = byte_offset + i;
            let shift = (b % 4) * 8;
            self.regs[b / 4] = (self.regs[b / 4] & !(0xff << shift)) | (u32::from(*d) << shift);
        }
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

/// Bus 0: one function per slot. Devices are added while the VM is built;
/// afterwards the bus is shared read-only (Arc) and only devices lock.
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

    /// The device whose memory BAR decodes `addr`: (device, BAR, offset).
    fn bar_target(&self, addr: u64) -> Option<(SharedPciDevice, usize, u64)> {
        self.slots.iter().flatten().find_map(|dev| {
            let bars = dev.lock().expect("PCI device lock poisoned").mmio_bars();
            bars.into_iter()
                .find(|&(_, base, size)| addr >= base && addr - base < size)
                .map(|(bar, base, _)| (dev.clone(), bar, addr - base))
        })
    }

    /// Dispatches an MMIO read; false when no BAR decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.bar_target(addr) {
            Some((dev, bar, offset)) => {
                dev.lock()
                    .expect("PCI device lock poisoned")
                    .read_bar(bar, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches an MMIO write; false when no BAR decodes `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.bar_target(addr) {
            Some((dev, bar, offset)) => {
                dev.lock()
                    .expect("PCI device lock poisoned")
                    .write_bar(bar, offset, data);
                true
            }
            None => false,
        }
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
    bus: Arc<PciBus>,
}

/// Offset of CONFIG_DATA within the device's 8 ports.
const DATA_OFFSET: u16 = 4;

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
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
        Some((self.bus.device(bus, slot, function)?.clone(), reg, byte))
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
        let mut io = PciConfigIo::new(Arc::new(PciBus::new()));
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
        let mut io = PciConfigIo::new(Arc::new(PciBus::new()));
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
        let mut io = PciConfigIo::new(Arc::new(PciBus::new()));
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

    fn header() -> ConfigHeader {
        ConfigHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            class_code: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 2,
        }
    }

    #[test]
    fn mem_bar64_sizes_and_moves() {
        let mut c = ConfigSpace::new(&header());
        c.add_mem_bar64(0, 0xc000_0000, 0x8000).unwrap();
        assert_eq!(c.read(REG_BAR0), 0xc000_0000 | BAR_MEM64);
        assert!(
            c.decoded_bars().is_empty(),
            "memory decoding is off until the guest enables it"
        );
        // Sizing: all ones, read back the size mask with the type bits.
        c.write(REG_BAR0, 0, &[0xff; 4]);
        c.write(REG_BAR0 + 1, 0, &[0xff; 4]);
        assert_eq!(c.read(REG_BAR0), 0xffff_8000 | BAR_MEM64);
        assert_eq!(c.read(REG_BAR0 + 1), 0xffff_ffff);
        // Move it.
        c.write(REG_BAR0, 0, &0xd000_0000u32.to_le_bytes());
        c.write(REG_BAR0 + 1, 0, &[0; 4]);
        c.write(REG_COMMAND_STATUS, 0, &[COMMAND_MEMORY as u8]);
        assert_eq!(c.decoded_bars(), vec![(0, 0xd000_0000, 0x8000)]);
        assert!(c.add_mem_bar64(0, 0, 0x8000).is_err(), "BAR taken");
        assert!(
            c.add_mem_bar64(2, 0x1000, 0x3000).is_err(),
            "not a power of two"
        );
        assert!(
            c.add_mem_bar64(5, 0, 0x1000).is_err(),
            "no room for the upper half"
        );
    }

    #[test]
    fn capabilities_are_linked() {
        let mut c = ConfigSpace::new(&header());
        let a = c.add_capability(0x09, &[14, 1, 2, 3]).unwrap();
        let b = c.add_capability(0x11, &[0; 10]).unwrap();
        assert_eq!(a, FIRST_CAPABILITY);
        assert_eq!(c.read(REG_CAPABILITIES) & 0xff, a as u32);
        assert_ne!(c.read(REG_COMMAND_STATUS) & STATUS_CAPABILITIES, 0);
        let mut link = [0u8; 2];
        c.bytes(a, &mut link);
        assert_eq!(link, [0x09, b as u8]);
        c.bytes(b, &mut link);
        assert_eq!(link, [0x11, 0]);
        // Capability bytes are read-only unless made writable.
        c.write(b / 4, 2, &[0xff]);
        c.bytes(b + 2, &mut link[..1]);
        assert_eq!(link[0], 0);
        c.set_writable(b + 2, &[0xc0]);
        c.write(b / 4, 2, &[0xff]);
        c.bytes(b + 2, &mut link[..1]);
        assert_eq!(link[0], 0xc0);
        assert!(c.add_capability(0x09, &[0; 200]).is_err());
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
