//! qcow2 images through `ringvm-blk`, checked from outside with qemu-img and
//! qemu-io: crash consistency (kill -9 under a random write job), a full host
//! disk, the images it must refuse, corrupted tables, thin provisioning and
//! discard, write amplification, and backing files.
//!
//! Where the logic does not depend on the format, a test runs on raw images
//! too (`*_raw`): the same job, the same checks of what the guest sees.

mod support;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use support::qcow2::{
    self, allocated_bytes, assert_check_clean, create_qcow2, incompatible_features, map,
    map_overlapping, qemu_io, read_u64_be, set_incompatible_bit, write_u64_be, Format, Header,
    Tmpfs, COPIED, CORRUPT_BIT, DIRTY_BIT, OFFSET_MASK,
};
use support::{Backend, BlkRequests, Desc::R, Desc::W, Guest, DATA, HDR, STATUS};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

const OK: u8 = 0;
const IOERR: u8 = 1;
const SECTOR_BYTES: u64 = 512;
const CLUSTER_BYTES: u64 = 64 << 10;
const CLUSTER_SECTORS: u64 = CLUSTER_BYTES / SECTOR_BYTES;
const BLOCK_BYTES: u64 = 4096;
const BLOCK_SECTORS: u64 = BLOCK_BYTES / SECTOR_BYTES;
/// main.rs: "1 when the image or the socket cannot be used".
const BAD_IMAGE_EXIT: i32 = 1;

/// Sector `sector` as write number `seq` leaves it: the sector, the write
/// and a filler derived from both, so that any sector read back names the
/// write it came from (or shows it came from none).
fn sector_content(sector: u64, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(SECTOR_BYTES as usize);
    out.extend_from_slice(&sector.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let mut word = sector.rotate_left(32) ^ seq ^ 0x9e37_79b9_7f4a_7c15;
    while out.len() < SECTOR_BYTES as usize {
        word = word.wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(1);
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// `BLOCK_BYTES` at `sector`, all written by write `seq`.
fn block_content(sector: u64, seq: u64) -> Vec<u8> {
    (sector..sector + BLOCK_SECTORS)
        .flat_map(|s| sector_content(s, seq))
        .collect()
}

/// What a sector of the image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Zero,
    Write(u64),
    /// Neither zeroes nor what any write put at this sector.
    Garbage,
}

fn decode(sector: u64, bytes: &[u8]) -> Seen {
    if bytes.iter().all(|b| *b == 0) {
        return Seen::Zero;
    }
    let seq = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    if sector_content(sector, seq) == bytes {
        Seen::Write(seq)
    } else {
        Seen::Garbage
    }
}

/// xorshift64*: the random job, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn assert_no_panic(backend: &Backend) {
    let stderr = backend.stderr();
    assert!(
        !stderr.contains("panicked"),
        "ringvm-blk panicked: {stderr}"
    );
}

// ---------------------------------------------------------------------------
// 1. Crash loop

const CRASH_ITERATIONS: u64 = 20;
const CRASH_DISK_BYTES: u64 = 64 << 20;
/// Requests in flight, each in its own slot: descriptors 3*i.., header at
/// HDR + 0x100 * i, data at DATA + BLOCK_BYTES * i, status at STATUS + i.
const CRASH_DEPTH: usize = 8;
const CRASH_FLUSH_EVERY: u32 = 16;
/// The writes go to the first clusters only, so that many hit a cluster an
/// earlier write allocated and many allocate one (~200 writes per run).
const CRASH_SPAN_CLUSTERS: u64 = 96;

#[derive(Clone, Copy, Debug)]
enum SlotUse {
    Free,
    Write {
        seq: u64,
        sector: u64,
    },
    /// A flush covers the writes completed before it was submitted.
    Flush {
        completed_before: u64,
    },
}

/// The job's bookkeeping: what may be in each sector after a crash.
#[derive(Default)]
struct CrashJob {
    /// Per sector, the writes to it in order. A write is never submitted
    /// while another write to one of its sectors is in flight, so each
    /// sector's writes land in this order.
    history: HashMap<u64, Vec<u64>>,
    /// Write -> its index among completions.
    completion: HashMap<u64, u64>,
    completed: u64,
    /// Writes with a completion index below this are covered by a flush
    /// that completed OK.
    durable: u64,
    flushes_ok: u64,
}

#[derive(Default, Debug)]
struct CrashStats {
    writes: u64,
    flushes: u64,
    kills_in_flight: u64,
    /// Sectors checked that hold: their flushed write, a later one, zeroes.
    sectors_flushed_content: u64,
    sectors_later_write: u64,
    sectors_lost_unflushed: u64,
}

impl CrashJob {
    fn on_used(&mut self, slot: SlotUse, status: u8, context: &str) {
        assert_eq!(status, OK, "{context}: {slot:?} failed");
        match slot {
            SlotUse::Free => panic!("{context}: a free slot was used"),
            SlotUse::Write { seq, .. } => {
                self.completion.insert(seq, self.completed);
                self.completed += 1;
            }
            SlotUse::Flush { completed_before } => {
                self.durable = self.durable.max(completed_before);
                self.flushes_ok += 1;
            }
        }
    }

    /// Checks every sector of the guest's view of the image.
    fn check(&self, view: &[u8], context: &str, stats: &mut CrashStats) {
        const ZERO_SECTOR: [u8; SECTOR_BYTES as usize] = [0; SECTOR_BYTES as usize];
        // Past the clusters the job writes to: zeroes (compared in big
        // chunks, the one-by-one check below is slow in a debug build).
        let written_bytes = ((CRASH_SPAN_CLUSTERS + 1) * CLUSTER_BYTES) as usize;
        let zeroes = vec![0u8; 1 << 20];
        for (i, chunk) in view[written_bytes..].chunks(zeroes.len()).enumerate() {
            assert!(
                chunk == &zeroes[..chunk.len()],
                "{context}: data in MiB {i} past byte {written_bytes}, where nothing was written"
            );
        }
        let view = &view[..written_bytes];
        for (sector, bytes) in view.chunks_exact(SECTOR_BYTES as usize).enumerate() {
            let sector = sector as u64;
            let Some(writes) = self.history.get(&sector) else {
                assert!(
                    bytes == ZERO_SECTOR,
                    "{context}: sector {sector} was never written, yet holds {:?}",
                    decode(sector, bytes)
                );
                continue;
            };
            let seen = decode(sector, bytes);
            let durable = writes.iter().rposition(|seq| {
                self.completion
                    .get(seq)
                    .is_some_and(|index| *index < self.durable)
            });
            let allowed = &writes[durable.unwrap_or(0)..];
            let ok = match seen {
                Seen::Zero => durable.is_none(),
                Seen::Write(seq) => allowed.contains(&seq),
                Seen::Garbage => false,
            };
            assert!(
                ok,
                "{context}: sector {sector} holds {seen:?}; its writes {writes:?}, \
                 the last flushed one {:?}",
                durable.map(|i| writes[i])
            );
            match (seen, durable) {
                (Seen::Zero, _) => stats.sectors_lost_unflushed += u64::from(!writes.is_empty()),
                (Seen::Write(seq), Some(i)) if seq == writes[i] => {
                    stats.sectors_flushed_content += 1
                }
                _ => stats.sectors_later_write += 1,
            }
        }
    }
}

/// One run: a fresh image, the random job, kill -9 after `kill_after`
/// requests (right away, or once none is in flight), then the checks.
fn crash_once(format: Format, iteration: u64, stats: &mut CrashStats) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("disk.{}", format.name()));
    format.create(&image, CRASH_DISK_BYTES, CLUSTER_BYTES);
    let kill_after = 8 + (iteration * 47) % 240;
    let kill_in_flight = iteration % 4 != 3;
    let seed = 0x5eed_0000 + iteration;
    let context = format!(
        "{} iteration {iteration} (seed {seed:#x}, kill after {kill_after} requests{})",
        format.name(),
        if kill_in_flight { ", in flight" } else { "" }
    );
    let mut backend = Backend::start_with(dir, image.clone(), &["--format", format.name()]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    let mut rng = Rng(seed);
    let mut job = CrashJob::default();
    let mut slots = [SlotUse::Free; CRASH_DEPTH];
    let mut submitted = 0u64;
    let mut next_seq = 1u64;
    let mut writes_since_flush = 0u32;
    let mut seen_used = 0u16;

    loop {
        while submitted < kill_after {
            let Some(i) = slots.iter().position(|s| matches!(s, SlotUse::Free)) else {
                break;
            };
            let hdr = HDR + 0x100 * i as u64;
            let status = STATUS + i as u64;
            let first_desc = 3 * i as u16;
            g.fill(status, 1, 0xee);
            if writes_since_flush >= CRASH_FLUSH_EVERY {
                g.header(hdr, VIRTIO_BLK_T_FLUSH, 0);
                g.submit_at(0, first_desc, &[R(hdr, 16), W(status, 1)]);
                slots[i] = SlotUse::Flush {
                    completed_before: job.completed,
                };
                writes_since_flush = 0;
                stats.flushes += 1;
            } else {
                // Not over a write in flight: its sectors' order would be
                // the device's choice.
                let sector = loop {
                    let sector = rng.below(CRASH_SPAN_CLUSTERS) * CLUSTER_SECTORS
                        + rng.below(CLUSTER_SECTORS);
                    let overlaps = slots.iter().any(|s| match *s {
                        SlotUse::Write { sector: other, .. } => {
                            sector < other + BLOCK_SECTORS && other < sector + BLOCK_SECTORS
                        }
                        _ => false,
                    });
                    if !overlaps {
                        break sector;
                    }
                };
                let seq = next_seq;
                next_seq += 1;
                let data = DATA + BLOCK_BYTES * i as u64;
                g.header(hdr, VIRTIO_BLK_T_OUT, sector);
                g.write_mem(data, &block_content(sector, seq));
                g.submit_at(
                    0,
                    first_desc,
                    &[R(hdr, 16), R(data, BLOCK_BYTES as u32), W(status, 1)],
                );
                for s in sector..sector + BLOCK_SECTORS {
                    job.history.entry(s).or_default().push(seq);
                }
                slots[i] = SlotUse::Write { seq, sector };
                writes_since_flush += 1;
                stats.writes += 1;
            }
            submitted += 1;
        }
        g.kick(0);
        let in_flight = slots.iter().any(|s| !matches!(s, SlotUse::Free));
        if submitted == kill_after && (kill_in_flight || !in_flight) {
            break;
        }
        for (id, _) in g.wait_used_entries(0, &mut seen_used) {
            let i = id as usize / 3;
            let status = g.read(STATUS + i as u64, 1)[0];
            job.on_used(slots[i], status, &context);
            slots[i] = SlotUse::Free;
        }
    }
    let in_flight = slots.iter().any(|s| !matches!(s, SlotUse::Free));
    let status = backend.kill();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{context}: {}",
        backend.stderr()
    );
    assert_no_panic(&backend);
    stats.kills_in_flight += u64::from(in_flight);
    // What the device answered before it died counts too.
    for (id, _) in g.poll_used(0, &mut seen_used) {
        let i = id as usize / 3;
        let status = g.read(STATUS + i as u64, 1)[0];
        job.on_used(slots[i], status, &context);
        slots[i] = SlotUse::Free;
    }
    drop(g);

    format.assert_consistent(&image);
    let view = format.guest_view(&image);
    assert_eq!(view.len() as u64, CRASH_DISK_BYTES, "{context}");
    job.check(&view, &context, stats);
}

fn crash_loop(format: Format) {
    let started = std::time::Instant::now();
    let mut stats = CrashStats::default();
    for iteration in 0..CRASH_ITERATIONS {
        crash_once(format, iteration, &mut stats);
    }
    println!(
        "crash loop {}: {CRASH_ITERATIONS} iterations",
        format.name()
    );
    println!(
        "crash loop {}: {} writes, {} flushes, {} kills with requests in flight; sectors \
         after the crash: {} as last flushed, {} from a later write, {} unflushed and lost; {:?}",
        format.name(),
        stats.writes,
        stats.flushes,
        stats.kills_in_flight,
        stats.sectors_flushed_content,
        stats.sectors_later_write,
        stats.sectors_lost_unflushed,
        started.elapsed()
    );
    assert!(stats.kills_in_flight >= CRASH_ITERATIONS / 2, "{stats:?}");
    assert!(stats.sectors_flushed_content > 0, "{stats:?}");
}

#[test]
fn crash_loop_qcow2() {
    crash_loop(Format::Qcow2);
}

#[test]
fn crash_loop_raw() {
    crash_loop(Format::Raw);
}

// ---------------------------------------------------------------------------
// 2. Disk full

/// Small enough that 4 KiB in each 64 KiB of a 64 MiB disk does not fit.
const FULL_TMPFS_BYTES: u64 = 2 << 20;
const FULL_DISK_BYTES: u64 = 64 << 20;

fn disk_full(format: Format) {
    let tmpfs = Tmpfs::mount(FULL_TMPFS_BYTES);
    let image = tmpfs.path().join(format!("disk.{}", format.name()));
    format.create(&image, FULL_DISK_BYTES, CLUSTER_BYTES);
    let dir = tempfile::tempdir().unwrap();
    let mut backend = Backend::start_with(dir, image.clone(), &["--format", format.name()]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    let sector_of = |block: u64| block * CLUSTER_SECTORS;

    // Distinct blocks, one per cluster, until the host disk is full.
    let mut written = Vec::new();
    let mut flushed = 0usize;
    let mut full_at = None;
    for block in 0..FULL_DISK_BYTES / CLUSTER_BYTES {
        match g.write_at(sector_of(block), &block_content(sector_of(block), block)) {
            OK => written.push(block),
            IOERR => {
                full_at = Some(block);
                break;
            }
            other => panic!("write of block {block}: status {other}"),
        }
        if written.len() % 16 == 0 && g.flush() == OK {
            flushed = written.len();
        }
    }
    let full_at = full_at.unwrap_or_else(|| {
        panic!(
            "{} writes of 4 KiB fit in a {FULL_TMPFS_BYTES}-byte tmpfs: the disk never got full",
            written.len()
        )
    });
    println!(
        "disk full {}: write {full_at} got IOERR; {} written, the first {flushed} flushed",
        format.name(),
        written.len()
    );
    assert!(written.len() >= 16, "only {} writes fit", written.len());

    // What was written reads back.
    for &block in &written {
        let (status, data) = g.read_at(sector_of(block), BLOCK_BYTES as usize);
        assert_eq!(status, OK, "read of block {block}");
        assert!(
            data == block_content(sector_of(block), block),
            "block {block} reads back wrong"
        );
    }
    // Rewriting allocated space needs no new space.
    let rewritten = written[0];
    let new_content = block_content(sector_of(rewritten), 1 << 32);
    assert_eq!(g.write_at(sector_of(rewritten), &new_content), OK);
    assert_eq!(
        g.read_at(sector_of(rewritten), BLOCK_BYTES as usize),
        (OK, new_content.clone())
    );
    let last_flush = g.flush();
    println!(
        "disk full {}: flush after the rewrite: status {last_flush}",
        format.name()
    );
    if last_flush == OK {
        flushed = written.len();
    }

    backend.signal(libc::SIGTERM);
    let status = backend.wait_exit();
    println!("disk full {}: SIGTERM -> {status}", format.name());
    assert_no_panic(&backend);
    drop(g);
    format.assert_consistent(&image);
    let view = format.guest_view(&image);
    for &block in &written[..flushed] {
        let at = (sector_of(block) * SECTOR_BYTES) as usize;
        let seen = &view[at..at + BLOCK_BYTES as usize];
        let ok = if block == rewritten {
            seen == new_content
                || (last_flush != OK && seen == block_content(sector_of(block), block))
        } else {
            seen == block_content(sector_of(block), block)
        };
        assert!(
            ok,
            "flushed block {block} is not in the image after the exit"
        );
    }
    drop(backend);
    drop(tmpfs);
}

#[test]
fn disk_full_qcow2() {
    disk_full(Format::Qcow2);
}

#[test]
fn disk_full_raw() {
    disk_full(Format::Raw);
}

// ---------------------------------------------------------------------------
// 3. Images ringvm-blk refuses

/// ringvm-blk on `image` must exit BAD_IMAGE_EXIT, before listening, with
/// every one of `keywords` in its message (any case, `_` and `-` as spaces).
fn assert_refused(dir: tempfile::TempDir, image: PathBuf, case: &str, keywords: &[&str]) {
    let socket = dir.path().join("blk.sock");
    let mut backend = Backend::spawn(dir, image, socket, &[]);
    let status = backend.wait_exit();
    let stderr = backend.stderr();
    assert_eq!(
        status.code(),
        Some(BAD_IMAGE_EXIT),
        "{case}: {status}: {stderr}"
    );
    let message = stderr.to_lowercase().replace(['_', '-'], " ");
    for keyword in keywords {
        assert!(
            message.contains(keyword),
            "{case}: no {keyword:?} in: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
    assert!(!backend.socket.exists(), "{case}: listened anyway");
}

fn refused_case(case: &str, keywords: &[&str], build: impl FnOnce(&Path, &Path)) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    build(dir.path(), &image);
    assert_refused(dir, image, case, keywords);
}

#[test]
fn refuses_an_internal_snapshot() {
    refused_case("internal snapshot", &["snapshot"], |_, image| {
        create_qcow2(image, 64 << 20, "");
        qcow2::run_ok(
            "qemu-img",
            &["snapshot", "-c", "s1", image.to_str().unwrap()],
        );
    });
}

#[test]
fn refuses_a_raw_backing_file() {
    refused_case("raw backing file", &["backing", "raw"], |dir, image| {
        let base = dir.join("base.raw");
        Format::Raw.create(&base, 64 << 20, 0);
        create_qcow2(
            image,
            64 << 20,
            &format!("backing_file={},backing_fmt=raw", base.display()),
        );
    });
}

#[test]
fn refuses_the_dirty_bit() {
    refused_case("dirty bit", &["dirty"], |_, image| {
        create_qcow2(image, 64 << 20, "");
        set_incompatible_bit(image, DIRTY_BIT);
    });
}

#[test]
fn refuses_the_corrupt_bit() {
    refused_case("corrupt bit", &["corrupt"], |_, image| {
        create_qcow2(image, 64 << 20, "");
        set_incompatible_bit(image, CORRUPT_BIT);
    });
}

#[test]
fn refuses_extended_l2_entries() {
    refused_case("extended L2", &["extended"], |_, image| {
        create_qcow2(image, 64 << 20, "extended_l2=on");
    });
}

#[test]
fn refuses_an_external_data_file() {
    refused_case("external data file", &["data file"], |dir, image| {
        let data = dir.join("data.raw");
        create_qcow2(image, 64 << 20, &format!("data_file={}", data.display()));
    });
}

#[test]
fn refuses_an_unknown_incompatible_feature() {
    refused_case("incompatible bit 40", &["incompatible"], |_, image| {
        create_qcow2(image, 64 << 20, "");
        set_incompatible_bit(image, 40);
    });
}

// ---------------------------------------------------------------------------
// 4. Corrupted tables

/// Guest clusters 0..16 hold 0x5a; the tests break the mapping of this one.
const BAD_CLUSTER: u64 = 3;
const WRITTEN_CLUSTERS: u64 = 16;

#[derive(Clone, Copy, Debug)]
enum Corruption {
    /// BAD_CLUSTER's L2 entry points at the L1 table.
    L2AtL1Table,
    /// BAD_CLUSTER's L2 entry is not cluster-aligned.
    L2Unaligned,
    /// The L1 entry of guest clusters 0.. points past the end of the file.
    L1PastEof,
}

fn corrupted_tables(corruption: Corruption) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, 64 << 20, "cluster_size=64K");
    qemu_io(&image, "write -P 0x5a 0 1M");
    let header = Header::read(&image);
    assert_eq!(header.cluster_bytes, CLUSTER_BYTES);
    match corruption {
        Corruption::L2AtL1Table => {
            let at = header.l2_entry_at(&image, BAD_CLUSTER);
            write_u64_be(&image, at, COPIED | header.l1_table_offset);
        }
        Corruption::L2Unaligned => {
            let at = header.l2_entry_at(&image, BAD_CLUSTER);
            let entry = read_u64_be(&image, at);
            let offset = (entry & OFFSET_MASK) + SECTOR_BYTES;
            write_u64_be(&image, at, (entry & !OFFSET_MASK) | offset);
        }
        Corruption::L1PastEof => {
            let len = std::fs::metadata(&image).unwrap().len();
            let past = len.next_multiple_of(CLUSTER_BYTES) + 16 * CLUSTER_BYTES;
            write_u64_be(&image, header.l1_entry_at(0), COPIED | past);
        }
    }
    let metadata_before = header.metadata_snapshot(&image);
    let bad_sector = BAD_CLUSTER * CLUSTER_SECTORS;

    let mut backend = Backend::start_with(dir, image.clone(), &["--format", "qcow2"]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    let (status, _) = g.read_at(bad_sector, CLUSTER_BYTES as usize);
    assert_eq!(status, IOERR, "{corruption:?}: read of the bad cluster");
    if !matches!(corruption, Corruption::L1PastEof) {
        for cluster in (0..WRITTEN_CLUSTERS).filter(|c| *c != BAD_CLUSTER) {
            let (status, data) = g.read_at(cluster * CLUSTER_SECTORS, CLUSTER_BYTES as usize);
            assert_eq!(status, OK, "{corruption:?}: read of cluster {cluster}");
            assert!(
                data.iter().all(|b| *b == 0x5a),
                "{corruption:?}: cluster {cluster} no longer reads 0x5a"
            );
        }
    }
    assert_eq!(
        g.write_at(bad_sector, &[0xa5; BLOCK_BYTES as usize]),
        IOERR,
        "{corruption:?}: write to the bad cluster"
    );
    drop(g);
    let status = backend.wait_exit();
    assert_no_panic(&backend);
    println!("{corruption:?}: ringvm-blk exited {status}");

    assert!(
        header.metadata_snapshot(&image) == metadata_before,
        "{corruption:?}: the header, L1 or refcount table changed"
    );
    let features = incompatible_features(&image);
    assert_ne!(
        features & (1 << CORRUPT_BIT),
        0,
        "{corruption:?}: corrupt bit not set ({features:#x})"
    );
    let info = qcow2::info(&image);
    assert_eq!(
        info["format-specific"]["data"]["corrupt"],
        serde_json::Value::Bool(true),
        "{corruption:?}: qemu-img info: {info}"
    );
}

#[test]
fn l2_entry_pointing_at_the_l1_table_is_corruption() {
    corrupted_tables(Corruption::L2AtL1Table);
}

#[test]
fn unaligned_l2_entry_is_corruption() {
    corrupted_tables(Corruption::L2Unaligned);
}

#[test]
fn l1_entry_past_the_end_of_the_file_is_corruption() {
    corrupted_tables(Corruption::L1PastEof);
}

// ---------------------------------------------------------------------------
// 5. Thin provisioning and discard

const THIN_DISK_BYTES: u64 = 256 << 20;
/// Metadata a few allocations may add: L2 tables, refcount blocks.
const THIN_METADATA_SLACK_BYTES: u64 = 4 * CLUSTER_BYTES;

fn thin_image(format: Format, path: &Path) {
    match format {
        Format::Raw => Format::Raw.create(path, THIN_DISK_BYTES, 0),
        Format::Qcow2 => {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringvm-blk"))
                .args(["create", path.to_str().unwrap(), "--size", "256M"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ringvm-blk create: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                std::fs::metadata(path).unwrap().len() < 1 << 20,
                "a new image is small"
            );
            assert_eq!(Header::read(path).size_bytes, THIN_DISK_BYTES);
        }
    }
}

fn thin_provisioning(format: Format) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("disk.{}", format.name()));
    thin_image(format, &image);
    let empty = allocated_bytes(&image);
    assert!(empty < 1 << 20, "a new image allocates {empty} bytes");

    let clusters: Vec<u64> = (0..10).map(|k| 3 + k * 37).collect();
    let mut backend = Backend::start_with(dir, image.clone(), &["--format", format.name()]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    for &c in &clusters {
        let sector = c * CLUSTER_SECTORS + 16;
        assert_eq!(g.write_at(sector, &block_content(sector, c)), OK);
    }
    assert_eq!(g.flush(), OK);
    let written = allocated_bytes(&image);
    println!(
        "thin {}: {empty} bytes allocated when new, {written} after 10 writes of 4 KiB",
        format.name()
    );
    assert!(
        written >= empty + 10 * BLOCK_BYTES
            && written <= empty + 10 * CLUSTER_BYTES + THIN_METADATA_SLACK_BYTES,
        "{written} bytes allocated after 10 writes of 4 KiB (new: {empty})"
    );

    let (discarded, kept) = clusters.split_at(8);
    for &c in discarded {
        let status = g.segment_request(
            VIRTIO_BLK_T_DISCARD,
            c * CLUSTER_SECTORS,
            CLUSTER_SECTORS as u32,
            0,
        );
        assert_eq!(status, OK, "discard of cluster {c}");
    }
    assert_eq!(g.flush(), OK);
    let after_discard = allocated_bytes(&image);
    println!(
        "thin {}: {after_discard} bytes allocated after 8 discards",
        format.name()
    );
    assert!(
        after_discard + 8 * BLOCK_BYTES <= written,
        "discarding 8 clusters freed {} bytes",
        written.saturating_sub(after_discard)
    );
    for &c in discarded {
        let (status, data) = g.read_at(c * CLUSTER_SECTORS, CLUSTER_BYTES as usize);
        assert_eq!(status, OK);
        assert!(
            data.iter().all(|b| *b == 0),
            "discarded cluster {c} reads back data"
        );
    }

    // WRITE_ZEROES over a written cluster.
    let zeroed = kept[0];
    let status = g.segment_request(
        VIRTIO_BLK_T_WRITE_ZEROES,
        zeroed * CLUSTER_SECTORS,
        CLUSTER_SECTORS as u32,
        0,
    );
    assert_eq!(status, OK);
    let (status, data) = g.read_at(zeroed * CLUSTER_SECTORS, CLUSTER_BYTES as usize);
    assert_eq!(status, OK);
    assert!(
        data.iter().all(|b| *b == 0),
        "cluster {zeroed} after WRITE_ZEROES"
    );
    let untouched = kept[1] * CLUSTER_SECTORS + 16;
    assert_eq!(
        g.read_at(untouched, BLOCK_BYTES as usize),
        (OK, block_content(untouched, kept[1]))
    );
    assert_eq!(g.flush(), OK);
    drop(g);
    assert!(backend.wait_exit().success(), "{}", backend.stderr());

    format.assert_consistent(&image);
    let map = map(&image, format);
    for &c in discarded {
        let ranges = map_overlapping(&map, c * CLUSTER_BYTES, CLUSTER_BYTES);
        assert!(
            ranges.iter().all(|r| !r.data),
            "discarded cluster {c} is still data: {ranges:?}"
        );
    }
    let ranges = map_overlapping(&map, untouched * SECTOR_BYTES, BLOCK_BYTES);
    assert!(ranges.iter().all(|r| r.data), "written block: {ranges:?}");
    let view = format.guest_view(&image);
    let at = (untouched * SECTOR_BYTES) as usize;
    assert!(view[at..at + BLOCK_BYTES as usize] == block_content(untouched, kept[1]));
}

#[test]
fn thin_provisioning_and_discard_qcow2() {
    thin_provisioning(Format::Qcow2);
}

#[test]
fn thin_provisioning_and_discard_raw() {
    thin_provisioning(Format::Raw);
}

// ---------------------------------------------------------------------------
// 6. Write amplification

#[test]
fn a_4k_write_into_a_new_cluster_writes_less_than_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, 64 << 20, "cluster_size=64K");
    let mut backend = Backend::start_with(dir, image.clone(), &["--format", "qcow2"]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    let host_bytes_written = |counters: HashMap<String, u64>| {
        *counters
            .get("host_bytes_written")
            .unwrap_or_else(|| panic!("no host_bytes_written counter in {counters:?}"))
    };
    let before = host_bytes_written(backend.dump_counters());
    let sector = 5 * CLUSTER_SECTORS + 8;
    assert_eq!(g.write_at(sector, &block_content(sector, 1)), OK);
    assert_eq!(g.flush(), OK);
    let after = host_bytes_written(backend.dump_counters());
    let written = after - before;
    println!(
        "one 4 KiB write into a new 64 KiB cluster, then a flush: host_bytes_written +{written}"
    );
    assert!(
        (BLOCK_BYTES..CLUSTER_BYTES).contains(&written),
        "host_bytes_written grew by {written}"
    );
    drop(g);
    assert!(backend.wait_exit().success(), "{}", backend.stderr());
    assert_check_clean(&image);
    let view = Format::Qcow2.guest_view(&image);
    let at = (sector * SECTOR_BYTES) as usize;
    assert!(view[at..at + BLOCK_BYTES as usize] == block_content(sector, 1));
}

// ---------------------------------------------------------------------------
// 7. qcow2 backing file

#[test]
fn qcow2_backing_file_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let base_copy = dir.path().join("base-before.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&base, 64 << 20, "cluster_size=64K");
    qemu_io(&base, "write -P 0x11 0 4M");
    std::fs::copy(&base, &base_copy).unwrap();
    create_qcow2(
        &top,
        64 << 20,
        &format!(
            "cluster_size=64K,backing_file={},backing_fmt=qcow2",
            base.display()
        ),
    );

    let mut backend = Backend::start_with(dir, top.clone(), &["--format", "qcow2"]);
    let mut g = Guest::connect(&backend.socket, 1, false);
    let (status, data) = g.read_at(0, 1 << 20);
    assert_eq!(status, OK);
    assert!(
        data.iter().all(|b| *b == 0x11),
        "reads fall through to the base"
    );
    let (status, data) = g.read_at((8 << 20) / SECTOR_BYTES, CLUSTER_BYTES as usize);
    assert_eq!(status, OK);
    assert!(data.iter().all(|b| *b == 0), "past the base's data: zeroes");

    // 4 KiB in the middle of cluster 1.
    let cluster = 1;
    let sector = cluster * CLUSTER_SECTORS + 16;
    assert_eq!(g.write_at(sector, &[0x22; BLOCK_BYTES as usize]), OK);
    assert_eq!(g.flush(), OK);
    let mut expected = vec![0x11u8; CLUSTER_BYTES as usize];
    expected[16 * SECTOR_BYTES as usize..][..BLOCK_BYTES as usize].fill(0x22);
    assert_eq!(
        g.read_at(cluster * CLUSTER_SECTORS, CLUSTER_BYTES as usize),
        (OK, expected.clone())
    );
    drop(g);
    assert!(backend.wait_exit().success(), "{}", backend.stderr());

    let compare = qcow2::run(
        "qemu-img",
        &[
            "compare",
            base_copy.to_str().unwrap(),
            base.to_str().unwrap(),
        ],
    );
    assert_eq!(
        compare.status.code(),
        Some(0),
        "the base changed: {}",
        String::from_utf8_lossy(&compare.stdout)
    );
    assert_check_clean(&base);
    assert_check_clean(&top);
    // The written cluster is the top's own, whole (copied on write).
    let top_map = map(&top, Format::Qcow2);
    let ranges = map_overlapping(&top_map, cluster * CLUSTER_BYTES, CLUSTER_BYTES);
    assert!(
        ranges.iter().all(|r| r.depth == 0 && r.data),
        "cluster {cluster} is not all in the top: {ranges:?}"
    );
    let view = Format::Qcow2.guest_view(&top);
    let at = (cluster * CLUSTER_BYTES) as usize;
    assert!(view[at..at + CLUSTER_BYTES as usize] == expected);
    assert!(view[..4 << 20]
        .chunks(CLUSTER_BYTES as usize)
        .enumerate()
        .all(|(c, bytes)| c as u64 == cluster || bytes.iter().all(|b| *b == 0x11)));
}
