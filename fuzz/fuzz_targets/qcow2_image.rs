//! Arbitrary bytes as a qcow2 image file, then a sequence of reads, writes,
//! discards, write-zeroes and flushes on it through ringvm-blk's qcow2
//! serving path.
//!
//! 1. Metadata: ringvm-blk's own qcow2 parser
//!    ([`ringvm_blk::image::qcow2::meta`]), which validates every image
//!    before qcow2-rs sees it: `read_layout` (header, extensions, backing
//!    file), `scan` (L1, L2, refcount table and blocks) and, on what scans
//!    clean, `unmap` of a few clusters (in a memfd).
//! 2. I/O, on images that scan, with clusters up to 64 KiB and a virtual
//!    size up to [`MAX_VIRTUAL_BYTES`], in a tmpfs file, opened as the
//!    backend opens it (`image::open`: a `Qcow2Image`, whose owner thread
//!    runs qcow2-rs on ringvm-blk's io_uring). The operations go through
//!    the image's queue engine (what a queue worker gets), built as the
//!    queue worker builds them: the image's `map` checks the range, and a
//!    request past the capacity never reaches the engine (the request
//!    parser refuses it with IOERR). Consecutive records can form a batch,
//!    submitted together and served concurrently by the owner.
//!
//!    The shadow model covers the watched clusters: those the operations
//!    touch, their neighbours, the first 16 and the last. They are read
//!    first, through a read-only open: that is the model's start. Then the
//!    image is opened read-write and the operations run; last a FLUSH,
//!    close, open again, and the watched clusters are read again.
//!
//! Invariants:
//! - nothing panics, in the target or inside qcow2-rs (the owner contains
//!   those and counts them in `qcow2_panics`, which must stay 0); nothing
//!   hangs (libFuzzer's -timeout); after an `unmap` of phase 1 that
//!   succeeded, the image still opens and scans;
//! - every successful read agrees with the model: a sector holds what the
//!   first read returned, the pattern of the last write, or zeroes after a
//!   discard or write-zeroes (two writes of one batch: either, and it must
//!   read); sectors a request of the same batch writes are not checked.
//!   Read buffers hold a different byte each time, so what a read leaves
//!   unfilled shows;
//! - "stays readable": a sector that read once, or was written with OK,
//!   reads with OK from then on, also after reopening. Reads and writes
//!   may fail only on clusters that could not be read (corrupt compressed
//!   data), FLUSH never;
//! - requests touching a guest cluster that the scan poisoned get IOERR and
//!   change nothing, and the first one sets the corrupt bit in the header
//!   (which the target clears before reopening). With table entries
//!   pointing past the end of the file, the bit is set at open (writes may
//!   grow the file over their target): such an image is not scanned after
//!   writes, and after closing it must be refused;
//! - data never lands on metadata ([`meta_guard`]): after every batch, the
//!   metadata clusters of the last scan changed only as table updates do
//!   (valid entries, refcounts falling or going from 0 to 1, in the header
//!   only the table positions); after a FLUSH that ends a batch, and after
//!   closing, the file scans clean with the same poisoned clusters, and no
//!   metadata cluster holds a word a write wrote (each 8-byte word written
//!   names its request and its guest offset).
//!
//! Input: the image file's bytes, then N operation records of
//! [`OP_BYTES`] ([`OpSpec::decode`]), then one byte whose value modulo 33
//! is N (at most [`MAX_OPS`]; fewer if the input is too short). A backing
//! file named `base.qcow2` lies next to the image (4 KiB clusters, 2 MiB
//! less 39 sectors, partly written). Seeds: seeds/qcow2_image.sh writes
//! images made by qemu-img and qemu-io, bare and with operations.

#![no_main]

#[path = "qcow2_image/meta_guard.rs"]
mod meta_guard;
#[path = "qcow2_image/model.rs"]
mod model;
#[path = "qcow2_image/ops.rs"]
mod ops;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use ringvm_blk::engine::{best_engine, Completion, Engine, EngineOp, FallocateMode};
use ringvm_blk::image::qcow2::meta::{create, read_layout, scan, unmap, UnmapMode};
use ringvm_blk::image::qcow2::ImageCounters;
use ringvm_blk::image::{open, Access, Extent, Format, ImageFormat, OpenOptions};
use ringvm_fuzz::tracing;

use meta_guard::{corrupt_bit, memfd, MetaGuard, CORRUPT_BIT, CORRUPT_BYTE};
use model::{Content, Model, Sector};
use ops::{Io, Kind, OpSpec, SECTOR};

/// Image bytes used (the rest of a longer image is cut off).
const MAX_BYTES: usize = 1 << 20;
const MAX_OPS: usize = 32;
const OP_BYTES: usize = 8;
/// Larger images only get the metadata checks (qcow2-rs's caches are sized
/// after the virtual disk).
const MAX_VIRTUAL_BYTES: u64 = 64 << 20;
const MAX_IO_CLUSTER_BITS: u32 = 16;
/// Watched besides the clusters the operations touch: the first ones.
const WATCHED_FIRST_CLUSTERS: u64 = 16;
/// Watched clusters are read in pieces of up to this size (or a cluster).
const CHUNK_BYTES: u64 = 64 << 10;
const BASE_NAME: &str = "base.qcow2";
/// Not a multiple of the top image's clusters (4 KiB and up): a top cluster
/// straddles the end of the backing file.
const BASE_BYTES: u64 = (2 << 20) - 19968;
const BASE_CLUSTER_BYTES: u64 = 4096;
/// What the backing file holds: (offset, length) written with
/// [`base_byte`]; the rest reads as zeroes.
const BASE_WRITTEN: [(u64, u64); 3] = [
    (0, 96 << 10),
    ((1 << 20) - 2048, 8192),
    (BASE_BYTES - 4096, 4096),
];

fn base_byte(offset: u64) -> u8 {
    (offset / SECTOR * 13 + offset % 241) as u8 | 1
}

/// The process's directory on tmpfs, with the backing file in it; removed
/// at exit (and, at start, those of fuzzing processes that are gone).
fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        const PREFIX: &str = "ringvm-fuzz-qcow2-";
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = parent.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("create the work directory");
        extern "C" fn remove_workdir() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a function without arguments that only removes
        // files; atexit has no other precondition.
        unsafe { libc::atexit(remove_workdir) };
        if tracing() {
            // ringvm-blk's warnings and errors (the owner's) with the trace.
            ringvm_backend::cli::init_logging("warn");
        }
        make_base(&dir.join(BASE_NAME));
        report_engine(&dir);
        dir
    })
}

/// The backing file, written through the same serving path.
fn make_base(path: &Path) {
    create(path, BASE_BYTES, BASE_CLUSTER_BYTES).expect("create the backing file");
    let mut disk = Disk::open(path, false).expect("open the backing file");
    let mut ios: Vec<Io> = BASE_WRITTEN
        .iter()
        .map(|&(offset, len)| {
            let mut io = Io::new(Kind::Write, offset, len);
            for (i, byte) in io.buf.iter_mut().enumerate() {
                *byte = base_byte(offset + i as u64);
            }
            io
        })
        .collect();
    ios.push(Io::new(Kind::Flush, 0, 0));
    disk.run(&mut ios);
    for io in &ios {
        let want = if io.kind == Kind::Flush {
            0
        } else {
            io.len as i32
        };
        assert_eq!(io.result, Some(want), "writing the backing file");
    }
    assert_eq!(
        disk.close(),
        0,
        "qcow2-rs panicked writing the backing file"
    );
}

/// Says whether the owner threads get io_uring (they fall back to blocking
/// syscalls when it is missing): when it is missing, or when tracing.
fn report_engine(dir: &Path) {
    let file = File::open(dir.join(BASE_NAME)).expect("the backing file");
    match best_engine(&[file.as_fd()], 8) {
        Ok((engine, None)) if tracing() => {
            eprintln!("qcow2_image: owner engine {}", engine.name())
        }
        Ok((_, Some(why))) => {
            eprintln!("qcow2_image: no io_uring ({why}); the owner uses blocking syscalls")
        }
        Ok(_) => {}
        Err(err) => panic!("no engine: {err}"),
    }
}

/// An image opened as ringvm-blk's backend opens it, and the engine a
/// queue worker would get.
struct Disk {
    image: Arc<dyn ImageFormat>,
    engine: Box<dyn Engine>,
    counters: Arc<ImageCounters>,
    extents: Vec<Extent>,
}

impl Disk {
    fn open(path: &Path, readonly: bool) -> Result<Disk, String> {
        let options = OpenOptions {
            readonly,
            direct: false,
            format: Some(Format::Qcow2),
        };
        let image = open(path, options).map_err(|err| {
            let cause = std::error::Error::source(&err).map(|e| e.to_string());
            format!("{err} ({})", cause.unwrap_or_default())
        })?;
        let engine = image
            .queue_engine()
            .expect("a qcow2 image has its own queue engine")
            .expect("the queue engine of a qcow2 image");
        let counters = image.counters().expect("a qcow2 image counts");
        Ok(Disk {
            image,
            engine,
            counters,
            extents: Vec::new(),
        })
    }

    fn panics(&self) -> u64 {
        self.counters
            .panics
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends `ios` together (as one kick of a queue does) and waits for all
    /// of them. Requests the queue worker would not send (empty ones, and
    /// ranges the image's mapping refuses) keep `result` None.
    fn run(&mut self, ios: &mut [Io]) {
        let mut sent = 0;
        for (tag, io) in ios.iter_mut().enumerate() {
            let access = match io.kind {
                Kind::Read => Access::Read,
                Kind::Write => Access::Write,
                Kind::Discard => Access::Discard,
                Kind::WriteZeroes => Access::WriteZeroes { unmap: false },
                Kind::Flush => {
                    // SAFETY: a flush points at no memory.
                    unsafe { self.engine.push(EngineOp::Datasync { file: 0 }, tag as u64) }
                        .expect("push a flush");
                    sent += 1;
                    continue;
                }
            };
            if io.len == 0 {
                continue;
            }
            self.extents.clear();
            if self
                .image
                .map(access, io.offset, io.len, &mut self.extents)
                .is_err()
            {
                continue;
            }
            let [Extent::Data {
                file,
                offset,
                len_bytes,
            }] = self.extents[..]
            else {
                panic!(
                    "{:#x}+{:#x} mapped as {:?}",
                    io.offset, io.len, self.extents
                );
            };
            assert_eq!((file, offset, len_bytes), (0, io.offset, io.len));
            let op = match io.kind {
                Kind::Read => EngineOp::Readv {
                    file,
                    offset,
                    iovecs: &io.iovecs,
                },
                Kind::Write => EngineOp::Writev {
                    file,
                    offset,
                    iovecs: &io.iovecs,
                },
                _ => EngineOp::Fallocate {
                    file,
                    offset,
                    len_bytes,
                    mode: if io.kind == Kind::Discard {
                        FallocateMode::PunchHole
                    } else {
                        FallocateMode::ZeroRange
                    },
                },
            };
            // SAFETY: the iovecs point into `io.buf`, whose heap buffer is
            // neither freed, moved nor touched until this function has
            // reaped every completion (below): `ios` stays borrowed for the
            // whole call. The engine copies the iovec array itself.
            unsafe { self.engine.push(op, tag as u64) }.expect("push a request");
            sent += 1;
        }
        self.engine.submit().expect("submit to the qcow2 owner");
        let mut done: Vec<Completion> = Vec::new();
        while done.len() < sent {
            self.engine.wait().expect("wait for the qcow2 owner");
            self.engine.reap(&mut done);
        }
        for completion in done {
            let io = &mut ios[completion.tag as usize];
            assert!(io.result.is_none(), "two completions for one request");
            io.result = Some(completion.result);
        }
    }

    /// Drops the image (its owner writes qcow2-rs's tables and stops);
    /// returns the panics the owner contained.
    fn close(self) -> u64 {
        let Disk {
            image,
            engine,
            counters,
            ..
        } = self;
        drop(engine);
        assert_eq!(Arc::strong_count(&image), 1, "nothing else holds the image");
        drop(image);
        counters.panics.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Reads the watched clusters (poisoned ones alone: they must fail, and a
/// piece that fails again cluster by cluster); returns the reads.
fn read_watched(disk: &mut Disk, model: &Model) -> Vec<Io> {
    let chunk = CHUNK_BYTES.max(model.cluster_bytes());
    let mut ios: Vec<Io> = Vec::new();
    for (offset, len) in model.watched() {
        let poisoned = model.poisoned(offset, len);
        if let Some(last) = ios.last_mut() {
            let joins = last.offset + last.len == offset
                && last.len + len <= chunk
                && !poisoned
                && !model.poisoned(last.offset, last.len);
            if joins {
                *last = Io::new(Kind::Read, last.offset, last.len + len);
                continue;
            }
        }
        ios.push(Io::new(Kind::Read, offset, len));
    }
    disk.run(&mut ios);
    let mut retried = Vec::new();
    for io in &ios {
        if io.ok() || model.poisoned(io.offset, io.len) {
            continue;
        }
        let cluster = model.cluster_bytes();
        let mut at = io.offset;
        while at < io.offset + io.len {
            let end = ((at / cluster + 1) * cluster).min(io.offset + io.len);
            retried.push(Io::new(Kind::Read, at, end - at));
            at = end;
        }
    }
    disk.run(&mut retried);
    ios.retain(|io| io.ok() || model.poisoned(io.offset, io.len));
    ios.extend(retried);
    for io in &ios {
        if model.poisoned(io.offset, io.len) {
            assert_eq!(
                io.result,
                Some(-libc::EIO),
                "a read of poisoned cluster(s) at {:#x}+{:#x}",
                io.offset,
                io.len
            );
        } else if io.ok() {
            assert_eq!(io.result, Some(io.len as i32), "a short read");
        }
    }
    ios
}

/// Runs one batch and checks it against the model.
fn run_batch(disk: &mut Disk, model: &mut Model, guard: &mut MetaGuard, batch: &[(u8, OpSpec)]) {
    let mut ios: Vec<Io> = batch.iter().map(|&(id, spec)| spec.io(id)).collect();
    for (&(id, _), io) in batch.iter().zip(&ios) {
        if io.kind == Kind::Write && io.len > 0 {
            guard.writes.push((id, io.offset, io.len));
        }
    }
    disk.run(&mut ios);
    if tracing() {
        for (&(id, spec), io) in batch.iter().zip(&ios) {
            let iovecs: Vec<_> = io.iovecs.iter().map(|v| v.len_bytes()).collect();
            let joins = if spec.joins { " (joins)" } else { "" };
            eprintln!(
                "  #{id} {:?} {:#x}+{:#x} iovecs {iovecs:?}{joins}: {:?}",
                io.kind, io.offset, io.len, io.result
            );
        }
    }
    let panics = disk.panics();
    assert_eq!(panics, 0, "qcow2-rs panicked serving {batch:?}");
    // What the batch's writes left, sector by sector: (content, writers).
    let mut landed: HashMap<u64, (Content, usize)> = HashMap::new();
    let mut failed: HashSet<u64> = HashSet::new();
    for (&(id, _), io) in batch.iter().zip(&ios) {
        let Some(result) = io.result else {
            continue;
        };
        let what = format!("#{id} {:?} at {:#x}+{:#x}", io.kind, io.offset, io.len);
        if io.kind == Kind::Flush {
            assert_eq!(result, 0, "{what} failed");
            continue;
        }
        if model.poisoned(io.offset, io.len) {
            assert_eq!(result, -libc::EIO, "{what} touches a poisoned cluster");
            model.touched_bad = true;
            continue;
        }
        if !io.kind.writes() {
            continue;
        }
        if result < 0 {
            assert!(
                model.touches_unknown(io.offset, io.len),
                "{what} failed ({result}) on clusters that read"
            );
            failed.extend(io.sectors());
            continue;
        }
        let content = if io.kind == Kind::Write {
            Content::Pattern(id)
        } else {
            Content::Zero
        };
        for sector in io.sectors() {
            landed
                .entry(sector)
                .and_modify(|e| e.1 += 1)
                .or_insert((content, 1));
        }
    }
    let written: HashSet<u64> = landed.keys().chain(&failed).copied().collect();
    for (&(id, _), io) in batch.iter().zip(&ios) {
        let (Kind::Read, Some(result)) = (io.kind, io.result) else {
            continue;
        };
        if model.poisoned(io.offset, io.len) {
            continue;
        }
        let what = format!("#{id} Read at {:#x}+{:#x}", io.offset, io.len);
        if result < 0 {
            let excused = model.touches_unknown(io.offset, io.len)
                || io.sectors().any(|s| failed.contains(&s));
            assert!(excused, "{what} failed ({result}) on sectors that read");
            continue;
        }
        assert_eq!(result, io.len as i32, "{what}: short");
        model.check_read(io.offset, &io.buf, &written, &what);
    }
    for (sector, (content, writers)) in landed {
        let state = if writers == 1 {
            Sector::Is(content)
        } else {
            Sector::Readable
        };
        model.set(sector, state);
    }
    for sector in failed {
        model.set(sector, Sector::Unknown);
    }
}

fn metadata_checks(data: &[u8], path: &Path) {
    let file = memfd(data);
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
}

/// The clusters the operations touch, with their neighbours, the first
/// few and the last.
fn watch(model: &mut Model, specs: &[(u8, OpSpec)]) {
    let (clusters, capacity, bits) = (model.clusters(), model.capacity(), model.cluster_bits);
    if clusters == 0 {
        return;
    }
    let mut spans = vec![
        (0, WATCHED_FIRST_CLUSTERS - 1),
        (clusters.saturating_sub(1), clusters),
    ];
    for (_, spec) in specs {
        let (offset, len) = spec.range();
        if len > 0 && offset + len <= capacity {
            spans.push((
                (offset >> bits).saturating_sub(1),
                ((offset + len - 1) >> bits) + 1,
            ));
        }
    }
    for (first, last) in spans {
        for cluster in first..=last.min(clusters.saturating_sub(1)) {
            model.watch(cluster);
        }
    }
}

fn serve(image: &[u8], ops: &[u8], dir: &Path) {
    let path = dir.join("top.qcow2");
    std::fs::write(&path, image).expect("write the image");
    let file = FsOpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the image");
    let Ok(layout) = read_layout(&file, &path) else {
        return;
    };
    if layout.cluster_bits > MAX_IO_CLUSTER_BITS || layout.virtual_size > MAX_VIRTUAL_BYTES {
        return;
    }
    let Ok(report) = scan(&file, &path, &layout) else {
        return;
    };
    let capacity = layout.virtual_size / SECTOR * SECTOR;
    let cluster_sectors = layout.cluster_bytes() / SECTOR;
    let specs: Vec<(u8, OpSpec)> = ops
        .chunks_exact(OP_BYTES)
        .enumerate()
        .map(|(i, rec)| {
            let spec = OpSpec::decode(rec, capacity / SECTOR, cluster_sectors);
            (i as u8 + 1, spec)
        })
        .collect();
    let mut model = Model::new(capacity, layout.cluster_bits, report.bad.clone());
    watch(&mut model, &specs);

    // What the image holds, read-only (nothing is written, not even the
    // corrupt bit).
    let Ok(mut disk) = Disk::open(&path, true) else {
        return;
    };
    if tracing() {
        eprintln!(
            "qcow2_image: {} byte clusters, {capacity} bytes, {} poisoned clusters, {} ops",
            layout.cluster_bytes(),
            report.bad.cluster_count(),
            specs.len()
        );
    }
    for io in read_watched(&mut disk, &model) {
        if io.ok() {
            model.set_initial(io.offset, &io.buf);
        }
    }
    assert_eq!(disk.close(), 0, "qcow2-rs panicked reading the image");

    // The operations.
    let mut disk = Disk::open(&path, false)
        .unwrap_or_else(|err| panic!("opened read-only, but not read-write: {err}"));
    let mut guard = MetaGuard::new(&path, image, layout.cluster_bytes(), report.bad.clone());
    guard.rescan(&file, "after opening");
    // Entries pointing past the end of the file map whatever is allocated
    // there once the file grows: the image is marked corrupt at once, and
    // scans of it (with the bit cleared) would follow them.
    let past_end = report.bad_past_end > 0;
    assert_eq!(
        corrupt_bit(&file),
        past_end,
        "the corrupt bit after opening, with {} entries past the end of the file",
        report.bad_past_end
    );
    let mut start = 0;
    while start < specs.len() {
        let mut end = start + 1;
        while end < specs.len() && specs[end].1.joins {
            end += 1;
        }
        let batch = &specs[start..end];
        run_batch(&mut disk, &mut model, &mut guard, batch);
        let when = format!("after ops #{}..=#{end}", start + 1);
        guard.after_batch(&file, &when);
        if !past_end
            && batch
                .last()
                .is_some_and(|(_, spec)| spec.kind == Kind::Flush)
        {
            guard.rescan(&file, &when);
        }
        start = end;
    }
    let mut flush = [Io::new(Kind::Flush, 0, 0)];
    disk.run(&mut flush);
    assert_eq!(flush[0].result, Some(0), "the last flush failed");
    guard.after_batch(&file, "after the last flush");
    assert_eq!(disk.close(), 0, "qcow2-rs panicked");
    assert_eq!(
        corrupt_bit(&file),
        model.touched_bad || past_end,
        "the corrupt bit is set exactly when a request touched a poisoned cluster \
         or an entry points past the end of the file"
    );
    if past_end {
        let refused = read_layout(&file, &path).expect_err("a corrupt image is refused");
        assert!(refused.to_string().contains("corrupt bit"), "{refused}");
        return;
    }
    if model.touched_bad {
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, CORRUPT_BYTE as u64)
            .expect("read the header");
        byte[0] &= !CORRUPT_BIT;
        file.write_all_at(&byte, CORRUPT_BYTE as u64)
            .expect("write the header");
    }
    guard.rescan(&file, "after closing");

    // Open again: the watched clusters read as the model says.
    let mut disk =
        Disk::open(&path, false).unwrap_or_else(|err| panic!("the image no longer opens: {err}"));
    for io in read_watched(&mut disk, &model) {
        if io.ok() {
            model.check_read(io.offset, &io.buf, &HashSet::new(), "after reopening");
        } else if !model.poisoned(io.offset, io.len) {
            assert!(
                model.touches_unknown(io.offset, io.len),
                "after reopening, the read at {:#x}+{:#x} fails ({:?}) on sectors that read",
                io.offset,
                io.len,
                io.result
            );
        }
    }
    assert_eq!(disk.close(), 0, "qcow2-rs panicked reading the image again");
}

/// The image's bytes and the operation records.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&count, rest)) = data.split_last() else {
        return (&[], &[]);
    };
    let n = (usize::from(count) % (MAX_OPS + 1)).min(rest.len() / OP_BYTES);
    rest.split_at(rest.len() - n * OP_BYTES)
}

fuzz_target!(|data: &[u8]| {
    let dir = workdir();
    let (image, ops) = split(data);
    let image = &image[..image.len().min(MAX_BYTES)];
    metadata_checks(image, &dir.join("fuzz.qcow2"));
    serve(image, ops, dir);
});
