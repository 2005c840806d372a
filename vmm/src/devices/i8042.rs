//! A minimal i8042 keyboard controller: enough for a guest to probe it and to
//! reset the machine with command 0xFE (the classic reboot path, and the ACPI
//! reset register ringvm announces). There is no keyboard behind it.

use std::sync::Arc;

use super::{ExitReason, ExitSignal, PioDevice};

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_PULSE_RESET: u8 = 0xfe;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const SELF_TEST_PASSED: u8 = 0x55;
/// CTR after reset: keyboard interrupt on, system flag, translation.
const CTR_DEFAULT: u8 = 0x45;
/// Output port: A20 enabled, not in reset.
const OUTPUT_PORT: u8 = 0x03;

/// Register offsets within the device's two ports: data at 0x60, command/status at 0x64.
pub const DATA_OFFSET: u16 = 0;
pub const COMMAND_OFFSET: u16 = 4;

pub struct I8042 {
    status: u8,
    ctr: u8,
    output: Option<u8>,
    expect_ctr_write: bool,
    exit: Arc<ExitSignal>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            status: STATUS_SYSTEM_FLAG,
            ctr: CTR_DEFAULT,
            output: None,
            expect_ctr_write: false,
            exit,
        }
    }

    fn reply(&mut self, byte: u8) {
        self.output = Some(byte);
    }

    fn on_command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR => self.expect_ctr_write = true,
            CMD_SELF_TEST => self.reply(SELF_TEST_PASSED),
            CMD_TEST_KBD | CMD_TEST_AUX => self.reply(0x00),
            CMD_READ_OUTPUT_PORT => self.reply(OUTPUT_PORT),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            CMD_PULSE_RESET => self.exit.request(ExitReason::Reset),
            other => tracing::debug!(cmd = other, "i8042 command ignored"),
        }
    }

    fn on_data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        if std::mem::take(&mut self.expect_ctr_write) {
            self.ctr = byte;
        }
        // Bytes for a keyboard are dropped: there is none.
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.output.take().unwrap_or(0),
            COMMAND_OFFSET => {
                let full = if self.output.is_some() {
                    STATUS_OUTPUT_FULL
                } else {
                    0
                };
                self.status | full
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.on_data(byte),
            COMMAND_OFFSET => self.on_command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(d: &mut I8042, off: u16) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_requests_reset() {
        let s = ExitSignal::new().unwrap();
        let mut d = I8042::new(s.clone());
        d.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(s.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn self_test_and_ctr_round_trip() {
        let s = ExitSignal::new().unwrap();
        let mut d = I8042::new(s.clone());
        d.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(
            read(&mut d, COMMAND_OFFSET) & STATUS_OUTPUT_FULL,
            STATUS_OUTPUT_FULL
        );
        assert_eq!(read(&mut d, DATA_OFFSET), SELF_TEST_PASSED);
        assert_eq!(read(&mut d, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        d.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        d.write(DATA_OFFSET, &[0x61]);
        d.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, DATA_OFFSET), 0x61);
        assert_eq!(s.reason(), None);
    }
}
