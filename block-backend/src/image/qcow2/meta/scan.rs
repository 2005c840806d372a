//! [`scan()`]: every L1, L2, refcount table and refblock entry checked
//! before qcow2-rs, which trusts them, sees the image.
//!
//! A bad L1 or L2 entry poisons the guest clusters it maps
//! ([`BadClusters`]): the caller fails I/O there and serves the rest. Bad
//! refcount metadata refuses the image: the allocator would hand out
//! clusters still in use.
//!
//! Memory and time are bounded by the file size: every table read lies
//! inside the file, and the per-cluster reference counts take 2 bytes per
//! host cluster of the file (as `qemu-img check` does).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use super::entry::{self, decode_l1, decode_l2, decode_reftable, L2Entry, MetaCluster};
use super::header::{Qcow2Layout, ENTRY_BYTES};
use super::{be_u64, read_exact_at, MetaError};

/// Most users named in a [`MetaError::RefcountTooLow`] message.
const MAX_USERS_NAMED: usize = 4;

/// Guest clusters whose mapping is damaged, in runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BadClusters {
    /// First guest cluster -> (count, what is wrong); runs do not overlap.
    runs: BTreeMap<u64, (u64, String)>,
}

impl BadClusters {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// True when any of the `count` guest clusters from
    /// `first_guest_cluster` is poisoned.
    pub fn any_in(&self, first_guest_cluster: u64, count: u64) -> bool {
        let end = first_guest_cluster.saturating_add(count);
        if count == 0 {
            return false;
        }
        self.runs
            .range(..end)
            .next_back()
            .is_some_and(|(&first, &(n, _))| first.saturating_add(n) > first_guest_cluster)
    }

    /// What is wrong with `guest_cluster`, or None when it is fine.
    pub fn describe(&self, guest_cluster: u64) -> Option<String> {
        let (&first, (count, problem)) = self.runs.range(..=guest_cluster).next_back()?;
        (first.saturating_add(*count) > guest_cluster).then(|| problem.clone())
    }

    /// The poisoned runs: (first guest cluster, count, what is wrong).
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64, &str)> {
        self.runs
            .iter()
            .map(|(&first, (count, problem))| (first, *count, problem.as_str()))
    }

    /// Number of poisoned guest clusters.
    pub fn cluster_count(&self) -> u64 {
        self.runs.values().map(|(count, _)| count).sum()
    }

    fn add(&mut self, first: u64, count: u64, problem: String) {
        if count > 0 {
            self.runs.insert(first, (count, problem));
        }
    }
}

/// Guest clusters whose L2 entry is compressed, in runs: the owner reads
/// them into zeroed buffers (qcow2-rs leaves what a short compressed stream
/// does not fill as it was).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompressedClusters {
    /// First guest cluster -> count; runs do not overlap.
    runs: BTreeMap<u64, u64>,
}

impl CompressedClusters {
    /// True when any of the `count` guest clusters from
    /// `first_guest_cluster` is compressed.
    pub fn any_in(&self, first_guest_cluster: u64, count: u64) -> bool {
        let end = first_guest_cluster.saturating_add(count);
        count > 0
            && self
                .runs
                .range(..end)
                .next_back()
                .is_some_and(|(&first, &n)| first.saturating_add(n) > first_guest_cluster)
    }

    /// Adds `guest_cluster`, past every cluster added before.
    fn add(&mut self, guest_cluster: u64) {
        if let Some((&first, count)) = self.runs.iter_mut().next_back() {
            if first.saturating_add(*count) == guest_cluster {
                *count += 1;
                return;
            }
        }
        self.runs.insert(guest_cluster, 1);
    }
}

/// What [`scan()`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub bad: BadClusters,
    /// Guest clusters stored in the file (data, compressed, or zero with a
    /// preallocated host cluster).
    pub allocated_clusters: u64,
    /// Of those, compressed ones.
    pub compressed_clusters: u64,
    pub l2_tables: u64,
    /// Host clusters in use (metadata and data).
    pub referenced_host_clusters: u64,
    /// Host clusters whose refcount is higher than their uses (harmless:
    /// space `qemu-img check -r leaks` would give back).
    pub leaked_clusters: u64,
    /// Guest clusters whose data is compressed.
    pub compressed: CompressedClusters,
    /// Bad L1 and L2 entries that point past the end of the file. Once the
    /// file grows over their target, they would map whatever the image
    /// allocates there (the owner marks such an image corrupt at open).
    pub bad_past_end: u64,
    /// Every metadata cluster the scan found (header, L1 table, refcount
    /// table, refblocks, and the L2 tables of valid L1 entries), by host
    /// cluster index: for checks that data never lands on metadata (the
    /// qcow2_image fuzz target).
    pub metadata: HashMap<u64, MetaCluster>,
}

/// Checks every table entry of the image described by `layout`.
pub fn scan(file: &File, path: &Path, layout: &Qcow2Layout) -> Result<ScanReport, MetaError> {
    let mut scanner = Scanner::new(file, path, layout)?;
    scanner.add_fixed_metadata()?;
    let refblocks = scanner.read_reftable()?;
    let l2_tables = scanner.read_l1()?;
    for &(l1_index, offset) in &l2_tables {
        scanner.scan_l2(l1_index, offset)?;
    }
    scanner.report.l2_tables = l2_tables.len() as u64;
    scanner.compare_refcounts(&refblocks, &l2_tables)?;
    scanner.report.metadata = scanner.meta;
    Ok(scanner.report)
}

struct Scanner<'a> {
    file: &'a File,
    path: &'a Path,
    layout: &'a Qcow2Layout,
    cluster_bytes: u64,
    /// Metadata clusters by host cluster index.
    meta: HashMap<u64, MetaCluster>,
    /// Uses of each host cluster of the file, saturating at u16::MAX.
    uses: Vec<u16>,
    report: ScanReport,
}

impl<'a> Scanner<'a> {
    fn new(file: &'a File, path: &'a Path, layout: &'a Qcow2Layout) -> Result<Self, MetaError> {
        let host_clusters =
            usize::try_from(layout.host_clusters()).map_err(|_| MetaError::Header {
                path: path.to_owned(),
                problem: "the file has more clusters than this machine can count".to_string(),
            })?;
        Ok(Scanner {
            file,
            path,
            layout,
            cluster_bytes: layout.cluster_bytes(),
            meta: HashMap::new(),
            uses: vec![0; host_clusters],
            report: ScanReport::default(),
        })
    }

    /// Counts one use of host cluster `cluster` (inside the file: callers
    /// checked).
    fn add_use(&mut self, cluster: u64) {
        if let Some(count) = usize::try_from(cluster)
            .ok()
            .and_then(|at| self.uses.get_mut(at))
        {
            *count = count.saturating_add(1);
        }
    }

    /// The metadata cluster `offset` lies in, if any.
    fn meta_at(&self, offset: u64) -> Option<MetaCluster> {
        self.meta.get(&(offset / self.cluster_bytes)).copied()
    }

    fn add_meta_range(&mut self, offset: u64, len_bytes: u64, kind: MetaCluster) {
        let first = offset / self.cluster_bytes;
        let end = offset
            .saturating_add(len_bytes)
            .div_ceil(self.cluster_bytes);
        for cluster in first..end {
            self.meta.insert(cluster, kind);
            self.add_use(cluster);
        }
    }

    /// The header cluster, the L1 table and the refcount table (read_layout
    /// checked that they are inside the file and apart).
    fn add_fixed_metadata(&mut self) -> Result<(), MetaError> {
        self.add_meta_range(0, self.cluster_bytes, MetaCluster::Header);
        let layout = self.layout;
        if layout.l1_entries > 0 {
            self.add_meta_range(layout.l1_offset, layout.l1_bytes(), MetaCluster::L1Table);
        }
        self.add_meta_range(
            layout.reftable_offset,
            layout.reftable_bytes(),
            MetaCluster::RefcountTable,
        );
        Ok(())
    }

    /// Reads `len_bytes` at `offset`, which must lie inside the file.
    fn read_table(
        &self,
        offset: u64,
        len_bytes: u64,
        what: impl FnOnce() -> String,
    ) -> Result<Vec<u8>, MetaError> {
        let inside = offset
            .checked_add(len_bytes)
            .is_some_and(|end| end <= self.layout.file_len);
        let len = usize::try_from(len_bytes).ok().filter(|_| inside);
        let Some(len) = len else {
            return Err(MetaError::Header {
                path: self.path.to_owned(),
                problem: format!("{} runs past the end of the file", what()),
            });
        };
        let mut buf = vec![0u8; len];
        read_exact_at(self.file, self.path, &mut buf, offset, what)?;
        Ok(buf)
    }

    /// Validates the refcount table; returns the refblock offset of each
    /// entry (0: none).
    fn read_reftable(&mut self) -> Result<Vec<u64>, MetaError> {
        let layout = self.layout;
        let table = self.read_table(layout.reftable_offset, layout.reftable_bytes(), || {
            format!("the refcount table at {:#x}", layout.reftable_offset)
        })?;
        let mut refblocks = Vec::with_capacity(table.len() / ENTRY_BYTES as usize);
        for (index, raw) in table.chunks_exact(ENTRY_BYTES as usize).enumerate() {
            let index = index as u64;
            let raw = be_u64(raw, 0);
            let bad = |problem: String| MetaError::BadReftableEntry {
                path: self.path.to_owned(),
                index,
                entry: raw,
                problem,
            };
            let offset = decode_reftable(raw, layout.cluster_bits).map_err(bad)?;
            if offset != 0 {
                if offset
                    .checked_add(self.cluster_bytes)
                    .is_none_or(|end| end > layout.file_len)
                {
                    return Err(bad(format!(
                        "points past the end of the file ({} bytes)",
                        layout.file_len
                    )));
                }
                if let Some(other) = self.meta_at(offset) {
                    return Err(bad(format!("points at {other}")));
                }
                self.add_meta_range(offset, self.cluster_bytes, MetaCluster::Refblock(index));
            }
            refblocks.push(offset);
        }
        Ok(refblocks)
    }

    /// Validates the L1 table; returns the valid (L1 index, L2 offset)
    /// pairs and poisons the guest clusters of the bad ones.
    fn read_l1(&mut self) -> Result<Vec<(u64, u64)>, MetaError> {
        let layout = self.layout;
        if layout.l1_entries == 0 {
            return Ok(Vec::new());
        }
        let table = self.read_table(layout.l1_offset, layout.l1_bytes(), || {
            format!("the L1 table at {:#x}", layout.l1_offset)
        })?;
        let l2_entries = layout.l2_entries();
        let guest_clusters = layout.guest_clusters();
        let mut l2_tables = Vec::new();
        for (index, raw) in table.chunks_exact(ENTRY_BYTES as usize).enumerate() {
            let index = index as u64;
            let raw = be_u64(raw, 0);
            let problem = match decode_l1(raw, layout.cluster_bits) {
                Ok(0) => continue,
                Ok(offset) => if offset
                    .checked_add(self.cluster_bytes)
                    .is_none_or(|end| end > layout.file_len)
                {
                    self.report.bad_past_end += 1;
                    Some(format!(
                        "points past the end of the file ({} bytes)",
                        layout.file_len
                    ))
                } else {
                    self.meta_at(offset)
                        .map(|other| format!("points at {other}"))
                }
                .map_or_else(
                    || {
                        self.add_meta_range(
                            offset,
                            self.cluster_bytes,
                            MetaCluster::L2Table(index),
                        );
                        l2_tables.push((index, offset));
                        None
                    },
                    Some,
                ),
                Err(problem) => Some(problem),
            };
            if let Some(problem) = problem {
                let first = index.saturating_mul(l2_entries);
                let count = l2_entries.min(guest_clusters.saturating_sub(first));
                self.report.bad.add(
                    first,
                    count,
                    format!("L1 entry {index} ({raw:#x}) {problem}"),
                );
            }
        }
        Ok(l2_tables)
    }

    /// Validates the L2 table of L1 entry `l1_index` at `offset`.
    fn scan_l2(&mut self, l1_index: u64, offset: u64) -> Result<(), MetaError> {
        let layout = self.layout;
        let table = self.read_table(offset, self.cluster_bytes, || {
            format!("the L2 table at {offset:#x}")
        })?;
        let first = l1_index.saturating_mul(layout.l2_entries());
        for (index, raw) in table.chunks_exact(ENTRY_BYTES as usize).enumerate() {
            let raw = be_u64(raw, 0);
            let guest_cluster = first.saturating_add(index as u64);
            let decoded = decode_l2(raw, layout.cluster_bits, layout.version);
            let compressed = matches!(decoded, Ok(L2Entry::Compressed { .. }));
            let problem = match decoded {
                // qcow2-rs writes part of such a cluster into a new one
                // without copying the rest, which then reads as zeroes.
                Ok(L2Entry::Data { .. }) if raw & entry::COPIED == 0 => Some(
                    "is a data cluster without the COPIED flag (shared, or to be copied \
                     on write), which qcow2-rs would not copy"
                        .to_string(),
                ),
                Ok(entry) => self.check_l2_entry(entry),
                Err(problem) => Some(problem),
            };
            if problem.is_none() && compressed && guest_cluster < layout.guest_clusters() {
                self.report.compressed.add(guest_cluster);
            }
            if let Some(problem) = problem {
                if guest_cluster < layout.guest_clusters() {
                    self.report.bad.add(
                        guest_cluster,
                        1,
                        format!(
                            "L2 entry {index} ({raw:#x}) of the L2 table at {offset:#x} {problem}"
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// Counts the uses of a decoded L2 entry, or says what is wrong with it.
    fn check_l2_entry(&mut self, entry: L2Entry) -> Option<String> {
        let file_len = self.layout.file_len;
        match entry {
            L2Entry::Unallocated | L2Entry::Zero { offset: 0 } => None,
            L2Entry::Data { offset } | L2Entry::Zero { offset } => {
                // The cluster may end past the end of the file: its tail
                // reads as zeroes.
                if offset >= file_len {
                    self.report.bad_past_end += 1;
                    return Some(format!(
                        "points past the end of the file ({file_len} bytes)"
                    ));
                }
                if let Some(other) = self.meta_at(offset) {
                    return Some(format!("points at {other}"));
                }
                self.add_use(offset / self.cluster_bytes);
                self.report.allocated_clusters += 1;
                None
            }
            L2Entry::Compressed { offset, end } => {
                // QEMU counts whole sectors: the last may run past the end of
                // a file whose length is not a multiple of 512.
                if offset >= file_len || end > file_len.next_multiple_of(512) {
                    self.report.bad_past_end += 1;
                    return Some(format!(
                        "has compressed data at {offset:#x}..{end:#x}, past the end of the file ({file_len} bytes)"
                    ));
                }
                let clusters = offset / self.cluster_bytes..end.div_ceil(self.cluster_bytes);
                if let Some(other) = clusters
                    .clone()
                    .find_map(|cluster| self.meta.get(&cluster).copied())
                {
                    return Some(format!(
                        "has compressed data at {offset:#x}..{end:#x} overlapping {other}"
                    ));
                }
                for cluster in clusters {
                    self.add_use(cluster);
                }
                self.report.allocated_clusters += 1;
                self.report.compressed_clusters += 1;
                None
            }
        }
    }

    /// Compares each host cluster's refcount with its uses.
    fn compare_refcounts(
        &mut self,
        refblocks: &[u64],
        l2_tables: &[(u64, u64)],
    ) -> Result<(), MetaError> {
        let per_block = self.layout.refblock_entries();
        let host_clusters = self.uses.len() as u64;
        let mut block: Option<(u64, Vec<u8>)> = None;
        for cluster in 0..host_clusters {
            let block_index = cluster / per_block;
            let refblock = usize::try_from(block_index)
                .ok()
                .and_then(|at| refblocks.get(at))
                .copied()
                .unwrap_or(0);
            let refcount = if refblock == 0 {
                0
            } else {
                if block.as_ref().is_none_or(|(at, _)| *at != refblock) {
                    let data = self.read_table(refblock, self.cluster_bytes, || {
                        format!("the refblock at {refblock:#x}")
                    })?;
                    block = Some((refblock, data));
                }
                block
                    .as_ref()
                    .map_or(0, |(_, data)| entry::refcount16(data, cluster % per_block))
            };
            let uses = u64::from(self.uses[cluster as usize]);
            // A saturated count means 65535 or more uses: more than a 16 bit
            // refcount can count unless it is exactly that.
            let too_many = uses == u64::from(u16::MAX) && refcount == uses;
            if refcount < uses || too_many {
                return Err(MetaError::RefcountTooLow {
                    path: self.path.to_owned(),
                    cluster,
                    cluster_bytes: self.cluster_bytes,
                    refcount,
                    uses,
                    users: self.users_of(cluster, l2_tables),
                });
            }
            if uses > 0 {
                self.report.referenced_host_clusters += 1;
            }
            if refcount > uses {
                self.report.leaked_clusters += 1;
            }
        }
        Ok(())
    }

    /// Names what uses host cluster `cluster` (the error path only: it
    /// reads the L2 tables again).
    fn users_of(&self, cluster: u64, l2_tables: &[(u64, u64)]) -> String {
        let mut users: Vec<String> = self
            .meta
            .get(&cluster)
            .map(|kind| kind.to_string())
            .into_iter()
            .collect();
        let l2_entries = self.layout.l2_entries();
        for &(l1_index, offset) in l2_tables {
            if users.len() >= MAX_USERS_NAMED {
                break;
            }
            let Ok(table) = self.read_table(offset, self.cluster_bytes, String::new) else {
                continue;
            };
            for (index, raw) in table.chunks_exact(ENTRY_BYTES as usize).enumerate() {
                let uses_it = match decode_l2(
                    be_u64(raw, 0),
                    self.layout.cluster_bits,
                    self.layout.version,
                ) {
                    Ok(L2Entry::Data { offset }) | Ok(L2Entry::Zero { offset }) => {
                        offset != 0 && offset / self.cluster_bytes == cluster
                    }
                    Ok(L2Entry::Compressed { offset, end }) => (offset / self.cluster_bytes
                        ..end.div_ceil(self.cluster_bytes))
                        .contains(&cluster),
                    _ => false,
                };
                if uses_it && users.len() < MAX_USERS_NAMED {
                    let guest = l1_index
                        .saturating_mul(l2_entries)
                        .saturating_add(index as u64);
                    users.push(format!("the data of guest cluster {guest}"));
                }
            }
        }
        if users.is_empty() {
            "nothing known".to_string()
        } else {
            users.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::read_layout;
    use super::super::testutil::{qcow2, qemu_img, qemu_io, read_u64, write_u64};
    use super::*;
    use std::path::PathBuf;

    const CLUSTER: u64 = 64 << 10;

    /// A 1G image with 64K clusters, 1M of 0xab at 0 (guest clusters
    /// 0..16) and 64K of 0xcd at 600M (L1 entry 1).
    fn written(dir: &Path) -> PathBuf {
        let path = qcow2(dir, "w.qcow2", "1G", "");
        qemu_io(&path, &["write -P 0xab 0 1M", "write -P 0xcd 600M 64k"]);
        path
    }

    fn scan_path(path: &Path) -> Result<ScanReport, MetaError> {
        let file = File::open(path).unwrap();
        let layout = read_layout(&file, path).unwrap();
        scan(&file, path, &layout)
    }

    struct Offsets {
        l1: u64,
        reftable: u64,
        refblock: u64,
        l2: u64,
        l2_second: u64,
    }

    fn offsets(path: &Path) -> Offsets {
        let l1 = read_u64(path, 40);
        let reftable = read_u64(path, 48);
        Offsets {
            l1,
            reftable,
            refblock: read_u64(path, reftable),
            l2: read_u64(path, l1) & 0x00ff_ffff_ffff_fe00,
            l2_second: read_u64(path, l1 + 8) & 0x00ff_ffff_ffff_fe00,
        }
    }

    #[test]
    fn clean_images_have_nothing_to_report() {
        let dir = tempfile::tempdir().unwrap();
        let report = scan_path(&written(dir.path())).unwrap();
        assert!(report.bad.is_empty(), "{report:?}");
        assert_eq!(report.allocated_clusters, 17);
        assert_eq!(report.l2_tables, 2);
        assert_eq!(report.leaked_clusters, 0);
        // header, reftable, refblock, L1, 2 L2 tables, 17 data clusters.
        assert_eq!(report.referenced_host_clusters, 23);
        let empty = qcow2(dir.path(), "e.qcow2", "10G", "cluster_size=4k");
        let report = scan_path(&empty).unwrap();
        assert_eq!((report.allocated_clusters, report.l2_tables), (0, 0));
    }

    /// Found by the qcow2_image fuzz target: qcow2-rs wrote part of a
    /// data cluster whose L2 entry lacks the COPIED flag into a new cluster
    /// without copying the rest, which then read as zeroes.
    #[test]
    fn data_clusters_without_the_copied_flag_are_poisoned() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path());
        let o = offsets(&path);
        let entry = read_u64(&path, o.l2 + 8);
        write_u64(&path, o.l2 + 8, entry & !entry::COPIED);
        let report = scan_path(&path).unwrap();
        let runs: Vec<_> = report.bad.runs().map(|(f, c, _)| (f, c)).collect();
        assert_eq!(runs, vec![(1, 1)]);
        let why = report.bad.describe(1).unwrap();
        assert!(why.contains("without the COPIED flag"), "{why}");
    }

    #[test]
    fn the_report_lists_every_metadata_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path());
        let o = offsets(&path);
        let report = scan_path(&path).unwrap();
        let mut listed: Vec<(u64, MetaCluster)> = report
            .metadata
            .iter()
            .map(|(&cluster, &kind)| (cluster * CLUSTER, kind))
            .collect();
        listed.sort_by_key(|&(offset, _)| offset);
        let mut expected = vec![
            (0, MetaCluster::Header),
            (o.l1, MetaCluster::L1Table),
            (o.reftable, MetaCluster::RefcountTable),
            (o.refblock, MetaCluster::Refblock(0)),
            (o.l2, MetaCluster::L2Table(0)),
            (o.l2_second, MetaCluster::L2Table(1)),
        ];
        expected.sort_by_key(|&(offset, _)| offset);
        assert_eq!(listed, expected);
    }

    #[test]
    fn compressed_images_are_clean() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let raw = d.join("r.raw");
        qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "4M"]);
        qemu_io_raw(&raw, "write -P 0x12 0 1M");
        qemu_io_raw(&raw, "write -P 0x34 2M 5000");
        let c = d.join("c.qcow2");
        for cluster in ["4k", "64k"] {
            let _ = std::fs::remove_file(&c);
            qemu_img(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                raw.to_str().unwrap(),
                c.to_str().unwrap(),
            ]);
            let report = scan_path(&c).unwrap();
            assert!(report.bad.is_empty(), "{report:?}");
            assert!(report.compressed_clusters > 0, "{report:?}");
            // 0..1M and 2M..2M+5000 were written: compressed clusters.
            let cluster: u64 = if cluster == "4k" { 4096 } else { 65536 };
            assert!(report.compressed.any_in(0, 1));
            assert!(report.compressed.any_in((1 << 20) / cluster - 1, 1));
            assert!(!report.compressed.any_in((1 << 20) / cluster, 1));
            assert!(report.compressed.any_in((2 << 20) / cluster, 1));
            assert!(!report.compressed.any_in((3 << 20) / cluster, 4));
            assert_eq!(report.leaked_clusters, 0, "{report:?}");
        }
    }

    fn qemu_io_raw(path: &Path, command: &str) {
        super::super::testutil::run(
            "qemu-io",
            &["-f", "raw", "-c", command, path.to_str().unwrap()],
        );
    }

    #[test]
    fn bad_l1_entries_poison_their_guest_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let clean = written(dir.path());
        let o = offsets(&clean);
        let cases = [
            (o.l2 + 0x200, "is not a multiple of the cluster size"),
            (o.l2 | 1, "reserved bits 0x1 are set"),
            (1 << 40, "points past the end of the file"),
            (o.l1, "points at the L1 table"),
            (o.reftable, "points at the refcount table"),
            (
                o.refblock,
                "points at the refblock of refcount table entry 0",
            ),
        ];
        for (value, expected) in cases {
            let path = dir.path().join("bad.qcow2");
            std::fs::copy(&clean, &path).unwrap();
            write_u64(&path, o.l1, value);
            let report = scan_path(&path).unwrap();
            let problem = report.bad.describe(5).unwrap_or_default();
            assert!(problem.contains(expected), "{value:#x}: {problem}");
            assert!(problem.starts_with("L1 entry 0"), "{problem}");
            assert_eq!(report.bad.cluster_count(), 8192, "{report:?}");
            assert!(report.bad.any_in(8191, 1) && !report.bad.any_in(8192, 10_000));
            assert_eq!(report.bad.describe(9600), None);
        }
        // Two L1 entries sharing an L2 table: the second is poisoned.
        let path = dir.path().join("shared.qcow2");
        std::fs::copy(&clean, &path).unwrap();
        write_u64(&path, o.l1 + 8, o.l2 | 1 << 63);
        let report = scan_path(&path).unwrap();
        assert!(!report.bad.any_in(0, 8192));
        let problem = report.bad.describe(8192).unwrap();
        assert!(
            problem.contains("points at the L2 table of L1 entry 0"),
            "{problem}"
        );
    }

    #[test]
    fn bad_l2_entries_poison_one_guest_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let clean = written(dir.path());
        let o = offsets(&clean);
        let data = read_u64(&clean, o.l2 + 3 * 8);
        let cases = [
            (data + 0x200, "is not a multiple of the cluster size"),
            (data | 0x2, "reserved bits 0x2 are set"),
            (1 << 63 | 1 << 40, "points past the end of the file"),
            (1 << 63 | o.l1, "points at the L1 table"),
            (1 << 63 | o.reftable, "points at the refcount table"),
            (1 << 63 | o.refblock, "points at the refblock"),
            (
                1 << 63 | o.l2_second,
                "points at the L2 table of L1 entry 1",
            ),
            (1 << 63 | o.l2, "points at the L2 table of L1 entry 0"),
            // A compressed entry with its data over the header.
            (1 << 62 | 0x100, "overlapping the header cluster"),
        ];
        for (value, expected) in cases {
            let path = dir.path().join("bad.qcow2");
            std::fs::copy(&clean, &path).unwrap();
            write_u64(&path, o.l2 + 3 * 8, value);
            let report = scan_path(&path).unwrap();
            let problem = report.bad.describe(3).unwrap_or_default();
            assert!(problem.contains(expected), "{value:#x}: {problem}");
            assert!(problem.starts_with("L2 entry 3"), "{problem}");
            assert_eq!(report.bad.cluster_count(), 1);
            assert!(report.bad.any_in(0, 4) && !report.bad.any_in(4, 100));
            assert!(!report.bad.any_in(0, 3) && report.bad.describe(2).is_none());
            // The old data cluster lost its only use: now a leak.
            assert_eq!(report.leaked_clusters, 1, "{value:#x}");
        }
    }

    fn refcount_offset(o: &Offsets, host_offset: u64) -> u64 {
        o.refblock + host_offset / CLUSTER * 2
    }

    fn set_refcount(path: &Path, at: u64, value: u16) {
        use std::os::unix::fs::FileExt;
        super::super::testutil::open_rw(path)
            .write_all_at(&value.to_be_bytes(), at)
            .unwrap();
    }

    #[test]
    fn refcounts_below_uses_refuse_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let clean = written(dir.path());
        let o = offsets(&clean);
        let data = read_u64(&clean, o.l2 + 3 * 8) & 0x00ff_ffff_ffff_fe00;

        let path = dir.path().join("zero.qcow2");
        std::fs::copy(&clean, &path).unwrap();
        set_refcount(&path, refcount_offset(&o, data), 0);
        let err = scan_path(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("host cluster {} (offset {data:#x}) has refcount 0 but is used 1 time(s), as the data of guest cluster 3", data / CLUSTER)),
            "{err}"
        );
        assert!(err.contains("qemu-img check -r all"), "{err}");

        std::fs::copy(&clean, &path).unwrap();
        set_refcount(&path, refcount_offset(&o, o.l2), 0);
        let err = scan_path(&path).unwrap_err().to_string();
        assert!(err.contains("as the L2 table of L1 entry 0"), "{err}");

        let path = dir.path().join("double.qcow2");
        std::fs::copy(&clean, &path).unwrap();
        write_u64(&path, o.l2 + 5 * 8, read_u64(&clean, o.l2 + 3 * 8));
        let err = scan_path(&path).unwrap_err().to_string();
        assert!(
            err.contains("has refcount 1 but is used 2 time(s), as the data of guest cluster 3, the data of guest cluster 5"),
            "{err}"
        );
    }

    #[test]
    fn refcounts_above_uses_are_leaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path());
        let o = offsets(&path);
        let data = read_u64(&path, o.l2) & 0x00ff_ffff_ffff_fe00;
        set_refcount(&path, refcount_offset(&o, data), 2);
        assert_eq!(scan_path(&path).unwrap().leaked_clusters, 1);
    }

    #[test]
    fn bad_refcount_table_entries_refuse_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let clean = written(dir.path());
        let o = offsets(&clean);
        for (value, expected) in [
            (o.refblock + 0x1000, "is not a multiple of the cluster size"),
            (o.refblock | 1, "reserved bits 0x1"),
            (1 << 40, "points past the end of the file"),
            (o.l1, "points at the L1 table"),
            (o.reftable, "points at the refcount table"),
        ] {
            let path = dir.path().join("bad.qcow2");
            std::fs::copy(&clean, &path).unwrap();
            write_u64(&path, o.reftable + 8, value);
            let err = scan_path(&path).unwrap_err().to_string();
            assert!(err.contains("refcount table entry 1"), "{err}");
            assert!(
                err.contains(expected) && err.contains("qemu-img check -r all"),
                "{err}"
            );
        }
        // A refblock where an L2 table is: refcounts are checked first, so
        // the L2 table is what the L1 entry may no longer use.
        let path = dir.path().join("refblock-l2.qcow2");
        std::fs::copy(&clean, &path).unwrap();
        write_u64(&path, o.reftable + 8, o.l2);
        let report = scan_path(&path).unwrap();
        let problem = report.bad.describe(0).unwrap();
        assert!(
            problem.contains("points at the refblock of refcount table entry 1"),
            "{problem}"
        );
    }
}
