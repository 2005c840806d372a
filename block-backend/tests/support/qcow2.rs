//! qcow2 images for the backend tests: made and checked with qemu-img and
//! qemu-io (a qcow2 implementation nobody here wrote), and poked at by hand
//! where the tests need a broken one. Offsets and bits are those of the
//! qcow2 specification (docs/interop/qcow2.txt in QEMU).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Output};

/// Header field offsets (qcow2 specification, "Header").
const CLUSTER_BITS_AT: u64 = 20;
const SIZE_AT: u64 = 24;
const L1_SIZE_AT: u64 = 36;
const L1_TABLE_OFFSET_AT: u64 = 40;
const REFCOUNT_TABLE_OFFSET_AT: u64 = 48;
const REFCOUNT_TABLE_CLUSTERS_AT: u64 = 56;
/// incompatible_features: bytes 72..80 of a version 3 header.
pub const INCOMPATIBLE_FEATURES_AT: u64 = 72;
/// Incompatible feature bits.
pub const DIRTY_BIT: u32 = 0;
pub const CORRUPT_BIT: u32 = 1;
/// Bits 9..55 of an L1 or L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63 of an L1 or L2 entry: refcount exactly one.
pub const COPIED: u64 = 1 << 63;

/// The image formats the tests run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name of `--format` and of qemu-img's `-f`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// A new image of `size_bytes` that reads as zeroes: a sparse raw file,
    /// or `qemu-img create -f qcow2` with `cluster_bytes` clusters.
    pub fn create(self, path: &Path, size_bytes: u64, cluster_bytes: u64) {
        match self {
            Format::Raw => File::create(path).unwrap().set_len(size_bytes).unwrap(),
            Format::Qcow2 => {
                create_qcow2(path, size_bytes, &format!("cluster_size={cluster_bytes}"))
            }
        }
    }

    /// What a guest sees of the image, read by qemu-img (raw: the file).
    pub fn guest_view(self, path: &Path) -> Vec<u8> {
        match self {
            Format::Raw => std::fs::read(path).unwrap(),
            Format::Qcow2 => to_raw(path),
        }
    }

    /// `qemu-img check` for qcow2 (see `assert_check_clean`); nothing to
    /// check in a raw file.
    pub fn assert_consistent(self, path: &Path) {
        if self == Format::Qcow2 {
            assert_check_clean(path);
        }
    }
}

/// Runs a QEMU tool; panics with a clear message when it is not installed.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {tool} (package qemu-utils): {err}"))
}

/// Runs a QEMU tool that must succeed; returns its stdout.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `qemu-img create -f qcow2 -o OPTIONS PATH SIZE`.
pub fn create_qcow2(path: &Path, size_bytes: u64, options: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    let size = size_bytes.to_string();
    args.extend([path.to_str().unwrap(), &size]);
    run_ok("qemu-img", &args);
}

/// `qemu-io -c COMMAND PATH` (the format taken from the header).
pub fn qemu_io(path: &Path, command: &str) -> String {
    let out = run_ok("qemu-io", &["-c", command, path.to_str().unwrap()]);
    assert!(
        !out.contains("error") && !out.contains("Pattern verification failed"),
        "qemu-io -c '{command}': {out}"
    );
    out
}

/// What `qemu-img check --output=json` says.
#[derive(Debug)]
pub struct CheckReport {
    pub exit_code: Option<i32>,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub text: String,
}

pub fn check(path: &Path) -> CheckReport {
    let out = run(
        "qemu-img",
        &["check", "--output=json", path.to_str().unwrap()],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("qemu-img check output is not JSON ({err}): {text}"));
    let field = |name: &str| json.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
    CheckReport {
        exit_code: out.status.code(),
        corruptions: field("corruptions"),
        leaks: field("leaks"),
        check_errors: field("check-errors"),
        text,
    }
}

/// `qemu-img check` finds no corruption: exit status 0, or 3 (leaked
/// clusters only, which a crash may leave and which lose no data).
pub fn assert_check_clean(path: &Path) -> CheckReport {
    let report = check(path);
    assert!(
        matches!(report.exit_code, Some(0) | Some(3))
            && report.corruptions == 0
            && report.check_errors == 0,
        "qemu-img check {}: {report:?}",
        path.display()
    );
    report
}

/// The guest's view of a qcow2 image: `qemu-img convert -O raw`.
pub fn to_raw(path: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("view.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(raw).unwrap()
}

/// `qemu-img info --output=json`, parsed.
pub fn info(path: &Path) -> serde_json::Value {
    let out = run_ok(
        "qemu-img",
        &["info", "--output=json", path.to_str().unwrap()],
    );
    serde_json::from_str(&out).unwrap()
}

/// One range of `qemu-img map --output=json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapRange {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub data: bool,
    pub zero: bool,
}

pub fn map(path: &Path, format: Format) -> Vec<MapRange> {
    let out = run_ok(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            format.name(),
            path.to_str().unwrap(),
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|range| MapRange {
            start: range["start"].as_u64().unwrap(),
            length: range["length"].as_u64().unwrap(),
            depth: range["depth"].as_u64().unwrap(),
            data: range["data"].as_bool().unwrap(),
            zero: range["zero"].as_bool().unwrap(),
        })
        .collect()
}

/// The ranges of `map` that overlap `start..start + length`.
pub fn map_overlapping(map: &[MapRange], start: u64, length: u64) -> Vec<MapRange> {
    map.iter()
        .filter(|r| r.start < start + length && start < r.start + r.length)
        .cloned()
        .collect()
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

pub fn read_u64_be(path: &Path, offset: u64) -> u64 {
    let mut raw = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut raw, offset)
        .unwrap();
    u64::from_be_bytes(raw)
}

pub fn read_u32_be(path: &Path, offset: u64) -> u32 {
    let mut raw = [0u8; 4];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut raw, offset)
        .unwrap();
    u32::from_be_bytes(raw)
}

pub fn write_u64_be(path: &Path, offset: u64, value: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&value.to_be_bytes(), offset)
        .unwrap();
}

pub fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Sets `bit` of incompatible_features (a version 3 header).
pub fn set_incompatible_bit(path: &Path, bit: u32) {
    let features = read_u64_be(path, INCOMPATIBLE_FEATURES_AT);
    write_u64_be(path, INCOMPATIBLE_FEATURES_AT, features | (1 << bit));
}

pub fn incompatible_features(path: &Path) -> u64 {
    read_u64_be(path, INCOMPATIBLE_FEATURES_AT)
}

/// The header fields the corruption tests need.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub cluster_bytes: u64,
    pub size_bytes: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
}

impl Header {
    pub fn read(path: &Path) -> Header {
        assert_eq!(
            read_range(path, 0, 4),
            b"QFI\xfb",
            "{} is not qcow2",
            path.display()
        );
        Header {
            cluster_bytes: 1 << read_u32_be(path, CLUSTER_BITS_AT),
            size_bytes: read_u64_be(path, SIZE_AT),
            l1_size: read_u32_be(path, L1_SIZE_AT),
            l1_table_offset: read_u64_be(path, L1_TABLE_OFFSET_AT),
            refcount_table_offset: read_u64_be(path, REFCOUNT_TABLE_OFFSET_AT),
            refcount_table_clusters: read_u32_be(path, REFCOUNT_TABLE_CLUSTERS_AT),
        }
    }

    /// Where L1 entry `index` is in the file.
    pub fn l1_entry_at(&self, index: u64) -> u64 {
        self.l1_table_offset + 8 * index
    }

    /// Where the L2 entry of guest cluster `guest_cluster` is in the file
    /// (its L2 table must be allocated).
    pub fn l2_entry_at(&self, path: &Path, guest_cluster: u64) -> u64 {
        let entries_per_table = self.cluster_bytes / 8;
        let l1_entry = read_u64_be(path, self.l1_entry_at(guest_cluster / entries_per_table));
        let l2_table = l1_entry & OFFSET_MASK;
        assert_ne!(l2_table, 0, "guest cluster {guest_cluster} has no L2 table");
        l2_table + 8 * (guest_cluster % entries_per_table)
    }

    /// The metadata that must survive a write to a corrupted cluster: the
    /// header cluster with incompatible_features zeroed (that field may
    /// gain the corrupt bit), the L1 table and the refcount table.
    pub fn metadata_snapshot(&self, path: &Path) -> Vec<u8> {
        let mut bytes = read_range(path, 0, self.cluster_bytes as usize);
        let at = INCOMPATIBLE_FEATURES_AT as usize;
        bytes[at..at + 8].fill(0);
        bytes.extend(read_range(
            path,
            self.l1_table_offset,
            8 * self.l1_size as usize,
        ));
        bytes.extend(read_range(
            path,
            self.refcount_table_offset,
            (u64::from(self.refcount_table_clusters) * self.cluster_bytes) as usize,
        ));
        bytes
    }
}

/// A tmpfs of `size_bytes` mounted on a new temporary directory, unmounted
/// on drop. Needs root (CI runs the tests as root); a failed mount panics:
/// a test that needs a full disk must not pass without one.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size_bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = run_mount(&[
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size_bytes}"),
            "tmpfs",
            dir.path().to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "cannot mount a {size_bytes}-byte tmpfs on {} (the disk-full test needs root): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn run_mount(args: &[&str]) -> Output {
    Command::new("mount")
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run mount: {err}"))
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let dir = self.dir.path().to_str().unwrap();
        let unmounted = Command::new("umount")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process that has a file open there): detach it.
            let _ = Command::new("umount").args(["-l", dir]).status();
        }
    }
}
