//! [`unmap()`]: discard and write-zeroes on the image file, for guest
//! clusters qcow2-rs cannot unmap itself (it has no discard).
//!
//! Crash safety comes from the order of the writes, batch by batch:
//! 1. the new refcounts are computed and checked in memory (nothing freed
//!    twice, nothing below 0) before anything is written;
//! 2. the modified L2 tables are written, then fdatasync: from here no L2
//!    entry points at the freed clusters;
//! 3. the refblocks with the decremented refcounts are written;
//! 4. holes are punched in the clusters whose refcount reached 0;
//! 5. fdatasync.
//!
//! A crash after 2 leaks the freed clusters (refcount above their uses,
//! which `qemu-img check -r leaks` repairs); no crash leaves an L2 entry
//! pointing at a cluster with refcount 0, which the allocator would reuse.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use super::entry::{self, decode_l1, decode_l2, decode_reftable, L2Entry, L2_ZERO};
use super::header::{self, Qcow2Layout, ENTRY_BYTES};
use super::{be_u64, read_exact_at, sync_data, write_all_at, MetaError};

/// Modified L2 tables kept in memory before a batch is written: 32 MiB
/// bounds memory and makes a whole-disk discard of a 1 TiB image with 64K
/// clusters (2048 L2 tables of 64K) cost 4 batches, 8 fdatasyncs.
const BATCH_BYTES: u64 = 32 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnmapMode {
    /// The guest no longer needs the data: reads return zeroes, or with a
    /// backing file, zeroes too (never the backing file's data).
    Discard,
    /// The guest wants zeroes there (write-zeroes with unmap allowed).
    Zero,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnmapOutcome {
    /// Host clusters whose refcount reached 0 (their space was given back).
    pub freed_clusters: u64,
    /// Guest cluster runs (first, count) not unmapped here, which the caller
    /// must zero by writing: no L2 table to hold a zero flag, or a version 2
    /// image (which has none).
    pub unhandled: Vec<(u64, u64)>,
}

impl UnmapOutcome {
    fn add_unhandled(&mut self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        if let Some(last) = self.unhandled.last_mut() {
            if last.0.saturating_add(last.1) == first {
                last.1 = last.1.saturating_add(count);
                return;
            }
        }
        self.unhandled.push((first, count));
    }
}

/// Unmaps the `count` guest clusters from `first_guest_cluster` of the
/// image open read-write as `file`, whose metadata no one caches. The table
/// positions are read from the header again (qcow2-rs may have moved the
/// refcount table since `layout` was read); `layout` names the file.
pub fn unmap(
    file: &File,
    layout: &Qcow2Layout,
    first_guest_cluster: u64,
    count: u64,
    mode: UnmapMode,
) -> Result<UnmapOutcome, MetaError> {
    let layout = header::parse_layout(file, &layout.path)?;
    let path = layout.path.as_path();
    let end = first_guest_cluster
        .checked_add(count)
        .filter(|&end| end <= layout.guest_clusters())
        .ok_or_else(|| MetaError::UnmapRange {
            path: path.to_owned(),
            first: first_guest_cluster,
            count,
            guest_clusters: layout.guest_clusters(),
        })?;
    let mut outcome = UnmapOutcome::default();
    if count == 0 {
        return Ok(outcome);
    }
    let mut batch = Batch::default();
    let l2_entries = layout.l2_entries();
    let first_l1 = first_guest_cluster / l2_entries;
    let last_l1 = (end - 1) / l2_entries;
    for l1_index in first_l1..=last_l1 {
        let table_first = l1_index * l2_entries;
        let run_first = first_guest_cluster.max(table_first);
        let run_end = end.min(table_first + l2_entries);
        let l2_offset = read_l1_entry(file, &layout, l1_index, run_first)?;
        if l2_offset == 0 {
            if layout.backing.is_some() {
                outcome.add_unhandled(run_first, run_end - run_first);
            }
            continue;
        }
        let mut table = vec![0u8; layout.cluster_bytes() as usize];
        read_exact_at(file, path, &mut table, l2_offset, || {
            format!("the L2 table at {l2_offset:#x}")
        })?;
        let mut modified = false;
        for guest_cluster in run_first..run_end {
            let at = ((guest_cluster - table_first) * ENTRY_BYTES) as usize;
            let raw = be_u64(&table, at);
            let entry = decode_l2(raw, layout.cluster_bits, layout.version).map_err(|problem| {
                MetaError::UnmapBadMetadata {
                    path: path.to_owned(),
                    guest_cluster,
                    problem: format!("its L2 entry {raw:#x} {problem}"),
                }
            })?;
            let backing = layout.backing.is_some();
            match transition(entry, mode, layout.version, backing, layout.cluster_bytes()) {
                Transition::Keep => {}
                Transition::Unhandled => outcome.add_unhandled(guest_cluster, 1),
                Transition::Set { new, freed } => {
                    table[at..at + ENTRY_BYTES as usize].copy_from_slice(&new.to_be_bytes());
                    modified = true;
                    batch
                        .freed
                        .extend(freed.map(|host_cluster| (host_cluster, guest_cluster)));
                }
            }
        }
        if modified {
            batch.tables.push((l2_offset, table));
            if batch.tables.len() as u64 * layout.cluster_bytes() >= BATCH_BYTES {
                outcome.freed_clusters += batch.commit(file, &layout)?;
            }
        }
    }
    outcome.freed_clusters += batch.commit(file, &layout)?;
    Ok(outcome)
}

enum Transition {
    Keep,
    Unhandled,
    /// Write `new`; the host clusters `freed` lose a reference each.
    Set {
        new: u64,
        freed: Range<u64>,
    },
}

fn transition(
    entry: L2Entry,
    mode: UnmapMode,
    version: u32,
    backing: bool,
    cluster_bytes: u64,
) -> Transition {
    let has_zero_flag = version >= 3;
    // What a guest cluster that must read as zeroes becomes, if possible.
    let zeroed = match (mode, backing) {
        (UnmapMode::Discard, false) => Some(0),
        _ if has_zero_flag => Some(L2_ZERO),
        _ => None,
    };
    match entry {
        L2Entry::Data { offset } | L2Entry::Zero { offset } if offset != 0 => {
            if mode == UnmapMode::Zero && !has_zero_flag {
                return Transition::Unhandled;
            }
            let cluster = offset / cluster_bytes;
            match zeroed {
                Some(new) => Transition::Set {
                    new,
                    freed: cluster..cluster + 1,
                },
                None => Transition::Unhandled,
            }
        }
        L2Entry::Data { .. } | L2Entry::Zero { .. } => Transition::Keep,
        L2Entry::Unallocated if !backing => Transition::Keep,
        L2Entry::Unallocated => match zeroed {
            Some(new) => Transition::Set { new, freed: 0..0 },
            None => Transition::Unhandled,
        },
        // Every host cluster the compressed data touches holds a reference
        // for it (as scan counts them, and QEMU frees them).
        L2Entry::Compressed { offset, end } => match zeroed {
            Some(new) => Transition::Set {
                new,
                freed: offset / cluster_bytes..end.div_ceil(cluster_bytes),
            },
            None => Transition::Unhandled,
        },
    }
}

/// The L2 table offset of L1 entry `l1_index`, checked (0: none).
fn read_l1_entry(
    file: &File,
    layout: &Qcow2Layout,
    l1_index: u64,
    guest_cluster: u64,
) -> Result<u64, MetaError> {
    let path = layout.path.as_path();
    if l1_index >= u64::from(layout.l1_entries) {
        return Err(MetaError::UnmapBadMetadata {
            path: path.to_owned(),
            guest_cluster,
            problem: format!("the L1 table has only {} entries", layout.l1_entries),
        });
    }
    let mut raw = [0u8; 8];
    let at = layout.l1_offset + l1_index * ENTRY_BYTES;
    read_exact_at(file, path, &mut raw, at, || format!("L1 entry {l1_index}"))?;
    let raw = u64::from_be_bytes(raw);
    let bad = |problem: String| MetaError::UnmapBadMetadata {
        path: path.to_owned(),
        guest_cluster,
        problem: format!("L1 entry {l1_index} ({raw:#x}) {problem}"),
    };
    let offset = decode_l1(raw, layout.cluster_bits).map_err(bad)?;
    if offset != 0
        && offset
            .checked_add(layout.cluster_bytes())
            .is_none_or(|end| end > layout.file_len)
    {
        return Err(bad("points past the end of the file".to_string()));
    }
    if offset != 0 && offset < layout.cluster_bytes() {
        return Err(bad("points at the header cluster".to_string()));
    }
    Ok(offset)
}

#[derive(Default)]
struct Batch {
    /// Modified L2 tables: (offset, contents).
    tables: Vec<(u64, Vec<u8>)>,
    /// Host clusters losing a reference: (host cluster, guest cluster).
    freed: Vec<(u64, u64)>,
}

impl Batch {
    /// Writes the batch in the crash-safe order; returns the number of host
    /// clusters whose refcount reached 0.
    fn commit(&mut self, file: &File, layout: &Qcow2Layout) -> Result<u64, MetaError> {
        if self.tables.is_empty() {
            return Ok(0);
        }
        let path = layout.path.as_path();
        let cluster_bytes = layout.cluster_bytes();
        // 1. New refcounts, in memory, checked.
        let mut refblocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut emptied = Vec::new();
        for &(cluster, guest_cluster) in &self.freed {
            let bad = |problem: String| MetaError::UnmapBadMetadata {
                path: path.to_owned(),
                guest_cluster,
                problem,
            };
            if let Some(what) = self.metadata_at(layout, cluster) {
                return Err(bad(format!(
                    "its L2 entry points at host cluster {cluster}, {what}"
                )));
            }
            let per_block = layout.refblock_entries();
            let refblock = reftable_entry(file, layout, cluster / per_block, guest_cluster)?;
            if refblock == 0 {
                return Err(bad(format!(
                    "its host cluster {cluster} has no refblock (refcount 0)"
                )));
            }
            if refblock / cluster_bytes == cluster {
                return Err(bad(format!(
                    "its L2 entry points at host cluster {cluster}, a refblock"
                )));
            }
            let data = match refblocks.entry(refblock) {
                Entry::Occupied(slot) => slot.into_mut(),
                Entry::Vacant(slot) => {
                    let mut data = vec![0u8; cluster_bytes as usize];
                    read_exact_at(file, path, &mut data, refblock, || {
                        format!("the refblock at {refblock:#x}")
                    })?;
                    slot.insert(data)
                }
            };
            let index = cluster % per_block;
            let refcount = entry::refcount16(data, index);
            let Some(new) = refcount.checked_sub(1) else {
                return Err(bad(format!(
                    "its host cluster {cluster} already has refcount 0"
                )));
            };
            // new < refcount <= u16::MAX.
            entry::set_refcount16(data, index, new as u16);
            if new == 0 {
                emptied.push(cluster);
            }
        }
        // 2. L2 tables, synced before any refcount drops.
        for (offset, table) in &self.tables {
            write_all_at(file, path, table, *offset, || {
                format!("the L2 table at {offset:#x}")
            })?;
        }
        sync_data(file, path, "after writing L2 tables")?;
        // 3. Refcounts.
        for (offset, data) in &refblocks {
            write_all_at(file, path, data, *offset, || {
                format!("the refblock at {offset:#x}")
            })?;
        }
        // 4. Space back to the file system.
        emptied.sort_unstable();
        for (first, count) in runs(&emptied) {
            punch_hole(file, first * cluster_bytes, count * cluster_bytes).map_err(|source| {
                MetaError::Io {
                    path: path.to_owned(),
                    what: format!("punch a hole in host clusters {first}..+{count}"),
                    source,
                }
            })?;
        }
        // 5.
        sync_data(file, path, "after writing refblocks")?;
        self.tables.clear();
        self.freed.clear();
        Ok(emptied.len() as u64)
    }
}

impl Batch {
    /// The metadata that host cluster `cluster` holds, among what is known
    /// without a scan: a freed data cluster must be none of it.
    fn metadata_at(&self, layout: &Qcow2Layout, cluster: u64) -> Option<&'static str> {
        let cluster_bytes = layout.cluster_bytes();
        let offset = cluster.checked_mul(cluster_bytes)?;
        let within = |start: u64, len_bytes: u64| {
            offset >= start && offset < start.saturating_add(len_bytes)
        };
        if cluster == 0 {
            Some("the header cluster")
        } else if within(layout.l1_offset, layout.l1_bytes()) {
            Some("the L1 table")
        } else if within(layout.reftable_offset, layout.reftable_bytes()) {
            Some("the refcount table")
        } else if self.tables.iter().any(|(at, _)| *at == offset) {
            Some("an L2 table")
        } else {
            None
        }
    }
}

/// The refblock offset of refcount table entry `index`, checked.
fn reftable_entry(
    file: &File,
    layout: &Qcow2Layout,
    index: u64,
    guest_cluster: u64,
) -> Result<u64, MetaError> {
    let path = layout.path.as_path();
    let bad = |problem: String| MetaError::UnmapBadMetadata {
        path: path.to_owned(),
        guest_cluster,
        problem,
    };
    if index >= layout.reftable_bytes() / ENTRY_BYTES {
        return Err(bad(format!(
            "its host cluster is past the refcount table (entry {index})"
        )));
    }
    let mut raw = [0u8; 8];
    let at = layout.reftable_offset + index * ENTRY_BYTES;
    read_exact_at(file, path, &mut raw, at, || {
        format!("refcount table entry {index}")
    })?;
    let raw = u64::from_be_bytes(raw);
    let offset = decode_reftable(raw, layout.cluster_bits)
        .map_err(|problem| bad(format!("refcount table entry {index} ({raw:#x}) {problem}")))?;
    if offset != 0
        && (offset < layout.cluster_bytes()
            || offset
                .checked_add(layout.cluster_bytes())
                .is_none_or(|end| end > layout.file_len))
    {
        return Err(bad(format!(
            "refcount table entry {index} ({raw:#x}) points outside the file"
        )));
    }
    Ok(offset)
}

/// Sorted cluster indices as (first, count) runs.
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &cluster in sorted {
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == cluster => last.1 += 1,
            Some(last) if last.0 + last.1 > cluster => {}
            _ => runs.push((cluster, 1)),
        }
    }
    runs
}

/// Deallocates `len_bytes` at `offset`, keeping the file size. File systems
/// without hole punching keep the space (the clusters are free all the
/// same).
fn punch_hole(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (
        libc::off_t::try_from(offset),
        libc::off_t::try_from(len_bytes),
    ) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range past the largest file offset",
        ));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is
    // borrowed from `file`, which stays open for the duration of the call.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(()),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::{parse_layout, read_layout};
    use super::super::scan::scan;
    use super::super::testutil::{assert_check_clean, open_rw, qcow2, qemu_img, qemu_io};
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};

    /// 64K clusters: guest cluster n is at n * 64K.
    fn written(dir: &Path, name: &str, options: &str) -> PathBuf {
        let path = qcow2(dir, name, "1G", options);
        qemu_io(&path, &["write -P 0xab 0 1M", "write -P 0xcd 600M 64k"]);
        path
    }

    fn unmap_path(path: &Path, first: u64, count: u64, mode: UnmapMode) -> UnmapOutcome {
        let file = open_rw(path);
        let layout = read_layout(&file, path).unwrap();
        unmap(&file, &layout, first, count, mode).unwrap()
    }

    fn blocks(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks()
    }

    #[test]
    fn discard_and_zero_free_clusters_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path(), "d.qcow2", "");
        let before = blocks(&path);
        let outcome = unmap_path(&path, 2, 4, UnmapMode::Discard);
        assert_eq!(
            outcome,
            UnmapOutcome {
                freed_clusters: 4,
                unhandled: vec![]
            }
        );
        assert_check_clean(&path);
        qemu_io(
            &path,
            &[
                "read -P 0xab 0 128k",
                "read -P 0 128k 256k",
                "read -P 0xab 384k 640k",
            ],
        );
        let after = blocks(&path);
        assert!(after + 4 * 128 <= before, "st_blocks {before} -> {after}");

        let outcome = unmap_path(&path, 8, 2, UnmapMode::Zero);
        assert_eq!(outcome.freed_clusters, 2);
        assert_check_clean(&path);
        qemu_io(
            &path,
            &[
                "read -P 0 512k 128k",
                "read -P 0xab 640k 384k",
                "read -P 0xcd 600M 64k",
            ],
        );
        let map = qemu_img(&["map", "--output=json", path.to_str().unwrap()]);
        assert!(map.contains("\"start\": 524288, \"length\": 131072, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), "{map}");

        // Unallocated clusters and a whole L1 entry without an L2 table:
        // nothing to do without a backing file.
        let outcome = unmap_path(&path, 100, 16384 - 100, UnmapMode::Zero);
        assert_eq!(
            outcome,
            UnmapOutcome {
                freed_clusters: 1,
                unhandled: vec![]
            }
        );
        assert_check_clean(&path);
        qemu_io(&path, &["read -P 0 600M 64k"]);

        let file = File::open(&path).unwrap();
        let layout = read_layout(&file, &path).unwrap();
        let report = scan(&file, &path, &layout).unwrap();
        assert_eq!((report.allocated_clusters, report.leaked_clusters), (10, 0));
    }

    #[test]
    fn with_a_backing_file_unmapped_clusters_read_zeroes_not_the_backing_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let base = qcow2(d, "base.qcow2", "1G", "");
        qemu_io(&base, &["write -P 0x77 0 2M"]);
        let over = qcow2(
            d,
            "over.qcow2",
            "2G",
            "backing_file=base.qcow2,backing_fmt=qcow2",
        );
        qemu_io(&over, &["write -P 0xab 0 1M"]);
        for mode in [UnmapMode::Discard, UnmapMode::Zero] {
            let path = d.join("o.qcow2");
            std::fs::copy(&over, &path).unwrap();
            // Clusters 0..4 hold data, 20..22 come from the backing file,
            // L1 entry 1 (guest clusters 8192..16384) has no L2 table.
            let outcome = unmap_path(&path, 0, 4, mode);
            assert_eq!(outcome.freed_clusters, 4);
            let outcome = unmap_path(&path, 20, 2, mode);
            assert_eq!(
                outcome,
                UnmapOutcome {
                    freed_clusters: 0,
                    unhandled: vec![]
                }
            );
            let outcome = unmap_path(&path, 8191, 3, mode);
            assert_eq!(outcome.unhandled, vec![(8192, 2)]);
            assert_check_clean(&path);
            qemu_io(
                &path,
                &[
                    "read -P 0 0 256k",
                    "read -P 0xab 256k 768k",
                    "read -P 0x77 1M 256k",
                    "read -P 0 1280k 128k",
                    "read -P 0x77 1408k 640k",
                    "read -P 0 536805376 64k",
                ],
            );
        }
    }

    /// Found by the qcow2_image fuzz target: compressed clusters were kept
    /// on discard (and the owner unmaps WRITE_ZEROES with UNMAP that way
    /// too), so they went on reading their data.
    #[test]
    fn compressed_clusters_are_freed_on_discard_and_zero() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let src = written(d, "src.qcow2", "");
        let path = d.join("c.qcow2");
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            path.to_str().unwrap(),
        ]);
        let outcome = unmap_path(&path, 0, 4, UnmapMode::Discard);
        assert_eq!(outcome.unhandled, vec![], "{outcome:?}");
        let outcome = unmap_path(&path, 4, 4, UnmapMode::Zero);
        assert_eq!(outcome.unhandled, vec![], "{outcome:?}");
        assert_check_clean(&path);
        qemu_io(&path, &["read -P 0 0 512k", "read -P 0xab 512k 512k"]);
        // The last references to the compressed data: its clusters go.
        let outcome = unmap_path(&path, 8, 8, UnmapMode::Discard);
        let last = unmap_path(&path, 9600, 1, UnmapMode::Discard);
        assert!(
            outcome.freed_clusters + last.freed_clusters > 0,
            "{outcome:?} {last:?}"
        );
        assert_check_clean(&path);
        qemu_io(&path, &["read -P 0 0 1M", "read -P 0 600M 64k"]);
    }

    #[test]
    fn version_2_images_cannot_hold_zero_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path(), "v2.qcow2", "compat=0.10");
        let file = open_rw(&path);
        let layout = parse_layout(&file, &path).unwrap();
        assert_eq!(layout.version, 2);
        let outcome = unmap(&file, &layout, 0, 2, UnmapMode::Zero).unwrap();
        assert_eq!(
            outcome,
            UnmapOutcome {
                freed_clusters: 0,
                unhandled: vec![(0, 2)]
            }
        );
        let outcome = unmap(&file, &layout, 0, 2, UnmapMode::Discard).unwrap();
        assert_eq!(outcome.freed_clusters, 2);
        assert_check_clean(&path);
        qemu_io(&path, &["read -P 0 0 128k", "read -P 0xab 128k 896k"]);
    }

    #[test]
    fn ranges_past_the_disk_and_bad_metadata_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path(), "r.qcow2", "");
        let file = open_rw(&path);
        let layout = read_layout(&file, &path).unwrap();
        let err = unmap(&file, &layout, 16383, 2, UnmapMode::Discard).unwrap_err();
        assert!(
            err.to_string()
                .contains("guest clusters 16383..+2 are past the virtual size (16384 clusters)"),
            "{err}"
        );
        let err = unmap(&file, &layout, u64::MAX, 2, UnmapMode::Discard).unwrap_err();
        assert!(err.to_string().contains("past the virtual size"), "{err}");
        // A data cluster pointing at the L1 table is not freed.
        let l1 = super::super::testutil::read_u64(&path, 40);
        let l2 = super::super::testutil::read_u64(&path, l1) & 0x00ff_ffff_ffff_fe00;
        super::super::testutil::write_u64(&path, l2 + 8, 1 << 63 | l1);
        let err = unmap(&file, &layout, 0, 4, UnmapMode::Discard).unwrap_err();
        assert!(
            err.to_string().contains(
                "cannot unmap guest cluster 1: its L2 entry points at host cluster 3, the L1 table"
            ),
            "{err}"
        );
        // Nothing was written: guest cluster 0 still reads its data.
        qemu_io(&path, &["read -P 0xab 0 64k"]);
    }
}
