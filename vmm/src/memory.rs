//! Guest RAM: one memfd, mapped MAP_SHARED, split around the 32-bit MMIO hole.
//!
//! The memfd is what the vhost-user backends will map (its fd goes into
//! VHOST_USER_SET_MEM_TABLE), so guest RAM is never anonymous memory. The
//! file is sealed against growing and shrinking: a peer that receives the fd
//! cannot change the size under the guest.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::boot::layout::{HIMEM_START, MMIO_HOLE_START, RAM_ABOVE_HOLE_START};

/// Smallest guest RAM ringvm accepts: the boot structures live below 1 MiB
/// and a kernel needs at least some room above it.
pub const MIN_RAM_BYTES: u64 = 2 * HIMEM_START.0;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--memory {0} bytes is below the minimum of {MIN_RAM_BYTES} bytes (2M)")]
    TooSmall(u64),
    #[error("--memory {0} bytes does not fit in this host's address space")]
    TooLarge(u64),
    #[error("memfd_create for guest RAM failed")]
    MemfdCreate(#[source] std::io::Error),
    #[error("sizing the guest RAM memfd to {size_bytes} bytes failed")]
    MemfdResize {
        size_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("sealing the guest RAM memfd failed")]
    MemfdSeal(#[source] std::io::Error),
    #[error("mapping guest RAM failed")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// One contiguous piece of guest RAM and where it lives in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub guest_addr: GuestAddress,
    pub len_bytes: u64,
    pub memfd_offset: u64,
}

/// Guest RAM backed by a sealed memfd.
pub struct GuestRam {
    memfd: File,
    memory: GuestMemoryMmap,
    ranges: Vec<RamRange>,
    size_bytes: u64,
}

impl GuestRam {
    /// Creates `size_bytes` of guest RAM (a multiple of 4 KiB is expected;
    /// the size is rounded up to one).
    pub fn new(size_bytes: u64) -> Result<Self, MemoryError> {
        if size_bytes < MIN_RAM_BYTES {
            return Err(MemoryError::TooSmall(size_bytes));
        }
        let size_bytes = size_bytes
            .checked_next_multiple_of(4096)
            .ok_or(MemoryError::TooLarge(size_bytes))?;
        let ranges = ram_ranges(size_bytes);
        let memfd = create_memfd(size_bytes)?;
        let mut mappings = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let len =
                usize::try_from(r.len_bytes).map_err(|_| MemoryError::TooLarge(size_bytes))?;
            let file = memfd.try_clone().map_err(MemoryError::MemfdCreate)?;
            mappings.push((
                r.guest_addr,
                len,
                Some(FileOffset::new(file, r.memfd_offset)),
            ));
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(mappings).map_err(MemoryError::Map)?;
        Ok(Self {
            memfd,
            memory,
            ranges,
            size_bytes,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The memfd behind all ranges (for the vhost-user memory table).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// End (exclusive) of the RAM below the MMIO hole.
    pub fn low_ram_end(&self) -> GuestAddress {
        let first = self.ranges[0];
        GuestAddress(first.guest_addr.0 + first.len_bytes)
    }
}

/// Splits `size_bytes` of RAM around the 32-bit MMIO hole.
pub fn ram_ranges(size_bytes: u64) -> Vec<RamRange> {
    let low_max = MMIO_HOLE_START.0;
    if size_bytes <= low_max {
        return vec![RamRange {
            guest_addr: GuestAddress(0),
            len_bytes: size_bytes,
            memfd_offset: 0,
        }];
    }
    vec![
        RamRange {
            guest_addr: GuestAddress(0),
            len_bytes: low_max,
            memfd_offset: 0,
        },
        RamRange {
            guest_addr: RAM_ABOVE_HOLE_START,
            len_bytes: size_bytes - low_max,
            memfd_offset: low_max,
        },
    ]
}

fn create_memfd(size_bytes: u64) -> Result<File, MemoryError> {
    const NAME: &CStr = c"ringvm-guest-ram";
    // SAFETY: NAME is a valid NUL-terminated string; the flags are valid
    // memfd_create flags. The returned fd is checked before use.
    let fd =
        unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::MemfdCreate(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size_bytes)
        .map_err(|source| MemoryError::MemfdResize { size_bytes, source })?;
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd we own, with valid seal flags; no memory is passed.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    };
    if rc < 0 {
        return Err(MemoryError::MemfdSeal(std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_ram_is_one_range() {
        let r = ram_ranges(512 << 20);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].len_bytes, 512 << 20);
    }

    #[test]
    fn large_ram_is_split_around_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].guest_addr, GuestAddress(0));
        assert_eq!(r[0].len_bytes, MMIO_HOLE_START.0);
        assert_eq!(r[1].guest_addr, RAM_ABOVE_HOLE_START);
        assert_eq!(r[1].len_bytes, (4 << 30) - MMIO_HOLE_START.0);
        assert_eq!(r[1].memfd_offset, MMIO_HOLE_START.0);
    }

    #[test]
    fn ram_is_shared_through_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory().num_regions(), 1);
    }

    #[test]
    fn memfd_cannot_be_resized_by_a_peer() {
        let ram = GuestRam::new(4 << 20).unwrap();
        assert!(ram.memfd().set_len(1 << 20).is_err());
        assert!(ram.memfd().set_len(8 << 20).is_err());
    }

    #[test]
    fn too_small_is_refused() {
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
    }
}
