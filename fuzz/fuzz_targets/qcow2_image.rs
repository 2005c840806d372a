//! Arbitrary bytes as a qcow2 image file: ringvm-blk's own qcow2 metadata
//! parser ([`ringvm_blk::image::qcow2::meta`]), which validates every image
//! before qcow2-rs sees it: `read_layout` (header, extensions, backing
//! file), `scan` (L1, L2, refcount table and blocks) and, on what scans,
//! `unmap` (discard of a few clusters, which rewrites tables on disk).
//!
//! Invariants: nothing panics, and nothing runs away (every allocation and
//! loop is bounded by the file's size; libFuzzer's -rss_limit_mb and
//! -timeout catch the rest). After an `unmap` that succeeded, the image must
//! still scan: freeing clusters never breaks an image that was valid.
//!
//! Input: the file's bytes (at most 1 MiB is used). The image lives in a
//! memfd, so `unmap`'s writes and syncs touch no disk. Seeds:
//! seeds/qcow2_image.sh writes images made by qemu-img and qemu-io.

#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use ringvm_blk::image::qcow2::meta::{read_layout, scan, unmap, UnmapMode};

const MAX_BYTES: usize = 1 << 20;

fn memfd(bytes: &[u8]) -> File {
    // SAFETY: a static C string name and valid flags; memfd_create returns
    // a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"qcow2-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes).unwrap();
    file
}

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_BYTES)];
    let file = memfd(data);
    let path = Path::new("fuzz.qcow2");
    let Ok(layout) = read_layout(&file, path) else {
        return;
    };
    let Ok(report) = scan(&file, path, &layout) else {
        return;
    };
    let clusters = layout.virtual_size >> layout.cluster_bits;
    if clusters == 0 || !report.bad.is_empty() {
        return;
    }
    let first = u64::from(data.get(8).copied().unwrap_or(0)) % clusters;
    let count = (u64::from(data.get(9).copied().unwrap_or(1)) % 8 + 1).min(clusters - first);
    let mode = if data.get(10).copied().unwrap_or(0) & 1 == 0 {
        UnmapMode::Discard
    } else {
        UnmapMode::Zero
    };
    if unmap(&file, &layout, first, count, mode).is_ok() {
        let layout = read_layout(&file, path).expect("an image that unmap wrote still opens");
        scan(&file, path, &layout).expect("an image that unmap wrote still scans");
    }
});
