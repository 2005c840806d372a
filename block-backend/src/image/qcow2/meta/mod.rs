//! qcow2 metadata, read and written by us with plain synchronous I/O,
//! independently of qcow2-rs, which trusts its input: this module decides
//! whether an image may be handed to it and keeps it away from what it would
//! damage.
//!
//! - [`header`]: [`read_layout`] parses and validates the header and refuses
//!   the features ringvm-blk does not serve; [`mark_corrupt`] and
//!   [`clear_autoclear`] write header bits.
//! - [`scan`]: [`scan()`] checks every L1, L2, refcount table and refblock
//!   entry; bad L1/L2 entries poison guest clusters ([`BadClusters`]), bad
//!   refcount metadata refuses the image.
//! - [`create`]: [`create()`] writes a thin qcow2 v3 image.
//! - [`unmap`]: [`unmap()`] discards or zeroes guest clusters on disk, in an
//!   order that a crash can only turn into leaked clusters.
//! - [`entry`]: the bit layout of table entries, shared by the above.
//!
//! Nothing here panics on any file content: every offset is computed with
//! checked arithmetic and every allocation is bounded by the file size. The
//! format is the qcow2 specification (qemu docs/interop/qcow2.txt).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub mod create;
pub mod entry;
pub mod header;
pub mod scan;
pub mod unmap;

#[cfg(test)]
mod testutil;

pub use create::create;
pub use header::{
    clear_autoclear, clear_empty_backing, mark_corrupt, read_layout, set_corrupt_bit, Backing,
    Qcow2Layout,
};
pub use scan::{scan, BadClusters, CompressedClusters, ScanReport};
pub use unmap::{unmap, UnmapMode, UnmapOutcome};

/// Advice appended to messages about damaged metadata.
const REPAIR_HINT: &str = "run qemu-img check -r all on it";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{}: cannot {what}", path.display())]
    Io {
        path: PathBuf,
        /// "read the L1 table at 0x30000", "write refblock at 0x20000", ...
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a qcow2 image (the first 4 bytes are not \"QFI\\xfb\")", path.display())]
    BadMagic { path: PathBuf },
    #[error("{}: qcow2 version {version} is not supported (versions 2 and 3 exist; ringvm-blk serves version 3)", path.display())]
    Version { path: PathBuf, version: u32 },
    #[error("{}: qcow2 version 2 (compat=0.10) is not supported: it has no zero clusters, which discard needs; convert it with qemu-img amend -o compat=1.1", path.display())]
    Version2 { path: PathBuf },
    #[error("{}: cluster_bits is {bits}; qcow2 clusters are 2^9 to 2^21 bytes", path.display())]
    ClusterBits { path: PathBuf, bits: u32 },
    #[error("{}: the image is encrypted (crypt_method {method}); ringvm-blk cannot serve encrypted qcow2 images (qemu-img convert to an unencrypted image)", path.display())]
    Encrypted { path: PathBuf, method: u32 },
    #[error("{}: has {count} internal snapshots; ringvm-blk cannot serve images with internal snapshots (qemu-img snapshot -d, or qemu-img convert)", path.display())]
    Snapshots { path: PathBuf, count: u32 },
    #[error("{}: the dirty bit is set: the image was opened by QEMU with lazy_refcounts and not closed cleanly; run qemu-img check -r all on it", path.display())]
    Dirty { path: PathBuf },
    #[error("{}: the corrupt bit is set: a qcow2 implementation found its metadata inconsistent; run qemu-img check -r all on it", path.display())]
    Corrupt { path: PathBuf },
    #[error("{}: the image keeps its data in an external data file; ringvm-blk cannot serve such images (qemu-img convert to a regular qcow2 image)", path.display())]
    ExternalDataFile { path: PathBuf },
    #[error("{}: compressed clusters use compression type {ctype} (1 is zstd); ringvm-blk only reads zlib (qemu-img convert -O qcow2 -o compression_type=zlib)", path.display())]
    CompressionType { path: PathBuf, ctype: u8 },
    #[error("{}: the image has extended L2 entries (subclusters); ringvm-blk cannot serve them (qemu-img convert -O qcow2 -o extended_l2=off)", path.display())]
    ExtendedL2 { path: PathBuf },
    #[error("{}: unknown incompatible feature bits {bits:#x}; ringvm-blk cannot serve this image safely", path.display())]
    UnknownIncompatible { path: PathBuf, bits: u64 },
    #[error("{}: refcount_order is {order} ({} bit refcounts); ringvm-blk only serves 16 bit refcounts (qemu-img amend -o refcount_bits=16)", path.display(), 1u64.checked_shl(*order).unwrap_or(0))]
    RefcountOrder { path: PathBuf, order: u32 },
    #[error("{}: backing file {} is a raw image; raw backing files are not supported, only qcow2 ones (qemu-img convert it to qcow2, or qemu-img rebase)", path.display(), backing.display())]
    RawBacking { path: PathBuf, backing: PathBuf },
    #[error("{}: backing file {} has format {format:?}; only qcow2 backing files are supported", path.display(), backing.display())]
    BackingFormat {
        path: PathBuf,
        backing: PathBuf,
        format: String,
    },
    #[error("{}: cannot open the backing file {}", path.display(), backing.display())]
    BackingOpen {
        path: PathBuf,
        backing: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: malformed qcow2 header: {problem}", path.display())]
    Header { path: PathBuf, problem: String },
    #[error("{}: refcount table entry {index} ({entry:#x}) {problem}; {REPAIR_HINT}", path.display())]
    BadReftableEntry {
        path: PathBuf,
        index: u64,
        entry: u64,
        problem: String,
    },
    #[error("{}: host cluster {cluster} (offset {:#x}) has refcount {refcount} but is used {uses} time(s), as {users}; {REPAIR_HINT}", path.display(), cluster.saturating_mul(*cluster_bytes))]
    RefcountTooLow {
        path: PathBuf,
        cluster: u64,
        cluster_bytes: u64,
        refcount: u64,
        uses: u64,
        /// What uses it, e.g. "the L2 table of L1 entry 3".
        users: String,
    },
    #[error("{}: guest clusters {first}..+{count} are past the virtual size ({guest_clusters} clusters)", path.display())]
    UnmapRange {
        path: PathBuf,
        first: u64,
        count: u64,
        guest_clusters: u64,
    },
    #[error("{}: cannot unmap guest cluster {guest_cluster}: {problem}; {REPAIR_HINT}", path.display())]
    UnmapBadMetadata {
        path: PathBuf,
        guest_cluster: u64,
        problem: String,
    },
    #[error("{}: already exists; ringvm-blk create does not overwrite files", path.display())]
    CreateExists { path: PathBuf },
    #[error("{}: cannot create a {size} byte image with {cluster_bytes} byte clusters: {problem}", path.display())]
    CreateParams {
        path: PathBuf,
        size: u64,
        cluster_bytes: u64,
        problem: String,
    },
}

impl MetaError {
    /// True for errors caused by the request itself (an existing path, bad
    /// sizes) rather than by the file system: the CLI exits 2 for those.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            MetaError::CreateExists { .. } | MetaError::CreateParams { .. }
        )
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; a short file is an error.
fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    what: impl FnOnce() -> String,
) -> Result<(), MetaError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| MetaError::Io {
            path: path.to_owned(),
            what: format!("read {}", what()),
            source,
        })
}

/// Writes all of `buf` at `offset`.
fn write_all_at(
    file: &File,
    path: &Path,
    buf: &[u8],
    offset: u64,
    what: impl FnOnce() -> String,
) -> Result<(), MetaError> {
    file.write_all_at(buf, offset)
        .map_err(|source| MetaError::Io {
            path: path.to_owned(),
            what: format!("write {}", what()),
            source,
        })
}

fn sync_data(file: &File, path: &Path, when: &str) -> Result<(), MetaError> {
    file.sync_data().map_err(|source| MetaError::Io {
        path: path.to_owned(),
        what: format!("sync the file {when}"),
        source,
    })
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    if let Some(src) = bytes.get(at..at.saturating_add(8)) {
        word.copy_from_slice(src);
    }
    u64::from_be_bytes(word)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(src) = bytes.get(at..at.saturating_add(4)) {
        word.copy_from_slice(src);
    }
    u32::from_be_bytes(word)
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    let mut word = [0u8; 2];
    if let Some(src) = bytes.get(at..at.saturating_add(2)) {
        word.copy_from_slice(src);
    }
    u16::from_be_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::testutil::{open_rw, qcow2, qemu_img, qemu_io, XorShift};
    use super::*;

    /// Header fields worth hitting with extreme values: (offset, width).
    const FIELDS: [(u64, u64); 16] = [
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (72, 8),
        (88, 8),
        (96, 4),
        (100, 4),
        (104, 1),
        (112, 8),
        (116, 4),
    ];

    fn mutate(rng: &mut XorShift, image: &mut Vec<u8>, tables: &[u64]) {
        for _ in 0..=rng.below(6) {
            match rng.below(5) {
                // A random byte anywhere.
                0 => {
                    let at = rng.below(image.len() as u64) as usize;
                    if let Some(byte) = image.get_mut(at) {
                        *byte = rng.next() as u8;
                    }
                }
                // A header field set to an extreme or random value.
                1 => {
                    let (at, width) = FIELDS[rng.below(FIELDS.len() as u64) as usize];
                    let value = match rng.below(4) {
                        0 => 0,
                        1 => u64::MAX,
                        2 => 1 << rng.below(64),
                        _ => rng.next(),
                    };
                    let bytes = value.to_be_bytes();
                    if let Some(slot) = image.get_mut(at as usize..(at + width) as usize) {
                        slot.copy_from_slice(&bytes[(8 - width) as usize..]);
                    }
                }
                // A table entry (L1, L2, reftable, refblock) rewritten.
                2 => {
                    let table = tables[rng.below(tables.len() as u64) as usize];
                    let at = (table + rng.below(64) * 8) as usize;
                    let value = match rng.below(3) {
                        0 => rng.next(),
                        1 => rng.below(image.len() as u64 * 2) & !0x1ff,
                        _ => (1 << 63) | (rng.below(image.len() as u64 / 4096 + 4) * 4096),
                    };
                    if let Some(slot) = image.get_mut(at..at + 8) {
                        slot.copy_from_slice(&value.to_be_bytes());
                    }
                }
                // Truncated.
                3 => {
                    let len = rng.below(image.len() as u64) as usize;
                    image.truncate(len.max(4));
                }
                // Random bytes after the magic.
                _ => {
                    let len = rng.below(8192) as usize;
                    image.clear();
                    image.extend_from_slice(&QCOW2_MAGIC_FOR_TESTS);
                    image.extend((0..len).map(|_| rng.next() as u8));
                }
            }
        }
    }

    const QCOW2_MAGIC_FOR_TESTS: [u8; 4] = header::QCOW2_MAGIC;

    /// read_layout, scan and unmap on thousands of mutated images: errors,
    /// never a panic or an allocation the file size does not justify.
    #[test]
    fn mutated_images_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let plain = qcow2(d, "plain.qcow2", "4M", "cluster_size=4k");
        qemu_io(&plain, &["write -P 0xab 0 64k", "write -P 0xcd 3M 4k"]);
        let compressed = d.join("compressed.qcow2");
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            plain.to_str().unwrap(),
            compressed.to_str().unwrap(),
        ]);
        let bases: Vec<(Vec<u8>, Vec<u64>)> = [plain, compressed]
            .iter()
            .map(|path| {
                let file = File::open(path).unwrap();
                let layout = read_layout(&file, path).unwrap();
                let l1 = std::fs::read(path).unwrap();
                let l2 = be_u64(&l1, layout.l1_offset as usize) & 0x00ff_ffff_ffff_fe00;
                let refblock = be_u64(&l1, layout.reftable_offset as usize);
                (
                    l1,
                    vec![layout.l1_offset, l2, layout.reftable_offset, refblock],
                )
            })
            .collect();
        let path = d.join("mutant.qcow2");
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut parsed, mut scanned) = (0, 0);
        for round in 0..3000 {
            let (base, tables) = &bases[round % bases.len()];
            let mut image = base.clone();
            mutate(&mut rng, &mut image, tables);
            std::fs::write(&path, &image).unwrap();
            let file = open_rw(&path);
            let Ok(layout) = read_layout(&file, &path) else {
                continue;
            };
            parsed += 1;
            if scan(&file, &path, &layout).is_ok() {
                scanned += 1;
            }
            let first = rng.below(layout.guest_clusters() + 2);
            let count = rng.below(64);
            let mode = if rng.below(2) == 0 {
                UnmapMode::Discard
            } else {
                UnmapMode::Zero
            };
            let _ = unmap(&file, &layout, first, count, mode);
        }
        // The mutations must leave enough images valid to reach scan and
        // unmap, or this test would test nothing.
        assert!(
            parsed > 300 && scanned > 100,
            "{parsed} parsed, {scanned} scanned"
        );
    }
}
