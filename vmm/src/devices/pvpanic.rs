//! pvpanic (QEMU's ISA device at port 0x505, ACPI id QEMU0001): a guest
//! whose pvpanic driver is loaded writes PANICKED when its kernel panics,
//! and ringvm ends with the guest-panic status instead of waiting for the
//! panic's reboot (or forever, with `panic=0`).

use std::sync::Arc;

use super::{ExitReason, ExitSignal, PioDevice};

const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    exit: Arc<ExitSignal>,
}

impl PvPanic {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl PioDevice for PvPanic {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // The events this device supports.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v & PVPANIC_PANICKED != 0 {
            self.exit.request(ExitReason::GuestPanic(
                "the guest reported a panic through pvpanic".into(),
            ));
        } else if v & PVPANIC_CRASH_LOADED != 0 {
            tracing::warn!("the guest panicked and is running its crash kernel (pvpanic)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicked_ends_the_vm() {
        let s = ExitSignal::new().unwrap();
        let mut d = PvPanic::new(s.clone());
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b[0], 3);
        d.write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(s.reason(), None);
        d.write(0, &[PVPANIC_PANICKED]);
        assert!(matches!(s.reason(), Some(ExitReason::GuestPanic(_))));
    }
}
