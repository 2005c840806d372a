//! MSI-X: the vector table and pending-bit array a function exposes in a
//! BAR, and the enable/function-mask bits of its capability.
//!
//! The table only decides *whether and where* each vector delivers; the
//! delivery itself is the MsiController's (KVM GSI routes and irqfds in
//! ringvm), so a backend's signal reaches the guest without this code
//! running. MSI-X rules: while a vector is masked (per entry, by the
//! function mask, or with MSI-X disabled) its interrupts are held, the
//! pending bit reads as set, and unmasking delivers what was held.

use std::sync::Arc;

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_BYTES: u64 = 16;
const VECTOR_CONTROL_MASKED: u32 = 1;
/// Message control: MSI-X enable and function mask bits.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// PCI capability id of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;

/// Where an interrupt is delivered: the address/data pair the guest wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
}

/// Delivers a function's vectors.
pub trait MsiController: Send + Sync {
    /// `Some(msg)`: deliver `vector`'s interrupts to `msg` from now on, and
    /// any held one now. `None`: hold them (masked or disabled).
    fn configure(&self, vector: u16, msg: Option<MsiMessage>);
    /// Whether an interrupt is held for `vector`.
    fn pending(&self, vector: u16) -> bool;
}

#[derive(Clone, Copy)]
struct Entry {
    msg: MsiMessage,
    control: u32,
}

pub struct Msix {
    entries: Vec<Entry>,
    enabled: bool,
    function_mask: bool,
    controller: Arc<dyn MsiController>,
}

impl Msix {
    pub fn new(num_vectors: u16, controller: Arc<dyn MsiController>) -> Self {
        Self {
            entries: vec![
                Entry {
                    msg: MsiMessage::default(),
                    control: VECTOR_CONTROL_MASKED,
                };
                usize::from(num_vectors)
            ],
            enabled: false,
            function_mask: false,
            controller,
        }
    }

    pub fn num_vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Table bytes (for the BAR layout).
    pub fn table_bytes(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_BYTES
    }

    /// PBA bytes: one bit per vector, in 64-bit words.
    pub fn pba_bytes(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    /// Message control as the capability shows it.
    pub fn control(&self) -> u16 {
        let mut c = self.num_vectors() - 1;
        if self.enabled {
            c |= CONTROL_ENABLE;
        }
        if self.function_mask {
            c |= CONTROL_FUNCTION_MASK;
        }
        c
    }

    /// The guest wrote message control.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_mask = control & CONTROL_FUNCTION_MASK != 0;
        if (enabled, function_mask) != (self.enabled, self.function_mask) {
            self.enabled = enabled;
            self.function_mask = function_mask;
            for v in 0..self.num_vectors() {
                self.apply(v);
            }
        }
    }

    fn delivers(&self, v: u16) -> bool {
        self.enabled
            && !self.function_mask
            && self.entries[usize::from(v)].control & VECTOR_CONTROL_MASKED == 0
    }

    fn apply(&self, v: u16) {
        let msg = self.delivers(v).then_some(self.entries[usize::from(v)].msg);
        self.controller.configure(v, msg);
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let Some(e) = self.entries.get((at / ENTRY_BYTES) as usize) else {
                continue;
            };
            let word = match (at % ENTRY_BYTES) / 4 {
                0 => e.msg.address_lo,
                1 => e.msg.address_hi,
                2 => e.msg.data,
                _ => e.control,
            };
            *b = (word >> ((at % 4) * 8)) as u8;
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        // Entries are written with 4- or 8-byte accesses; anything else is dropped.
        if !(data.len() == 4 || data.len() == 8) || offset % 4 != 0 {
            return;
        }
        let mut touched = None;
        for (k, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * k as u64;
            let v = (at / ENTRY_BYTES) as usize;
            let Some(e) = self.entries.get_mut(v) else {
                continue;
            };
            let value = u32::from_le_bytes(chunk.try_into().expect("4-byte chunk"));
            match (at % ENTRY_BYTES) / 4 {
                0 => e.msg.address_lo = value,
                1 => e.msg.address_hi = value,
                2 => e.msg.data = value,
                _ => e.control = value & VECTOR_CONTROL_MASKED,
            }
            touched = Some(v as u16);
        }
        if let Some(v) = touched {
            self.apply(v);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset + i as u64) * 8;
            for bit in 0..8u64 {
                let v = first + bit;
                if v < u64::from(self.num_vectors())
                    && !self.delivers(v as u16)
                    && self.controller.pending(v as u16)
                {
                    *b |= 1 << bit;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        routes: Mutex<Vec<Option<MsiMessage>>>,
        held: Mutex<Vec<bool>>,
    }

    impl MsiController for Fake {
        fn configure(&self, vector: u16, msg: Option<MsiMessage>) {
            let mut r = self.routes.lock().unwrap();
            r.resize(usize::from(vector) + 1, None);
            r[usize::from(vector)] = msg;
            if msg.is_some() {
                // Delivering releases what was held.
                let mut h = self.held.lock().unwrap();
                h.resize(usize::from(vector) + 1, false);
                h[usize::from(vector)] = false;
            }
        }
        fn pending(&self, vector: u16) -> bool {
            self.held
                .lock()
                .unwrap()
                .get(usize::from(vector))
                .copied()
                .unwrap_or(false)
        }
    }

    fn write_entry(m: &mut Msix, v: u64, addr: u32, data: u32, masked: bool) {
        m.write_table(v * ENTRY_BYTES, &addr.to_le_bytes());
        m.write_table(v * ENTRY_BYTES + 4, &0u32.to_le_bytes());
        m.write_table(v * ENTRY_BYTES + 8, &data.to_le_bytes());
        m.write_table(v * ENTRY_BYTES + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn vector_delivers_only_when_enabled_and_unmasked() {
        let fake = Arc::new(Fake::default());
        let mut m = Msix::new(3, fake.clone());
        write_entry(&mut m, 1, 0xfee0_0000, 0x41, false);
        assert_eq!(fake.routes.lock().unwrap()[1], None, "MSI-X still disabled");
        m.set_control(CONTROL_ENABLE);
        let want = MsiMessage {
            address_lo: 0xfee0_0000,
            address_hi: 0,
            data: 0x41,
        };
        assert_eq!(fake.routes.lock().unwrap()[1], Some(want));
        assert_eq!(
            fake.routes.lock().unwrap()[0],
            None,
            "vector 0 stays masked"
        );
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(
            fake.routes.lock().unwrap()[1],
            None,
            "function mask holds everything"
        );
        assert_eq!(m.control(), 2 | CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
    }

    #[test]
    fn masked_vector_shows_pending_and_unmask_delivers() {
        let fake = Arc::new(Fake::default());
        let mut m = Msix::new(2, fake.clone());
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 0, 0xfee0_0000, 0x40, true);
        *fake.held.lock().unwrap() = vec![true, false];
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b01);
        m.write_table(12, &0u32.to_le_bytes());
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0, "unmasking delivered the held interrupt");
        assert!(fake.routes.lock().unwrap()[0].is_some());
    }

    #[test]
    fn table_reads_back_and_odd_writes_are_dropped() {
        let fake = Arc::new(Fake::default());
        let mut m = Msix::new(1, fake);
        write_entry(&mut m, 0, 0xfee0_1000, 0x4042, false);
        let mut e = [0u8; 16];
        m.read_table(0, &mut e);
        assert_eq!(&e[0..4], &0xfee0_1000u32.to_le_bytes());
        assert_eq!(&e[8..12], &0x4042u32.to_le_bytes());
        assert_eq!(&e[12..16], &0u32.to_le_bytes());
        m.write_table(1, &[0xff; 4]); // unaligned
        m.write_table(0, &[0xff; 2]); // 2-byte
        m.write_table(64, &[0xff; 4]); // past the table
        m.read_table(0, &mut e[..4]);
        assert_eq!(&e[0..4], &0xfee0_1000u32.to_le_bytes());
        assert_eq!((m.table_bytes(), m.pba_bytes()), (16, 8));
    }
}
