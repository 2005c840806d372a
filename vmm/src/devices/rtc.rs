//! CMOS real-time clock (MC146818) on ports 0x70/0x71: the host's UTC time,
//! in BCD or binary and 24- or 12-hour form as register B asks, and 128
//! bytes of CMOS RAM. Updates never appear in progress (UIP reads 0) and no
//! interrupts are raised; guests that want a tick use the LAPIC or PIT.

use std::time::{SystemTime, UNIX_EPOCH};

use super::PioDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) never set.
const REG_A_DEFAULT: u8 = 0x26;
/// Register B: 24-hour mode, BCD.
const REG_B_DEFAULT: u8 = 0x02;
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
/// Register D: valid RAM and time.
const REG_D_VALID: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

pub const INDEX_OFFSET: u16 = 0;
pub const DATA_OFFSET: u16 = 1;

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub weekday: u8,
}

impl CivilTime {
    /// Converts seconds since the Unix epoch (days-from-civil, inverted).
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (5 in 1 = Sunday numbering).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }
}

pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Rtc {
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    fn with_clock(now: fn() -> i64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = REG_A_DEFAULT;
        ram[usize::from(REG_B)] = REG_B_DEFAULT;
        ram[usize::from(REG_D)] = REG_D_VALID;
        Self { index: 0, ram, now }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.ram[usize::from(REG_B)] & REG_B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn read_reg(&self, reg: u8) -> u8 {
        let t = CivilTime::from_unix((self.now)());
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => {
                if self.ram[usize::from(REG_B)] & REG_B_24H != 0 {
                    self.encode(t.hour)
                } else {
                    let h12 = match t.hour % 12 {
                        0 => 12,
                        h => h,
                    };
                    self.encode(h12) | if t.hour >= 12 { HOUR_PM } else { 0 }
                }
            }
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u8),
            REG_C => 0,
            r => self.ram[usize::from(r & 0x7f)],
        }
    }

    fn write_reg(&mut self, reg: u8, value: u8) {
        match reg {
            // The clock follows the host; setting it is not supported.
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                tracing::debug!(reg, value, "guest write to an RTC time register ignored");
            }
            REG_A => self.ram[usize::from(REG_A)] = value & 0x7f,
            REG_C | REG_D => {}
            r => self.ram[usize::from(r & 0x7f)] = value,
        }
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl PioDevice for Rtc {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            INDEX_OFFSET => self.index,
            DATA_OFFSET => self.read_reg(self.index),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            INDEX_OFFSET => self.index = v & 0x7f,
            DATA_OFFSET => self.write_reg(self.index, v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> i64 {
        // 2026-11-21 20:05:09 UTC, a Saturday.
        1_795_291_509
    }

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(INDEX_OFFSET, &[reg | 0x80]);
        let mut b = [0u8];
        rtc.read(DATA_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn civil_time_from_unix() {
        assert_eq!(
            CivilTime::from_unix(0),
            CivilTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        let t = CivilTime::from_unix(fixed());
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2026, 11, 21, 20, 5, 9, 7)
        );
        let leap = CivilTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn bcd_24h_by_default() {
        let mut rtc = Rtc::with_clock(fixed);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x20);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x09);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x26);
        assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(read(&mut rtc, REG_MONTH), 0x11);
        assert_eq!(read(&mut rtc, REG_A) & 0x80, 0, "never update-in-progress");
        assert_eq!(read(&mut rtc, REG_D), REG_D_VALID);
    }

    #[test]
    fn binary_and_12h_modes() {
        let mut rtc = Rtc::with_clock(fixed);
        rtc.write(INDEX_OFFSET, &[REG_B]);
        rtc.write(DATA_OFFSET, &[REG_B_BINARY]);
        assert_eq!(read(&mut rtc, REG_HOURS), 8 | HOUR_PM);
        assert_eq!(read(&mut rtc, REG_DAY), 21);
    }

    #[test]
    fn cmos_ram_keeps_values_and_time_is_read_only() {
        let mut rtc = Rtc::with_clock(fixed);
        rtc.write(INDEX_OFFSET, &[0x40]);
        rtc.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        rtc.write(INDEX_OFFSET, &[REG_SECONDS]);
        rtc.write(DATA_OFFSET, &[0x33]);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x09);
    }
}
