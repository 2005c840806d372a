//! Bit layouts of the qcow2 table entries (qcow2 specification, "Cluster
//! mapping" and "Host cluster management"), decoded into checked values.

use std::fmt;

/// Bits 9-55 of L1, standard L2 and refcount table entries: an offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits 0-8 and 56-62 are reserved.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits 1-8 and 56-61 are reserved.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry bits 0-8 are reserved.
const REFTABLE_RESERVED: u64 = 0x1ff;
pub const L2_ZERO: u64 = 1 << 0;
const L2_COMPRESSED: u64 = 1 << 62;
/// L1 and standard L2 entries: the cluster's refcount is exactly 1 (it
/// may be written in place).
pub const COPIED: u64 = 1 << 63;
/// Compressed cluster sizes count 512-byte sectors.
const COMPRESSED_SECTOR_BYTES: u64 = 512;

/// Where a guest cluster's data is, per its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Read from the backing file, or zeroes without one.
    Unallocated,
    /// Reads as zeroes; `offset` is 0 or a preallocated host cluster.
    Zero { offset: u64 },
    /// The host cluster at `offset`.
    Data { offset: u64 },
    /// Compressed data at host bytes `offset..end`.
    Compressed { offset: u64, end: u64 },
}

/// Decodes an L1 entry into its L2 table offset (0: no L2 table).
pub fn decode_l1(raw: u64, cluster_bits: u32) -> Result<u64, String> {
    if raw & L1_RESERVED != 0 {
        return Err(format!("reserved bits {:#x} are set", raw & L1_RESERVED));
    }
    let offset = raw & OFFSET_MASK;
    check_aligned(offset, cluster_bits)?;
    Ok(offset)
}

/// Decodes a refcount table entry into its refblock offset (0: none).
pub fn decode_reftable(raw: u64, cluster_bits: u32) -> Result<u64, String> {
    if raw & REFTABLE_RESERVED != 0 {
        return Err(format!(
            "reserved bits {:#x} are set",
            raw & REFTABLE_RESERVED
        ));
    }
    check_aligned(raw, cluster_bits)?;
    Ok(raw)
}

/// Decodes an L2 entry of an image of `version` (the zero flag is a
/// reserved bit in version 2).
pub fn decode_l2(raw: u64, cluster_bits: u32, version: u32) -> Result<L2Entry, String> {
    if raw & L2_COMPRESSED != 0 {
        return decode_compressed(raw, cluster_bits);
    }
    let reserved = if version >= 3 {
        L2_RESERVED
    } else {
        L2_RESERVED | L2_ZERO
    };
    if raw & reserved != 0 {
        return Err(format!("reserved bits {:#x} are set", raw & reserved));
    }
    let offset = raw & OFFSET_MASK;
    check_aligned(offset, cluster_bits)?;
    if raw & L2_ZERO != 0 {
        Ok(L2Entry::Zero { offset })
    } else if offset == 0 {
        if raw & COPIED != 0 {
            return Err("the COPIED flag is set on an unallocated entry".to_string());
        }
        Ok(L2Entry::Unallocated)
    } else {
        Ok(L2Entry::Data { offset })
    }
}

fn decode_compressed(raw: u64, cluster_bits: u32) -> Result<L2Entry, String> {
    if raw & COPIED != 0 {
        return Err("the COPIED flag is set on a compressed entry".to_string());
    }
    // cluster_bits is 9..=21, so size_bits is 1..=13 and offset_bits 49..=61.
    let size_bits = cluster_bits.saturating_sub(8);
    let offset_bits = 62u32.saturating_sub(size_bits);
    let offset = raw & ((1u64 << offset_bits) - 1);
    let extra_sectors = (raw >> offset_bits) & ((1u64 << size_bits) - 1);
    let end = (offset & !(COMPRESSED_SECTOR_BYTES - 1))
        .checked_add((extra_sectors + 1) * COMPRESSED_SECTOR_BYTES)
        .ok_or_else(|| format!("the compressed data at {offset:#x} ends past 2^64"))?;
    if offset == 0 {
        return Err("a compressed entry at host offset 0".to_string());
    }
    Ok(L2Entry::Compressed { offset, end })
}

fn check_aligned(offset: u64, cluster_bits: u32) -> Result<(), String> {
    let mask = (1u64 << cluster_bits) - 1;
    if offset & mask != 0 {
        return Err(format!(
            "offset {offset:#x} is not a multiple of the cluster size ({:#x})",
            mask + 1
        ));
    }
    Ok(())
}

/// What a metadata cluster is, for overlap checks and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaCluster {
    Header,
    L1Table,
    RefcountTable,
    /// The refblock of refcount table entry `n`.
    Refblock(u64),
    /// The L2 table of L1 entry `n`.
    L2Table(u64),
}

impl fmt::Display for MetaCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaCluster::Header => write!(f, "the header cluster"),
            MetaCluster::L1Table => write!(f, "the L1 table"),
            MetaCluster::RefcountTable => write!(f, "the refcount table"),
            MetaCluster::Refblock(n) => write!(f, "the refblock of refcount table entry {n}"),
            MetaCluster::L2Table(n) => write!(f, "the L2 table of L1 entry {n}"),
        }
    }
}

/// The 16 bit refcount at `index` of a refblock.
pub fn refcount16(refblock: &[u8], index: u64) -> u64 {
    let at = usize::try_from(index.saturating_mul(2)).unwrap_or(usize::MAX);
    u64::from(super::be_u16(refblock, at))
}

/// Sets the 16 bit refcount at `index`; false when out of the refblock.
pub fn set_refcount16(refblock: &mut [u8], index: u64, value: u16) -> bool {
    let Ok(at) = usize::try_from(index.saturating_mul(2)) else {
        return false;
    };
    match refblock.get_mut(at..at.saturating_add(2)) {
        Some(slot) => {
            slot.copy_from_slice(&value.to_be_bytes());
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_entries_decode_and_refuse_reserved_bits() {
        assert_eq!(decode_l1(0, 16), Ok(0));
        assert_eq!(decode_l1(COPIED | 0x3_0000, 16), Ok(0x3_0000));
        assert!(decode_l1(0x3_0001, 16).unwrap_err().contains("reserved"));
        assert!(decode_l1(0x3_1000, 16).unwrap_err().contains("multiple"));
        assert!(decode_l1(1 << 60, 16).unwrap_err().contains("reserved"));
    }

    #[test]
    fn l2_entries_decode() {
        assert_eq!(decode_l2(0, 16, 3), Ok(L2Entry::Unallocated));
        assert_eq!(decode_l2(1, 16, 3), Ok(L2Entry::Zero { offset: 0 }));
        assert!(decode_l2(1, 16, 2).unwrap_err().contains("reserved"));
        assert_eq!(
            decode_l2(COPIED | 0x5_0000, 16, 3),
            Ok(L2Entry::Data { offset: 0x5_0000 })
        );
        assert!(decode_l2(COPIED, 16, 3).unwrap_err().contains("COPIED"));
        assert!(decode_l2(0x5_0200, 16, 3).unwrap_err().contains("multiple"));
        assert!(decode_l2(0x5_0002, 16, 3).unwrap_err().contains("reserved"));
        // 64K clusters: offset in bits 0..54, 8 size bits; 2 extra sectors.
        let raw = L2_COMPRESSED | (2u64 << 54) | 0x5_0010;
        assert_eq!(
            decode_l2(raw, 16, 3),
            Ok(L2Entry::Compressed {
                offset: 0x5_0010,
                end: 0x5_0600
            })
        );
    }

    #[test]
    fn refcounts_are_big_endian_u16() {
        let mut block = vec![0u8; 8];
        assert!(set_refcount16(&mut block, 1, 0x1234));
        assert_eq!(block[2..4], [0x12, 0x34]);
        assert_eq!(refcount16(&block, 1), 0x1234);
        assert!(!set_refcount16(&mut block, 4, 1));
        assert_eq!(refcount16(&block, 4), 0);
    }
}
