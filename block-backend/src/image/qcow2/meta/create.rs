//! [`create()`]: a thin qcow2 version 3 image with 16 bit refcounts.
//!
//! Layout, in clusters: the header, the refcount table, the refblocks
//! covering the metadata, then the L1 table (all zeroes, left sparse). No
//! L2 table or data cluster is allocated.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{
    ENTRY_BYTES, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS, QCOW2_MAGIC,
    REFCOUNT_ORDER,
};
use super::MetaError;

/// Version 3 header length with the compression type byte and its
/// padding, as QEMU writes it.
const HEADER_LENGTH: u32 = 112;
const SECTOR_BYTES: u64 = 512;

/// Where the metadata of a new image goes, in clusters.
#[derive(Debug, PartialEq, Eq)]
struct CreateLayout {
    reftable_clusters: u64,
    refblocks: u64,
    l1_entries: u64,
    l1_clusters: u64,
}

impl CreateLayout {
    fn total_clusters(&self) -> u64 {
        1 + self.reftable_clusters + self.refblocks + self.l1_clusters
    }
}

/// Creates the qcow2 image `path` (which must not exist) of `size` bytes
/// with clusters of `cluster_size` bytes.
pub fn create(path: &Path, size: u64, cluster_size: u64) -> Result<(), MetaError> {
    let plan = plan(size, cluster_size).map_err(|problem| MetaError::CreateParams {
        path: path.to_owned(),
        size,
        cluster_bytes: cluster_size,
        problem,
    })?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => MetaError::CreateExists {
                path: path.to_owned(),
            },
            _ => MetaError::Io {
                path: path.to_owned(),
                what: "create the file".to_string(),
                source,
            },
        })?;
    write_image(&file, &plan, size, cluster_size).map_err(|source| {
        // Best effort: a half-written image is worse than none.
        let _ = fs::remove_file(path);
        MetaError::Io {
            path: path.to_owned(),
            what: "write the new image".to_string(),
            source,
        }
    })
}

/// Sizes the metadata: the refblocks must count themselves, the refcount
/// table and the L1 table.
fn plan(size: u64, cluster_size: u64) -> Result<CreateLayout, String> {
    if !cluster_size.is_power_of_two()
        || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cluster_size)
    {
        return Err("the cluster size must be a power of two from 512 to 2M".to_string());
    }
    if size == 0 || size % SECTOR_BYTES != 0 {
        return Err("the size must be a positive multiple of 512 bytes".to_string());
    }
    let bytes_per_l2 = cluster_size * (cluster_size / ENTRY_BYTES);
    let l1_entries = size.div_ceil(bytes_per_l2);
    let l1_bytes = l1_entries * ENTRY_BYTES;
    if l1_bytes > MAX_L1_BYTES || l1_entries > u64::from(u32::MAX) {
        return Err(format!(
            "it needs {l1_entries} L1 entries, more than QEMU's limit of {} (use larger clusters)",
            MAX_L1_BYTES / ENTRY_BYTES
        ));
    }
    let per_refblock = (cluster_size * 8) >> REFCOUNT_ORDER;
    let mut plan = CreateLayout {
        reftable_clusters: 1,
        refblocks: 1,
        l1_entries,
        l1_clusters: l1_bytes.div_ceil(cluster_size),
    };
    // Each round only grows the counts; they settle within a few rounds.
    loop {
        let refblocks = plan.total_clusters().div_ceil(per_refblock);
        let reftable_clusters = (refblocks * ENTRY_BYTES).div_ceil(cluster_size);
        if refblocks <= plan.refblocks && reftable_clusters <= plan.reftable_clusters {
            break;
        }
        plan.refblocks = plan.refblocks.max(refblocks);
        plan.reftable_clusters = plan.reftable_clusters.max(reftable_clusters);
    }
    if plan.reftable_clusters * cluster_size > MAX_REFTABLE_BYTES {
        return Err("its refcount table would exceed QEMU's limit of 8 MiB".to_string());
    }
    Ok(plan)
}

fn write_image(file: &File, plan: &CreateLayout, size: u64, cluster_size: u64) -> io::Result<()> {
    let reftable_offset = cluster_size;
    let first_refblock = 1 + plan.reftable_clusters;
    let l1_offset = (first_refblock + plan.refblocks) * cluster_size;
    let cluster_bits = cluster_size.trailing_zeros();

    let mut header = vec![0u8; cluster_size as usize];
    let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &QCOW2_MAGIC);
    put(4, &3u32.to_be_bytes());
    put(20, &cluster_bits.to_be_bytes());
    put(24, &size.to_be_bytes());
    // plan() bounded l1_entries by u32::MAX.
    put(36, &(plan.l1_entries as u32).to_be_bytes());
    put(40, &l1_offset.to_be_bytes());
    put(48, &reftable_offset.to_be_bytes());
    put(56, &(plan.reftable_clusters as u32).to_be_bytes());
    put(96, &REFCOUNT_ORDER.to_be_bytes());
    put(100, &HEADER_LENGTH.to_be_bytes());
    // Byte 104 (compression type zlib), its padding and the end of the
    // header extensions (type 0) after it are zeroes already.
    file.write_all_at(&header, 0)?;

    let mut reftable = vec![0u8; (plan.reftable_clusters * cluster_size) as usize];
    for (index, slot) in reftable
        .chunks_exact_mut(ENTRY_BYTES as usize)
        .take(plan.refblocks as usize)
        .enumerate()
    {
        let offset = (first_refblock + index as u64) * cluster_size;
        slot.copy_from_slice(&offset.to_be_bytes());
    }
    file.write_all_at(&reftable, reftable_offset)?;

    let per_refblock = (cluster_size * 8) >> REFCOUNT_ORDER;
    let mut used = plan.total_clusters();
    for index in 0..plan.refblocks {
        let mut refblock = vec![0u8; cluster_size as usize];
        let count = used.min(per_refblock);
        for slot in refblock.chunks_exact_mut(2).take(count as usize) {
            slot.copy_from_slice(&1u16.to_be_bytes());
        }
        used -= count;
        file.write_all_at(&refblock, (first_refblock + index) * cluster_size)?;
    }
    // The L1 table: zeroes, as a sparse tail.
    file.set_len(plan.total_clusters() * cluster_size)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::super::header::read_layout;
    use super::super::scan::scan;
    use super::super::testutil::{assert_check_clean, qemu_img, qemu_io};
    use super::*;

    #[test]
    fn created_images_are_what_qemu_img_expects() {
        let dir = tempfile::tempdir().unwrap();
        for (size, cluster) in [
            (10u64 << 30, 64u64 << 10),
            (1 << 20, 512),
            (100 << 30, 2 << 20),
            (64 << 30, 4096),
        ] {
            let path = dir.path().join(format!("{size}-{cluster}.qcow2"));
            create(&path, size, cluster).unwrap();
            assert_check_clean(&path);
            let info = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
            assert!(
                info.contains(&format!("\"virtual-size\": {size},")),
                "{info}"
            );
            assert!(
                info.contains(&format!("\"cluster-size\": {cluster},")),
                "{info}"
            );
            assert!(info.contains("\"compat\": \"1.1\""), "{info}");
            let len = std::fs::metadata(&path).unwrap().len();
            let l1_clusters = (size.div_ceil(cluster * cluster / 8) * 8).div_ceil(cluster);
            assert!(len <= (4 + l1_clusters) * cluster, "{len} bytes");
            let file = File::open(&path).unwrap();
            let layout = read_layout(&file, &path).unwrap();
            let report = scan(&file, &path, &layout).unwrap();
            assert_eq!((report.allocated_clusters, report.leaked_clusters), (0, 0));
        }
    }

    #[test]
    fn created_images_take_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.qcow2");
        create(&path, 1 << 30, 64 << 10).unwrap();
        qemu_io(&path, &["write -P 0x5a 1M 3M", "write -P 0x11 1000M 4k"]);
        qemu_io(
            &path,
            &[
                "read -P 0x5a 1M 3M",
                "read -P 0x11 1000M 4k",
                "read -P 0 0 1M",
            ],
        );
        assert_check_clean(&path);
    }

    #[test]
    fn existing_paths_and_bad_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        std::fs::write(&path, b"precious").unwrap();
        let err = create(&path, 1 << 20, 65536).unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            err.to_string(),
            format!(
                "{}: already exists; ringvm-blk create does not overwrite files",
                path.display()
            )
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");

        let path = dir.path().join("y.qcow2");
        for (size, cluster, expected) in [
            (1000, 65536, "positive multiple of 512"),
            (0, 65536, "positive multiple of 512"),
            (1 << 20, 3000, "power of two from 512 to 2M"),
            (1 << 50, 512, "more than QEMU's limit"),
        ] {
            let err = create(&path, size, cluster).unwrap_err();
            assert!(
                err.is_bad_input() && err.to_string().contains(expected),
                "{err}"
            );
            assert!(!path.exists());
        }
        let err = create(Path::new("/nonexistent/dir/z.qcow2"), 1 << 20, 65536).unwrap_err();
        assert!(!err.is_bad_input());
        assert!(
            err.to_string()
                .contains("/nonexistent/dir/z.qcow2: cannot create the file"),
            "{err}"
        );
    }
}
