//! COM1 output (8250 UART, polled). Every line the guest prints goes through
//! [`println!`], which adds the `testguest: ` prefix and a `\n`.

use core::fmt::{self, Write};

use crate::port::{inb, outb};

const COM1: u16 = 0x3f8;
const REG_DATA: u16 = 0; // DLAB=0: transmit holding register; DLAB=1: divisor low
const REG_IER: u16 = 1; // DLAB=0: interrupt enable; DLAB=1: divisor high
const REG_LCR: u16 = 3;
const REG_LSR: u16 = 5;
const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const LSR_THRE: u8 = 0x20;
const LSR_DATA_READY: u8 = 0x01;
/// 115200 baud = 115200 / divisor 1.
const DIVISOR_115200: u8 = 1;
/// LSR reads before a byte is sent anyway: each read is an exit to the VMM,
/// whose UART is ready at once; the bound only keeps a missing or wedged UART
/// from hanging the guest.
const THRE_POLL_LIMIT: u32 = 100_000;

/// Prints one line on COM1: `testguest: <formatted>\n`.
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print_line(format_args!($($arg)*))
    };
}

/// Sets COM1 to 115200 8N1 with its interrupts off.
pub fn init() {
    // SAFETY: COM1's registers only change the UART's own state; the UART
    // does no DMA.
    unsafe {
        outb(COM1 + REG_IER, 0);
        outb(COM1 + REG_LCR, LCR_DLAB);
        outb(COM1 + REG_DATA, DIVISOR_115200);
        outb(COM1 + REG_IER, 0);
        outb(COM1 + REG_LCR, LCR_8N1);
    }
}

/// Sends one byte once the transmit holding register is empty.
pub fn write_byte(byte: u8) {
    for _ in 0..THRE_POLL_LIMIT {
        // SAFETY: reading the LSR of COM1 has no side effect beyond the UART's
        // own error bits; no memory is involved.
        if unsafe { inb(COM1 + REG_LSR) } & LSR_THRE != 0 {
            break;
        }
    }
    // SAFETY: writing COM1's data register only queues a byte for output.
    unsafe { outb(COM1 + REG_DATA, byte) };
}

/// The next received byte, if the UART has one.
pub fn try_read_byte() -> Option<u8> {
    // SAFETY: reading COM1's LSR only reports the UART's state; no memory is involved.
    if unsafe { inb(COM1 + REG_LSR) } & LSR_DATA_READY == 0 {
        return None;
    }
    // SAFETY: reading COM1's receive buffer pops one byte from its FIFO.
    Some(unsafe { inb(COM1 + REG_DATA) })
}

/// A `core::fmt::Write` sink for COM1.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(write_byte);
        Ok(())
    }
}

/// What [`println!`] expands to.
pub fn print_line(args: fmt::Arguments<'_>) {
    // Serial never fails; nothing to do with a formatting error either.
    let _ = Serial.write_str("testguest: ");
    let _ = Serial.write_fmt(args);
    let _ = Serial.write_str("\n");
}
