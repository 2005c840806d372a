//! Formats translate addresses: an [`ImageFormat`] says where a range of
//! guest bytes lives in its host files, as [`Extent`]s. It moves no data; the
//! queue code turns extents into engine operations on guest memory.
//!
//! - [`raw::RawImage`]: one file, guest offset = host offset.
//! - [`qcow2::Qcow2Image`]: thin qcow2 through qcow2-rs. Its clusters are
//!   mapped by the image's owner thread, which qcow2-rs's state cannot leave;
//!   the queues reach it through the engine the image provides
//!   ([`ImageFormat::queue_engine`]), on a virtual disk whose offsets are
//!   the guest's.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{Engine, EngineError};

pub mod qcow2;
pub mod raw;

/// Index of a host file in [`ImageFormat::files`].
pub type FileIndex = u32;

/// Where a run of guest bytes lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len_bytes` guest bytes stored at `offset` of host file `file`.
    Data {
        file: FileIndex,
        offset: u64,
        len_bytes: u64,
    },
    /// `len_bytes` guest bytes stored nowhere, reading as zeroes (a format
    /// returns these for reads and for discards, never for writes).
    Zero { len_bytes: u64 },
}

impl Extent {
    pub fn len_bytes(&self) -> u64 {
        match *self {
            Extent::Data { len_bytes, .. } | Extent::Zero { len_bytes } => len_bytes,
        }
    }
}

/// What the queue code is about to do with the range it asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    /// A format allocates here what is not allocated yet.
    Write,
    Discard,
    WriteZeroes {
        unmap: bool,
    },
}

/// A host file of an image, as the engines get it.
#[derive(Debug)]
pub struct HostFile {
    /// Opened with O_DIRECT when `--direct` was given.
    pub file: File,
    /// `--direct` only: the same file without O_DIRECT, for requests whose
    /// buffers O_DIRECT cannot take.
    pub buffered: Option<File>,
    /// `--direct` only: what O_DIRECT requires of buffers and offsets.
    pub dio: Option<DioAlignment>,
}

/// O_DIRECT alignment (statx STATX_DIOALIGN, Linux 6.1; block devices 6.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlignment {
    /// Alignment of each buffer's address.
    pub mem_bytes: u32,
    /// Alignment of the file offset and of each buffer's length.
    pub offset_bytes: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the header of {path}")]
    ReadHeader {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the size of {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {message}")]
    Qcow2 { path: PathBuf, message: String },
    #[error(transparent)]
    Qcow2Meta(#[from] qcow2::meta::MetaError),
    #[error("--direct: cannot find the O_DIRECT alignment of {path}")]
    DirectAlignment {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--direct: {path} does not support O_DIRECT")]
    DirectUnsupported { path: PathBuf },
    #[error("bytes {offset}..+{len_bytes} are past the end of the image")]
    OutOfRange { offset: u64, len_bytes: u64 },
}

pub trait ImageFormat: Send + Sync + std::fmt::Debug {
    /// For logs: "raw".
    fn name(&self) -> &'static str;

    /// The disk size the guest sees.
    fn capacity_sectors(&self) -> u64;

    /// The host files extents point into; index 0 is the one FLUSH syncs
    /// first.
    fn files(&self) -> &[HostFile];

    /// Appends to `extents`, in guest order, where the `len_bytes` guest
    /// bytes at `offset` live; their lengths sum to `len_bytes`. The range is
    /// within the capacity (the request parser checked it).
    fn map(
        &self,
        access: Access,
        offset: u64,
        len_bytes: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<(), ImageError>;

    /// Writes out metadata before a FLUSH syncs the host files.
    fn flush_metadata(&self) -> Result<(), ImageError> {
        Ok(())
    }

    /// The granularity in which DISCARD gives space back
    /// (`discard_sector_alignment` in the config space).
    fn discard_granularity_bytes(&self) -> u64;

    /// The engine a queue uses, when the format moves the bytes itself
    /// (qcow2); `None`: an engine on [`ImageFormat::files`].
    fn queue_engine(&self) -> Option<Result<Box<dyn Engine>, EngineError>> {
        None
    }

    /// What the format counts of its own (printed with the device's).
    fn counters(&self) -> Option<Arc<qcow2::ImageCounters>> {
        None
    }
}

/// The extent of a format whose file offsets are the guest's (raw, and the
/// virtual disk a qcow2 image's queues see), checked against the capacity.
pub fn identity_map(
    capacity_sectors: u64,
    offset: u64,
    len_bytes: u64,
    extents: &mut Vec<Extent>,
) -> Result<(), ImageError> {
    let end = offset
        .checked_add(len_bytes)
        .filter(|end| *end <= capacity_sectors << crate::request::SECTOR_SHIFT)
        .ok_or(ImageError::OutOfRange { offset, len_bytes })?;
    extents.push(Extent::Data {
        file: 0,
        offset,
        len_bytes: end - offset,
    });
    Ok(())
}

/// The image formats of `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    pub readonly: bool,
    pub direct: bool,
    /// None: taken from the image's header.
    pub format: Option<Format>,
}

/// "QFI\xfb", the first four bytes of every qcow2 image.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Opens the image at `path` in the format given or detected.
pub fn open(path: &Path, options: OpenOptions) -> Result<Arc<dyn ImageFormat>, ImageError> {
    let format = match options.format {
        Some(format) => format,
        None if has_qcow2_magic(path)? => Format::Qcow2,
        None => Format::Raw,
    };
    Ok(match format {
        Format::Qcow2 => Arc::new(qcow2::Qcow2Image::open(path, options)?),
        Format::Raw => Arc::new(raw::RawImage::open(path, options)?),
    })
}

fn has_qcow2_magic(path: &Path) -> Result<bool, ImageError> {
    let mut file = File::open(path).map_err(|source| ImageError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == QCOW2_MAGIC),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(source) => Err(ImageError::ReadHeader {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(bytes).unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        tmp
    }

    #[test]
    fn a_bad_qcow2_header_is_an_error_unless_raw_is_asked_for() {
        let tmp = file_with(b"QFI\xfb\0\0\0\x03");
        assert!(open(tmp.path(), OpenOptions::default()).is_err());
        let raw = OpenOptions {
            format: Some(Format::Raw),
            ..OpenOptions::default()
        };
        assert_eq!(open(tmp.path(), raw).unwrap().capacity_sectors(), 2048);
    }

    #[test]
    fn format_qcow2_on_a_raw_file_is_an_error() {
        let tmp = file_with(b"");
        let qcow2 = OpenOptions {
            format: Some(Format::Qcow2),
            ..OpenOptions::default()
        };
        assert!(open(tmp.path(), qcow2).is_err());
    }

    #[test]
    fn anything_else_is_raw() {
        let tmp = file_with(b"\xebc\x90");
        let image = open(tmp.path(), OpenOptions::default()).unwrap();
        assert_eq!(image.name(), "raw");
        let empty = tempfile::NamedTempFile::new().unwrap();
        let image = open(empty.path(), OpenOptions::default()).unwrap();
        assert_eq!(image.capacity_sectors(), 0);
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = open(Path::new("/nonexistent/disk.img"), OpenOptions::default()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    }
}
