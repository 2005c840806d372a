//! Raw images: the guest's byte `n` is the file's byte `n`. A regular file or
//! a block device; a trailing partial sector is not served.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use tracing::{info, warn};

use super::{
    identity_map, Access, DioAlignment, Extent, HostFile, ImageError, ImageFormat, OpenOptions,
};
use crate::request::{SECTOR_BYTES, SECTOR_SHIFT};

/// O_DIRECT alignment assumed when the kernel does not report it (statx
/// without STATX_DIOALIGN): a page, which every Linux O_DIRECT path takes.
const FALLBACK_DIO_ALIGN_BYTES: u32 = 4096;

#[derive(Debug)]
pub struct RawImage {
    files: [HostFile; 1],
    capacity_sectors: u64,
    discard_granularity_bytes: u64,
}

impl RawImage {
    pub fn open(path: &Path, options: OpenOptions) -> Result<Self, ImageError> {
        let file = open_file(path, options.readonly, options.direct)?;
        let len_bytes = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| ImageError::Size {
                path: path.to_owned(),
                source,
            })?;
        if len_bytes % SECTOR_BYTES != 0 {
            warn!(
                "{}: the last {} bytes do not fill a 512-byte sector and are not served",
                path.display(),
                len_bytes % SECTOR_BYTES
            );
        }
        let (buffered, dio) = if options.direct {
            let dio = dio_alignment(&file)
                .map_err(|source| ImageError::DirectAlignment {
                    path: path.to_owned(),
                    source,
                })?
                .unwrap_or(DioAlignment {
                    mem_bytes: FALLBACK_DIO_ALIGN_BYTES,
                    offset_bytes: FALLBACK_DIO_ALIGN_BYTES,
                });
            info!(
                "{}: O_DIRECT needs buffers aligned to {} bytes and offsets and lengths to {}; \
                 other requests go through the page cache",
                path.display(),
                dio.mem_bytes,
                dio.offset_bytes
            );
            (Some(open_file(path, options.readonly, false)?), Some(dio))
        } else {
            (None, None)
        };
        // Punching holes frees whole file system blocks.
        let block = file.metadata().map(|m| m.blksize()).unwrap_or(4096);
        let discard_granularity_bytes = block.clamp(SECTOR_BYTES, 1 << 20).next_power_of_two();
        Ok(RawImage {
            files: [HostFile {
                file,
                buffered,
                dio,
            }],
            capacity_sectors: len_bytes >> SECTOR_SHIFT,
            discard_granularity_bytes,
        })
    }
}

fn open_file(path: &Path, readonly: bool, direct: bool) -> Result<File, ImageError> {
    let mut options = FsOpenOptions::new();
    options.read(true).write(!readonly);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path).map_err(|source| {
        if direct && source.raw_os_error() == Some(libc::EINVAL) {
            ImageError::DirectUnsupported {
                path: path.to_owned(),
            }
        } else {
            ImageError::Open {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// The file's O_DIRECT alignment, if the kernel reports it.
fn dio_alignment(file: &File) -> io::Result<Option<DioAlignment>> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes at most one `struct statx` into `stx`, which is
    // that large; the empty path with AT_EMPTY_PATH names the open file.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, and statx succeeded; every field is an
    // integer, for which any bit pattern is valid.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_mem_align == 0 {
        return Ok(None);
    }
    Ok(Some(DioAlignment {
        mem_bytes: stx.stx_dio_mem_align,
        offset_bytes: stx.stx_dio_offset_align,
    }))
}

impl ImageFormat for RawImage {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn files(&self) -> &[HostFile] {
        &self.files
    }

    fn map(
        &self,
        _access: Access,
        offset: u64,
        len_bytes: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<(), ImageError> {
        identity_map(self.capacity_sectors, offset, len_bytes, extents)
    }

    fn discard_granularity_bytes(&self) -> u64 {
        self.discard_granularity_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len_bytes: u64) -> tempfile::NamedTempFile {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(len_bytes).unwrap();
        tmp
    }

    #[test]
    fn capacity_is_whole_sectors() {
        let tmp = image(1 << 20);
        let raw = RawImage::open(tmp.path(), OpenOptions::default()).unwrap();
        assert_eq!(raw.capacity_sectors(), 2048);
        let tmp = image((1 << 20) + 100);
        let raw = RawImage::open(tmp.path(), OpenOptions::default()).unwrap();
        assert_eq!(raw.capacity_sectors(), 2048);
        assert!(raw.discard_granularity_bytes().is_power_of_two());
        assert!(raw.discard_granularity_bytes() >= 512);
    }

    #[test]
    fn map_is_the_identity() {
        let tmp = image(1 << 20);
        let raw = RawImage::open(tmp.path(), OpenOptions::default()).unwrap();
        let mut extents = Vec::new();
        raw.map(Access::Write, 4096, 8192, &mut extents).unwrap();
        raw.map(Access::Read, (1 << 20) - 512, 512, &mut extents)
            .unwrap();
        assert_eq!(
            extents,
            [
                Extent::Data {
                    file: 0,
                    offset: 4096,
                    len_bytes: 8192
                },
                Extent::Data {
                    file: 0,
                    offset: (1 << 20) - 512,
                    len_bytes: 512
                }
            ]
        );
        assert!(raw.map(Access::Read, 1 << 20, 512, &mut extents).is_err());
        assert!(raw.map(Access::Read, u64::MAX, 2, &mut extents).is_err());
    }

    #[test]
    fn readonly_opens_the_file_readonly() {
        let tmp = image(4096);
        let readonly = OpenOptions {
            readonly: true,
            ..OpenOptions::default()
        };
        let raw = RawImage::open(tmp.path(), readonly).unwrap();
        assert!((&raw.files()[0].file).write_all(b"x").is_err());
        assert!(raw.files()[0].buffered.is_none());
    }

    #[test]
    fn direct_opens_both_ways_and_knows_the_alignment() {
        let tmp = image(1 << 20);
        let direct = OpenOptions {
            direct: true,
            ..OpenOptions::default()
        };
        let raw = RawImage::open(tmp.path(), direct).unwrap();
        let host = &raw.files()[0];
        let flags = |file: &File| {
            // SAFETY: F_GETFL on an open descriptor reads its flags only.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) }
        };
        assert_ne!(flags(&host.file) & libc::O_DIRECT, 0);
        assert_eq!(flags(host.buffered.as_ref().unwrap()) & libc::O_DIRECT, 0);
        let dio = host.dio.unwrap();
        assert!(dio.mem_bytes.is_power_of_two() && dio.offset_bytes.is_power_of_two());
    }
}
