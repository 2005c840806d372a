//! The qcow2 header: [`read_layout`] parses it (big-endian, qcow2
//! specification "Header" and "Header extensions") and refuses what
//! ringvm-blk would misread or damage.
//!
//! Policy decisions, each a distinct [`MetaError`]:
//! - version 2 is refused: it has no zero flag, so a discard on an image
//!   with a backing file could not be expressed; `qemu-img amend -o
//!   compat=1.1` converts in place.
//! - refcount_order other than 4 is refused: qcow2-rs has code for the
//!   other widths, but only 16 bit refcounts are what QEMU creates and what
//!   we test.
//! - a virtual size that is not a multiple of 512 is refused (virtio-blk
//!   counts 512-byte sectors); a virtual size of 0 is accepted.
//! - a backing file must be a qcow2 image that can be opened; its own
//!   header is not checked here: call [`read_layout`] on
//!   [`Backing::path`] for that (the caller bounds the chain length).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{be_u32, be_u64, read_exact_at, MetaError};

/// "QFI\xfb".
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Size of the version 2 header; version 3 adds fields up to 104.
const V2_HEADER_BYTES: usize = 72;
const V3_MIN_HEADER_BYTES: usize = 104;
/// Byte offsets of the header fields written by [`mark_corrupt`] and
/// [`clear_autoclear`].
pub(super) const INCOMPATIBLE_OFFSET: u64 = 72;
/// Header fields `backing_file_offset` (u64) and `backing_file_size` (u32).
const BACKING_OFFSET: usize = 8;
const BACKING_LEN_OFFSET: usize = 16;
pub(super) const AUTOCLEAR_OFFSET: u64 = 88;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Incompatible feature bits (qcow2 specification, bytes 72-79).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Longest backing file name (QEMU refuses longer ones too).
const MAX_BACKING_NAME_BYTES: u32 = 1023;
/// QEMU's limits on the table sizes (QCOW_MAX_L1_SIZE and
/// QCOW_MAX_REFTABLE_SIZE in block/qcow2.h); qcow2-rs uses the same.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Bytes of one table entry (L1, L2 and refcount table).
pub const ENTRY_BYTES: u64 = 8;
/// refcount_order of 16 bit refcounts.
pub const REFCOUNT_ORDER: u32 = 4;
const SECTOR_BYTES: u64 = 512;

/// What the header says, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Layout {
    /// The image file, for error messages.
    pub path: PathBuf,
    pub version: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
    pub l1_offset: u64,
    pub l1_entries: u32,
    pub reftable_offset: u64,
    pub reftable_clusters: u32,
    pub refcount_order: u32,
    pub backing: Option<Backing>,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    /// 0 is zlib (the only value for version 2).
    pub compression_type: u8,
    pub header_length: u32,
    /// The file's size when the header was read.
    pub file_len: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    /// Resolved relative to the image's directory when relative.
    pub path: PathBuf,
    /// The backing format header extension, when present ("qcow2").
    pub format: Option<String>,
}

impl Qcow2Layout {
    pub fn cluster_bytes(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries of one L2 table (one cluster of 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_bytes() / ENTRY_BYTES
    }

    /// Refcounts in one refblock.
    pub fn refblock_entries(&self) -> u64 {
        (self.cluster_bytes() * 8) >> self.refcount_order
    }

    /// Guest clusters of the virtual disk (the last may be partial).
    pub fn guest_clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster_bytes())
    }

    /// Host clusters the file spans (the last may be partial).
    pub fn host_clusters(&self) -> u64 {
        self.file_len.div_ceil(self.cluster_bytes())
    }

    pub fn l1_bytes(&self) -> u64 {
        u64::from(self.l1_entries) * ENTRY_BYTES
    }

    pub fn reftable_bytes(&self) -> u64 {
        u64::from(self.reftable_clusters) << self.cluster_bits
    }
}

/// Reads and validates the header of the qcow2 image open as `file` at
/// `path`, and checks that its backing file (if any) is a qcow2 image that
/// can be opened.
pub fn read_layout(file: &File, path: &Path) -> Result<Qcow2Layout, MetaError> {
    let layout = parse_layout(file, path)?;
    refuse_unsupported(&layout)?;
    if let Some(backing) = &layout.backing {
        check_backing(path, backing)?;
    }
    Ok(layout)
}

/// The header's structure, checked, and the refusals every use shares
/// (encryption, internal snapshots), without the policy of
/// [`refuse_unsupported`] (version 2 images parse).
pub(super) fn parse_layout(file: &File, path: &Path) -> Result<Qcow2Layout, MetaError> {
    let file_len = file_len(file, path)?;
    let malformed = |problem: String| MetaError::Header {
        path: path.to_owned(),
        problem,
    };
    let mut fixed = [0u8; V3_MIN_HEADER_BYTES];
    let fixed_len = usize::try_from(file_len.min(V3_MIN_HEADER_BYTES as u64)).unwrap_or(0);
    read_exact_at(file, path, &mut fixed[..fixed_len], 0, || {
        "the qcow2 header".to_string()
    })?;
    if fixed_len < 4 || fixed[..4] != QCOW2_MAGIC {
        return Err(MetaError::BadMagic {
            path: path.to_owned(),
        });
    }
    let version = be_u32(&fixed, 4);
    if version != 2 && version != 3 {
        return Err(MetaError::Version {
            path: path.to_owned(),
            version,
        });
    }
    let min_header = if version == 2 {
        V2_HEADER_BYTES
    } else {
        V3_MIN_HEADER_BYTES
    };
    if fixed_len < min_header {
        return Err(malformed(format!(
            "the file is {file_len} bytes, shorter than a version {version} header ({min_header} bytes)"
        )));
    }
    let cluster_bits = be_u32(&fixed, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(MetaError::ClusterBits {
            path: path.to_owned(),
            bits: cluster_bits,
        });
    }
    let crypt_method = be_u32(&fixed, 32);
    if crypt_method != 0 {
        return Err(MetaError::Encrypted {
            path: path.to_owned(),
            method: crypt_method,
        });
    }
    let nb_snapshots = be_u32(&fixed, 60);
    if nb_snapshots != 0 {
        return Err(MetaError::Snapshots {
            path: path.to_owned(),
            count: nb_snapshots,
        });
    }
    let cluster_bytes = 1u64 << cluster_bits;
    // The header cluster: all that the header and its extensions may use.
    let header_len = file_len.min(cluster_bytes);
    let mut header = vec![0u8; usize::try_from(header_len).unwrap_or(0)];
    read_exact_at(file, path, &mut header, 0, || {
        "the header cluster".to_string()
    })?;

    let (incompatible_features, compatible_features, autoclear_features, refcount_order) =
        if version == 2 {
            (0, 0, 0, REFCOUNT_ORDER)
        } else {
            (
                be_u64(&header, 72),
                be_u64(&header, 80),
                be_u64(&header, 88),
                be_u32(&header, 96),
            )
        };
    let header_length = if version == 2 {
        V2_HEADER_BYTES as u32
    } else {
        be_u32(&header, 100)
    };
    if version == 3 {
        if (header_length as usize) < V3_MIN_HEADER_BYTES || header_length % 8 != 0 {
            return Err(malformed(format!(
                "header_length {header_length} is not a multiple of 8 of at least {V3_MIN_HEADER_BYTES}"
            )));
        }
        if u64::from(header_length) > header_len {
            return Err(malformed(format!(
                "header_length {header_length} runs past the header cluster ({header_len} bytes)"
            )));
        }
    }
    if refcount_order > 6 {
        return Err(malformed(format!(
            "refcount_order {refcount_order} is above 6 (64 bit refcounts)"
        )));
    }
    let compression_type = if header_length > 104 { header[104] } else { 0 };
    if incompatible_features & INCOMPAT_COMPRESSION == 0 && compression_type != 0 {
        return Err(malformed(format!(
            "compression_type is {compression_type} without the compression type feature bit"
        )));
    }

    let backing_offset = be_u64(&header, BACKING_OFFSET);
    let backing_len = be_u32(&header, BACKING_LEN_OFFSET);
    let (backing_name, extensions_end) = if backing_offset != 0 && backing_len != 0 {
        if backing_len > MAX_BACKING_NAME_BYTES {
            return Err(malformed(format!(
                "the backing file name is {backing_len} bytes long; at most {MAX_BACKING_NAME_BYTES} are allowed"
            )));
        }
        let end = backing_offset
            .checked_add(u64::from(backing_len))
            .filter(|&end| end <= header_len)
            .ok_or_else(|| {
                malformed(format!(
                    "the backing file name at {backing_offset:#x}..+{backing_len} runs past the header cluster"
                ))
            })?;
        if backing_offset < u64::from(header_length) {
            return Err(malformed(format!(
                "the backing file name at {backing_offset:#x} overlaps the header fields"
            )));
        }
        // Both bounds are at most header_len, the length of `header`.
        let name = header[backing_offset as usize..end as usize].to_vec();
        (Some(name), backing_offset)
    } else {
        (None, header_len)
    };
    let backing_format =
        parse_extensions(&header, header_length as usize, extensions_end).map_err(malformed)?;

    let virtual_size = be_u64(&header, 24);
    if virtual_size % SECTOR_BYTES != 0 {
        return Err(malformed(format!(
            "the virtual size {virtual_size} is not a multiple of 512 bytes (qemu-img resize it)"
        )));
    }
    let layout = Qcow2Layout {
        path: path.to_owned(),
        version,
        cluster_bits,
        virtual_size,
        l1_offset: be_u64(&header, 40),
        l1_entries: be_u32(&header, 36),
        reftable_offset: be_u64(&header, 48),
        reftable_clusters: be_u32(&header, 56),
        refcount_order,
        backing: backing_name.map(|name| Backing {
            path: resolve_backing(path, &name),
            format: backing_format,
        }),
        incompatible_features,
        compatible_features,
        autoclear_features,
        compression_type,
        header_length,
        file_len,
    };
    check_tables(&layout).map_err(malformed)?;
    Ok(layout)
}

fn file_len(file: &File, path: &Path) -> Result<u64, MetaError> {
    // Seeking to the end works for block devices too (their metadata says 0).
    let mut handle = file;
    handle
        .seek(SeekFrom::End(0))
        .map_err(|source| MetaError::Io {
            path: path.to_owned(),
            what: "find the size of the file".to_string(),
            source,
        })
}

/// Walks the header extensions from `start` to `end` (exclusive) and
/// returns the backing format, if given.
fn parse_extensions(header: &[u8], start: usize, end: u64) -> Result<Option<String>, String> {
    let end = usize::try_from(end).unwrap_or(usize::MAX).min(header.len());
    let mut at = start;
    let mut backing_format = None;
    loop {
        let data = at
            .checked_add(8)
            .filter(|&data| data <= end)
            .ok_or_else(|| {
                format!("the header extensions run past {end:#x} without an end marker")
            })?;
        let kind = be_u32(header, at);
        let len = be_u32(header, at + 4) as usize;
        if kind == EXT_END {
            return Ok(backing_format);
        }
        let next = len
            .checked_add(7)
            .map(|padded| padded & !7)
            .and_then(|padded| data.checked_add(padded))
            .filter(|&next| next <= end)
            .ok_or_else(|| {
                format!("header extension {kind:#x} at {at:#x} ({len} bytes) runs past {end:#x}")
            })?;
        if kind == EXT_BACKING_FORMAT {
            let name = &header[data..data + len];
            backing_format = Some(String::from_utf8_lossy(name).into_owned());
        }
        at = next;
    }
}

/// The L1 table and the refcount table: aligned, inside the file, within
/// QEMU's size limits, apart from each other, and the L1 table large
/// enough for the virtual size.
fn check_tables(layout: &Qcow2Layout) -> Result<(), String> {
    let cluster_bytes = layout.cluster_bytes();
    let mask = cluster_bytes - 1;
    let bytes_per_l2 = cluster_bytes * layout.l2_entries();
    let needed = layout.virtual_size.div_ceil(bytes_per_l2);
    if u64::from(layout.l1_entries) < needed {
        return Err(format!(
            "the L1 table has {} entries; a virtual size of {} needs {needed}",
            layout.l1_entries, layout.virtual_size
        ));
    }
    if layout.l1_bytes() > MAX_L1_BYTES {
        return Err(format!(
            "the L1 table has {} entries, more than QEMU's limit of {}",
            layout.l1_entries,
            MAX_L1_BYTES / ENTRY_BYTES
        ));
    }
    if layout.l1_entries > 0 {
        if layout.l1_offset == 0 || layout.l1_offset & mask != 0 {
            return Err(format!(
                "the L1 table offset {:#x} is not a nonzero multiple of the cluster size",
                layout.l1_offset
            ));
        }
        if layout
            .l1_offset
            .checked_add(layout.l1_bytes())
            .is_none_or(|end| end > layout.file_len)
        {
            return Err(format!(
                "the L1 table at {:#x} ({} entries) runs past the end of the file ({} bytes)",
                layout.l1_offset, layout.l1_entries, layout.file_len
            ));
        }
    }
    if layout.reftable_clusters == 0 {
        return Err("the refcount table has 0 clusters".to_string());
    }
    if layout.reftable_bytes() > MAX_REFTABLE_BYTES {
        return Err(format!(
            "the refcount table has {} clusters, more than QEMU's limit of {MAX_REFTABLE_BYTES} bytes",
            layout.reftable_clusters
        ));
    }
    if layout.reftable_offset == 0 || layout.reftable_offset & mask != 0 {
        return Err(format!(
            "the refcount table offset {:#x} is not a nonzero multiple of the cluster size",
            layout.reftable_offset
        ));
    }
    let reftable_end = layout
        .reftable_offset
        .checked_add(layout.reftable_bytes())
        .filter(|&end| end <= layout.file_len)
        .ok_or_else(|| {
            format!(
                "the refcount table at {:#x} ({} clusters) runs past the end of the file ({} bytes)",
                layout.reftable_offset, layout.reftable_clusters, layout.file_len
            )
        })?;
    // Both ranges are inside the file, so the additions cannot overflow.
    let l1_end = (layout.l1_offset + layout.l1_bytes()).next_multiple_of(cluster_bytes);
    if layout.l1_entries > 0 && layout.l1_offset < reftable_end && layout.reftable_offset < l1_end {
        return Err(format!(
            "the L1 table at {:#x} and the refcount table at {:#x} overlap",
            layout.l1_offset, layout.reftable_offset
        ));
    }
    Ok(())
}

/// The refusals that are choices of ringvm-blk rather than malformed input.
fn refuse_unsupported(layout: &Qcow2Layout) -> Result<(), MetaError> {
    let path = layout.path.clone();
    if layout.version == 2 {
        return Err(MetaError::Version2 { path });
    }
    let incompat = layout.incompatible_features;
    if incompat & INCOMPAT_DIRTY != 0 {
        return Err(MetaError::Dirty { path });
    }
    if incompat & INCOMPAT_CORRUPT != 0 {
        return Err(MetaError::Corrupt { path });
    }
    if incompat & INCOMPAT_DATA_FILE != 0 {
        return Err(MetaError::ExternalDataFile { path });
    }
    if incompat & INCOMPAT_COMPRESSION != 0 && layout.compression_type != 0 {
        return Err(MetaError::CompressionType {
            path,
            ctype: layout.compression_type,
        });
    }
    if incompat & INCOMPAT_EXTL2 != 0 {
        return Err(MetaError::ExtendedL2 { path });
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(MetaError::UnknownIncompatible {
            path,
            bits: incompat & !INCOMPAT_KNOWN,
        });
    }
    if layout.refcount_order != REFCOUNT_ORDER {
        return Err(MetaError::RefcountOrder {
            path,
            order: layout.refcount_order,
        });
    }
    Ok(())
}

fn resolve_backing(image: &Path, name: &[u8]) -> PathBuf {
    let name = Path::new(OsStr::from_bytes(name));
    if name.is_absolute() {
        return name.to_owned();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_owned(),
    }
}

/// The backing file must open and be qcow2: declared so, or, without a
/// declared format, starting with the qcow2 magic.
fn check_backing(path: &Path, backing: &Backing) -> Result<(), MetaError> {
    match backing.format.as_deref() {
        None | Some("qcow2") => {}
        Some("raw") => {
            return Err(MetaError::RawBacking {
                path: path.to_owned(),
                backing: backing.path.clone(),
            })
        }
        Some(other) => {
            return Err(MetaError::BackingFormat {
                path: path.to_owned(),
                backing: backing.path.clone(),
                format: other.to_string(),
            })
        }
    }
    let open_error = |source| MetaError::BackingOpen {
        path: path.to_owned(),
        backing: backing.path.clone(),
        source,
    };
    let file = File::open(&backing.path).map_err(open_error)?;
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) if magic == QCOW2_MAGIC => Ok(()),
        Ok(()) => Err(not_qcow2(path, backing)),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Err(not_qcow2(path, backing)),
        Err(source) => Err(open_error(source)),
    }
}

fn not_qcow2(path: &Path, backing: &Backing) -> MetaError {
    match &backing.format {
        None => MetaError::RawBacking {
            path: path.to_owned(),
            backing: backing.path.clone(),
        },
        Some(format) => MetaError::BackingFormat {
            path: path.to_owned(),
            backing: backing.path.clone(),
            format: format!("{format}, but it does not start with the qcow2 magic"),
        },
    }
}

/// Sets the corrupt bit (incompatible feature bit 1) so that no qcow2
/// implementation opens the image again before a repair, then syncs.
pub fn mark_corrupt(file: &File) -> io::Result<()> {
    let mut word = [0u8; 4];
    file.read_exact_at(&mut word, 4)?;
    if u32::from_be_bytes(word) < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "qcow2 version 2 images have no corrupt bit",
        ));
    }
    let mut bits = [0u8; 8];
    file.read_exact_at(&mut bits, INCOMPATIBLE_OFFSET)?;
    let bits = u64::from_be_bytes(bits) | INCOMPAT_CORRUPT;
    file.write_all_at(&bits.to_be_bytes(), INCOMPATIBLE_OFFSET)?;
    file.sync_data()
}

/// Sets or clears the corrupt bit in `bytes`, a piece of the file that
/// starts at file offset `offset`, if it holds the byte with that bit.
///
/// For the owner thread: qcow2-rs refuses a header with the corrupt bit
/// (it knows no incompatible feature), so the bit the owner set on a bad
/// entry is cleared in the header qcow2-rs is given when it opens the image
/// again (after a discard), and set in every header qcow2-rs writes.
pub fn set_corrupt_bit(bytes: &mut [u8], offset: u64, set: bool) {
    let byte_at = INCOMPATIBLE_OFFSET + 7;
    let mask = INCOMPAT_CORRUPT as u8;
    let Some(byte) = byte_at
        .checked_sub(offset)
        .and_then(|at| usize::try_from(at).ok())
        .and_then(|at| bytes.get_mut(at))
    else {
        return;
    };
    if set {
        *byte |= mask;
    } else {
        *byte &= !mask;
    }
}

/// Clears the backing file offset of a header (`bytes`, from file offset 0)
/// that sets it with a name length of 0: QEMU and [`read_layout`] see no
/// backing file there, qcow2-rs sees one named "" and fails every write
/// to an unallocated cluster (its copy-on-write finds no backing file).
pub fn clear_empty_backing(bytes: &mut [u8]) {
    if be_u32(bytes, BACKING_LEN_OFFSET) == 0 {
        if let Some(offset) = bytes.get_mut(BACKING_OFFSET..BACKING_OFFSET + 8) {
            offset.fill(0);
        }
    }
}

/// Zeroes the autoclear feature bits of an image opened for writing, as
/// QEMU does for the bits it does not maintain (persistent bitmaps, ...):
/// we change the data without updating what they describe. A no-op when
/// they are already 0.
pub fn clear_autoclear(file: &File, layout: &Qcow2Layout) -> io::Result<()> {
    if layout.autoclear_features == 0 || layout.version < 3 {
        return Ok(());
    }
    file.write_all_at(&0u64.to_be_bytes(), AUTOCLEAR_OFFSET)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{open_rw, qcow2, qemu_img, read_u64, write_u32, write_u64};
    use super::*;

    fn layout_of(path: &Path) -> Result<Qcow2Layout, MetaError> {
        read_layout(&File::open(path).unwrap(), path)
    }

    fn refusal(path: &Path) -> String {
        let err = layout_of(path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        err
    }

    #[test]
    fn qemu_img_images_parse() {
        let dir = tempfile::tempdir().unwrap();
        for (cluster_size, bits) in [("4k", 12), ("64k", 16), ("2M", 21)] {
            let path = qcow2(
                dir.path(),
                &format!("c{bits}.qcow2"),
                "3G",
                &format!("cluster_size={cluster_size}"),
            );
            let layout = layout_of(&path).unwrap();
            assert_eq!(layout.version, 3);
            assert_eq!(layout.cluster_bits, bits);
            assert_eq!(layout.virtual_size, 3 << 30);
            assert_eq!(layout.refcount_order, 4);
            assert_eq!(layout.backing, None);
            assert_eq!(layout.autoclear_features, 0);
            assert_eq!(layout.file_len, std::fs::metadata(&path).unwrap().len());
            let per_l1 = layout.cluster_bytes() * layout.l2_entries();
            assert!(u64::from(layout.l1_entries) >= (3u64 << 30).div_ceil(per_l1));
            assert_eq!(layout.guest_clusters(), (3 << 30) >> bits);
        }
    }

    #[test]
    fn features_we_cannot_serve_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let snap = qcow2(d, "snap.qcow2", "1M", "");
        qemu_img(&["snapshot", "-c", "s1", snap.to_str().unwrap()]);
        assert!(refusal(&snap).contains(
            "has 1 internal snapshots; ringvm-blk cannot serve images with internal snapshots"
        ));
        let ext = qcow2(d, "ext.qcow2", "1M", "extended_l2=on");
        assert!(refusal(&ext).contains("extended L2 entries"));
        let data_file = d.join("data.raw");
        let opt = format!("data_file={}", data_file.display());
        let external = qcow2(d, "external.qcow2", "1M", &opt);
        assert!(refusal(&external).contains("external data file"));
        let zstd = qcow2(d, "zstd.qcow2", "1M", "compression_type=zstd");
        assert!(refusal(&zstd).contains("compression type 1"));
        let v2 = qcow2(d, "v2.qcow2", "1M", "compat=0.10");
        assert!(refusal(&v2).contains("qemu-img amend -o compat=1.1"));
        let rc8 = qcow2(d, "rc8.qcow2", "1M", "refcount_bits=8");
        assert!(refusal(&rc8).contains("refcount_order is 3 (8 bit refcounts)"));
    }

    #[test]
    fn backing_files_must_be_qcow2_and_open() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "raw",
            d.join("raw.img").to_str().unwrap(),
            "1M",
        ]);
        let over_raw = qcow2(
            d,
            "over-raw.qcow2",
            "1M",
            "backing_file=raw.img,backing_fmt=raw",
        );
        let err = refusal(&over_raw);
        assert!(err.contains("raw backing files are not supported"), "{err}");
        assert!(
            err.contains(&d.join("raw.img").display().to_string()),
            "{err}"
        );

        qcow2(d, "base.qcow2", "1M", "");
        let over = qcow2(
            d,
            "over.qcow2",
            "1M",
            "backing_file=base.qcow2,backing_fmt=qcow2",
        );
        let layout = layout_of(&over).unwrap();
        let backing = layout.backing.unwrap();
        assert_eq!(backing.path, d.join("base.qcow2"));
        assert_eq!(backing.format.as_deref(), Some("qcow2"));

        // Without the backing format extension (its type renamed to an
        // unknown one), the backing file's magic decides.
        let over_probed = d.join("over-probed.qcow2");
        std::fs::copy(&over_raw, &over_probed).unwrap();
        let ext = find_extension(&over_probed, EXT_BACKING_FORMAT).unwrap();
        write_u32(&over_probed, ext, 0x1234_5678);
        let err = refusal(&over_probed);
        assert!(err.contains("raw backing files are not supported"), "{err}");

        std::fs::remove_file(d.join("base.qcow2")).unwrap();
        let err = refusal(&over);
        assert!(
            err.contains(&format!(
                "cannot open the backing file {}",
                d.join("base.qcow2").display()
            )),
            "{err}"
        );
    }

    /// The offset of the header extension of type `kind` in a v3 image.
    fn find_extension(path: &Path, kind: u32) -> Option<u64> {
        let mut at = u64::from((read_u64(path, 96) & 0xffff_ffff) as u32);
        loop {
            let word = read_u64(path, at);
            let (this, len) = ((word >> 32) as u32, word as u32);
            if this == kind {
                return Some(at);
            }
            if this == 0 {
                return None;
            }
            at += 8 + u64::from(len).next_multiple_of(8);
        }
    }

    /// Pokes `bytes` at `offset` of a copy of a fresh 64K-cluster image and
    /// returns the refusal.
    fn poked(dir: &Path, name: &str, poke: impl FnOnce(&Path)) -> String {
        let path = qcow2(dir, name, "1G", "");
        poke(&path);
        refusal(&path)
    }

    #[test]
    fn poked_headers_are_refused_precisely() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        type Poke = Box<dyn FnOnce(&Path)>;
        let cases: Vec<(&str, Poke, &str)> = vec![
            (
                "magic",
                Box::new(|p| write_u32(p, 0, 0x5146_49fa)),
                "not a qcow2 image",
            ),
            (
                "version",
                Box::new(|p| write_u32(p, 4, 4)),
                "qcow2 version 4 is not supported",
            ),
            (
                "bits",
                Box::new(|p| write_u32(p, 20, 22)),
                "cluster_bits is 22",
            ),
            (
                "bits8",
                Box::new(|p| write_u32(p, 20, 8)),
                "cluster_bits is 8",
            ),
            (
                "crypt",
                Box::new(|p| write_u32(p, 32, 1)),
                "encrypted (crypt_method 1)",
            ),
            (
                "dirty",
                Box::new(|p| write_u64(p, 72, 1)),
                "lazy_refcounts and not closed cleanly; run qemu-img check -r all",
            ),
            (
                "corrupt",
                Box::new(|p| write_u64(p, 72, 2)),
                "the corrupt bit is set",
            ),
            (
                "unknown",
                Box::new(|p| write_u64(p, 72, 1 << 40)),
                "unknown incompatible feature bits 0x10000000000",
            ),
            (
                "l1-unaligned",
                Box::new(|p| write_u64(p, 40, 0x3_0200)),
                "the L1 table offset 0x30200 is not a nonzero multiple",
            ),
            (
                "l1-zero",
                Box::new(|p| write_u64(p, 40, 0)),
                "the L1 table offset 0x0 is not a nonzero multiple",
            ),
            (
                "l1-eof",
                Box::new(|p| write_u64(p, 40, 1 << 40)),
                "runs past the end of the file",
            ),
            (
                "l1-huge",
                Box::new(|p| write_u32(p, 36, u32::MAX)),
                "more than QEMU's limit",
            ),
            (
                "l1-small",
                Box::new(|p| write_u32(p, 36, 1)),
                "the L1 table has 1 entries; a virtual size of 1073741824 needs 2",
            ),
            (
                "size-huge",
                Box::new(|p| write_u64(p, 24, 1 << 62)),
                "needs 8589934592",
            ),
            (
                "size-odd",
                Box::new(|p| write_u64(p, 24, 1000)),
                "not a multiple of 512",
            ),
            (
                "rt-unaligned",
                Box::new(|p| write_u64(p, 48, 0x1_0008)),
                "the refcount table offset 0x10008",
            ),
            (
                "rt-huge",
                Box::new(|p| write_u32(p, 56, u32::MAX)),
                "the refcount table has 4294967295 clusters",
            ),
            (
                "rt-zero",
                Box::new(|p| write_u32(p, 56, 0)),
                "the refcount table has 0 clusters",
            ),
            (
                "rt-eof",
                Box::new(|p| write_u32(p, 56, 100)),
                "the refcount table at 0x10000 (100 clusters) runs past",
            ),
            (
                "overlap",
                Box::new(|p| write_u64(p, 48, read_u64(p, 40))),
                "overlap",
            ),
            (
                "hlen",
                Box::new(|p| write_u32(p, 100, 1 << 20)),
                "header_length 1048576 runs past the header cluster",
            ),
            (
                "hlen-odd",
                Box::new(|p| write_u32(p, 100, 105)),
                "header_length 105 is not a multiple of 8",
            ),
            (
                "ext-len",
                Box::new(|p| write_u64(p, 112, (0x6803_f857u64 << 32) | 0xffff_fff0)),
                "runs past 0x10000",
            ),
            (
                "backing-long",
                Box::new(|p| {
                    write_u64(p, 8, 0x200);
                    write_u32(p, 16, 2000)
                }),
                "2000 bytes long",
            ),
            (
                "backing-past",
                Box::new(|p| {
                    write_u64(p, 8, 0xfff0);
                    write_u32(p, 16, 100)
                }),
                "runs past the header cluster",
            ),
            (
                "compression-no-bit",
                Box::new(|p| open_rw(p).write_all_at(&[1], 104).unwrap()),
                "compression_type is 1 without",
            ),
        ];
        for (name, poke, expected) in cases {
            let err = poked(d, &format!("{name}.qcow2"), poke);
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn short_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.qcow2");
        std::fs::write(&path, b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(refusal(&path).contains("shorter than a version 3 header"));
        std::fs::write(&path, b"QF").unwrap();
        assert!(refusal(&path).contains("not a qcow2 image"));
    }

    #[test]
    fn mark_corrupt_sets_the_bit_qemu_sees() {
        let dir = tempfile::tempdir().unwrap();
        let path = qcow2(dir.path(), "c.qcow2", "1M", "");
        mark_corrupt(&open_rw(&path)).unwrap();
        assert!(refusal(&path).contains("the corrupt bit is set"));
        let info = qemu_img(&["info", "-U", path.to_str().unwrap()]);
        assert!(info.contains("corrupt: true"), "{info}");
    }

    #[test]
    fn clear_autoclear_drops_persistent_bitmaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = qcow2(dir.path(), "b.qcow2", "1M", "");
        qemu_img(&["bitmap", "--add", path.to_str().unwrap(), "b0"]);
        assert!(qemu_img(&["info", path.to_str().unwrap()]).contains("b0"));
        let file = open_rw(&path);
        let layout = read_layout(&file, &path).unwrap();
        assert_eq!(layout.autoclear_features, 1);
        clear_autoclear(&file, &layout).unwrap();
        let layout = read_layout(&file, &path).unwrap();
        assert_eq!(layout.autoclear_features, 0);
        // QEMU no longer trusts the bitmap extension.
        let info = qemu_img(&["info", path.to_str().unwrap()]);
        assert!(!info.contains("b0"), "{info}");
        clear_autoclear(&file, &layout).unwrap();
        assert_eq!(read_u64(&path, AUTOCLEAR_OFFSET), 0);
    }
}
