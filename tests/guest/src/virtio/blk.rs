//! virtio-blk (virtio 1.2 5.2) over the modern PCI transport: feature
//! negotiation, one [`BlkQueue`] per virtqueue, requests in fixed slots.
//!
//! Each queue has `depth` request slots. A slot owns, for its whole life, a
//! data buffer of `buffer_bytes` and 128 bytes of request metadata (header,
//! status byte, the get-id / discard payload, an indirect table), and either
//! three consecutive descriptors of the queue (`3 * slot`.., the default) or,
//! when the queue is too small for that and VIRTIO_F_INDIRECT_DESC is
//! negotiated, descriptor `slot` pointing to the slot's indirect table. So
//! submitting is a few memory writes and no allocation, and a used element's
//! id names its slot. A request is three descriptors (header; data; status)
//! or two for a flush.
//!
//! A slot is Idle, Owned by the caller (after [`BlkQueue::take_slot`] or
//! after its request completed: the caller may read and write its buffer), or
//! InFlight (the device owns its buffer). The caller releases it.
//!
//! Completion: the jobs poll the used rings (interrupts suppressed: queue
//! vectors are VIRTIO_MSI_NO_VECTOR and used_event stays behind), or, with
//! [`CompletionMode::Irq`], [`BlkDevice::wait`] turns interrupts on and spins
//! until the CPL0 stub has counted one on a queue's vector (MSI-X entry i
//! sends vector `IRQ_VECTOR_BASE + i`), then turns them off again while the
//! job reaps and resubmits.

use alloc::vec::Vec;
use core::fmt;
use core::ptr;

use super::pci::{VirtioPci, VirtioPciError};
use super::queue::{
    Descriptor, SplitQueue, QUEUE_SIZE_MAX, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
use super::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};
use crate::heap::DmaBuf;
use crate::pci::BarWindow;
use crate::{start, tsc};

/// PCI device IDs of virtio-blk: modern (0x1040 + 2) and transitional.
pub const VIRTIO_BLK_PCI_DEVICE_IDS: &[u16] = &[0x1042, 0x1001];

// Feature bits (5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Everything the driver accepts when offered (GET_ID has no feature bit:
/// a device without it answers VIRTIO_BLK_S_UNSUPP).
const FEATURES_WANTED: u64 = VIRTIO_BLK_F_SEG_MAX
    | VIRTIO_BLK_F_RO
    | VIRTIO_BLK_F_BLK_SIZE
    | VIRTIO_BLK_F_FLUSH
    | VIRTIO_BLK_F_MQ
    | VIRTIO_BLK_F_DISCARD
    | VIRTIO_BLK_F_WRITE_ZEROES
    | VIRTIO_F_INDIRECT_DESC
    | VIRTIO_F_EVENT_IDX
    | VIRTIO_F_ACCESS_PLATFORM;

// struct virtio_blk_config (5.2.4).
const CFG_CAPACITY: u64 = 0x00;
const CFG_BLK_SIZE: u64 = 0x14;
const CFG_NUM_QUEUES: u64 = 0x22;
const CFG_MAX_DISCARD_SECTORS: u64 = 0x24;
const CFG_DISCARD_SECTOR_ALIGNMENT: u64 = 0x2c;
const CFG_MAX_WRITE_ZEROES_SECTORS: u64 = 0x30;
/// Reads of the config before giving up on a stable config_generation.
const CONFIG_READ_ATTEMPTS: u32 = 100;

// Requests (5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Length of the get-id answer (VIRTIO_BLK_ID_BYTES).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// struct virtio_blk_discard_write_zeroes: sector u64, num_sectors u32, flags u32.
const DISCARD_SEGMENT_BYTES: u32 = 16;
pub const SECTOR_BYTES: u64 = 512;
/// The status byte before the device writes it (no status the spec defines).
pub const STATUS_UNSET: u8 = 0xff;

// A slot's metadata block.
const SLOT_META_BYTES: usize = 128;
const META_HEADER: usize = 0;
const HEADER_BYTES: u32 = 16;
const META_AUX: usize = 16;
const META_STATUS: usize = 40;
const META_INDIRECT: usize = 64;
const DESCRIPTORS_PER_REQUEST: u16 = 3;
const DESCRIPTOR_BYTES: u32 = 16;

/// Queue `i` interrupts with vector `IRQ_VECTOR_BASE + i % msix entries`.
pub const IRQ_VECTOR_BASE: u8 = 0x40;
/// Most queues driven (vectors 0x40..0x7f).
pub const MAX_QUEUES: u16 = 64;
/// Cycles without a completion while requests are in flight before
/// [`BlkDevice::wait`] prints what it is waiting for (once): 2^35, about
/// 10 s at 3 GHz.
const STALL_REPORT_CYCLES: u64 = 1 << 35;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CompletionMode {
    Poll,
    Irq,
}

impl CompletionMode {
    pub fn name(self) -> &'static str {
        match self {
            CompletionMode::Poll => "poll",
            CompletionMode::Irq => "irq",
        }
    }
}

pub struct BlkOptions {
    /// Queues to drive; `None`: all the device has.
    pub queues: Option<u16>,
    /// Request slots per queue.
    pub depth: u16,
    /// Data buffer bytes per slot.
    pub buffer_bytes: usize,
    pub completion: CompletionMode,
    /// Unplace the device's BARs first, so that the driver places them
    /// (tests BAR placement under QEMU, whose firmware placed them).
    pub unplace_bars: bool,
}

pub enum BlkError {
    NotFound,
    Transport(VirtioPciError),
    NoDeviceConfig,
    UnstableConfig,
    BadQueueCount { asked: u16, device: u16 },
    NoMsix,
    OutOfMemory(&'static str),
}

impl From<VirtioPciError> for BlkError {
    fn from(e: VirtioPciError) -> Self {
        BlkError::Transport(e)
    }
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::NotFound => write!(f, "no virtio-blk PCI device on bus 0"),
            BlkError::Transport(e) => e.fmt(f),
            BlkError::NoDeviceConfig => write!(f, "virtio-blk device has no device config"),
            BlkError::UnstableConfig => write!(f, "virtio-blk config keeps changing"),
            BlkError::BadQueueCount { asked, device } => write!(
                f,
                "queues={asked}: the device has {device} (at most {MAX_QUEUES} are driven)"
            ),
            BlkError::NoMsix => write!(f, "completion=irq needs MSI-X, the device has none"),
            BlkError::OutOfMemory(what) => write!(f, "out of memory for {what}"),
        }
    }
}

/// What the device's config says (fields of features not negotiated are 0).
#[derive(Clone, Copy, Default)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
}

/// A request; reads and writes move `len_bytes` of the slot's buffer.
#[derive(Clone, Copy)]
pub enum BlkRequest {
    Read {
        sector: u64,
        len_bytes: u32,
    },
    Write {
        sector: u64,
        len_bytes: u32,
    },
    Flush,
    GetId,
    Discard {
        sector: u64,
        sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

/// A finished request. Its slot is Owned by the caller again.
pub struct BlkCompletion {
    pub slot: u16,
    pub tag: u64,
    pub status: u8,
    pub submit_tsc: u64,
    pub complete_tsc: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Idle,
    Owned,
    InFlight,
}

#[derive(Clone, Copy)]
struct Slot {
    state: SlotState,
    tag: u64,
    submit_tsc: u64,
}

pub struct BlkQueue {
    index: u16,
    vq: SplitQueue,
    indirect: bool,
    meta: DmaBuf,
    buffers: Vec<DmaBuf>,
    slots: Vec<Slot>,
    idle: Vec<u16>,
    in_flight: u16,
    /// Interrupt vector in irq mode.
    vector: Option<u8>,
    last_completion_tsc: u64,
}

impl BlkQueue {
    fn new(
        vq: SplitQueue,
        index: u16,
        depth: u16,
        indirect: bool,
        buffer_bytes: usize,
        vector: Option<u8>,
    ) -> Result<BlkQueue, BlkError> {
        let meta = DmaBuf::alloc(SLOT_META_BYTES * usize::from(depth))
            .ok_or(BlkError::OutOfMemory("request headers"))?;
        let mut buffers = Vec::with_capacity(usize::from(depth));
        for _ in 0..depth {
            buffers.push(DmaBuf::alloc(buffer_bytes).ok_or(BlkError::OutOfMemory("buffers"))?);
        }
        Ok(BlkQueue {
            index,
            vq,
            indirect,
            meta,
            buffers,
            slots: alloc::vec![
                Slot {
                    state: SlotState::Idle,
                    tag: 0,
                    submit_tsc: 0
                };
                usize::from(depth)
            ],
            idle: (0..depth).rev().collect(),
            in_flight: 0,
            vector,
            last_completion_tsc: tsc::now(),
        })
    }

    /// Request slots (the most requests in flight at once).
    pub fn depth(&self) -> u16 {
        self.slots.len() as u16
    }

    pub fn queue_size(&self) -> u16 {
        self.vq.size()
    }

    pub fn indirect(&self) -> bool {
        self.indirect
    }

    pub fn notifies(&self) -> u64 {
        self.vq.notifies
    }

    /// An idle slot, now Owned by the caller.
    pub fn take_slot(&mut self) -> Option<u16> {
        let slot = self.idle.pop()?;
        self.slots[usize::from(slot)].state = SlotState::Owned;
        Some(slot)
    }

    /// Gives an Owned slot back.
    pub fn release(&mut self, slot: u16) {
        self.expect_owned(slot);
        self.slots[usize::from(slot)].state = SlotState::Idle;
        self.idle.push(slot);
    }

    fn expect_owned(&self, slot: u16) {
        assert!(
            self.slots.get(usize::from(slot)).map(|s| s.state) == Some(SlotState::Owned),
            "queue {}: slot {slot} is not owned by the caller",
            self.index
        );
    }

    /// The data buffer of an Owned slot.
    pub fn buffer(&mut self, slot: u16) -> &mut [u8] {
        self.expect_owned(slot);
        // SAFETY: the slot is Owned, not InFlight: its request (if any) has
        // come back through the used ring, so the device holds no descriptor
        // of an available chain that points into this buffer.
        unsafe { self.buffers[usize::from(slot)].bytes_mut() }
    }

    /// The get-id answer of an Owned slot whose GetId request completed.
    pub fn id_bytes(&self, slot: u16) -> [u8; VIRTIO_BLK_ID_BYTES] {
        self.expect_owned(slot);
        let at = usize::from(slot) * SLOT_META_BYTES + META_AUX;
        // SAFETY: inside the slot's metadata (ptr_at checks); the slot is not
        // in flight, so the device is done writing it.
        unsafe { ptr::read_volatile(self.meta.ptr_at::<[u8; VIRTIO_BLK_ID_BYTES]>(at)) }
    }

    fn write_meta<T>(&mut self, offset: usize, value: T) {
        // SAFETY: ptr_at bounds-checks the offset; callers write metadata of
        // an Owned slot, which the device is not reading.
        unsafe { ptr::write_volatile(self.meta.ptr_at::<T>(offset), value) }
    }

    /// Puts `request` for the Owned `slot` on the avail ring (made visible to
    /// the device by [`kick`](Self::kick)). `tag` comes back with the
    /// completion.
    pub fn submit(&mut self, slot: u16, request: BlkRequest, tag: u64) {
        self.expect_owned(slot);
        let meta_offset = usize::from(slot) * SLOT_META_BYTES;
        let meta_paddr = self.meta.paddr() + meta_offset as u64;
        let buffer_paddr = self.buffers[usize::from(slot)].paddr();
        let buffer_len = self.buffers[usize::from(slot)].len();
        let aux_paddr = meta_paddr + META_AUX as u64;
        // (type, sector, data: (address, length, device-writable))
        let (kind, sector, data) = match request {
            BlkRequest::Read { sector, len_bytes } | BlkRequest::Write { sector, len_bytes } => {
                assert!(
                    len_bytes as usize <= buffer_len,
                    "request of {len_bytes} bytes, buffer {buffer_len}"
                );
                let read = matches!(request, BlkRequest::Read { .. });
                let kind = if read {
                    VIRTIO_BLK_T_IN
                } else {
                    VIRTIO_BLK_T_OUT
                };
                (kind, sector, Some((buffer_paddr, len_bytes, read)))
            }
            BlkRequest::Flush => (VIRTIO_BLK_T_FLUSH, 0, None),
            BlkRequest::GetId => {
                // Zeroes after a shorter answer, not an old discard segment.
                self.write_meta(meta_offset + META_AUX, [0u8; VIRTIO_BLK_ID_BYTES]);
                (
                    VIRTIO_BLK_T_GET_ID,
                    0,
                    Some((aux_paddr, VIRTIO_BLK_ID_BYTES as u32, true)),
                )
            }
            BlkRequest::Discard { sector, sectors } => {
                self.write_meta(meta_offset + META_AUX, sector);
                self.write_meta(meta_offset + META_AUX + 8, sectors);
                self.write_meta(meta_offset + META_AUX + 12, 0u32);
                (
                    VIRTIO_BLK_T_DISCARD,
                    0,
                    Some((aux_paddr, DISCARD_SEGMENT_BYTES, false)),
                )
            }
            BlkRequest::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => {
                let flags = if unmap {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                self.write_meta(meta_offset + META_AUX, sector);
                self.write_meta(meta_offset + META_AUX + 8, sectors);
                self.write_meta(meta_offset + META_AUX + 12, flags);
                (
                    VIRTIO_BLK_T_WRITE_ZEROES,
                    0,
                    Some((aux_paddr, DISCARD_SEGMENT_BYTES, false)),
                )
            }
        };
        // struct virtio_blk_req header: type u32, reserved u32, sector u64.
        self.write_meta(meta_offset + META_HEADER, kind);
        self.write_meta(meta_offset + META_HEADER + 4, 0u32);
        self.write_meta(meta_offset + META_HEADER + 8, sector);
        self.write_meta(meta_offset + META_STATUS, STATUS_UNSET);

        // The chain as descriptors 0, 1, 2 (relative), status last.
        let status_at: u16 = if data.is_some() { 2 } else { 1 };
        let mut chain = [Descriptor {
            addr: 0,
            len: 0,
            flags: 0,
            next: 0,
        }; DESCRIPTORS_PER_REQUEST as usize];
        chain[0] = Descriptor {
            addr: meta_paddr + META_HEADER as u64,
            len: HEADER_BYTES,
            flags: VIRTQ_DESC_F_NEXT,
            next: 1,
        };
        if let Some((addr, len, device_writes)) = data {
            chain[1] = Descriptor {
                addr,
                len,
                flags: VIRTQ_DESC_F_NEXT | if device_writes { VIRTQ_DESC_F_WRITE } else { 0 },
                next: 2,
            };
        }
        chain[usize::from(status_at)] = Descriptor {
            addr: meta_paddr + META_STATUS as u64,
            len: 1,
            flags: VIRTQ_DESC_F_WRITE,
            next: 0,
        };
        let count = status_at + 1;
        let head = if self.indirect {
            for (i, descriptor) in chain.iter().take(usize::from(count)).enumerate() {
                let at = self
                    .meta
                    .ptr_at::<Descriptor>(meta_offset + META_INDIRECT + i * 16);
                // SAFETY: the slot's own indirect table (bounds checked by
                // ptr_at), which the device does not read: the slot is not in
                // flight.
                unsafe { super::queue::write_descriptor(at, *descriptor) };
            }
            self.vq.set_descriptor(
                slot,
                Descriptor {
                    addr: meta_paddr + META_INDIRECT as u64,
                    len: u32::from(count) * DESCRIPTOR_BYTES,
                    flags: VIRTQ_DESC_F_INDIRECT,
                    next: 0,
                },
            );
            slot
        } else {
            let base = slot * DESCRIPTORS_PER_REQUEST;
            for (i, descriptor) in chain.iter().take(usize::from(count)).enumerate() {
                let mut descriptor = *descriptor;
                if descriptor.flags & VIRTQ_DESC_F_NEXT != 0 {
                    descriptor.next += base;
                }
                self.vq.set_descriptor(base + i as u16, descriptor);
            }
            base
        };
        let state = &mut self.slots[usize::from(slot)];
        state.state = SlotState::InFlight;
        state.tag = tag;
        state.submit_tsc = tsc::now();
        self.in_flight += 1;
        self.vq.push_avail(head);
    }

    /// Publishes the submitted requests; notifies the device if it wants.
    pub fn kick(&mut self) -> bool {
        self.vq.publish()
    }

    /// The next finished request, if any.
    pub fn next_completion(&mut self) -> Option<BlkCompletion> {
        let elem = self.vq.pop_used()?;
        let complete_tsc = tsc::now();
        let slot = if self.indirect {
            elem.id
        } else {
            elem.id / u32::from(DESCRIPTORS_PER_REQUEST)
        };
        let state = self
            .slots
            .get_mut(slot as usize)
            .filter(|s| s.state == SlotState::InFlight)
            .unwrap_or_else(|| {
                panic!(
                    "virtio-blk queue {}: the device returned chain {} (len {}), which is not in flight",
                    self.index, elem.id, elem.len
                )
            });
        state.state = SlotState::Owned;
        let (tag, submit_tsc) = (state.tag, state.submit_tsc);
        self.in_flight -= 1;
        self.last_completion_tsc = complete_tsc;
        let at = slot as usize * SLOT_META_BYTES + META_STATUS;
        // SAFETY: the slot's status byte (bounds checked by ptr_at), written
        // by the device before it returned the chain.
        let status = unsafe { ptr::read_volatile(self.meta.ptr_at::<u8>(at)) };
        Some(BlkCompletion {
            slot: slot as u16,
            tag,
            status,
            submit_tsc,
            complete_tsc,
        })
    }
}

pub struct BlkDevice {
    transport: VirtioPci,
    pub features: u64,
    pub config: BlkConfig,
    pub completion: CompletionMode,
    queues: Vec<BlkQueue>,
    /// The distinct interrupt vectors of the queues (none in poll mode).
    vectors: Vec<u8>,
    stall_reported: bool,
}

impl BlkDevice {
    /// Finds the first virtio-blk device on bus 0 and initializes it: all
    /// of 3.1.1 up to DRIVER_OK.
    pub fn open(options: &BlkOptions) -> Result<BlkDevice, BlkError> {
        let function = super::pci::find(VIRTIO_BLK_PCI_DEVICE_IDS).ok_or(BlkError::NotFound)?;
        if options.unplace_bars {
            // SAFETY: nothing uses the device yet; VirtioPci::open places its
            // BARs again before any access.
            unsafe { function.unplace_memory_bars() };
        }
        let transport = VirtioPci::open(function, &mut BarWindow::default())?;
        let features = transport.negotiate(FEATURES_WANTED)?;
        match set_up_queues(&transport, features, options) {
            Ok((config, queues)) => {
                transport.driver_ok();
                let mut vectors: Vec<u8> = queues.iter().filter_map(|q| q.vector).collect();
                vectors.sort_unstable();
                vectors.dedup();
                Ok(BlkDevice {
                    transport,
                    features,
                    config,
                    completion: options.completion,
                    queues,
                    vectors,
                    stall_reported: false,
                })
            }
            Err(e) => {
                transport.fail();
                Err(e)
            }
        }
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    pub fn queues(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }

    pub fn queue(&mut self, index: usize) -> &mut BlkQueue {
        &mut self.queues[index]
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn in_flight(&self) -> u32 {
        self.queues.iter().map(|q| u32::from(q.in_flight)).sum()
    }

    pub fn notifies(&self) -> u64 {
        self.queues.iter().map(|q| q.notifies()).sum()
    }

    /// Interrupts counted so far on the queues' vectors. No allocation: the
    /// irq-mode wait spins on this (and the heap never frees).
    pub fn interrupts(&self) -> u64 {
        self.vectors
            .iter()
            .map(|&v| start::interrupt_count(v))
            .sum()
    }

    /// Waits for completions: in poll mode a pause (the caller polls again);
    /// in irq mode until an interrupt arrives on a queue with requests in
    /// flight (or completions are already waiting). Reports (once) when
    /// nothing has completed for a long time.
    pub fn wait(&mut self) {
        self.check_stall();
        if self.completion == CompletionMode::Poll {
            core::hint::spin_loop();
            return;
        }
        let before = self.interrupts();
        let mut pending = false;
        for queue in self.queues.iter_mut().filter(|q| q.in_flight > 0) {
            pending |= queue.vq.set_interrupts(true);
        }
        if !pending {
            let started = tsc::now();
            while self.interrupts() == before {
                core::hint::spin_loop();
                if tsc::now() - started > STALL_REPORT_CYCLES {
                    self.check_stall();
                    break;
                }
            }
        }
        for queue in &mut self.queues {
            queue.vq.set_interrupts(false);
        }
    }

    fn check_stall(&mut self) {
        if self.stall_reported {
            return;
        }
        let now = tsc::now();
        let stalled = self
            .queues
            .iter()
            .filter(|q| q.in_flight > 0 && now - q.last_completion_tsc > STALL_REPORT_CYCLES)
            .count();
        if stalled == 0 {
            return;
        }
        self.stall_reported = true;
        for q in &self.queues {
            println!(
                "virtio-blk queue {}: {} in flight, no completion for {} cycles, {} notifies, \
                 {} interrupts, device status {:#x}, {}",
                q.index,
                q.in_flight,
                now - q.last_completion_tsc,
                q.notifies(),
                self.interrupts(),
                self.transport.status(),
                q.vq
            );
        }
    }
}

/// Between FEATURES_OK and DRIVER_OK: reads the config, programs MSI-X and
/// sets up the queues.
fn set_up_queues(
    transport: &VirtioPci,
    features: u64,
    options: &BlkOptions,
) -> Result<(BlkConfig, Vec<BlkQueue>), BlkError> {
    let config = read_config(transport, features)?;
    let device_queues = if features & VIRTIO_BLK_F_MQ != 0 {
        config.num_queues.max(1)
    } else {
        1
    }
    .min(transport.num_queues().max(1));
    let queues = options.queues.unwrap_or(device_queues.min(MAX_QUEUES));
    if queues == 0 || queues > device_queues || queues > MAX_QUEUES {
        return Err(BlkError::BadQueueCount {
            asked: queues,
            device: device_queues,
        });
    }
    let irq = options.completion == CompletionMode::Irq;
    let entries = transport.msix_entries();
    if irq && entries == 0 {
        return Err(BlkError::NoMsix);
    }
    // MSI-X entry e sends IRQ_VECTOR_BASE + e; queue q uses entry q % entries.
    let vectors: Vec<Option<u8>> = (0..entries.min(queues))
        .map(|e| irq.then_some(IRQ_VECTOR_BASE + e as u8))
        .collect();
    transport.enable_msix(&vectors);
    let event_idx = features & VIRTIO_F_EVENT_IDX != 0;
    let depth = options.depth.clamp(1, QUEUE_SIZE_MAX);
    let wanted_size = (u32::from(depth) * u32::from(DESCRIPTORS_PER_REQUEST))
        .next_power_of_two()
        .min(u32::from(QUEUE_SIZE_MAX)) as u16;
    let mut built = Vec::with_capacity(usize::from(queues));
    for index in 0..queues {
        let entry = irq.then(|| index % entries);
        let vq = transport.setup_queue(index, wanted_size, entry, event_idx)?;
        let size = vq.size();
        // Three descriptors per request if the queue has room for them all,
        // else one (indirect), else fewer requests.
        let (depth, indirect) =
            if u32::from(depth) * u32::from(DESCRIPTORS_PER_REQUEST) <= u32::from(size) {
                (depth, false)
            } else if features & VIRTIO_F_INDIRECT_DESC != 0 {
                (depth.min(size), true)
            } else {
                (size / DESCRIPTORS_PER_REQUEST, false)
            };
        let vector = entry.map(|e| IRQ_VECTOR_BASE + e as u8);
        built.push(BlkQueue::new(
            vq,
            index,
            depth.max(1),
            indirect,
            options.buffer_bytes,
            vector,
        )?);
    }
    Ok((config, built))
}

/// The device config, read until config_generation is stable around it.
fn read_config(transport: &VirtioPci, features: u64) -> Result<BlkConfig, BlkError> {
    let cfg = transport.device_cfg().ok_or(BlkError::NoDeviceConfig)?;
    let read32 = |offset: u64, feature: u64| {
        if (feature == 0 || features & feature != 0) && cfg.contains(offset, 4) {
            cfg.read32(offset)
        } else {
            0
        }
    };
    for _ in 0..CONFIG_READ_ATTEMPTS {
        let generation = transport.config_generation();
        let config = BlkConfig {
            capacity_sectors: u64::from(read32(CFG_CAPACITY, 0))
                | u64::from(read32(CFG_CAPACITY + 4, 0)) << 32,
            blk_size: read32(CFG_BLK_SIZE, VIRTIO_BLK_F_BLK_SIZE),
            num_queues: if features & VIRTIO_BLK_F_MQ != 0 && cfg.contains(CFG_NUM_QUEUES, 2) {
                cfg.read16(CFG_NUM_QUEUES)
            } else {
                0
            },
            max_discard_sectors: read32(CFG_MAX_DISCARD_SECTORS, VIRTIO_BLK_F_DISCARD),
            discard_sector_alignment: read32(CFG_DISCARD_SECTOR_ALIGNMENT, VIRTIO_BLK_F_DISCARD),
            max_write_zeroes_sectors: read32(
                CFG_MAX_WRITE_ZEROES_SECTORS,
                VIRTIO_BLK_F_WRITE_ZEROES,
            ),
        };
        if transport.config_generation() == generation {
            return Ok(config);
        }
    }
    Err(BlkError::UnstableConfig)
}
