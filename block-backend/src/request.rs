//! Descriptor chain -> [`BlkRequest`]: the one place that reads the layout of
//! a virtio-blk request (virtio 1.2, 5.2.6) out of guest memory.
//!
//! [`parse_request`] is pure: it reads the chain's descriptors, the 16-byte
//! header and the discard/write-zeroes segments through the chain's own
//! `GuestMemory`, and checks every buffer against that memory, but it never
//! touches the image and never writes guest memory. It classifies every bad
//! request as a [`RequestError`] and says whether a status byte can be
//! written for it, so the caller answers every chain, fatal for nobody.
//!
//! The layout is not taken from descriptor boundaries (VIRTIO_F_VERSION_1
//! implies any layout): the device-readable descriptors form one byte stream
//! (header, then OUT data or discard segments), the device-writable ones
//! another (IN data or the id, then the status byte, which is the last byte
//! of the last device-writable descriptor).

use std::mem::size_of;
use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

/// virtio-blk addresses the disk in 512-byte sectors (virtio 1.2, 5.2.6).
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_BYTES: u64 = 1 << SECTOR_SHIFT;
const HEADER_BYTES: u64 = size_of::<virtio_blk_outhdr>() as u64;
const SEGMENT_BYTES: u64 = size_of::<virtio_blk_discard_write_zeroes>() as u64;

/// The request types this device serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequestType {
    #[default]
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// A guest buffer of IN/OUT data or of the GET_ID answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataSegment {
    pub addr: GuestAddress,
    pub len_bytes: u32,
}

/// One range of a DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroingSegment {
    pub sector: u64,
    pub num_sectors: u32,
    /// WRITE_ZEROES may deallocate the range (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub unmap: bool,
}

/// What the device promised in its config space; every request is checked
/// against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    pub capacity_sectors: u64,
    pub seg_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub readonly: bool,
}

/// A parsed request. Its vectors are reused from one request to the next,
/// so parsing allocates nothing once they have grown to the guest's sizes.
#[derive(Clone, Debug, Default)]
pub struct BlkRequest {
    pub request_type: RequestType,
    /// First sector of IN/OUT (zero for the other types).
    pub sector: u64,
    /// IN/OUT data, or the GET_ID buffer.
    pub data: Vec<DataSegment>,
    pub data_len_bytes: u64,
    /// DISCARD/WRITE_ZEROES ranges.
    pub segments: Vec<ZeroingSegment>,
    /// The status byte: the last byte of the last device-writable descriptor.
    pub status_addr: GuestAddress,
    descriptors: Vec<ChainDescriptor>,
}

#[derive(Clone, Copy, Debug)]
struct ChainDescriptor {
    addr: GuestAddress,
    len_bytes: u32,
    writable: bool,
}

/// Why a chain is not a request this device can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    #[error("the status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
    #[error("the chain has {0} device-readable bytes, fewer than the 16-byte header")]
    NoHeader(u64),
    #[error("{0}")]
    WrongDirection(&'static str),
    #[error("data length {0} is not a multiple of 512 bytes")]
    UnalignedLength(u64),
    #[error(
        "sectors {sector}..+{len_sectors} reach past the capacity of {capacity_sectors} sectors"
    )]
    OutOfRange {
        sector: u64,
        len_sectors: u64,
        capacity_sectors: u64,
    },
    #[error("sector {sector} plus {len_bytes} bytes overflows a 64-bit byte offset")]
    RangeOverflow { sector: u64, len_bytes: u64 },
    #[error("a segment list of {0} bytes is not a positive multiple of 16")]
    BadSegmentList(u64),
    #[error("{count} segments, more than the {max} the device offers")]
    TooManySegments { count: u64, max: u32 },
    #[error("a segment of {num_sectors} sectors, more than the {max} the device offers")]
    SegmentTooLarge { num_sectors: u32, max: u32 },
    #[error("segment flags {0:#x} set reserved bits")]
    ReservedFlags(u32),
    #[error("buffer {addr:#x}+{len_bytes} is outside guest memory")]
    OutsideMemory { addr: u64, len_bytes: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
}

/// The kinds of [`RequestError`], for counters and rate-limited logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRequestKind {
    NoStatus,
    NoHeader,
    WrongDirection,
    UnalignedLength,
    OutOfRange,
    BadSegments,
    ReservedFlags,
    OutsideMemory,
    ReadOnly,
    Unsupported,
}

impl BadRequestKind {
    pub const ALL: [BadRequestKind; 10] = [
        BadRequestKind::NoStatus,
        BadRequestKind::NoHeader,
        BadRequestKind::WrongDirection,
        BadRequestKind::UnalignedLength,
        BadRequestKind::OutOfRange,
        BadRequestKind::BadSegments,
        BadRequestKind::ReservedFlags,
        BadRequestKind::OutsideMemory,
        BadRequestKind::ReadOnly,
        BadRequestKind::Unsupported,
    ];

    /// The counter name.
    pub fn name(self) -> &'static str {
        match self {
            BadRequestKind::NoStatus => "bad_no_status",
            BadRequestKind::NoHeader => "bad_no_header",
            BadRequestKind::WrongDirection => "bad_direction",
            BadRequestKind::UnalignedLength => "bad_length",
            BadRequestKind::OutOfRange => "bad_range",
            BadRequestKind::BadSegments => "bad_segments",
            BadRequestKind::ReservedFlags => "bad_flags",
            BadRequestKind::OutsideMemory => "bad_memory",
            BadRequestKind::ReadOnly => "readonly_writes",
            BadRequestKind::Unsupported => "unsupported",
        }
    }
}

impl RequestError {
    /// The virtio status the guest gets when the status byte can be written.
    pub fn status(&self) -> u8 {
        let status = match self {
            RequestError::Unsupported(_) | RequestError::ReservedFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }

    pub fn kind(&self) -> BadRequestKind {
        match self {
            RequestError::NoStatus => BadRequestKind::NoStatus,
            RequestError::StatusOutsideMemory(_) | RequestError::OutsideMemory { .. } => {
                BadRequestKind::OutsideMemory
            }
            RequestError::NoHeader(_) => BadRequestKind::NoHeader,
            RequestError::WrongDirection(_) => BadRequestKind::WrongDirection,
            RequestError::UnalignedLength(_) => BadRequestKind::UnalignedLength,
            RequestError::OutOfRange { .. } | RequestError::RangeOverflow { .. } => {
                BadRequestKind::OutOfRange
            }
            RequestError::BadSegmentList(_)
            | RequestError::TooManySegments { .. }
            | RequestError::SegmentTooLarge { .. } => BadRequestKind::BadSegments,
            RequestError::ReservedFlags(_) => BadRequestKind::ReservedFlags,
            RequestError::ReadOnly => BadRequestKind::ReadOnly,
            RequestError::Unsupported(_) => BadRequestKind::Unsupported,
        }
    }
}

/// A chain that is not a servable request, and where its status byte is.
/// Without a status address the chain goes back to the guest unused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadRequest {
    pub error: RequestError,
    pub status_addr: Option<GuestAddress>,
}

/// Parses `chain` into `req` (whose vectors are reused), checking it against
/// `limits` and the chain's guest memory.
pub fn parse_request<M>(
    chain: DescriptorChain<M>,
    limits: &RequestLimits,
    req: &mut BlkRequest,
) -> Result<(), BadRequest>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    req.request_type = RequestType::In;
    req.sector = 0;
    req.data.clear();
    req.data_len_bytes = 0;
    req.segments.clear();
    req.descriptors.clear();

    let mem = chain.memory();
    // The leading device-readable descriptors; all the others must be
    // device-writable.
    let mut readable = 0;
    let mut seen_writable = false;
    let mut readable_after_writable = false;
    for desc in chain.clone() {
        if desc.len() == 0 {
            continue;
        }
        let writable = desc.is_write_only();
        if writable {
            seen_writable = true;
        } else if seen_writable {
            readable_after_writable = true;
        } else {
            readable += 1;
        }
        req.descriptors.push(ChainDescriptor {
            addr: desc.addr(),
            len_bytes: desc.len(),
            writable,
        });
    }

    let no_status = |error| BadRequest {
        error,
        status_addr: None,
    };
    let last_writable = req
        .descriptors
        .iter()
        .rev()
        .find(|desc| desc.writable)
        .ok_or(no_status(RequestError::NoStatus))?;
    let status_addr = last_writable
        .addr
        .checked_add(u64::from(last_writable.len_bytes) - 1)
        .filter(|addr| mem.check_range(*addr, 1, Permissions::Write))
        .ok_or(no_status(RequestError::StatusOutsideMemory(
            last_writable
                .addr
                .0
                .wrapping_add(u64::from(last_writable.len_bytes) - 1),
        )))?;
    req.status_addr = status_addr;
    let bad = |error| BadRequest {
        error,
        status_addr: Some(status_addr),
    };

    if readable_after_writable {
        return Err(bad(RequestError::WrongDirection(
            "a device-readable descriptor follows a device-writable one",
        )));
    }
    let (out, into) = req.descriptors.split_at(readable);
    let out_bytes = stream_len(out);
    let in_bytes = stream_len(into);
    if out_bytes < HEADER_BYTES {
        return Err(bad(RequestError::NoHeader(out_bytes)));
    }
    let mut header = [0u8; HEADER_BYTES as usize];
    read_stream(mem, out, 0, &mut header).map_err(bad)?;
    let request_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let out_data_bytes = out_bytes - HEADER_BYTES;
    // The status byte is the last device-writable byte; the rest is data.
    let in_data_bytes = in_bytes - 1;

    match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (reading, skip, len_bytes, perm) = if request_type == VIRTIO_BLK_T_IN {
                if out_data_bytes != 0 {
                    return Err(bad(RequestError::WrongDirection(
                        "a read request carries device-readable data",
                    )));
                }
                (into, 0, in_data_bytes, Permissions::Write)
            } else {
                if in_data_bytes != 0 {
                    return Err(bad(RequestError::WrongDirection(
                        "a write request carries device-writable data",
                    )));
                }
                if limits.readonly {
                    return Err(bad(RequestError::ReadOnly));
                }
                (out, HEADER_BYTES, out_data_bytes, Permissions::Read)
            };
            if len_bytes % SECTOR_BYTES != 0 {
                return Err(bad(RequestError::UnalignedLength(len_bytes)));
            }
            check_sectors(sector, len_bytes, limits.capacity_sectors).map_err(bad)?;
            collect_data(mem, reading, skip, len_bytes, perm, &mut req.data).map_err(bad)?;
            if req.data.len() as u64 > u64::from(limits.seg_max) {
                return Err(bad(RequestError::TooManySegments {
                    count: req.data.len() as u64,
                    max: limits.seg_max,
                }));
            }
            req.request_type = if request_type == VIRTIO_BLK_T_IN {
                RequestType::In
            } else {
                RequestType::Out
            };
            req.sector = sector;
            req.data_len_bytes = len_bytes;
        }
        VIRTIO_BLK_T_FLUSH => {
            // A flush carries no data; anything else in the chain is ignored
            // (and the used length says that only the status was written).
            req.request_type = RequestType::Flush;
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_data_bytes != 0 {
                return Err(bad(RequestError::WrongDirection(
                    "a get-id request carries device-readable data",
                )));
            }
            collect_data(
                mem,
                into,
                0,
                in_data_bytes,
                Permissions::Write,
                &mut req.data,
            )
            .map_err(bad)?;
            req.request_type = RequestType::GetId;
            req.data_len_bytes = in_data_bytes;
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            if in_data_bytes != 0 {
                return Err(bad(RequestError::WrongDirection(
                    "a discard or write-zeroes request carries device-writable data",
                )));
            }
            if limits.readonly {
                return Err(bad(RequestError::ReadOnly));
            }
            if out_data_bytes == 0 || out_data_bytes % SEGMENT_BYTES != 0 {
                return Err(bad(RequestError::BadSegmentList(out_data_bytes)));
            }
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let count = out_data_bytes / SEGMENT_BYTES;
            if count > u64::from(max_seg) {
                return Err(bad(RequestError::TooManySegments {
                    count,
                    max: max_seg,
                }));
            }
            // Reserved flag bits are UNSUPP (virtio 1.2, 5.2.6.2); so is
            // UNMAP on a discard, where the flag is not defined.
            let allowed_flags = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            for index in 0..count {
                let mut raw = [0u8; SEGMENT_BYTES as usize];
                read_stream(mem, out, HEADER_BYTES + index * SEGMENT_BYTES, &mut raw)
                    .map_err(bad)?;
                let segment_sector = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
                let num_sectors = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
                if flags & !allowed_flags != 0 {
                    return Err(bad(RequestError::ReservedFlags(flags)));
                }
                if num_sectors > max_sectors {
                    return Err(bad(RequestError::SegmentTooLarge {
                        num_sectors,
                        max: max_sectors,
                    }));
                }
                check_sectors(
                    segment_sector,
                    u64::from(num_sectors) << SECTOR_SHIFT,
                    limits.capacity_sectors,
                )
                .map_err(bad)?;
                req.segments.push(ZeroingSegment {
                    sector: segment_sector,
                    num_sectors,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
            req.request_type = if discard {
                RequestType::Discard
            } else {
                RequestType::WriteZeroes
            };
        }
        other => return Err(bad(RequestError::Unsupported(other))),
    }
    Ok(())
}

fn stream_len(descriptors: &[ChainDescriptor]) -> u64 {
    descriptors.iter().map(|d| u64::from(d.len_bytes)).sum()
}

/// `[sector, sector + len_bytes)` must lie within the disk, in 64-bit bytes.
fn check_sectors(sector: u64, len_bytes: u64, capacity_sectors: u64) -> Result<(), RequestError> {
    let len_sectors = len_bytes >> SECTOR_SHIFT;
    let end = sector
        .checked_add(len_sectors)
        .filter(|end| end.checked_mul(SECTOR_BYTES).is_some())
        .ok_or(RequestError::RangeOverflow { sector, len_bytes })?;
    if end > capacity_sectors {
        return Err(RequestError::OutOfRange {
            sector,
            len_sectors,
            capacity_sectors,
        });
    }
    Ok(())
}

/// Visits the `len_bytes` bytes of a descriptor stream that follow its first
/// `skip` bytes, one contiguous guest range at a time.
fn for_each_range(
    descriptors: &[ChainDescriptor],
    mut skip: u64,
    mut len_bytes: u64,
    mut visit: impl FnMut(GuestAddress, u64) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    for desc in descriptors {
        if len_bytes == 0 {
            break;
        }
        let desc_len = u64::from(desc.len_bytes);
        if skip >= desc_len {
            skip -= desc_len;
            continue;
        }
        let take = (desc_len - skip).min(len_bytes);
        let addr = desc
            .addr
            .checked_add(skip)
            .ok_or(RequestError::OutsideMemory {
                addr: desc.addr.0,
                len_bytes: desc_len,
            })?;
        visit(addr, take)?;
        skip = 0;
        len_bytes -= take;
    }
    Ok(())
}

/// Reads `buf.len()` bytes of the device-readable stream from `offset` on
/// (the header and the discard segments: a few bytes, copied).
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: &[ChainDescriptor],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut filled = 0;
    for_each_range(descriptors, offset, buf.len() as u64, |addr, len| {
        let dst = &mut buf[filled..filled + len as usize];
        mem.read_slice(dst, addr)
            .map_err(|_| RequestError::OutsideMemory {
                addr: addr.0,
                len_bytes: len,
            })?;
        filled += len as usize;
        Ok(())
    })
}

/// Collects the data buffers, each checked to lie within guest memory.
fn collect_data<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: &[ChainDescriptor],
    skip: u64,
    len_bytes: u64,
    perm: Permissions,
    data: &mut Vec<DataSegment>,
) -> Result<(), RequestError> {
    for_each_range(descriptors, skip, len_bytes, |addr, len| {
        if !mem.check_range(addr, len as usize, perm) {
            return Err(RequestError::OutsideMemory {
                addr: addr.0,
                len_bytes: len,
            });
        }
        data.push(DataSegment {
            addr,
            // A range never exceeds its descriptor's u32 length.
            len_bytes: len as u32,
        });
        Ok(())
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;

    /// Rings at 0, buffers in [0x10_0000, 0x20_0000), a hole above, and a
    /// second region at [0x30_0000, 0x31_0000).
    pub(crate) fn memory() -> Mem {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
            (GuestAddress(0x30_0000), 0x1_0000),
        ])
        .unwrap()
    }

    pub(crate) const HDR: u64 = 0x10_0000;
    pub(crate) const DATA: u64 = 0x11_0000;
    pub(crate) const STATUS: u64 = 0x1f_0000;
    const HOLE: u64 = 0x28_0000;

    pub(crate) fn limits() -> RequestLimits {
        RequestLimits {
            capacity_sectors: 2048,
            seg_max: 4,
            max_discard_sectors: 1024,
            max_discard_seg: 2,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_seg: 2,
            readonly: false,
        }
    }

    pub(crate) fn readable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    pub(crate) fn writable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    pub(crate) fn write_header(mem: &Mem, at: u64, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(at)).unwrap();
    }

    pub(crate) fn write_segment(mem: &Mem, at: u64, sector: u64, num_sectors: u32, flags: u32) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    fn parse_with(
        mem: &Mem,
        descs: &[RawDescriptor],
        limits: &RequestLimits,
    ) -> Result<BlkRequest, BadRequest> {
        let queue = MockSplitQueue::new(mem, 16);
        let chain = queue.build_desc_chain(descs).unwrap();
        let mut req = BlkRequest::default();
        parse_request(chain, limits, &mut req).map(|()| req)
    }

    fn parse(mem: &Mem, descs: &[RawDescriptor]) -> Result<BlkRequest, BadRequest> {
        parse_with(mem, descs, &limits())
    }

    fn rejected(mem: &Mem, descs: &[RawDescriptor]) -> (RequestError, Option<u64>) {
        let bad = parse(mem, descs).unwrap_err();
        (bad.error, bad.status_addr.map(|a| a.0))
    }

    fn seg(addr: u64, len_bytes: u32) -> DataSegment {
        DataSegment {
            addr: GuestAddress(addr),
            len_bytes,
        }
    }

    #[test]
    fn read_with_two_data_buffers() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 7);
        let req = parse(
            &mem,
            &[
                readable(HDR, 16),
                writable(DATA, 512),
                writable(DATA + 0x1000, 1024),
                writable(STATUS, 1),
            ],
        )
        .unwrap();
        assert_eq!(req.request_type, RequestType::In);
        assert_eq!(req.sector, 7);
        assert_eq!(req.data, [seg(DATA, 512), seg(DATA + 0x1000, 1024)]);
        assert_eq!(req.data_len_bytes, 1536);
        assert_eq!(req.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn write_with_header_and_data_in_one_descriptor() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 2047);
        let req = parse(&mem, &[readable(HDR, 16 + 512), writable(STATUS, 1)]).unwrap();
        assert_eq!(req.request_type, RequestType::Out);
        assert_eq!(req.sector, 2047);
        assert_eq!(req.data, [seg(HDR + 16, 512)]);
    }

    #[test]
    fn header_split_across_descriptors() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
        let req = parse(
            &mem,
            &[
                readable(HDR, 4),
                readable(HDR + 4, 12),
                writable(DATA, 512),
                writable(STATUS, 1),
            ],
        )
        .unwrap();
        assert_eq!((req.request_type, req.sector), (RequestType::In, 3));
    }

    #[test]
    fn read_data_and_status_in_one_descriptor() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let req = parse(&mem, &[readable(HDR, 16), writable(DATA, 513)]).unwrap();
        assert_eq!(req.data, [seg(DATA, 512)]);
        assert_eq!(req.status_addr, GuestAddress(DATA + 512));
    }

    #[test]
    fn zero_length_descriptors_are_skipped() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let req = parse(
            &mem,
            &[
                readable(HDR, 16),
                writable(DATA, 0),
                writable(DATA, 512),
                writable(STATUS, 1),
            ],
        )
        .unwrap();
        assert_eq!(req.data, [seg(DATA, 512)]);
    }

    #[test]
    fn flush_and_get_id() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse(&mem, &[readable(HDR, 16), writable(STATUS, 1)]).unwrap();
        assert_eq!(req.request_type, RequestType::Flush);
        write_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse(
            &mem,
            &[readable(HDR, 16), writable(DATA, 20), writable(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(req.request_type, RequestType::GetId);
        assert_eq!(req.data, [seg(DATA, 20)]);
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        write_segment(&mem, HDR + 16, 8, 16, 0);
        write_segment(&mem, HDR + 32, 100, 1024, 0);
        let req = parse(&mem, &[readable(HDR, 48), writable(STATUS, 1)]).unwrap();
        assert_eq!(req.request_type, RequestType::Discard);
        assert_eq!(
            req.segments,
            [
                ZeroingSegment {
                    sector: 8,
                    num_sectors: 16,
                    unmap: false
                },
                ZeroingSegment {
                    sector: 100,
                    num_sectors: 1024,
                    unmap: false
                }
            ]
        );
        write_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segment(&mem, DATA, 2040, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let req = parse(
            &mem,
            &[readable(HDR, 16), readable(DATA, 16), writable(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(req.request_type, RequestType::WriteZeroes);
        assert_eq!(
            req.segments,
            [ZeroingSegment {
                sector: 2040,
                num_sectors: 8,
                unmap: true
            }]
        );
    }

    #[test]
    fn indirect_chain() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 5);
        let table = GuestAddress(0x8000);
        let entries = [
            SplitDescriptor::new(HDR, 16, 1, 1),
            SplitDescriptor::new(DATA, 4096, 1 | VRING_DESC_F_WRITE as u16, 2),
            SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, entry) in entries.iter().enumerate() {
            mem.write_obj(
                RawDescriptor::from(*entry),
                table.unchecked_add(16 * i as u64),
            )
            .unwrap();
        }
        let head = RawDescriptor::from(SplitDescriptor::new(
            table.0,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        let req = parse(&mem, &[head]).unwrap();
        assert_eq!(req.data, [seg(DATA, 4096)]);
        assert_eq!(req.status_addr, GuestAddress(STATUS));
    }

    #[test]
    fn chain_without_status_is_returned_unused() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            rejected(&mem, &[readable(HDR, 16), readable(DATA, 512)]),
            (RequestError::NoStatus, None)
        );
        assert_eq!(
            rejected(&mem, &[readable(HDR, 16), writable(STATUS, 0)]),
            (RequestError::NoStatus, None)
        );
    }

    #[test]
    fn status_outside_memory_is_returned_unused() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let (error, status) = rejected(&mem, &[readable(HDR, 16), writable(HOLE, 1)]);
        assert_eq!(
            (error.kind(), status),
            (BadRequestKind::OutsideMemory, None)
        );
        let (error, status) = rejected(&mem, &[readable(HDR, 16), writable(u64::MAX, 2)]);
        assert_eq!(
            (error.kind(), status),
            (BadRequestKind::OutsideMemory, None)
        );
    }

    #[test]
    fn chain_without_header_gets_ioerr() {
        let mem = memory();
        let (error, status) = rejected(&mem, &[readable(HDR, 8), writable(STATUS, 1)]);
        assert_eq!(error, RequestError::NoHeader(8));
        assert_eq!(status, Some(STATUS));
        assert_eq!(error.status(), VIRTIO_BLK_S_IOERR as u8);
        let (error, _) = rejected(&mem, &[writable(DATA, 512), writable(STATUS, 1)]);
        assert_eq!(error, RequestError::NoHeader(0));
    }

    #[test]
    fn header_outside_memory_gets_ioerr() {
        let mem = memory();
        let (error, status) = rejected(&mem, &[readable(HOLE, 16), writable(STATUS, 1)]);
        assert_eq!(error.kind(), BadRequestKind::OutsideMemory);
        assert_eq!(status, Some(STATUS));
    }

    #[test]
    fn wrong_direction_flags_get_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        // A read whose data buffer is device-readable.
        let (error, status) = rejected(
            &mem,
            &[readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)],
        );
        assert_eq!(error.kind(), BadRequestKind::WrongDirection);
        assert_eq!(status, Some(STATUS));
        // A write whose data buffer is device-writable.
        write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let (error, _) = rejected(
            &mem,
            &[readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)],
        );
        assert_eq!(error.kind(), BadRequestKind::WrongDirection);
        // A device-readable descriptor after a device-writable one.
        let (error, status) = rejected(
            &mem,
            &[
                readable(HDR, 16),
                writable(DATA, 512),
                readable(DATA + 512, 512),
                writable(STATUS, 1),
            ],
        );
        assert_eq!(error.kind(), BadRequestKind::WrongDirection);
        assert_eq!(status, Some(STATUS));
        // Same, with the readable one last.
        let (error, status) = rejected(
            &mem,
            &[readable(HDR, 16), writable(STATUS, 1), readable(DATA, 512)],
        );
        assert_eq!(error.kind(), BadRequestKind::WrongDirection);
        assert_eq!(status, Some(STATUS));
        // Get-id with device-readable data, discard with device-writable data.
        write_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let (error, _) = rejected(
            &mem,
            &[readable(HDR, 16), readable(DATA, 20), writable(STATUS, 1)],
        );
        assert_eq!(error.kind(), BadRequestKind::WrongDirection);
        write_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        write_segment(&mem, HDR + 16, 0, 8, 0);
        let (error, _) = rejected(
            &mem,
            &[readable(HDR, 32), writable(DATA, 16), writable(STATUS, 1)],
        );
        assert_eq!(error.kind(), BadRequestKind::WrongDirection);
    }

    #[test]
    fn data_length_must_be_whole_sectors() {
        let mem = memory();
        for request_type in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            write_header(&mem, HDR, request_type, 0);
            let data = if request_type == VIRTIO_BLK_T_IN {
                writable(DATA, 700)
            } else {
                readable(DATA, 700)
            };
            let (error, status) = rejected(&mem, &[readable(HDR, 16), data, writable(STATUS, 1)]);
            assert_eq!(error, RequestError::UnalignedLength(700));
            assert_eq!(status, Some(STATUS));
        }
        // Whole sectors spread over odd-sized buffers are fine.
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        parse(
            &mem,
            &[
                readable(HDR, 16),
                writable(DATA, 100),
                writable(DATA + 0x1000, 412),
                writable(STATUS, 1),
            ],
        )
        .unwrap();
    }

    #[test]
    fn sector_range_past_capacity_gets_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 2047);
        let (error, status) = rejected(
            &mem,
            &[readable(HDR, 16), writable(DATA, 1024), writable(STATUS, 1)],
        );
        assert_eq!(
            error,
            RequestError::OutOfRange {
                sector: 2047,
                len_sectors: 2,
                capacity_sectors: 2048
            }
        );
        assert_eq!(status, Some(STATUS));
        assert_eq!(error.status(), VIRTIO_BLK_S_IOERR as u8);
        // A zero-length read just past the end is past the end too.
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 2049);
        let (error, _) = rejected(&mem, &[readable(HDR, 16), writable(STATUS, 1)]);
        assert_eq!(error.kind(), BadRequestKind::OutOfRange);
    }

    #[test]
    fn sector_range_overflowing_u64_gets_ioerr() {
        let mem = memory();
        for sector in [u64::MAX, u64::MAX / 512 + 1, u64::MAX - 1] {
            write_header(&mem, HDR, VIRTIO_BLK_T_OUT, sector);
            let (error, status) = rejected(
                &mem,
                &[readable(HDR, 16), readable(DATA, 1024), writable(STATUS, 1)],
            );
            assert!(
                matches!(error, RequestError::RangeOverflow { .. }),
                "{sector}: {error}"
            );
            assert_eq!(status, Some(STATUS));
        }
        write_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segment(&mem, HDR + 16, u64::MAX - 3, 8, 0);
        let (error, _) = rejected(&mem, &[readable(HDR, 32), writable(STATUS, 1)]);
        assert!(
            matches!(error, RequestError::RangeOverflow { .. }),
            "{error}"
        );
    }

    #[test]
    fn buffer_outside_guest_memory_gets_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let (error, status) = rejected(
            &mem,
            &[readable(HDR, 16), writable(HOLE, 512), writable(STATUS, 1)],
        );
        assert_eq!(
            error,
            RequestError::OutsideMemory {
                addr: HOLE,
                len_bytes: 512
            }
        );
        assert_eq!(status, Some(STATUS));
        // A buffer that starts in memory and runs into the hole.
        write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let (error, _) = rejected(
            &mem,
            &[
                readable(HDR, 16),
                readable(0x1f_ff00, 512),
                writable(STATUS, 1),
            ],
        );
        assert_eq!(error.kind(), BadRequestKind::OutsideMemory);
        // Discard segments in the hole.
        write_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        let (error, _) = rejected(
            &mem,
            &[readable(HDR, 16), readable(HOLE, 16), writable(STATUS, 1)],
        );
        assert_eq!(error.kind(), BadRequestKind::OutsideMemory);
    }

    #[test]
    fn buffer_across_two_adjacent_regions_is_fine() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let req = parse(
            &mem,
            &[
                readable(HDR, 16),
                writable(0xf_ff00, 512),
                writable(STATUS, 1),
            ],
        )
        .unwrap();
        assert_eq!(req.data, [seg(0xf_ff00, 512)]);
    }

    #[test]
    fn too_many_data_segments_get_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![readable(HDR, 16)];
        descs.extend((0..5).map(|i| writable(DATA + i * 0x1000, 512)));
        descs.push(writable(STATUS, 1));
        let (error, status) = rejected(&mem, &descs);
        assert_eq!(error, RequestError::TooManySegments { count: 5, max: 4 });
        assert_eq!(status, Some(STATUS));
    }

    #[test]
    fn discard_segment_with_reserved_flags_gets_unsupp() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        for flags in [VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, 2, 0x8000_0000] {
            write_segment(&mem, HDR + 16, 0, 8, flags);
            let (error, status) = rejected(&mem, &[readable(HDR, 32), writable(STATUS, 1)]);
            assert_eq!(error, RequestError::ReservedFlags(flags));
            assert_eq!(error.status(), VIRTIO_BLK_S_UNSUPP as u8);
            assert_eq!(status, Some(STATUS));
        }
        write_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segment(&mem, HDR + 16, 0, 8, 3);
        let (error, _) = rejected(&mem, &[readable(HDR, 32), writable(STATUS, 1)]);
        assert_eq!(error, RequestError::ReservedFlags(3));
    }

    #[test]
    fn bad_segment_lists_get_ioerr() {
        let mem = memory();
        write_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        write_segment(&mem, HDR + 16, 0, 8, 0);
        write_segment(&mem, HDR + 32, 8, 8, 0);
        write_segment(&mem, HDR + 48, 16, 8, 0);
        let cases = [
            (16, RequestError::BadSegmentList(0)),
            (40, RequestError::BadSegmentList(24)),
            (64, RequestError::TooManySegments { count: 3, max: 2 }),
        ];
        for (len, expected) in cases {
            let (error, status) = rejected(&mem, &[readable(HDR, len), writable(STATUS, 1)]);
            assert_eq!(error, expected);
            assert_eq!(status, Some(STATUS));
        }
        write_segment(&mem, HDR + 16, 0, 1025, 0);
        let (error, _) = rejected(&mem, &[readable(HDR, 32), writable(STATUS, 1)]);
        assert_eq!(
            error,
            RequestError::SegmentTooLarge {
                num_sectors: 1025,
                max: 1024
            }
        );
        write_segment(&mem, HDR + 16, 2000, 49, 0);
        let (error, _) = rejected(&mem, &[readable(HDR, 32), writable(STATUS, 1)]);
        assert_eq!(error.kind(), BadRequestKind::OutOfRange);
    }

    #[test]
    fn writes_to_a_readonly_disk_get_ioerr() {
        let mem = memory();
        let limits = RequestLimits {
            readonly: true,
            ..limits()
        };
        write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let bad = parse_with(
            &mem,
            &[readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)],
            &limits,
        )
        .unwrap_err();
        assert_eq!(bad.error, RequestError::ReadOnly);
        assert_eq!(bad.error.status(), VIRTIO_BLK_S_IOERR as u8);
        for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            write_header(&mem, HDR, request_type, 0);
            write_segment(&mem, HDR + 16, 0, 8, 0);
            let bad =
                parse_with(&mem, &[readable(HDR, 32), writable(STATUS, 1)], &limits).unwrap_err();
            assert_eq!(bad.error, RequestError::ReadOnly);
        }
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        parse_with(
            &mem,
            &[readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)],
            &limits,
        )
        .unwrap();
        write_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        parse_with(&mem, &[readable(HDR, 16), writable(STATUS, 1)], &limits).unwrap();
    }

    #[test]
    fn unknown_request_types_get_unsupp() {
        let mem = memory();
        for request_type in [2, 14, 16, 0x8000_0000, u32::MAX] {
            write_header(&mem, HDR, request_type, 0);
            let (error, status) = rejected(&mem, &[readable(HDR, 16), writable(STATUS, 1)]);
            assert_eq!(error, RequestError::Unsupported(request_type));
            assert_eq!(error.status(), VIRTIO_BLK_S_UNSUPP as u8);
            assert_eq!(status, Some(STATUS));
        }
    }

    #[test]
    fn parsing_reuses_the_request_vectors() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let mut req = BlkRequest::default();
        write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let descs = [
            readable(HDR, 16),
            writable(DATA, 512),
            writable(DATA + 0x1000, 512),
            writable(STATUS, 1),
        ];
        let chain = queue.build_desc_chain(&descs).unwrap();
        parse_request(chain, &limits(), &mut req).unwrap();
        let capacity = req.data.capacity();
        let chain = queue.build_desc_chain(&descs).unwrap();
        parse_request(chain, &limits(), &mut req).unwrap();
        assert_eq!(req.data.len(), 2);
        assert_eq!(req.data.capacity(), capacity);
    }

    #[test]
    fn every_kind_has_a_distinct_counter_name() {
        let mut names: Vec<_> = BadRequestKind::ALL.iter().map(|k| k.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), BadRequestKind::ALL.len());
    }
}
