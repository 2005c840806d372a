//! Job parameters from the command line (`key=value` words), with fio's
//! spellings for sizes and times: `4k`, `64K`, `1m`, `2g`, `1MiB` are powers of
//! 1024 (fio's default kb_base); a bare runtime is seconds, `500ms`, `10s`,
//! `2m` say their unit.

use super::JobFailed;
use crate::bootinfo::CmdLine;

/// A decimal or `0x` hexadecimal number.
pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Bytes: a number with an optional k/m/g/t suffix (powers of 1024), which
/// may be followed by `b` or `ib` (any case): `4096`, `4k`, `4KiB`, `1m`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let lower = text.to_ascii_lowercase();
    let mut rest = lower.as_str();
    for unit in ["ib", "b"] {
        if let Some(stripped) = rest.strip_suffix(unit) {
            if stripped.ends_with(|c: char| "kmgt".contains(c)) {
                rest = stripped;
                break;
            }
        }
    }
    let (digits, shift) = match rest.as_bytes().last()? {
        b'k' => (&rest[..rest.len() - 1], 10),
        b'm' => (&rest[..rest.len() - 1], 20),
        b'g' => (&rest[..rest.len() - 1], 30),
        b't' => (&rest[..rest.len() - 1], 40),
        _ => (rest, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

/// Milliseconds from a fio time: bare = seconds, or `ms`, `s`, `m` (minutes).
pub fn parse_ms(text: &str) -> Option<u64> {
    let (digits, scale) = if let Some(d) = text.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = text.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = text.strip_suffix('m') {
        (d, 60_000)
    } else {
        (text, 1000)
    };
    parse_number(digits)?.checked_mul(scale)
}

/// The command line as seen by one job, which names itself in error lines.
pub struct Params<'a> {
    cmdline: &'a CmdLine,
    job: &'static str,
}

impl<'a> Params<'a> {
    pub fn new(cmdline: &'a CmdLine, job: &'static str) -> Self {
        Params { cmdline, job }
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.cmdline.get(key)
    }

    fn parsed<T>(
        &self,
        key: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, JobFailed> {
        match self.get(key) {
            None => Ok(None),
            Some(text) => parse(text).map(Some).ok_or_else(|| {
                println!(
                    "{} FAILED bad parameter {key}={text}: expected {expected}",
                    self.job
                );
                JobFailed
            }),
        }
    }

    pub fn number(&self, key: &str) -> Result<Option<u64>, JobFailed> {
        self.parsed(key, "a number (decimal or 0x hex)", parse_number)
    }

    /// A number in `range`.
    pub fn number_in(
        &self,
        key: &str,
        range: core::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, JobFailed> {
        let expected = alloc::format!("a number from {} to {}", range.start(), range.end());
        self.parsed(key, &expected, |t| {
            parse_number(t).filter(|n| range.contains(n))
        })
    }

    pub fn bytes(&self, key: &str) -> Result<Option<u64>, JobFailed> {
        self.parsed(key, "bytes, e.g. 4096, 4k, 64k, 1m, 2g", parse_bytes)
    }

    pub fn ms(&self, key: &str) -> Result<Option<u64>, JobFailed> {
        self.parsed(
            key,
            "a time: seconds, or with ms/s/m (e.g. 10, 500ms, 2m)",
            parse_ms,
        )
    }

    /// One of `choices` (the first is the default).
    pub fn choice(&self, key: &str, choices: &[&'static str]) -> Result<&'static str, JobFailed> {
        let expected = alloc::format!("one of {}", choices.join("|"));
        Ok(self
            .parsed(key, &expected, |t| {
                choices.iter().find(|&&c| c == t).copied()
            })?
            .unwrap_or(choices[0]))
    }
}
