//! The engine operations of one request: how a parsed request becomes
//! operations on host file extents with iovecs into guest memory
//! ([`build_ops`]), and what follows each completion ([`next_step`]): done,
//! failed, or resubmitted (short transfers, O_DIRECT refusals, file systems
//! without FALLOC_FL_ZERO_RANGE).

use vm_memory::{Address, Bytes, GuestMemory, Permissions};

use super::GuestRam;
use crate::counters::{inc, QueueCounters};
use crate::engine::{EngineOp, FallocateMode, FileSlot, IoVec};
use crate::image::{Access, DioAlignment, Extent, FileIndex, ImageError, ImageFormat};
use crate::request::{BlkRequest, DataSegment, RequestType, SECTOR_SHIFT};

/// Linux's IOV_MAX: one readv/writev takes at most this many buffers.
const IOV_MAX: usize = 1024;

/// Engine file slots: host file `i` is slot `2i`, and `2i + 1` is its
/// page-cache twin under `--direct` (the same file otherwise).
pub(super) fn primary_slot(file: FileIndex) -> FileSlot {
    2 * file
}

/// Why a request could not be turned into engine operations.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("cannot map the request onto the image")]
    Map(#[source] ImageError),
    #[error("cannot write the image's metadata before a flush")]
    FlushMetadata(#[source] ImageError),
    #[error("a guest buffer at {0:#x} is no longer in guest memory")]
    GuestMemory(u64),
    #[error("{0} buffers, more than the {IOV_MAX} one readv/writev takes")]
    TooManyBuffers(usize),
    #[error("the image format mapped {mapped} of {len_bytes} bytes, or a hole for a write")]
    BadMapping { mapped: u64, len_bytes: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OpKind {
    Read,
    Write,
    Datasync,
    /// DISCARD: punch a hole; file systems without holes ignore it.
    Discard,
    /// WRITE_ZEROES without UNMAP.
    ZeroRange,
    /// WRITE_ZEROES without UNMAP where ZERO_RANGE is missing: punch, then
    /// allocate.
    PunchThenAllocate,
    Allocate,
    /// WRITE_ZEROES with UNMAP.
    PunchHole,
}

/// One engine operation of a request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Op {
    pub(super) kind: OpKind,
    pub(super) file: FileSlot,
    /// Under `--direct`: `file` is the O_DIRECT descriptor and `file + 1`
    /// the page-cache one, to retry on when O_DIRECT refuses the request.
    pub(super) may_fall_back: bool,
    pub(super) offset: u64,
    /// Still to transfer (read/write) or the range (fallocate).
    pub(super) len_bytes: u64,
    /// The op's buffers: `iovecs[iov_start..iov_end]` of its slot.
    pub(super) iov_start: usize,
    pub(super) iov_end: usize,
}

impl Op {
    pub(super) fn engine_op<'a>(&self, iovecs: &'a [IoVec]) -> EngineOp<'a> {
        let fallocate = |mode| EngineOp::Fallocate {
            file: self.file,
            offset: self.offset,
            len_bytes: self.len_bytes,
            mode,
        };
        match self.kind {
            OpKind::Read => EngineOp::Readv {
                file: self.file,
                offset: self.offset,
                iovecs: &iovecs[self.iov_start..self.iov_end],
            },
            OpKind::Write => EngineOp::Writev {
                file: self.file,
                offset: self.offset,
                iovecs: &iovecs[self.iov_start..self.iov_end],
            },
            OpKind::Datasync => EngineOp::Datasync { file: self.file },
            OpKind::Discard | OpKind::PunchHole | OpKind::PunchThenAllocate => {
                fallocate(FallocateMode::PunchHole)
            }
            OpKind::ZeroRange => fallocate(FallocateMode::ZeroRange),
            OpKind::Allocate => fallocate(FallocateMode::Allocate),
        }
    }
}

/// What to do after an operation completed.
pub(super) enum Next {
    Done,
    Failed(i32),
    Resubmit,
}

/// What building ops needs besides the request.
pub(super) struct OpContext<'a> {
    pub image: &'a dyn ImageFormat,
    /// Per host file: the O_DIRECT alignment under `--direct`.
    pub dio: &'a [Option<DioAlignment>],
    pub counters: &'a QueueCounters,
    /// WRITE_ZEROES goes straight to punch hole + allocate.
    pub zero_range_unsupported: bool,
}

/// Turns a parsed request into engine ops on `iovecs` (none for empty
/// requests, GET_ID, and reads of holes only). Returns how many bytes the
/// device writes into the chain's buffers (reads only).
pub(super) fn build_ops(
    ctx: &OpContext<'_>,
    request: &BlkRequest,
    mem: &GuestRam,
    extents: &mut Vec<Extent>,
    iovecs: &mut Vec<IoVec>,
    ops: &mut Vec<Op>,
) -> Result<u32, OpError> {
    iovecs.clear();
    ops.clear();
    let mut data_written = 0;
    let image = ctx.image;
    match request.request_type {
        RequestType::In | RequestType::Out => {
            let reading = request.request_type == RequestType::In;
            let len_bytes = request.data_len_bytes;
            if len_bytes == 0 {
                return Ok(0);
            }
            let offset = request.sector << SECTOR_SHIFT;
            extents.clear();
            let access = if reading { Access::Read } else { Access::Write };
            image
                .map(access, offset, len_bytes, extents)
                .map_err(OpError::Map)?;
            let perm = if reading {
                Permissions::Write
            } else {
                Permissions::Read
            };
            for segment in &request.data {
                let slices = mem
                    .get_slices(segment.addr, segment.len_bytes as usize, perm)
                    .map_err(|_| OpError::GuestMemory(segment.addr.0))?;
                for slice in slices {
                    let slice = slice.map_err(|_| OpError::GuestMemory(segment.addr.0))?;
                    iovecs.push(IoVec::new(slice.ptr_guard_mut().as_ptr(), slice.len()));
                }
            }
            let all = iovecs.len();
            let single = extents.len() == 1;
            let mut pos = 0;
            for extent in extents.iter() {
                match *extent {
                    Extent::Data {
                        file,
                        offset,
                        len_bytes,
                    } => {
                        let (iov_start, iov_end) = if single {
                            (0, all)
                        } else {
                            let start = iovecs.len();
                            push_subrange(iovecs, all, pos, len_bytes);
                            (start, iovecs.len())
                        };
                        if iov_end - iov_start > IOV_MAX {
                            return Err(OpError::TooManyBuffers(iov_end - iov_start));
                        }
                        let dio = ctx.dio.get(file as usize).copied().flatten();
                        let direct_ok = dio.is_none_or(|dio| {
                            direct_aligned(dio, offset, &iovecs[iov_start..iov_end])
                        });
                        if !direct_ok {
                            inc(&ctx.counters.direct_fallbacks);
                        }
                        ops.push(Op {
                            kind: if reading { OpKind::Read } else { OpKind::Write },
                            file: primary_slot(file) + u32::from(!direct_ok),
                            may_fall_back: dio.is_some() && direct_ok,
                            offset,
                            len_bytes,
                            iov_start,
                            iov_end,
                        });
                    }
                    Extent::Zero { len_bytes } if reading => {
                        zero_guest(mem, &request.data, pos, len_bytes)?;
                    }
                    Extent::Zero { .. } => {
                        return Err(OpError::BadMapping {
                            mapped: pos,
                            len_bytes,
                        })
                    }
                }
                pos += extent.len_bytes();
            }
            if pos != len_bytes {
                return Err(OpError::BadMapping {
                    mapped: pos,
                    len_bytes,
                });
            }
            if reading {
                // The chain's total length is below 4 GiB (virtio-queue
                // stops iterating at 2^32 bytes).
                data_written = len_bytes as u32;
            }
        }
        RequestType::Flush => {
            image.flush_metadata().map_err(OpError::FlushMetadata)?;
            for file in 0..image.files().len() as FileIndex {
                ops.push(Op {
                    kind: OpKind::Datasync,
                    file: primary_slot(file),
                    may_fall_back: false,
                    offset: 0,
                    len_bytes: 0,
                    iov_start: 0,
                    iov_end: 0,
                });
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            let discard = request.request_type == RequestType::Discard;
            for segment in &request.segments {
                let len_bytes = u64::from(segment.num_sectors) << SECTOR_SHIFT;
                if len_bytes == 0 {
                    continue;
                }
                let (access, kind) = if discard {
                    (Access::Discard, OpKind::Discard)
                } else if segment.unmap {
                    (Access::WriteZeroes { unmap: true }, OpKind::PunchHole)
                } else if ctx.zero_range_unsupported {
                    (
                        Access::WriteZeroes { unmap: false },
                        OpKind::PunchThenAllocate,
                    )
                } else {
                    (Access::WriteZeroes { unmap: false }, OpKind::ZeroRange)
                };
                extents.clear();
                image
                    .map(access, segment.sector << SECTOR_SHIFT, len_bytes, extents)
                    .map_err(OpError::Map)?;
                for extent in extents.iter() {
                    // Holes already read as zeroes.
                    if let Extent::Data {
                        file,
                        offset,
                        len_bytes,
                    } = *extent
                    {
                        ops.push(Op {
                            kind,
                            file: primary_slot(file),
                            may_fall_back: false,
                            offset,
                            len_bytes,
                            iov_start: 0,
                            iov_end: 0,
                        });
                    }
                }
            }
        }
        RequestType::GetId => {}
    }
    Ok(data_written)
}

/// Decides what follows the completion of `op` with `result` (`-errno` or
/// bytes).
pub(super) fn next_step(
    op: &mut Op,
    result: i32,
    iovecs: &mut [IoVec],
    zero_range_unsupported: &mut bool,
    counters: &QueueCounters,
) -> Next {
    let errno = if result < 0 { -result } else { 0 };
    if errno == libc::EINTR || errno == libc::EAGAIN {
        return Next::Resubmit;
    }
    match op.kind {
        OpKind::Read | OpKind::Write => {
            if errno == libc::EINVAL && op.may_fall_back {
                // O_DIRECT refused what statx said it takes: page cache.
                op.file += 1;
                op.may_fall_back = false;
                inc(&counters.direct_fallbacks);
                return Next::Resubmit;
            }
            if errno != 0 {
                return Next::Failed(errno);
            }
            let done = result as u64;
            if done >= op.len_bytes {
                return Next::Done;
            }
            if done == 0 {
                // End of file inside the image: it shrank under us.
                return Next::Failed(libc::EIO);
            }
            // Short transfer: go on from where it stopped.
            op.offset += done;
            op.len_bytes -= done;
            let mut left = done as usize;
            while left > 0 && op.iov_start < op.iov_end {
                let iov = &mut iovecs[op.iov_start];
                if iov.len_bytes() <= left {
                    left -= iov.len_bytes();
                    op.iov_start += 1;
                } else {
                    iov.advance(left);
                    left = 0;
                }
            }
            Next::Resubmit
        }
        OpKind::Discard if errno == libc::EOPNOTSUPP => Next::Done,
        OpKind::ZeroRange if errno == libc::EOPNOTSUPP => {
            *zero_range_unsupported = true;
            inc(&counters.zero_range_fallbacks);
            op.kind = OpKind::PunchThenAllocate;
            Next::Resubmit
        }
        OpKind::PunchHole if errno == libc::EOPNOTSUPP => {
            op.kind = OpKind::ZeroRange;
            Next::Resubmit
        }
        OpKind::PunchThenAllocate if errno == 0 => {
            op.kind = OpKind::Allocate;
            Next::Resubmit
        }
        // The hole reads as zeroes already; allocation is a nicety.
        OpKind::Allocate if errno == libc::EOPNOTSUPP => Next::Done,
        _ if errno != 0 => Next::Failed(errno),
        _ => Next::Done,
    }
}

/// Appends the iovecs covering bytes `[start, start + len_bytes)` of the
/// first `all` entries.
fn push_subrange(iovecs: &mut Vec<IoVec>, all: usize, start: u64, len_bytes: u64) {
    let mut skip = start as usize;
    let mut left = len_bytes as usize;
    for index in 0..all {
        if left == 0 {
            break;
        }
        let mut piece = iovecs[index];
        if skip >= piece.len_bytes() {
            skip -= piece.len_bytes();
            continue;
        }
        piece.advance(skip);
        skip = 0;
        let take = piece.len_bytes().min(left);
        iovecs.push(IoVec::new(piece.base(), take));
        left -= take;
    }
}

/// Whether O_DIRECT takes this transfer: offset and every length aligned to
/// the offset alignment, every buffer address to the memory alignment.
fn direct_aligned(dio: DioAlignment, offset: u64, iovecs: &[IoVec]) -> bool {
    let offset_align = u64::from(dio.offset_bytes.max(1));
    let mem_align = dio.mem_bytes.max(1) as usize;
    offset % offset_align == 0
        && iovecs.iter().all(|iov| {
            (iov.base() as usize) % mem_align == 0 && iov.len_bytes() as u64 % offset_align == 0
        })
}

/// Writes zeroes to bytes `[start, start + len_bytes)` of the request's data
/// buffers (a read of a hole).
fn zero_guest(
    mem: &GuestRam,
    data: &[DataSegment],
    start: u64,
    len_bytes: u64,
) -> Result<(), OpError> {
    const ZEROES: [u8; 4096] = [0; 4096];
    let mut skip = start;
    let mut left = len_bytes;
    for segment in data {
        let seg_len = u64::from(segment.len_bytes);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let mut addr = segment.addr.unchecked_add(skip);
        let mut here = (seg_len - skip).min(left);
        skip = 0;
        left -= here;
        while here > 0 {
            let chunk = here.min(ZEROES.len() as u64);
            mem.write_slice(&ZEROES[..chunk as usize], addr)
                .map_err(|_| OpError::GuestMemory(addr.0))?;
            addr = addr.unchecked_add(chunk);
            here -= chunk;
        }
        if left == 0 {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subranges_split_buffers() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        let mut iovecs = vec![
            IoVec::new(a.as_mut_ptr(), 100),
            IoVec::new(b.as_mut_ptr(), 50),
        ];
        push_subrange(&mut iovecs, 2, 90, 30);
        assert_eq!(iovecs.len(), 4);
        assert_eq!(
            (iovecs[2].base(), iovecs[2].len_bytes()),
            (a[90..].as_mut_ptr(), 10)
        );
        assert_eq!(
            (iovecs[3].base(), iovecs[3].len_bytes()),
            (b.as_mut_ptr(), 20)
        );
    }

    #[test]
    fn o_direct_alignment() {
        let dio = DioAlignment {
            mem_bytes: 512,
            offset_bytes: 4096,
        };
        let mut buf = vec![0u8; 3 * 4096];
        let base = buf
            .as_mut_ptr()
            .wrapping_add(buf.as_ptr().align_offset(4096));
        let aligned = [IoVec::new(base, 4096)];
        assert!(direct_aligned(dio, 8192, &aligned));
        assert!(!direct_aligned(dio, 512, &aligned), "offset");
        assert!(!direct_aligned(dio, 0, &[IoVec::new(base, 512)]), "length");
        assert!(
            !direct_aligned(dio, 0, &[IoVec::new(base.wrapping_add(1), 4096)]),
            "address"
        );
        assert!(direct_aligned(
            dio,
            0,
            &[IoVec::new(base.wrapping_add(512), 4096)]
        ));
    }
}
