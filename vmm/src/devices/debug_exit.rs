//! Debug-exit port (0xf4, like QEMU's isa-debug-exit): the guest writes n and
//! ringvm exits with status n. Tests and benchmarks use it to report a result
//! without a shutdown path.

use std::sync::Arc;

use super::{le_value, ExitReason, ExitSignal, PioDevice};

pub struct DebugExit {
    exit: Arc<ExitSignal>,
}

impl DebugExit {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl PioDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        // Exit statuses are 8 bits wide; wider writes keep the low byte.
        let code = (le_value(data) & 0xff) as u8;
        self.exit.request(ExitReason::DebugExit(code));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_exit_with_low_byte() {
        let s = ExitSignal::new().unwrap();
        let mut d = DebugExit::new(s.clone());
        d.write(0, &[0x07, 0x01, 0, 0]);
        assert_eq!(s.reason(), Some(ExitReason::DebugExit(7)));
    }
}
