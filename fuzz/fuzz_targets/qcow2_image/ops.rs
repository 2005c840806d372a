//! The operations of a qcow2_image input: how a record decodes, and the
//! request (buffer, iovecs) it becomes.

use std::sync::atomic::{AtomicU8, Ordering};

use ringvm_blk::engine::IoVec;

pub const SECTOR: u64 = 512;
/// The top byte of every 8-byte word a write puts on the disk (as a table
/// entry it is invalid: reserved bits, and COPIED on a compressed entry).
pub const PATTERN_TAG: u64 = 0xd5;
pub const OFFSET_BITS: u32 = 48;
/// What read buffers hold before the read: a different nonzero byte each
/// time, so that bytes a read leaves unfilled never match what an earlier
/// read returned.
fn unread_fill() -> u8 {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) % 255 + 1
}

/// The word write `op` puts at guest `offset` (a multiple of 8).
pub fn pattern_word(op: u8, offset: u64) -> u64 {
    PATTERN_TAG << 56 | u64::from(op) << OFFSET_BITS | offset
}

/// The bytes write `op` puts at guest `offset` (a multiple of 8).
pub fn fill_pattern(op: u8, offset: u64, buf: &mut [u8]) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&pattern_word(op, offset + 8 * i as u64).to_be_bytes());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    /// DISCARD, and WRITE_ZEROES with UNMAP (the queue worker makes both a
    /// punch-hole, with which the owner frees whole clusters).
    Discard,
    /// WRITE_ZEROES without UNMAP.
    WriteZeroes,
    Flush,
}

impl Kind {
    pub fn writes(self) -> bool {
        matches!(self, Kind::Write | Kind::Discard | Kind::WriteZeroes)
    }
}

/// One request as the engine gets it.
pub struct Io {
    pub kind: Kind,
    pub offset: u64,
    pub len: u64,
    pub buf: Vec<u8>,
    /// Into `buf`.
    pub iovecs: Vec<IoVec>,
    /// `None`: not sent (empty, or refused by the range check).
    pub result: Option<i32>,
}

impl Io {
    /// A request whose buffer (reads and writes) is one iovec.
    pub fn new(kind: Kind, offset: u64, len: u64) -> Io {
        let mut buf = match kind {
            Kind::Read => vec![unread_fill(); len as usize],
            Kind::Write => vec![0; len as usize],
            _ => Vec::new(),
        };
        let iovecs = if buf.is_empty() {
            Vec::new()
        } else {
            vec![IoVec::new(buf.as_mut_ptr(), buf.len())]
        };
        Io {
            kind,
            offset,
            len,
            buf,
            iovecs,
            result: None,
        }
    }

    pub fn ok(&self) -> bool {
        self.result.is_some_and(|r| r >= 0)
    }

    /// The sectors it names.
    pub fn sectors(&self) -> std::ops::Range<u64> {
        self.offset / SECTOR..(self.offset + self.len) / SECTOR
    }
}

/// One operation record of the input.
#[derive(Clone, Copy, Debug)]
pub struct OpSpec {
    pub kind: Kind,
    /// Submitted together with the operation before it.
    pub joins: bool,
    pub sector: u64,
    pub sectors: u64,
    /// How the buffer is cut into iovecs (reads and writes).
    shape: u8,
    cut: [u8; 2],
}

impl OpSpec {
    /// A record of 8 bytes. Byte 0: kind (bits 0-2: 0-1 read, 2-4 write,
    /// 5 discard, 6 write-zeroes, 7 flush), bit 3: joins the batch of the
    /// record before, bits 4-5: iovecs (one; two cut on a sector; two cut
    /// anywhere; three cut anywhere). Byte 1, bits 0-1: where (sector `v`
    /// modulo the disk; `v >> 4` clusters and -8..7 sectors from there;
    /// -48..15 sectors from the end of the disk; sector `2v`, even past the
    /// end), bits 2-3: how long (1-8 sectors; 1-4 clusters; 1-3 clusters
    /// and -1..1 sector; 0-128 sectors). Bytes 2-3: `v`, bytes 4-5: the
    /// length value, bytes 6-7: where the iovecs are cut.
    pub fn decode(rec: &[u8], capacity_sectors: u64, cluster_sectors: u64) -> OpSpec {
        let kind = match rec[0] & 7 {
            0 | 1 => Kind::Read,
            2..=4 => Kind::Write,
            5 => Kind::Discard,
            6 => Kind::WriteZeroes,
            _ => Kind::Flush,
        };
        let v = u64::from(u16::from_le_bytes([rec[2], rec[3]]));
        let w = u64::from(u16::from_le_bytes([rec[4], rec[5]]));
        let clusters = capacity_sectors.div_ceil(cluster_sectors);
        let sector = match rec[1] & 3 {
            0 => v % capacity_sectors.max(1),
            1 => ((v >> 4) % (clusters + 1) * cluster_sectors + (v & 15)).saturating_sub(8),
            2 => (capacity_sectors + v % 64).saturating_sub(48),
            _ => 2 * v,
        };
        let sectors = match (rec[1] >> 2) & 3 {
            0 => 1 + w % 8,
            1 => cluster_sectors * (1 + w % 4),
            2 => (cluster_sectors * (1 + w % 3) + (w >> 2) % 3)
                .saturating_sub(1)
                .max(1),
            _ => w % 129,
        };
        OpSpec {
            kind,
            joins: rec[0] & 8 != 0,
            sector,
            sectors,
            shape: (rec[0] >> 4) & 3,
            cut: [rec[6], rec[7]],
        }
    }

    /// The byte range a data request names (empty for a flush).
    pub fn range(&self) -> (u64, u64) {
        if self.kind == Kind::Flush {
            (0, 0)
        } else {
            (self.sector * SECTOR, self.sectors * SECTOR)
        }
    }

    /// The request, with its buffer cut into iovecs; writes carry the
    /// pattern of `id`.
    pub fn io(&self, id: u8) -> Io {
        let (offset, len) = self.range();
        let mut io = Io::new(self.kind, offset, len);
        if self.kind == Kind::Write {
            fill_pattern(id, offset, &mut io.buf);
        }
        if io.buf.is_empty() {
            return io;
        }
        let n = io.buf.len();
        let (a, b) = (usize::from(self.cut[0]), usize::from(self.cut[1]));
        let mut cuts = match self.shape {
            0 => vec![],
            1 => vec![a % (n / SECTOR as usize) * SECTOR as usize],
            2 => vec![(a << 8 | b) % n],
            _ => vec![(a * 61) % n, (b * 4099) % n],
        };
        cuts.retain(|&c| c > 0);
        cuts.sort_unstable();
        cuts.dedup();
        cuts.push(n);
        let base = io.buf.as_mut_ptr();
        let mut start = 0;
        io.iovecs.clear();
        for cut in cuts {
            // `start..cut` lies inside the buffer.
            io.iovecs
                .push(IoVec::new(base.wrapping_add(start), cut - start));
            start = cut;
        }
        io
    }
}
