//! The host side of the test guest's `job=blk-verify`: the pattern it writes
//! (tests/guest/src/jobs/blk_verify.rs, "The pattern") and a check of an
//! image file after a run, from the guest's `blk-verify ok` line.

use std::io::Read;
use std::path::Path;

pub const SECTOR_BYTES: usize = 512;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The 512 bytes blk-verify writes to sector `s` for `seed`.
pub fn sector_pattern(s: u64, seed: u64) -> [u8; SECTOR_BYTES] {
    let mut out = [0u8; SECTOR_BYTES];
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => s,
            1 => seed,
            _ => (s ^ seed.rotate_left(17) ^ ((i as u64) << 56)).wrapping_mul(GOLDEN),
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// What a `testguest: blk-verify ok ...` line says about the disk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub sectors: u64,
    pub seed: u64,
    pub queues: u32,
    pub discard_range: Option<(u64, u64)>,
    pub write_zeroes_range: Option<(u64, u64)>,
    /// "zeroes", "kept", "mixed" or "none".
    pub discard_result: String,
}

fn range(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.split_once('+')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Parses the `blk-verify ok` line out of a console log.
pub fn parse_verify_ok(console: &str) -> Option<VerifyReport> {
    let line = console.lines().find_map(|l| {
        l.split_once("testguest: blk-verify ok ")
            .map(|(_, rest)| rest)
    })?;
    let mut r = VerifyReport::default();
    for word in line.split_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        match k {
            "sectors" => r.sectors = v.parse().ok()?,
            "seed" => r.seed = u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()?,
            "queues" => r.queues = v.parse().ok()?,
            "discard_range" => r.discard_range = range(v),
            "write_zeroes_range" => r.write_zeroes_range = range(v),
            "discard_result" => r.discard_result = v.to_owned(),
            _ => {}
        }
    }
    Some(r)
}

/// Checks every sector of `image` that blk-verify covered: zeroes in the
/// write-zeroes range, zeroes or the pattern in the discard range (as the
/// report says), the pattern elsewhere. Returns the first mismatch.
pub fn check_image(image: &Path, r: &VerifyReport) -> Result<(), String> {
    let mut f = std::fs::File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let within = |rg: Option<(u64, u64)>, s: u64| rg.is_some_and(|(a, n)| s >= a && s < a + n);
    let mut buf = [0u8; SECTOR_BYTES];
    for s in 0..r.sectors {
        f.read_exact(&mut buf)
            .map_err(|e| format!("sector {s}: {e}"))?;
        let zero = buf.iter().all(|b| *b == 0);
        let pattern = buf == sector_pattern(s, r.seed);
        let ok = if within(r.write_zeroes_range, s) {
            zero
        } else if within(r.discard_range, s) {
            match r.discard_result.as_str() {
                "zeroes" => zero,
                "kept" => pattern,
                _ => zero || pattern,
            }
        } else {
            pattern
        };
        if !ok {
            return Err(format!(
                "sector {s} of {} holds neither what blk-verify left there (zero={zero})",
                image.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_words() {
        let p = sector_pattern(7, 0x5eed);
        assert_eq!(&p[0..8], &7u64.to_le_bytes());
        assert_eq!(&p[8..16], &0x5eedu64.to_le_bytes());
        let w2 = (7u64 ^ 0x5eedu64.rotate_left(17) ^ (2u64 << 56)).wrapping_mul(GOLDEN);
        assert_eq!(&p[16..24], &w2.to_le_bytes());
        assert_ne!(sector_pattern(8, 0x5eed), p);
    }

    #[test]
    fn report_line() {
        let r = parse_verify_ok(
            "noise\ntestguest: blk-verify ok sectors=128 queues=4 seed=0x5eed flush=yes discard=yes \
             discard_result=zeroes discard_range=32+16 write_zeroes_range=64+16 serial=x completion=poll\n",
        )
        .unwrap();
        assert_eq!((r.sectors, r.queues, r.seed), (128, 4, 0x5eed));
        assert_eq!(
            (r.discard_range, r.write_zeroes_range),
            (Some((32, 16)), Some((64, 16)))
        );
        assert!(parse_verify_ok("testguest: blk-verify FAILED").is_none());
    }

    #[test]
    fn image_check_finds_a_bad_sector() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.raw");
        let mut bytes = Vec::new();
        for s in 0..8 {
            bytes.extend_from_slice(&if (4..6).contains(&s) {
                [0u8; 512]
            } else {
                sector_pattern(s, 1)
            });
        }
        std::fs::write(&img, &bytes).unwrap();
        let mut r = VerifyReport {
            sectors: 8,
            seed: 1,
            queues: 1,
            write_zeroes_range: Some((4, 2)),
            discard_result: "none".into(),
            ..Default::default()
        };
        assert_eq!(check_image(&img, &r), Ok(()));
        r.write_zeroes_range = Some((5, 2));
        assert!(check_image(&img, &r).unwrap_err().contains("sector 4"));
    }
}
