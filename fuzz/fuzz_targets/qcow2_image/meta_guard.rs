//! What the qcow2_image target checks of the image's metadata: data never
//! lands on it, it changes only as table updates do, and at quiet points
//! the image scans clean.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ringvm_blk::image::qcow2::meta::entry::{decode_l1, decode_l2, decode_reftable, MetaCluster};
use ringvm_blk::image::qcow2::meta::{read_layout, scan, BadClusters, ScanReport};

use super::ops::{OFFSET_BITS, PATTERN_TAG};

/// Byte 7 of `incompatible_features` (header offset 72), bit 1: corrupt.
pub const CORRUPT_BYTE: usize = 79;
pub const CORRUPT_BIT: u8 = 1 << 1;
/// Header bytes qcow2-rs rewrites when a table grows: l1_size,
/// l1_table_offset, refcount_table_offset, refcount_table_clusters.
const HEADER_TABLE_FIELDS: std::ops::Range<usize> = 36..60;

pub fn memfd(bytes: &[u8]) -> File {
    // SAFETY: a static C string name and valid flags; memfd_create returns
    // a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"qcow2-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes).unwrap();
    file
}

/// The metadata clusters as the last scan found them, and what a write
/// may not leave in them.
pub struct MetaGuard {
    path: PathBuf,
    cluster_bytes: u64,
    /// (host offset, what it is, bytes).
    clusters: Vec<(u64, MetaCluster, Vec<u8>)>,
    bad: BadClusters,
    /// Pattern-like words the input image held already.
    foreign: HashSet<u64>,
    /// Writes sent: (id, offset, length).
    pub writes: Vec<(u8, u64, u64)>,
}

/// The file's bytes with the corrupt bit cleared, layout and scan report.
fn scan_copy(file: &File, path: &Path) -> Result<(File, ScanReport), String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| e.to_string())?;
    if let Some(byte) = bytes.get_mut(CORRUPT_BYTE) {
        *byte &= !CORRUPT_BIT;
    }
    let copy = memfd(&bytes);
    let layout = read_layout(&copy, path).map_err(|e| e.to_string())?;
    let report = scan(&copy, path, &layout).map_err(|e| e.to_string())?;
    Ok((copy, report))
}

fn header_masked(bytes: &[u8]) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    if let Some(byte) = bytes.get_mut(CORRUPT_BYTE) {
        *byte &= !CORRUPT_BIT;
    }
    bytes
}

impl MetaGuard {
    pub fn new(path: &Path, image: &[u8], cluster_bytes: u64, bad: BadClusters) -> MetaGuard {
        let foreign = image
            .chunks_exact(8)
            .map(|w| u64::from_be_bytes(w.try_into().expect("8 bytes")))
            .filter(|w| w >> 56 == PATTERN_TAG)
            .collect();
        MetaGuard {
            path: path.to_owned(),
            cluster_bytes,
            clusters: Vec::new(),
            bad,
            foreign,
            writes: Vec::new(),
        }
    }

    /// At a quiet point (nothing in flight, tables written): the file
    /// scans clean, with the same poisoned clusters, its metadata holds no
    /// written word, and it becomes the reference for [`Self::after_batch`].
    pub fn rescan(&mut self, file: &File, when: &str) {
        let (copy, report) = scan_copy(file, &self.path)
            .unwrap_or_else(|err| panic!("{when}: the image no longer scans: {err}"));
        let runs = |bad: &BadClusters| {
            bad.runs()
                .map(|(first, count, _)| (first, count))
                .collect::<Vec<_>>()
        };
        let (now, at_open) = (runs(&report.bad), runs(&self.bad));
        if now != at_open {
            let what = |bad: &BadClusters, first| bad.describe(first).unwrap_or_default();
            let gone = at_open.iter().find(|r| !now.contains(r));
            let new = now.iter().find(|r| !at_open.contains(r));
            panic!(
                "{when}: the poisoned clusters changed: no longer {gone:?} ({}), newly {new:?} ({})",
                gone.map(|r| what(&self.bad, r.0)).unwrap_or_default(),
                new.map(|r| what(&report.bad, r.0)).unwrap_or_default(),
            );
        }
        self.clusters.clear();
        let mut metadata: Vec<_> = report.metadata.iter().map(|(&c, &k)| (c, k)).collect();
        metadata.sort_unstable_by_key(|&(c, _)| c);
        for (cluster, kind) in metadata {
            let offset = cluster * self.cluster_bytes;
            let mut bytes = vec![0u8; self.cluster_bytes as usize];
            // The last cluster may be partial: the rest reads as zeroes.
            let n = copy.read_at(&mut bytes, offset).unwrap_or(0);
            bytes[n..].fill(0);
            for (i, word) in bytes.chunks_exact(8).enumerate() {
                let word = u64::from_be_bytes(word.try_into().expect("8 bytes"));
                if let Some(op) = written_word(&self.writes, &self.foreign, word) {
                    panic!(
                        "{when}: {kind} at {offset:#x} holds, at byte {:#x}, the data of write #{op} for guest offset {:#x}",
                        i * 8,
                        word & ((1 << OFFSET_BITS) - 1)
                    );
                }
            }
            self.clusters.push((offset, kind, bytes));
        }
    }

    /// After every batch: the metadata clusters changed only as table
    /// updates do. A changed L1, L2 or refcount table entry must be a valid
    /// entry and not a word some write wrote; a refcount may only fall, or
    /// rise from 0 to 1 (qcow2-rs shares no cluster); in the header cluster
    /// only the L1 and refcount table fields may change (qcow2-rs moved a
    /// table that grew: the old clusters may then be reused for data, and
    /// are no longer watched). The bytes then become the reference for the
    /// next batch.
    pub fn after_batch(&mut self, file: &File, when: &str) {
        let mut now = vec![0u8; self.cluster_bytes as usize];
        let mut moved = false;
        let cluster_bits = self.cluster_bytes.trailing_zeros();
        for (offset, kind, before) in &mut self.clusters {
            let n = file.read_at(&mut now, *offset).unwrap_or(0);
            now[n..].fill(0);
            if now == *before {
                continue;
            }
            let fail = |at: usize, what: &str| -> ! {
                let at = at & !7;
                panic!(
                    "{when}: {kind} at {offset:#x}, byte {at:#x}: {:02x?} was {:02x?}: {what}",
                    &now[at..at + 8],
                    &before[at..at + 8]
                )
            };
            match *kind {
                MetaCluster::Header => {
                    let (now, before) = (header_masked(&now), header_masked(before));
                    let changed =
                        |range: std::ops::Range<usize>| now[range.clone()] != before[range];
                    if changed(0..HEADER_TABLE_FIELDS.start)
                        || changed(HEADER_TABLE_FIELDS.end..now.len())
                    {
                        let at =
                            now.iter().zip(&before).enumerate().position(|(i, (a, b))| {
                                a != b && !HEADER_TABLE_FIELDS.contains(&i)
                            });
                        fail(
                            at.unwrap_or(0),
                            "a header field other than the table positions changed",
                        );
                    }
                    moved = changed(HEADER_TABLE_FIELDS);
                }
                MetaCluster::Refblock(_) => {
                    for (i, (a, b)) in now.chunks_exact(2).zip(before.chunks_exact(2)).enumerate() {
                        let (new, old) = (
                            u16::from_be_bytes([a[0], a[1]]),
                            u16::from_be_bytes([b[0], b[1]]),
                        );
                        if new > old.max(1) {
                            fail(i * 2, &format!("a refcount rose from {old} to {new}"));
                        }
                    }
                }
                MetaCluster::L1Table | MetaCluster::L2Table(_) | MetaCluster::RefcountTable => {
                    for (i, (a, b)) in now.chunks_exact(8).zip(before.chunks_exact(8)).enumerate() {
                        if a == b {
                            continue;
                        }
                        let word = u64::from_be_bytes(a.try_into().expect("8 bytes"));
                        if let Some(op) = written_word(&self.writes, &self.foreign, word) {
                            fail(i * 8, &format!("the data of write #{op}"));
                        }
                        let valid = match *kind {
                            MetaCluster::L1Table => decode_l1(word, cluster_bits).map(|_| ()),
                            MetaCluster::L2Table(_) => decode_l2(word, cluster_bits, 3).map(|_| ()),
                            _ => decode_reftable(word, cluster_bits).map(|_| ()),
                        };
                        if let Err(problem) = valid {
                            fail(i * 8, &format!("not a table entry: {problem}"));
                        }
                    }
                }
            }
            before.copy_from_slice(&now);
        }
        if moved {
            self.clusters.retain(|(_, kind, _)| {
                !matches!(kind, MetaCluster::L1Table | MetaCluster::RefcountTable)
            });
        }
    }
}

/// The write that put `word` on the disk, if one did: `writes` are
/// (id, offset, length), `foreign` the pattern-like words the input held.
fn written_word(writes: &[(u8, u64, u64)], foreign: &HashSet<u64>, word: u64) -> Option<u8> {
    if word >> 56 != PATTERN_TAG || foreign.contains(&word) {
        return None;
    }
    let op = (word >> OFFSET_BITS) as u8;
    let at = word & ((1 << OFFSET_BITS) - 1);
    writes
        .iter()
        .any(|&(id, offset, len)| {
            id == op && at.is_multiple_of(8) && (offset..offset + len).contains(&at)
        })
        .then_some(op)
}

pub fn corrupt_bit(file: &File) -> bool {
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, CORRUPT_BYTE as u64).is_ok() && byte[0] & CORRUPT_BIT != 0
}
