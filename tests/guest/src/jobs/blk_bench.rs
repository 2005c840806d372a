//! `job=blk-bench`: a fio-like benchmark of the virtio-blk device.
//!
//! Parameters, with fio's names and meanings:
//!
//! - `rw=read|write|randread|randwrite|randrw|readwrite` (`rw` is an alias of
//!   readwrite: sequential mixed), default read; `rwmixread=` percent of
//!   reads in mixed workloads (default 50).
//! - `bs=` block size (`4k`, `64k`, `1m`, ...; a multiple of 512 and of the
//!   device's blk_size), default 4k.
//! - `iodepth=` requests in flight per job (default 1), `numjobs=` jobs
//!   (default 1), each with its own virtqueue: job j drives queue j. One vCPU
//!   drives them all, round-robin: submit on every queue, reap every queue.
//! - `size=` the region `[0, size)` every job works on and, without
//!   `runtime=`, the bytes each job transfers (fio: size per job). Default:
//!   the whole disk with `runtime=`, else the disk capped at 64 MiB.
//! - `runtime=` (seconds, or `500ms`, `10s`, `2m`) makes the run time-based
//!   (fio's time_based): offsets wrap within the region until it elapses,
//!   then the requests in flight finish.
//! - `verify=0|1`: writes carry the blk-verify pattern (same `seed=`) and
//!   each one is read back and checked once it completes (the read-back is
//!   not counted as a read); reads are checked too: all of them in read-only
//!   workloads (so the disk must hold the pattern, e.g. after blk-verify or
//!   a write run), and in mixed ones those of blocks this run has written.
//!   The pattern depends only on the sector and the seed, so requests to
//!   the same block racing with each other cannot make a check fail.
//! - `completion=poll|irq`: poll the used rings (default; interrupts
//!   suppressed) or wait for MSI-X interrupts.
//! - `randseed=` seeds the offsets (xorshift64*, one stream per job).
//! - `pci_unplace=1`: as for blk-verify (the driver places the BARs).
//!
//! Sequential jobs each start at block 0, as fio's jobs on one file do.
//! Random offsets are uniform over the region's `bs`-aligned blocks.
//!
//! Output, one line, `testguest: result ` and a JSON object:
//!
//! ```text
//! {"rw":"randread","bs":4096,"iodepth":32,"numjobs":1,"rwmixread":100,
//!  "size":67108864,"time_based":true,"completion":"poll","verify":0,
//!  "runtime_ms":10000,"elapsed_cycles":...,
//!  "read":{"ios":..,"bytes":..,"iops":..,"bytes_per_sec":..,
//!          "lat_ns":{"min":..,"mean":..,"p50":..,"p99":..,"p99.9":..,"max":..}},
//!  "write":{...same...},
//!  "verified":0,"errors":0,"notifies":..,"interrupts":..,
//!  "queue_size":256,"queue_depth":32,"indirect":false,"event_idx":true,
//!  "tsc_khz":2000000,"tsc_source":"cpuid"}
//! ```
//!
//! Latency is per request, submit (avail ring entry written) to completion
//! (seen in the used ring), from rdtsc, in a log2-linear histogram (32
//! linear buckets per power of two: percentiles within 1/64). Without a
//! known TSC rate, times are null and latencies come as `lat_cycles`.
//! Errors (a status other than OK, a failed check) are counted; the first
//! is printed as `testguest: blk-bench FAILED ...`, and the job fails after
//! printing its result.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::blk_verify::{check_pattern, fill_pattern, DEFAULT_SEED};
use super::params::Params;
use super::{Boot, JobFailed};
use crate::tsc::{self, TscRate};
use crate::virtio::blk::{
    BlkDevice, BlkOptions, BlkRequest, CompletionMode, MAX_QUEUES, SECTOR_BYTES, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_OK,
};
use crate::virtio::VIRTIO_F_EVENT_IDX;

/// Default region without `runtime=` or `size=`.
const DEFAULT_SIZE_MAX_BYTES: u64 = 64 << 20;
/// Default `randseed=`.
const DEFAULT_RANDSEED: u64 = 0x2545_f491_4f6c_dd1d;
const MAX_BS: u64 = 16 << 20;
const MAX_IODEPTH: u64 = 4096;
/// Heap kept free beyond the buffers (queues, headers, histograms).
const HEAP_RESERVE_BYTES: u64 = 8 << 20;
/// xorshift64* output multiplier.
const XORSHIFT_MULTIPLIER: u64 = 0x2545_f491_4f6c_dd1d;

/// A request's tag: the operation in the top two bits, the block below.
const TAG_OP_SHIFT: u32 = 62;
const TAG_BLOCK_MASK: u64 = (1 << TAG_OP_SHIFT) - 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read = 0,
    Write = 1,
    VerifyRead = 2,
}

fn tag(op: Op, block: u64) -> u64 {
    (op as u64) << TAG_OP_SHIFT | block
}

fn untag(tag: u64) -> (Op, u64) {
    let op = match tag >> TAG_OP_SHIFT {
        0 => Op::Read,
        1 => Op::Write,
        _ => Op::VerifyRead,
    };
    (op, tag & TAG_BLOCK_MASK)
}

/// fio's rw= workloads.
#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    random: bool,
    reads: bool,
    writes: bool,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "read",
        random: false,
        reads: true,
        writes: false,
    },
    Workload {
        name: "write",
        random: false,
        reads: false,
        writes: true,
    },
    Workload {
        name: "randread",
        random: true,
        reads: true,
        writes: false,
    },
    Workload {
        name: "randwrite",
        random: true,
        reads: false,
        writes: true,
    },
    Workload {
        name: "randrw",
        random: true,
        reads: true,
        writes: true,
    },
    Workload {
        name: "readwrite",
        random: false,
        reads: true,
        writes: true,
    },
    Workload {
        name: "rw",
        random: false,
        reads: true,
        writes: true,
    },
];

/// Latencies in cycles: a log2-linear histogram, no allocation per sample.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
const BUCKETS: usize = ((64 - SUB_BUCKET_BITS + 1) as usize) << SUB_BUCKET_BITS;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn bucket(value: u64) -> usize {
        if value < SUB_BUCKETS {
            return value as usize;
        }
        let shift = 63 - value.leading_zeros() - SUB_BUCKET_BITS;
        (((shift + 1) as usize) << SUB_BUCKET_BITS)
            + ((value >> shift) & (SUB_BUCKETS - 1)) as usize
    }

    /// The middle of bucket `b`'s values.
    fn value(b: usize) -> u64 {
        let (group, sub) = (b >> SUB_BUCKET_BITS, (b as u64) & (SUB_BUCKETS - 1));
        if group == 0 {
            return sub;
        }
        let shift = group as u32 - 1;
        ((SUB_BUCKETS + sub) << shift) + ((1 << shift) >> 1)
    }

    fn record(&mut self, value: u64) {
        self.counts[Self::bucket(value)] += 1;
        self.total += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// The value below which `per_mille`/1000 of the samples lie.
    fn percentile(&self, per_mille: u64) -> u64 {
        let rank = (self.total * per_mille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (b, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::value(b).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

/// One direction's totals.
struct Direction {
    ios: u64,
    bytes: u64,
    latency: Histogram,
}

/// One job: a queue and where it is in its work.
struct Job {
    queue: usize,
    rng: u64,
    next_block: u64,
    issued_bytes: u64,
    done: bool,
}

impl Job {
    /// xorshift64*.
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(XORSHIFT_MULTIPLIER)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_random()) * u128::from(n)) >> 64) as u64
    }
}

struct Settings {
    workload: Workload,
    rwmixread: u64,
    bs: u64,
    iodepth: u16,
    numjobs: u16,
    runtime_ms: Option<u64>,
    size: Option<u64>,
    verify: bool,
    completion: CompletionMode,
    seed: u64,
    randseed: u64,
}

fn settings(params: &Params<'_>) -> Result<Settings, JobFailed> {
    let rw = params.choice(
        "rw",
        &[
            "read",
            "write",
            "randread",
            "randwrite",
            "randrw",
            "readwrite",
            "rw",
        ],
    )?;
    let workload = *WORKLOADS
        .iter()
        .find(|w| w.name == rw)
        .expect("choice() returns a listed name");
    let bs = params.bytes("bs")?.unwrap_or(4096);
    if bs == 0 || bs % SECTOR_BYTES != 0 || bs > MAX_BS {
        println!(
            "blk-bench FAILED bad parameter bs={bs}: expected a multiple of 512 up to {MAX_BS}"
        );
        return Err(JobFailed);
    }
    let completion = match params.choice("completion", &["poll", "irq"])? {
        "irq" => CompletionMode::Irq,
        _ => CompletionMode::Poll,
    };
    Ok(Settings {
        workload,
        rwmixread: if workload.writes && workload.reads {
            params.number_in("rwmixread", 0..=100)?.unwrap_or(50)
        } else if workload.reads {
            100
        } else {
            0
        },
        bs,
        iodepth: params.number_in("iodepth", 1..=MAX_IODEPTH)?.unwrap_or(1) as u16,
        numjobs: params
            .number_in("numjobs", 1..=u64::from(MAX_QUEUES))?
            .unwrap_or(1) as u16,
        runtime_ms: params.ms("runtime")?,
        size: params.bytes("size")?,
        verify: params.number_in("verify", 0..=1)? == Some(1),
        completion,
        seed: params.number("seed")?.unwrap_or(DEFAULT_SEED),
        randseed: params.number("randseed")?.unwrap_or(DEFAULT_RANDSEED),
    })
}

fn failed(what: fmt::Arguments<'_>) -> JobFailed {
    println!("blk-bench FAILED {what}");
    JobFailed
}

pub fn run(boot: &Boot) -> Result<(), JobFailed> {
    let params = Params::new(&boot.cmdline, "blk-bench");
    let s = settings(&params)?;
    let rate = tsc::rate(boot.start_info.rsdp_paddr);
    if s.runtime_ms.is_some() && rate.is_none() {
        return Err(failed(format_args!(
            "runtime= needs the TSC rate, which is unknown"
        )));
    }
    let buffers = u64::from(s.iodepth) * u64::from(s.numjobs) * s.bs;
    if buffers + HEAP_RESERVE_BYTES > crate::heap::free_bytes() {
        return Err(failed(format_args!(
            "iodepth*numjobs*bs = {buffers} bytes of buffers; the heap has {}",
            crate::heap::free_bytes()
        )));
    }
    let options = BlkOptions {
        queues: Some(s.numjobs),
        depth: s.iodepth,
        buffer_bytes: s.bs as usize,
        completion: s.completion,
        unplace_bars: params.number_in("pci_unplace", 0..=1)? == Some(1),
    };
    let mut dev = BlkDevice::open(&options).map_err(|e| failed(format_args!("{e}")))?;
    let config = dev.config;
    if config.blk_size != 0 && s.bs % u64::from(config.blk_size) != 0 {
        return Err(failed(format_args!(
            "bs={} is not a multiple of the device's blk_size {}",
            s.bs, config.blk_size
        )));
    }
    if s.workload.writes && dev.has(VIRTIO_BLK_F_RO) {
        return Err(failed(format_args!(
            "rw={} on a read-only device",
            s.workload.name
        )));
    }
    let capacity = config.capacity_sectors * SECTOR_BYTES;
    let region = match (s.size, s.runtime_ms) {
        (Some(size), _) => size.min(capacity),
        (None, Some(_)) => capacity,
        (None, None) => capacity.min(DEFAULT_SIZE_MAX_BYTES),
    };
    let blocks = region / s.bs;
    if blocks == 0 {
        return Err(failed(format_args!(
            "region of {region} bytes holds no bs={} block (capacity {capacity})",
            s.bs
        )));
    }
    let io_limit = s.runtime_ms.is_none().then_some(blocks * s.bs);
    let sectors_per_block = s.bs / SECTOR_BYTES;
    let read_only = !s.workload.writes;
    let mut written = (s.verify && s.workload.reads && s.workload.writes)
        .then(|| vec![0u64; blocks.div_ceil(64) as usize]);

    // Write buffers hold the pattern even without verify (a zero-filled
    // write could be detected and skipped by a backend).
    for q in dev.queues() {
        let slots: Vec<u16> = core::iter::from_fn(|| q.take_slot()).collect();
        for &slot in &slots {
            fill_pattern(q.buffer(slot), 0, s.seed);
        }
        slots.into_iter().for_each(|slot| q.release(slot));
    }
    let mut jobs: Vec<Job> = (0..s.numjobs)
        .map(|j| Job {
            queue: usize::from(j),
            rng: (s.randseed ^ (u64::from(j) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
            next_block: 0,
            issued_bytes: 0,
            done: false,
        })
        .collect();
    let mut read = Direction {
        ios: 0,
        bytes: 0,
        latency: Histogram::new(),
    };
    let mut write = Direction {
        ios: 0,
        bytes: 0,
        latency: Histogram::new(),
    };
    let (mut errors, mut verified) = (0u64, 0u64);
    let report_error = |errors: &mut u64, what: fmt::Arguments<'_>| {
        if *errors == 0 {
            println!("blk-bench FAILED {what}");
        }
        *errors += 1;
    };

    let interrupts_before = dev.interrupts();
    let start = tsc::now();
    let deadline = s
        .runtime_ms
        .zip(rate)
        .map(|(ms, r)| start + r.cycles_in_ms(ms));
    let mut last_completion = start;
    loop {
        let now = tsc::now();
        for job in jobs.iter_mut().filter(|j| !j.done) {
            let queue = dev.queue(job.queue);
            loop {
                if io_limit.is_some_and(|limit| job.issued_bytes >= limit)
                    || deadline.is_some_and(|d| now >= d)
                {
                    job.done = true;
                    break;
                }
                let Some(slot) = queue.take_slot() else { break };
                let block = if s.workload.random {
                    job.below(blocks)
                } else {
                    let b = job.next_block;
                    job.next_block = (b + 1) % blocks;
                    b
                };
                let is_read = match s.rwmixread {
                    100 => true,
                    0 => false,
                    mix => job.below(100) < mix,
                };
                let sector = block * sectors_per_block;
                let len_bytes = s.bs as u32;
                let (request, op) = if is_read {
                    (BlkRequest::Read { sector, len_bytes }, Op::Read)
                } else {
                    if s.verify {
                        fill_pattern(queue.buffer(slot), sector, s.seed);
                    }
                    (BlkRequest::Write { sector, len_bytes }, Op::Write)
                };
                queue.submit(slot, request, tag(op, block));
                job.issued_bytes += s.bs;
            }
            queue.kick();
        }

        let mut reaped = 0;
        for job in &jobs {
            let queue = dev.queue(job.queue);
            while let Some(c) = queue.next_completion() {
                reaped += 1;
                last_completion = c.complete_tsc;
                let (op, block) = untag(c.tag);
                let sector = block * sectors_per_block;
                if c.status != VIRTIO_BLK_S_OK {
                    let name = match op {
                        Op::Read => "read",
                        Op::Write => "write",
                        Op::VerifyRead => "verify read",
                    };
                    report_error(
                        &mut errors,
                        format_args!("{name} sector={sector} status={}", c.status),
                    );
                    queue.release(c.slot);
                    continue;
                }
                let latency = c.complete_tsc - c.submit_tsc;
                let mut check = false;
                match op {
                    Op::Read => {
                        read.ios += 1;
                        read.bytes += s.bs;
                        read.latency.record(latency);
                        check = s.verify
                            && (read_only
                                || written.as_ref().is_some_and(|w| {
                                    w[(block / 64) as usize] & 1 << (block % 64) != 0
                                }));
                    }
                    Op::Write => {
                        write.ios += 1;
                        write.bytes += s.bs;
                        write.latency.record(latency);
                        if s.verify {
                            let request = BlkRequest::Read {
                                sector,
                                len_bytes: s.bs as u32,
                            };
                            queue.submit(c.slot, request, tag(Op::VerifyRead, block));
                            continue;
                        }
                    }
                    Op::VerifyRead => {
                        check = true;
                        if let Some(w) = written.as_mut() {
                            w[(block / 64) as usize] |= 1 << (block % 64);
                        }
                    }
                }
                if check {
                    verified += 1;
                    if let Err(m) = check_pattern(queue.buffer(c.slot), sector, s.seed) {
                        report_error(
                            &mut errors,
                            format_args!(
                                "verify sector={} word={} expected={:#018x} got={:#018x}",
                                m.sector, m.word, m.expected, m.got
                            ),
                        );
                    }
                }
                queue.release(c.slot);
            }
            queue.kick();
        }
        if jobs.iter().all(|j| j.done) && dev.in_flight() == 0 {
            break;
        }
        if reaped == 0 {
            dev.wait();
        }
    }

    let q0 = dev.queue(0);
    let (queue_size, queue_depth, indirect) = (q0.queue_size(), q0.depth(), q0.indirect());
    let report = Report {
        s: &s,
        region,
        elapsed_cycles: last_completion - start,
        rate,
        read: &read,
        write: &write,
        verified,
        errors,
        notifies: dev.notifies(),
        interrupts: dev.interrupts() - interrupts_before,
        queue_size,
        queue_depth,
        indirect,
        event_idx: dev.has(VIRTIO_F_EVENT_IDX),
    };
    println!("result {report}");
    if errors > 0 {
        return Err(JobFailed);
    }
    Ok(())
}

struct Report<'a> {
    s: &'a Settings,
    region: u64,
    elapsed_cycles: u64,
    rate: Option<TscRate>,
    read: &'a Direction,
    write: &'a Direction,
    verified: u64,
    errors: u64,
    notifies: u64,
    interrupts: u64,
    queue_size: u16,
    queue_depth: u16,
    indirect: bool,
    event_idx: bool,
}

/// A number, or `null` when there is none.
struct Maybe(Option<u64>);

impl fmt::Display for Maybe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("null"),
        }
    }
}

impl Report<'_> {
    fn direction(&self, f: &mut fmt::Formatter<'_>, d: &Direction) -> fmt::Result {
        let per_sec = |n| self.rate.map(|r| r.per_sec(n, self.elapsed_cycles));
        write!(
            f,
            "{{\"ios\":{},\"bytes\":{},\"iops\":{},\"bytes_per_sec\":{},",
            d.ios,
            d.bytes,
            Maybe(per_sec(d.ios)),
            Maybe(per_sec(d.bytes))
        )?;
        let h = &d.latency;
        let (key, scale): (&str, &dyn Fn(u64) -> u64) = match &self.rate {
            Some(r) => ("lat_ns", &move |c| r.ns(c)),
            None => ("lat_cycles", &|c| c),
        };
        if h.total == 0 {
            return write!(f, "\"{key}\":null}}");
        }
        write!(
            f,
            "\"{key}\":{{\"min\":{},\"mean\":{},\"p50\":{},\"p99\":{},\"p99.9\":{},\"max\":{}}}}}",
            scale(h.min),
            scale((h.sum / u128::from(h.total)) as u64),
            scale(h.percentile(500)),
            scale(h.percentile(990)),
            scale(h.percentile(999)),
            scale(h.max)
        )
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.s;
        write!(
            f,
            "{{\"rw\":\"{}\",\"bs\":{},\"iodepth\":{},\"numjobs\":{},\"rwmixread\":{},\
             \"size\":{},\"time_based\":{},\"completion\":\"{}\",\"verify\":{},\
             \"runtime_ms\":{},\"elapsed_cycles\":{},\"read\":",
            s.workload.name,
            s.bs,
            s.iodepth,
            s.numjobs,
            s.rwmixread,
            self.region,
            s.runtime_ms.is_some(),
            s.completion.name(),
            u8::from(s.verify),
            Maybe(self.rate.map(|r| r.ms(self.elapsed_cycles))),
            self.elapsed_cycles
        )?;
        self.direction(f, self.read)?;
        f.write_str(",\"write\":")?;
        self.direction(f, self.write)?;
        write!(
            f,
            ",\"verified\":{},\"errors\":{},\"notifies\":{},\"interrupts\":{},\
             \"queue_size\":{},\"queue_depth\":{},\"indirect\":{},\"event_idx\":{},\
             \"tsc_khz\":{},\"tsc_source\":",
            self.verified,
            self.errors,
            self.notifies,
            self.interrupts,
            self.queue_size,
            self.queue_depth,
            self.indirect,
            self.event_idx,
            Maybe(self.rate.map(|r| r.khz)),
        )?;
        match &self.rate {
            Some(r) => write!(f, "\"{}\"}}", r.source),
            None => f.write_str("null}"),
        }
    }
}
