//! `job=blk-verify`: the virtio-blk device does what it says, on every queue.
//!
//! 1. get-id (VIRTIO_BLK_T_GET_ID) on queue 0; with `serial=EXPECTED` the
//!    answer must equal it.
//! 2. Writes the pattern below over the region, in 64 KiB requests; request
//!    k goes to queue k % queues, up to 16 in flight per queue.
//! 3. Flushes every queue (if VIRTIO_BLK_F_FLUSH).
//! 4. Reads the region back (request k on queue (k + 1) % queues, so data
//!    written through one queue is read through another) and checks it.
//! 5. Discards (if VIRTIO_BLK_F_DISCARD) `discard_range` and writes zeroes
//!    (if VIRTIO_BLK_F_WRITE_ZEROES, flags 0) over `write_zeroes_range`,
//!    then reads the region back once more: write-zeroes sectors must be
//!    zero; discarded sectors zero or still the pattern (a device may ignore
//!    a discard: QEMU with discard=ignore does), or only zero with
//!    `discard_zeroes=1`; every other sector the pattern.
//!
//! With VIRTIO_BLK_F_RO it only reads the region, once: every sector must
//! hold the pattern or be all zero (what a run on a writable disk leaves).
//!
//! `zero_sectors` in the output counts the all-zero sectors of the last read
//! pass (write-zeroes, zeroed discards, or the zero sectors of a read-only
//! disk).
//!
//! Parameters: `queues=N` (default: all the device has), `size=BYTES` (the
//! region, from sector 0; default the whole disk capped at 64 MiB, `size=all`
//! for the whole disk), `seed=N` (default 0x5eed), `serial=EXPECTED`,
//! `completion=poll|irq`, `discard_zeroes=0|1`, `pci_unplace=1` (clear the
//! device's BARs first, so that the driver places them: tests placement
//! under QEMU, whose firmware placed them).
//!
//! Output, one line: `testguest: blk-verify ok sectors=N queues=Q seed=0x..
//! flush=yes|no discard=yes|no write_zeroes=yes|no get_id=yes|no ro=yes|no
//! discard_result=zeroes|kept|mixed|none discard_range=START+COUNT|none
//! write_zeroes_range=START+COUNT|none zero_sectors=N serial=ID
//! completion=poll|irq`, or
//! `testguest: blk-verify FAILED <what> ...` and exit code 1.
//!
//! # The pattern
//!
//! Sector `s` (512 bytes at byte offset `512 * s` of the disk) holds 64
//! little-endian u64 words, for the run's `seed`:
//!
//! ```text
//! word 0        = s
//! word 1        = seed
//! word i, 2..64 = (s ^ rotate_left(seed, 17) ^ (i << 56)) * 0x9e3779b97f4a7c15   (mod 2^64)
//! ```
//!
//! After a successful run the image holds, for s < sectors: zeroes in
//! write_zeroes_range, zeroes or the pattern in discard_range (as
//! discard_result says), the pattern elsewhere. blk-bench writes the same
//! pattern (same `seed=`).

use alloc::format;
use alloc::string::String;

use super::params::Params;
use super::{Boot, JobFailed};
use crate::virtio::blk::{
    BlkDevice, BlkOptions, BlkRequest, CompletionMode, SECTOR_BYTES, STATUS_UNSET,
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};

/// Default pattern seed.
pub const DEFAULT_SEED: u64 = 0x5eed;
/// Multiplier of the pattern's words (the 64-bit golden ratio).
const PATTERN_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
const WORDS_PER_SECTOR: usize = 64;
/// Bytes per read/write request.
const CHUNK_BYTES: usize = 64 * 1024;
const CHUNK_SECTORS: u64 = CHUNK_BYTES as u64 / SECTOR_BYTES;
/// Requests in flight per queue.
const DEPTH: u16 = 16;
/// Default region: the disk, but no more than this (a short run).
const DEFAULT_REGION_MAX_BYTES: u64 = 64 << 20;

/// Word `i` of sector `sector` (see the module doc).
pub fn pattern_word(sector: u64, seed: u64, i: usize) -> u64 {
    match i {
        0 => sector,
        1 => seed,
        _ => (sector ^ seed.rotate_left(17) ^ ((i as u64) << 56)).wrapping_mul(PATTERN_MULTIPLIER),
    }
}

/// Fills `buf` (whole sectors) with the pattern of the sectors from `first_sector`.
pub fn fill_pattern(buf: &mut [u8], first_sector: u64, seed: u64) {
    for (n, sector) in buf.chunks_exact_mut(SECTOR_BYTES as usize).enumerate() {
        for (i, word) in sector.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&pattern_word(first_sector + n as u64, seed, i).to_le_bytes());
        }
    }
}

/// The first word that differs from what was expected.
pub struct Mismatch {
    pub sector: u64,
    pub word: usize,
    pub expected: u64,
    pub got: u64,
}

/// Checks one sector of `data` against `expected(i)` for each word i.
fn check_sector(data: &[u8], sector: u64, expected: impl Fn(usize) -> u64) -> Result<(), Mismatch> {
    for (i, word) in data.chunks_exact(8).enumerate().take(WORDS_PER_SECTOR) {
        let got = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        let want = expected(i);
        if got != want {
            return Err(Mismatch {
                sector,
                word: i,
                expected: want,
                got,
            });
        }
    }
    Ok(())
}

/// Checks that `buf` (whole sectors) holds the pattern from `first_sector`.
pub fn check_pattern(buf: &[u8], first_sector: u64, seed: u64) -> Result<(), Mismatch> {
    for (n, data) in buf.chunks_exact(SECTOR_BYTES as usize).enumerate() {
        let sector = first_sector + n as u64;
        check_sector(data, sector, |i| pattern_word(sector, seed, i))?;
    }
    Ok(())
}

fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// What a sector must hold after the discard/write-zeroes step.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Pattern,
    Zero,
    ZeroOrPattern,
}

/// A range of sectors: `start + count`.
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    count: u64,
}

impl Range {
    fn contains(&self, sector: u64) -> bool {
        (self.start..self.start + self.count).contains(&sector)
    }
}

fn show_range(range: Option<Range>) -> String {
    match range {
        Some(r) => format!("{}+{}", r.start, r.count),
        None => String::from("none"),
    }
}

fn yes(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

fn failed(what: core::fmt::Arguments<'_>) -> JobFailed {
    println!("blk-verify FAILED {what}");
    JobFailed
}

fn mismatch_failure(what: &str, m: &Mismatch) -> JobFailed {
    failed(format_args!(
        "{what} sector={} word={} expected={:#018x} got={:#018x}",
        m.sector, m.word, m.expected, m.got
    ))
}

/// Runs one request per chunk `k` in `0..chunks` on queue `(k + shift) %
/// queues`, with up to the queue's depth in flight. `prepare` fills the
/// slot's buffer and says what to submit; `finish` sees the status and the
/// buffer of each completion.
fn run_pass(
    dev: &mut BlkDevice,
    chunks: u64,
    shift: u64,
    mut prepare: impl FnMut(u64, &mut [u8]) -> BlkRequest,
    mut finish: impl FnMut(u64, u8, &[u8]) -> Result<(), JobFailed>,
) -> Result<(), JobFailed> {
    let queues = dev.queue_count() as u64;
    let (mut next, mut done) = (0, 0);
    while done < chunks {
        while next < chunks {
            let queue = dev.queue(((next + shift) % queues) as usize);
            let Some(slot) = queue.take_slot() else { break };
            let request = prepare(next, queue.buffer(slot));
            queue.submit(slot, request, next);
            next += 1;
        }
        let mut reaped = 0;
        for queue in dev.queues() {
            queue.kick();
            while let Some(c) = queue.next_completion() {
                reaped += 1;
                done += 1;
                finish(c.tag, c.status, queue.buffer(c.slot))?;
                queue.release(c.slot);
            }
        }
        if reaped == 0 {
            dev.wait();
        }
    }
    Ok(())
}

/// Fails unless a request came back OK.
fn expect_ok(what: &str, chunk: u64, status: u8) -> Result<(), JobFailed> {
    if status == VIRTIO_BLK_S_OK {
        return Ok(());
    }
    let unset = if status == STATUS_UNSET {
        " (the device did not write the status)"
    } else {
        ""
    };
    Err(failed(format_args!(
        "{what} request {chunk} status={status}{unset}"
    )))
}

/// The sectors of chunk `k` of a region of `sectors`.
fn chunk_range(k: u64, sectors: u64) -> Range {
    let start = k * CHUNK_SECTORS;
    Range {
        start,
        count: CHUNK_SECTORS.min(sectors - start),
    }
}

/// Sends get-id on queue 0 and returns the id (up to its first NUL), or
/// `None` if the device answers UNSUPP.
fn get_id(dev: &mut BlkDevice) -> Result<Option<String>, JobFailed> {
    let queue = dev.queue(0);
    let slot = queue.take_slot().expect("an idle queue has idle slots");
    queue.submit(slot, BlkRequest::GetId, 0);
    queue.kick();
    let completion = loop {
        if let Some(c) = dev.queue(0).next_completion() {
            break c;
        }
        dev.wait();
    };
    let queue = dev.queue(0);
    let id = queue.id_bytes(slot);
    queue.release(slot);
    match completion.status {
        VIRTIO_BLK_S_OK => {}
        VIRTIO_BLK_S_UNSUPP => return Ok(None),
        status => return Err(failed(format_args!("get-id status={status}"))),
    }
    let len = id
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(VIRTIO_BLK_ID_BYTES);
    Ok(Some(
        id[..len]
            .iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
            .collect(),
    ))
}

/// One request (discard, write-zeroes) on `queue`, waited for.
fn single(
    dev: &mut BlkDevice,
    queue: usize,
    what: &str,
    request: BlkRequest,
) -> Result<(), JobFailed> {
    let shift = queue as u64;
    run_pass(
        dev,
        1,
        shift,
        |_, _| request,
        |k, status, _| expect_ok(what, k, status),
    )
}

pub fn run(boot: &Boot) -> Result<(), JobFailed> {
    let params = Params::new(&boot.cmdline, "blk-verify");
    let queues = params.number_in("queues", 1..=u64::from(crate::virtio::blk::MAX_QUEUES))?;
    let seed = params.number("seed")?.unwrap_or(DEFAULT_SEED);
    let expected_serial = params.get("serial");
    let completion = match params.choice("completion", &["poll", "irq"])? {
        "irq" => CompletionMode::Irq,
        _ => CompletionMode::Poll,
    };
    let discard_zeroes = params.number_in("discard_zeroes", 0..=1)? == Some(1);
    let size = match params.get("size") {
        Some("all") => None,
        _ => Some(params.bytes("size")?.unwrap_or(DEFAULT_REGION_MAX_BYTES)),
    };

    let options = BlkOptions {
        queues: queues.map(|q| q as u16),
        depth: DEPTH,
        buffer_bytes: CHUNK_BYTES,
        completion,
        unplace_bars: params.number_in("pci_unplace", 0..=1)? == Some(1),
    };
    let mut dev = BlkDevice::open(&options).map_err(|e| failed(format_args!("{e}")))?;
    let config = dev.config;
    let align = u64::from(config.blk_size / SECTOR_BYTES as u32).max(1);
    let mut sectors = config.capacity_sectors;
    if let Some(bytes) = size {
        sectors = sectors.min(bytes / SECTOR_BYTES);
    }
    sectors -= sectors % align;
    if sectors == 0 {
        return Err(failed(format_args!(
            "no region to check: capacity={} sectors, size={size:?}",
            config.capacity_sectors
        )));
    }
    let chunks = sectors.div_ceil(CHUNK_SECTORS);
    let read_only = dev.has(VIRTIO_BLK_F_RO);

    let serial = get_id(&mut dev)?;
    if let Some(expected) = expected_serial {
        if serial.as_deref() != Some(expected) {
            return Err(failed(format_args!(
                "get-id expected={expected} got={}",
                serial.as_deref().unwrap_or("<unsupported>")
            )));
        }
    }

    if !read_only {
        run_pass(
            &mut dev,
            chunks,
            0,
            |k, buf| {
                let range = chunk_range(k, sectors);
                let len = (range.count * SECTOR_BYTES) as usize;
                fill_pattern(&mut buf[..len], range.start, seed);
                BlkRequest::Write {
                    sector: range.start,
                    len_bytes: len as u32,
                }
            },
            |k, status, _| expect_ok("write", k, status),
        )?;
    }
    let flush = dev.has(VIRTIO_BLK_F_FLUSH) && !read_only;
    if flush {
        let queues = dev.queue_count() as u64;
        run_pass(
            &mut dev,
            queues,
            0,
            |_, _| BlkRequest::Flush,
            |k, status, _| expect_ok("flush", k, status),
        )?;
    }
    let read_back = |k: u64, buf: &mut [u8]| {
        let range = chunk_range(k, sectors);
        buf[..(range.count * SECTOR_BYTES) as usize].fill(0xa5);
        BlkRequest::Read {
            sector: range.start,
            len_bytes: (range.count * SECTOR_BYTES) as u32,
        }
    };
    if !read_only {
        run_pass(&mut dev, chunks, 1, read_back, |k, status, buf| {
            expect_ok("read", k, status)?;
            let range = chunk_range(k, sectors);
            check_pattern(
                &buf[..(range.count * SECTOR_BYTES) as usize],
                range.start,
                seed,
            )
            .map_err(|m| mismatch_failure("read-back", &m))
        })?;
    }

    // Discard a quarter of the way in, write zeroes half-way, an eighth each.
    let last_queue = dev.queue_count() - 1;
    let discard = (dev.has(VIRTIO_BLK_F_DISCARD) && !read_only)
        .then(|| {
            let granule = align.max(u64::from(config.discard_sector_alignment));
            let start = (sectors / 4).next_multiple_of(granule);
            let mut count = (sectors / 8).min(sectors.saturating_sub(start));
            if config.max_discard_sectors != 0 {
                count = count.min(u64::from(config.max_discard_sectors));
            }
            count -= count % granule;
            (count > 0).then_some(Range { start, count })
        })
        .flatten();
    let write_zeroes = (dev.has(VIRTIO_BLK_F_WRITE_ZEROES) && !read_only)
        .then(|| {
            let start = (sectors / 2).next_multiple_of(align);
            let mut count = (sectors / 8).min(sectors.saturating_sub(start));
            if config.max_write_zeroes_sectors != 0 {
                count = count.min(u64::from(config.max_write_zeroes_sectors));
            }
            count -= count % align;
            (count > 0).then_some(Range { start, count })
        })
        .flatten();
    if let Some(r) = discard {
        let request = BlkRequest::Discard {
            sector: r.start,
            sectors: r.count as u32,
        };
        single(&mut dev, last_queue, "discard", request)?;
    }
    if let Some(r) = write_zeroes {
        let request = BlkRequest::WriteZeroes {
            sector: r.start,
            sectors: r.count as u32,
            unmap: false,
        };
        single(&mut dev, last_queue.min(1), "write-zeroes", request)?;
    }
    let (mut discard_zero, mut discard_kept, mut zero_sectors) = (0u64, 0u64, 0u64);
    if read_only || discard.is_some() || write_zeroes.is_some() {
        let expect = |sector: u64| {
            if write_zeroes.is_some_and(|r| r.contains(sector)) {
                Expect::Zero
            } else if discard.is_some_and(|r| r.contains(sector)) {
                if discard_zeroes {
                    Expect::Zero
                } else {
                    Expect::ZeroOrPattern
                }
            } else if read_only {
                Expect::ZeroOrPattern
            } else {
                Expect::Pattern
            }
        };
        let in_discard = |sector: u64| discard.is_some_and(|r| r.contains(sector));
        run_pass(&mut dev, chunks, 2, read_back, |k, status, buf| {
            expect_ok("read", k, status)?;
            let range = chunk_range(k, sectors);
            for (n, data) in buf
                .chunks_exact(SECTOR_BYTES as usize)
                .take(range.count as usize)
                .enumerate()
            {
                let sector = range.start + n as u64;
                let pattern = |i| pattern_word(sector, seed, i);
                let zero = is_zero(data);
                zero_sectors += u64::from(zero);
                if in_discard(sector) {
                    discard_zero += u64::from(zero);
                    discard_kept += u64::from(!zero);
                }
                let result = match expect(sector) {
                    Expect::Pattern => check_sector(data, sector, pattern),
                    Expect::Zero => check_sector(data, sector, |_| 0),
                    Expect::ZeroOrPattern if zero => Ok(()),
                    Expect::ZeroOrPattern => check_sector(data, sector, pattern),
                };
                result.map_err(|m| {
                    let what = match expect(sector) {
                        Expect::Pattern => "after discard/write-zeroes, outside their ranges,",
                        Expect::Zero if write_zeroes.is_some_and(|r| r.contains(sector)) => {
                            "write-zeroes"
                        }
                        Expect::Zero => "discard (discard_zeroes=1)",
                        Expect::ZeroOrPattern if read_only => {
                            "read-only check (neither zero nor the pattern)"
                        }
                        Expect::ZeroOrPattern => "discard (neither zero nor the old data)",
                    };
                    mismatch_failure(what, &m)
                })?;
            }
            Ok(())
        })?;
    }
    let discard_result = match (discard.is_some(), discard_zero, discard_kept) {
        (false, _, _) => "none",
        (true, _, 0) => "zeroes",
        (true, 0, _) => "kept",
        _ => "mixed",
    };
    println!(
        "blk-verify ok sectors={sectors} queues={} seed={seed:#x} flush={} discard={} \
         write_zeroes={} get_id={} ro={} discard_result={discard_result} discard_range={} \
         write_zeroes_range={} zero_sectors={zero_sectors} serial={} completion={}",
        dev.queue_count(),
        yes(flush),
        yes(discard.is_some()),
        yes(write_zeroes.is_some()),
        yes(serial.is_some()),
        yes(read_only),
        show_range(discard),
        show_range(write_zeroes),
        serial.as_deref().unwrap_or("none"),
        completion.name(),
    );
    Ok(())
}
