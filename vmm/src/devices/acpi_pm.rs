//! ACPI PM1a event and control blocks (fixed hardware registers the FADT
//! announces). Writing SLP_EN with SLP_TYP = S5 powers the VM off; that is how
//! a Linux guest's `poweroff` reaches ringvm.

use std::sync::Arc;

use super::{le_value, ExitReason, ExitSignal, PioDevice};

use crate::boot::acpi::S5_SLP_TYP;

const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
/// SCI_EN: reads back as set, because ringvm has no legacy (SMI) mode.
const SCI_EN: u16 = 1;

/// PM1a event block: PM1_STS (2 bytes) then PM1_EN (2 bytes). No fixed
/// events are ever raised, so status reads 0; enable bits are stored.
#[derive(Default)]
pub struct Pm1Event {
    enable: u16,
}

impl PioDevice for Pm1Event {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let regs = [0u8, 0, self.enable as u8, (self.enable >> 8) as u8];
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(usize::from(offset) + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        // PM1_STS is write-1-to-clear and always 0; only PM1_EN is kept.
        for (i, b) in data.iter().enumerate() {
            match usize::from(offset) + i {
                2 => self.enable = (self.enable & 0xff00) | u16::from(*b),
                3 => self.enable = (self.enable & 0x00ff) | (u16::from(*b) << 8),
                _ => {}
            }
        }
    }
}

/// PM1a control block: SCI_EN, SLP_TYP, SLP_EN.
pub struct Pm1Control {
    control: u16,
    exit: Arc<ExitSignal>,
}

impl Pm1Control {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            control: SCI_EN,
            exit,
        }
    }
}

impl PioDevice for Pm1Control {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = self.control.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(usize::from(offset) + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let v = le_value(data) as u16;
        self.control = (v & !SLP_EN) | SCI_EN;
        let slp_typ = (v & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if v & SLP_EN != 0 {
            if slp_typ == u16::from(S5_SLP_TYP) {
                self.exit.request(ExitReason::PowerOff);
            } else {
                tracing::warn!(
                    slp_typ,
                    "guest asked for an ACPI sleep state ringvm does not offer"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let s = ExitSignal::new().unwrap();
        let mut c = Pm1Control::new(s.clone());
        c.write(0, &(u16::from(S5_SLP_TYP) << SLP_TYP_SHIFT).to_le_bytes());
        assert_eq!(s.reason(), None, "SLP_TYP without SLP_EN does nothing");
        c.write(
            0,
            &((u16::from(S5_SLP_TYP) << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
        );
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn other_sleep_states_are_ignored() {
        let s = ExitSignal::new().unwrap();
        let mut c = Pm1Control::new(s.clone());
        c.write(0, &((3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        assert_eq!(s.reason(), None);
        let mut b = [0u8; 2];
        c.read(0, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
    }

    #[test]
    fn event_block_keeps_enable_bits() {
        let mut e = Pm1Event::default();
        e.write(2, &[0x21, 0x01]);
        let mut b = [0u8; 4];
        e.read(0, &mut b);
        assert_eq!(b, [0, 0, 0x21, 0x01]);
    }
}
