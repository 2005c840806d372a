//! PCI through configuration mechanism #1 (ports 0xCF8/0xCFC): enumeration
//! of bus 0, capability lists, and memory BARs.
//!
//! ringvm has no firmware and places BARs itself; QEMU's SeaBIOS places them
//! too. A BAR that nobody placed (zero), or that lies where CPL3 cannot reach
//! it (above 4 GiB, or outside the part of the MMIO hole start.S maps for
//! CPL3), is sized and placed here, in the MMIO hole from 0xc000_0000 up,
//! clear of every BAR already placed on bus 0.
//!
//! Each config access is two port accesses (two exits to the VMM): this is
//! setup code only.

use alloc::vec::Vec;
use core::fmt;

use crate::mmio::{MMIO_CPL3_END, MMIO_HOLE_START};
use crate::port::{inl, outl, outw};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const CONFIG_ENABLE: u32 = 1 << 31;
const DEVICES_PER_BUS: u8 = 32;
const FUNCTIONS_PER_DEVICE: u8 = 8;

const REG_VENDOR_ID: u8 = 0x00;
const REG_DEVICE_ID: u8 = 0x02;
const REG_COMMAND: u8 = 0x04;
const REG_STATUS: u8 = 0x06;
const REG_HEADER_TYPE: u8 = 0x0e;
const REG_BAR0: u8 = 0x10;
const REG_CAP_PTR: u8 = 0x34;

const VENDOR_NONE: u16 = 0xffff;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAP_LIST: u16 = 1 << 4;
const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
const HEADER_TYPE_MASK: u8 = 0x7f;
/// BARs of a type 0 (endpoint) and a type 1 (bridge) header.
const BARS_ENDPOINT: u8 = 6;
const BARS_BRIDGE: u8 = 2;
const BAR_IO: u32 = 1 << 0;
const BAR_TYPE_MASK: u32 = 0b110;
const BAR_TYPE_64: u32 = 0b100;
const BAR_MEM_FLAGS: u32 = 0xf;
/// Capability pointers are dword-aligned; the low two bits are reserved.
const CAP_PTR_MASK: u8 = 0xfc;
/// A capability list longer than this is a loop.
const CAP_WALK_LIMIT: usize = 48;

/// Where BARs are placed when they need placing: the MMIO hole up to the
/// IOAPIC (0xfec0_0000), which CPL3 can reach (start.S).
const BAR_WINDOW_START: u64 = MMIO_HOLE_START;
const BAR_WINDOW_END: u64 = 0xfec0_0000;
/// Smallest BAR placement granule: a page, so no two BARs share one.
const BAR_MIN_ALIGN: u64 = 4096;

pub enum PciError {
    IoBar {
        function: PciFunction,
        bar: u8,
    },
    NoBar {
        function: PciFunction,
        bar: u8,
    },
    NoRoom {
        function: PciFunction,
        bar: u8,
        bytes: u64,
    },
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PciError::IoBar { function, bar } => {
                write!(f, "pci {function} BAR{bar} is an I/O BAR, not memory")
            }
            PciError::NoBar { function, bar } => {
                write!(f, "pci {function} has no BAR{bar}")
            }
            PciError::NoRoom {
                function,
                bar,
                bytes,
            } => write!(
                f,
                "pci {function} BAR{bar}: no room for {bytes:#x} bytes in the MMIO window"
            ),
        }
    }
}

/// One function on bus 0 (or any bus, but only bus 0 is enumerated).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PciFunction {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

impl PciFunction {
    fn config_address(self, offset: u8) -> u32 {
        CONFIG_ENABLE
            | u32::from(self.bus) << 16
            | u32::from(self.device) << 11
            | u32::from(self.function) << 8
            | u32::from(offset & 0xfc)
    }

    pub fn read32(self, offset: u8) -> u32 {
        // SAFETY: CONFIG_ADDRESS/CONFIG_DATA are the host bridge's config
        // mechanism: selecting a register and reading it touches no memory,
        // and reads of the standard header and capabilities have no side
        // effects on the device.
        unsafe {
            outl(CONFIG_ADDRESS, self.config_address(offset));
            inl(CONFIG_DATA)
        }
    }

    pub fn read16(self, offset: u8) -> u16 {
        (self.read32(offset) >> ((offset & 2) * 8)) as u16
    }

    pub fn read8(self, offset: u8) -> u8 {
        (self.read32(offset) >> ((offset & 3) * 8)) as u8
    }

    /// Writes a config register.
    ///
    /// # Safety
    /// The write can move a BAR, turn on DMA (bus master) or interrupts; the
    /// caller owns this function's setup and knows what it changes.
    pub unsafe fn write32(self, offset: u8, value: u32) {
        // SAFETY: selecting the register touches no memory; the effect of the
        // write is the caller's contract.
        unsafe {
            outl(CONFIG_ADDRESS, self.config_address(offset));
            outl(CONFIG_DATA, value);
        }
    }

    /// Writes a 16-bit config register with a word access to CONFIG_DATA
    /// (at its offset in the dword, as mechanism #1 allows), so the other
    /// half of the dword, e.g. the write-1-to-clear status register, is not
    /// touched.
    ///
    /// # Safety
    /// As for [`write32`](Self::write32).
    pub unsafe fn write16(self, offset: u8, value: u16) {
        // SAFETY: as in write32.
        unsafe {
            outl(CONFIG_ADDRESS, self.config_address(offset));
            outw(CONFIG_DATA + u16::from(offset & 2), value);
        }
    }

    pub fn vendor_id(self) -> u16 {
        self.read16(REG_VENDOR_ID)
    }

    pub fn device_id(self) -> u16 {
        self.read16(REG_DEVICE_ID)
    }

    fn header_type(self) -> u8 {
        self.read8(REG_HEADER_TYPE)
    }

    fn bar_count(self) -> u8 {
        match self.header_type() & HEADER_TYPE_MASK {
            0 => BARS_ENDPOINT,
            1 => BARS_BRIDGE,
            _ => 0,
        }
    }

    /// Capabilities as (offset in config space, capability ID).
    pub fn capabilities(self) -> impl Iterator<Item = (u8, u8)> {
        let mut next = if self.read16(REG_STATUS) & STATUS_CAP_LIST != 0 {
            self.read8(REG_CAP_PTR) & CAP_PTR_MASK
        } else {
            0
        };
        core::iter::from_fn(move || {
            if next == 0 {
                return None;
            }
            let at = next;
            let header = self.read16(at);
            next = (header >> 8) as u8 & CAP_PTR_MASK;
            Some((at, header as u8))
        })
        .take(CAP_WALK_LIMIT)
    }

    /// Turns on memory decoding and bus mastering (DMA), INTx off.
    ///
    /// # Safety
    /// The device may DMA from now on: its setup must only ever hand it
    /// memory meant for it.
    pub unsafe fn enable_memory_and_dma(self) {
        let command =
            self.read16(REG_COMMAND) | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        // SAFETY: the caller's contract (see above).
        unsafe { self.write16(REG_COMMAND, command) }
    }

    /// Turns memory decoding off and writes 0 to every memory BAR, so that
    /// [`memory_bar`](Self::memory_bar) places them again: how BAR placement
    /// is tested under a firmware that has placed them already.
    ///
    /// # Safety
    /// Nothing may use the function's registers until they are placed again.
    pub unsafe fn unplace_memory_bars(self) {
        let command = self.read16(REG_COMMAND);
        // SAFETY: decoding goes off first, so the zeroed BARs decode nothing;
        // the caller's contract covers the rest.
        unsafe { self.write16(REG_COMMAND, command & !COMMAND_MEMORY) };
        let mut bar = 0;
        while let Some((low, high)) = self.bar_raw(bar) {
            if low & BAR_IO == 0 {
                // SAFETY: as above.
                unsafe {
                    self.write32(REG_BAR0 + 4 * bar, 0);
                    if high.is_some() {
                        self.write32(REG_BAR0 + 4 * bar + 4, 0);
                    }
                }
            }
            bar += if high.is_some() { 2 } else { 1 };
        }
    }

    /// The BAR's raw value, 64-bit BARs with their upper half. `None` if
    /// there is no such BAR.
    fn bar_raw(self, bar: u8) -> Option<(u32, Option<u32>)> {
        if bar >= self.bar_count() {
            return None;
        }
        let offset = REG_BAR0 + 4 * bar;
        let low = self.read32(offset);
        let high = (low & BAR_IO == 0 && low & BAR_TYPE_MASK == BAR_TYPE_64 && bar + 1 < 6)
            .then(|| self.read32(offset + 4));
        Some((low, high))
    }

    /// Address of a memory BAR as placed now (0 if not placed).
    fn memory_bar_address(self, bar: u8) -> Result<u64, PciError> {
        let (low, high) = self.bar_raw(bar).ok_or(PciError::NoBar {
            function: self,
            bar,
        })?;
        if low & BAR_IO != 0 {
            return Err(PciError::IoBar {
                function: self,
                bar,
            });
        }
        Ok(u64::from(high.unwrap_or(0)) << 32 | u64::from(low & !BAR_MEM_FLAGS))
    }

    /// Size of a memory BAR, found by writing all ones with memory decoding
    /// off (and restoring both afterwards). 0 if the BAR is not implemented.
    fn memory_bar_size(self, bar: u8) -> u64 {
        let Some((low, high)) = self.bar_raw(bar) else {
            return 0;
        };
        let offset = REG_BAR0 + 4 * bar;
        let command = self.read16(REG_COMMAND);
        // SAFETY: the sizing protocol (PCI 3.0 6.2.5.1): decoding is off
        // while the BAR holds all ones, then the BAR and the command register
        // get their old values back. No memory is involved.
        let (mask_low, mask_high) = unsafe {
            self.write16(REG_COMMAND, command & !COMMAND_MEMORY);
            self.write32(offset, u32::MAX);
            let mask_low = self.read32(offset);
            self.write32(offset, low);
            let mask_high = high.map(|high| {
                self.write32(offset + 4, u32::MAX);
                let mask = self.read32(offset + 4);
                self.write32(offset + 4, high);
                mask
            });
            self.write16(REG_COMMAND, command);
            (mask_low, mask_high)
        };
        let mask =
            u64::from(mask_high.unwrap_or(u32::MAX)) << 32 | u64::from(mask_low & !BAR_MEM_FLAGS);
        if mask_low & !BAR_MEM_FLAGS == 0 && mask_high.unwrap_or(0) == 0 {
            return 0;
        }
        (!mask).wrapping_add(1)
    }

    /// The address of memory BAR `bar`, placing it in `window` first if it is
    /// unplaced or out of CPL3's reach.
    pub fn memory_bar(self, bar: u8, window: &mut BarWindow) -> Result<u64, PciError> {
        let address = self.memory_bar_address(bar)?;
        if address != 0 && reachable(address, 1) {
            return Ok(address);
        }
        let bytes = self.memory_bar_size(bar);
        if bytes == 0 {
            return Err(PciError::NoBar {
                function: self,
                bar,
            });
        }
        let Some(address) = window.alloc(bytes) else {
            return Err(PciError::NoRoom {
                function: self,
                bar,
                bytes,
            });
        };
        let (_, high) = self.bar_raw(bar).expect("the BAR exists (sized above)");
        let offset = REG_BAR0 + 4 * bar;
        // SAFETY: BarWindow gave a range that no other BAR on bus 0 decodes,
        // inside the MMIO hole (no RAM there); nothing accesses this BAR yet.
        unsafe {
            self.write32(offset, address as u32);
            if high.is_some() {
                self.write32(offset + 4, (address >> 32) as u32);
            }
        }
        println!("pci {self} BAR{bar} placed at {address:#x} ({bytes:#x} bytes)");
        Ok(address)
    }
}

/// Whether `[address, address + bytes)` is where CPL3 can reach MMIO.
fn reachable(address: u64, bytes: u64) -> bool {
    address >= MMIO_HOLE_START
        && address
            .checked_add(bytes)
            .is_some_and(|end| end <= MMIO_CPL3_END)
}

/// Every function on bus 0.
pub fn bus0_functions() -> impl Iterator<Item = PciFunction> {
    (0..DEVICES_PER_BUS).flat_map(|device| {
        let first = PciFunction {
            bus: 0,
            device,
            function: 0,
        };
        let functions = if first.vendor_id() == VENDOR_NONE {
            0
        } else if first.header_type() & HEADER_TYPE_MULTIFUNCTION != 0 {
            FUNCTIONS_PER_DEVICE
        } else {
            1
        };
        (0..functions)
            .map(move |function| PciFunction {
                bus: 0,
                device,
                function,
            })
            .filter(|f| f.vendor_id() != VENDOR_NONE)
    })
}

/// Free space for BARs in the MMIO hole. The ranges already decoded by bus 0
/// are collected (by sizing their BARs) on the first allocation only, which
/// happens only when some BAR was left unplaced.
#[derive(Default)]
pub struct BarWindow {
    taken: Option<Vec<(u64, u64)>>,
}

impl BarWindow {
    fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let taken = self.taken.get_or_insert_with(placed_bars);
        let align = bytes.max(BAR_MIN_ALIGN).checked_next_power_of_two()?;
        let mut start = BAR_WINDOW_START.next_multiple_of(align);
        loop {
            let end = start.checked_add(bytes)?;
            if end > BAR_WINDOW_END {
                return None;
            }
            match taken.iter().find(|&&(s, e)| s < end && start < e) {
                Some(&(_, e)) => start = e.checked_next_multiple_of(align)?,
                None => {
                    taken.push((start, end));
                    return Some(start);
                }
            }
        }
    }
}

/// `[start, end)` of every placed, reachable memory BAR on bus 0.
fn placed_bars() -> Vec<(u64, u64)> {
    let mut taken = Vec::new();
    for function in bus0_functions() {
        let mut bar = 0;
        while bar < function.bar_count() {
            let Some((low, high)) = function.bar_raw(bar) else {
                break;
            };
            let next = if high.is_some() { bar + 2 } else { bar + 1 };
            if low & BAR_IO == 0 {
                let address = u64::from(high.unwrap_or(0)) << 32 | u64::from(low & !BAR_MEM_FLAGS);
                if address != 0 && reachable(address, 1) {
                    let bytes = function.memory_bar_size(bar);
                    if bytes != 0 {
                        taken.push((address, address.saturating_add(bytes)));
                    }
                }
            }
            bar = next;
        }
    }
    taken
}
