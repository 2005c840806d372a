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
pub use header::{clear_autoclear, mark_corrupt, read_layout, Backing, Qcow2Layout};
pub use scan::{scan, BadClusters, ScanReport};
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
