//! virtio-net (virtio 1.2 5.1) over the modern PCI transport: feature
//! negotiation, the config space (mac, status, max_virtqueue_pairs), the
//! control queue, and receive/transmit queue pairs driven by polling the
//! used rings (interrupts stay suppressed, as with virtio-blk's
//! completion=poll).
//!
//! Buffers: receive queue entry `i` is descriptor `i`, one device-writable
//! buffer of [`RX_BUFFER_BYTES`], posted at open and re-posted as soon as its
//! contents are copied out by [`QueuePair::recv`]. With VIRTIO_NET_F_MRG_RXBUF
//! a packet may span several buffers (`num_buffers` in the header of the
//! first); without it each buffer holds a whole packet (5.1.6.3.1: without
//! GUEST_TSO4, a buffer of at least 1526 bytes is enough). Transmit queue
//! entry `i` is descriptor `i` with its own buffer: a `virtio_net_hdr_v1`
//! and the frame.
//!
//! Offloads (5.1.6.2, 5.1.6.4): VIRTIO_NET_F_CSUM and HOST_TSO4 are accepted
//! when offered, so that [`QueuePair::try_send_offloaded`] can hand the
//! device a frame whose checksum it completes, or a TCP/IPv4 frame of up to
//! 64 KiB that it cuts into segments; GUEST_CSUM and GUEST_TSO4 too, so the
//! device may hand over frames with a partial checksum (NEEDS_CSUM) and TSO
//! frames of up to 64 KiB. GUEST_TSO4 needs GUEST_CSUM (5.1.3.1), and is
//! accepted only with MRG_RXBUF, which spreads such a frame over the
//! page-sized buffers (without it every buffer would have to hold 65562
//! bytes); HOST_TSO4 needs CSUM. [`QueuePair::recv`] completes partial
//! checksums, so its callers see frames as they would be on a wire;
//! [`QueuePair::recv_offloaded`] leaves them and returns the header.
//!
//! Multiqueue: VIRTIO_NET_F_MQ requires VIRTIO_NET_F_CTRL_VQ (5.1.3.1), and a
//! device starts with one pair; more pairs are only enabled by a
//! VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET command on the control queue (5.1.6.5.5).
//! The driver accepts MQ only with CTRL_VQ, and CTRL_VQ whenever offered.
//! With MQ it sets up max_virtqueue_pairs (N) pairs, queues 2n (receive) and
//! 2n + 1 (transmit), and the control queue at 2N (at 2 with CTRL_VQ alone,
//! 5.1.2); it posts buffers on the pairs it uses only, and after DRIVER_OK
//! sends VQ_PAIRS_SET with their number and checks the device's ack
//! (VIRTIO_NET_OK; VIRTIO_NET_ERR fails the open). The device then steers
//! each flow to one of those pairs' receive queues, and a flow stays on its
//! pair when the driver answers on the same pair's transmit queue
//! ([`NetDevice::pair`]).

use alloc::vec::Vec;
use core::fmt;
use core::ptr;

use super::pci::{VirtioPci, VirtioPciError};
use super::queue::{Descriptor, SplitQueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use super::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX};
use crate::heap::DmaBuf;
use crate::netproto::{self, NetHdr};
use crate::pci::BarWindow;

/// PCI device IDs of virtio-net: modern (0x1040 + 1) and transitional.
pub const VIRTIO_NET_PCI_DEVICE_IDS: &[u16] = &[0x1041, 0x1000];

// Feature bits (5.1.3).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// Accepted whenever offered (MQ only with CTRL_VQ, see the module doc).
const FEATURES_WANTED: u64 = VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_CTRL_VQ
    | VIRTIO_F_EVENT_IDX
    | VIRTIO_F_ACCESS_PLATFORM
    | OFFLOADS_WANTED;
/// The offloads accepted whenever offered, and whatever they need (see
/// [`with_offload_needs`]).
const OFFLOADS_WANTED: u64 =
    VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4;
/// The offload features with their names, for reports.
pub const OFFLOAD_NAMES: &[(u64, &str)] = &[
    (VIRTIO_NET_F_CSUM, "csum"),
    (VIRTIO_NET_F_GUEST_CSUM, "guest_csum"),
    (VIRTIO_NET_F_HOST_TSO4, "host_tso4"),
    (VIRTIO_NET_F_GUEST_TSO4, "guest_tso4"),
];

/// The MAC the driver uses when the device offers none (locally
/// administered, unicast).
pub const DRIVER_MAC: [u8; 6] = [0x02, 0x72, 0x76, 0x6d, 0x00, 0x01];
/// config.status: the link is up (5.1.4).
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

// struct virtio_net_config (5.1.4).
const CFG_MAC: u64 = 0;
const CFG_STATUS: u64 = 6;
const CFG_MAX_VIRTQUEUE_PAIRS: u64 = 8;
/// Reads of the config before giving up on a stable config_generation.
const CONFIG_READ_ATTEMPTS: u32 = 100;

/// struct virtio_net_hdr_v1 (5.1.6): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers. With VERSION_1 it always has
/// num_buffers, MRG_RXBUF or not.
pub const NET_HDR_BYTES: usize = netproto::NET_HDR_BYTES;

/// Bytes of one receive buffer: a page, which is what each one takes anyway
/// (the heap aligns every DmaBuf to a page). A whole 1514-byte frame and its
/// header fit in one (so without MRG_RXBUF too); a 64 KiB TSO frame spans 17
/// (with MRG_RXBUF), so that the ring holds 15 of them.
pub const RX_BUFFER_BYTES: usize = 4096;
/// Entries of each queue (less if the device's maximum is smaller): enough
/// receive buffers to absorb a burst from the host while the job answers.
const QUEUE_ENTRIES: u16 = 256;
/// The most pairs a device may have (5.1.4: max_virtqueue_pairs is 1 to
/// 0x8000).
const MAX_PAIRS: u16 = 0x8000;

// The control queue (5.1.6.5): class, command, data, then the ack the
// device writes.
const VIRTIO_NET_CTRL_MQ: u8 = 4;
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;
/// Entries of the control queue: one command at a time.
const CTRL_QUEUE_ENTRIES: u16 = 4;
/// The command buffer: class and command at 0, data at
/// [`CTRL_DATA_OFFSET`], the ack at [`CTRL_ACK_OFFSET`] (written by the
/// device, so in a descriptor of its own).
const CTRL_BUFFER_BYTES: usize = 64;
const CTRL_DATA_OFFSET: usize = 2;
const CTRL_ACK_OFFSET: usize = 32;
/// The ack byte before the device answers: neither OK nor ERR.
const CTRL_ACK_UNSET: u8 = 0xff;
/// Polls of the control queue's used ring before giving up on an answer:
/// far more than a device takes (QEMU answers within the notify write;
/// a vhost-user frontend after a round trip to its backend).
const CTRL_ANSWER_SPINS: u64 = 1 << 30;
/// Attempts of [`NetDevice::send`] to find a free transmit buffer before it
/// gives up on the frame (the device is not consuming the queue).
const TX_FULL_SPINS: u32 = 1 << 24;

pub enum NetError {
    NotFound,
    Transport(VirtioPciError),
    NoDeviceConfig,
    UnstableConfig,
    FrameTooLarge {
        len: usize,
        max: usize,
    },
    /// An offloaded frame whose headers are longer than the frame.
    BadHeaders {
        headers: usize,
        len: usize,
    },
    OutOfMemory(&'static str),
    /// max_virtqueue_pairs outside 1..=0x8000 with MQ negotiated.
    BadMaxPairs(u16),
    /// The caller asked for more pairs than the device has (or none).
    PairsUnavailable {
        wanted: u16,
        max: u16,
    },
    /// The device has fewer queues than its pairs and control queue need.
    TooFewQueues {
        needed: u32,
        has: u16,
    },
    /// The device answered a control command with VIRTIO_NET_ERR.
    CtrlRejected {
        command: &'static str,
    },
    /// Neither VIRTIO_NET_OK nor VIRTIO_NET_ERR in the ack byte.
    CtrlBadAck {
        command: &'static str,
        ack: u8,
        used_len: u32,
    },
    /// The device did not return the command.
    CtrlNoAnswer {
        command: &'static str,
    },
}

impl From<VirtioPciError> for NetError {
    fn from(e: VirtioPciError) -> Self {
        NetError::Transport(e)
    }
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::NotFound => write!(f, "no virtio-net PCI device on bus 0"),
            NetError::Transport(e) => e.fmt(f),
            NetError::NoDeviceConfig => write!(f, "virtio-net device has no device config"),
            NetError::UnstableConfig => write!(f, "virtio-net config keeps changing"),
            NetError::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes, transmit buffers hold {max}")
            }
            NetError::BadHeaders { headers, len } => {
                write!(f, "{headers} bytes of headers for a frame of {len} bytes")
            }
            NetError::OutOfMemory(what) => write!(f, "out of memory for {what}"),
            NetError::BadMaxPairs(n) => write!(
                f,
                "virtio-net config says max_virtqueue_pairs={n}, outside 1..={MAX_PAIRS}"
            ),
            NetError::PairsUnavailable { wanted, max } => {
                write!(f, "pairs={wanted} asked for, the device has 1 to {max}")
            }
            NetError::TooFewQueues { needed, has } => write!(
                f,
                "virtio-net device has {has} queues, its pairs and control queue need {needed}"
            ),
            NetError::CtrlRejected { command } => {
                write!(f, "the device answered {command} with VIRTIO_NET_ERR")
            }
            NetError::CtrlBadAck {
                command,
                ack,
                used_len,
            } => write!(
                f,
                "the device answered {command} with ack {ack:#x} (used length {used_len}), \
                 neither VIRTIO_NET_OK nor VIRTIO_NET_ERR"
            ),
            NetError::CtrlNoAnswer { command } => {
                write!(
                    f,
                    "the device never returned {command} on the control queue"
                )
            }
        }
    }
}

/// What the device's config says (fields of features not negotiated are 0).
#[derive(Clone, Copy, Default)]
pub struct NetConfig {
    pub mac: [u8; 6],
    /// VIRTIO_NET_S_* bits; LINK_UP when STATUS is not negotiated.
    pub status: u16,
    pub max_virtqueue_pairs: u16,
}

/// A MAC address printed as `52:54:00:12:34:56`.
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Why a received packet was not handed to the caller (its buffers are
/// posted again either way).
#[derive(Clone, Copy, Debug)]
pub enum RxDrop {
    /// Used length shorter than the header.
    Short,
    /// num_buffers of 0, or more than the buffers the device returned.
    BadNumBuffers,
    /// Larger than the caller's buffer.
    TooLarge,
}

/// One receive/transmit queue pair the driver uses, with its buffers.
pub struct QueuePair {
    features: u64,
    rx: SplitQueue,
    rx_buffers: Vec<DmaBuf>,
    tx: SplitQueue,
    tx_buffers: Vec<DmaBuf>,
    /// Transmit entries the device does not hold.
    tx_free: Vec<u16>,
    /// Per transmit buffer, the end of the bytes that may not be zero
    /// (header included): [`try_send_offloaded`](Self::try_send_offloaded)
    /// sends zeros after the caller's headers without writing them each time.
    tx_dirty: Vec<usize>,
    /// Packets received (dropped ones included) and sent.
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// The control queue and its one command buffer.
struct ControlQueue {
    queue: SplitQueue,
    buffer: DmaBuf,
}

pub struct NetDevice {
    transport: VirtioPci,
    pub features: u64,
    pub config: NetConfig,
    /// The pairs in use: the device's first `pairs.len()`.
    pairs: Vec<QueuePair>,
    /// The queues of the device's other pairs: set up, never given buffers
    /// (kept because the device knows their rings).
    _idle: Vec<SplitQueue>,
    ctrl: Option<ControlQueue>,
}

impl NetDevice {
    /// Finds the first virtio-net device on bus 0 and initializes it (3.1.1
    /// up to DRIVER_OK) with one queue pair, every receive buffer posted.
    /// `tx_frame_bytes`: the largest frame [`send`](Self::send) must take.
    pub fn open(tx_frame_bytes: usize) -> Result<NetDevice, NetError> {
        Self::open_pairs(tx_frame_bytes, Some(1))
    }

    /// [`open`](Self::open) with `pairs` queue pairs (`None`: all the
    /// device has), turned on with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET when MQ
    /// is negotiated; more than one needs MQ.
    pub fn open_pairs(tx_frame_bytes: usize, pairs: Option<u16>) -> Result<NetDevice, NetError> {
        let function = super::pci::find(VIRTIO_NET_PCI_DEVICE_IDS).ok_or(NetError::NotFound)?;
        let transport = VirtioPci::open(function, &mut BarWindow::default())?;
        let mut features = transport.negotiate(FEATURES_WANTED | VIRTIO_NET_F_MQ)?;
        if features & VIRTIO_NET_F_MQ != 0 && features & VIRTIO_NET_F_CTRL_VQ == 0 {
            // A device offering MQ without CTRL_VQ breaks 5.1.3.1, and the
            // driver must not accept it: start over (negotiate resets).
            features = transport.negotiate(FEATURES_WANTED)?;
        }
        let consistent = with_offload_needs(features);
        if consistent != features {
            // An offload offered without what it needs: start over without it.
            features = transport.negotiate(consistent)?;
        }
        let mut device = match set_up(&transport, features, tx_frame_bytes, pairs) {
            Ok((config, pairs, idle, ctrl)) => NetDevice {
                transport,
                features,
                config,
                pairs,
                _idle: idle,
                ctrl,
            },
            Err(e) => {
                transport.fail();
                return Err(e);
            }
        };
        device.transport.driver_ok();
        for pair in &mut device.pairs {
            pair.rx.publish();
        }
        if device.has(VIRTIO_NET_F_MQ) {
            let pairs = device.pairs.len() as u16;
            let answer = device.ctrl_command(
                "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET",
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &pairs.to_le_bytes(),
            );
            if let Err(e) = answer {
                device.transport.fail();
                return Err(e);
            }
        }
        Ok(device)
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// The device status register (for reports).
    pub fn device_status(&self) -> u8 {
        self.transport.status()
    }

    /// The queue pairs in use.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Queue pair `i` (below [`pairs`](Self::pairs)).
    pub fn pair(&mut self, i: usize) -> &mut QueuePair {
        &mut self.pairs[i]
    }

    /// [`QueuePair::recv_offloaded`] on pair 0.
    pub fn recv_offloaded(&mut self, frame: &mut [u8]) -> Option<Result<(usize, NetHdr), RxDrop>> {
        self.pairs[0].recv_offloaded(frame)
    }

    /// [`QueuePair::send`] on pair 0.
    pub fn send(&mut self, frame: &[u8]) -> Result<bool, NetError> {
        self.pairs[0].send(frame)
    }

    /// [`QueuePair::try_send_offloaded`] on pair 0.
    pub fn try_send_offloaded(
        &mut self,
        hdr: &NetHdr,
        headers: &[u8],
        len: usize,
    ) -> Result<bool, NetError> {
        self.pairs[0].try_send_offloaded(hdr, headers, len)
    }

    /// Notify writes done on every queue.
    pub fn notifies(&self) -> u64 {
        let data: u64 = self
            .pairs
            .iter()
            .map(|p| p.rx.notifies + p.tx.notifies)
            .sum();
        data + self.ctrl.as_ref().map_or(0, |c| c.queue.notifies)
    }

    /// Queue sizes of pair 0 (receive, transmit).
    pub fn queue_sizes(&self) -> (u16, u16) {
        (self.pairs[0].rx.size(), self.pairs[0].tx.size())
    }

    /// Sends one command on the control queue (5.1.6.5) and waits for the
    /// device's ack: Ok for VIRTIO_NET_OK. `name` names the command in
    /// errors.
    fn ctrl_command(
        &mut self,
        name: &'static str,
        class: u8,
        command: u8,
        data: &[u8],
    ) -> Result<(), NetError> {
        let ctrl = self
            .ctrl
            .as_mut()
            .ok_or(NetError::CtrlNoAnswer { command: name })?;
        let paddr = ctrl.buffer.paddr();
        // SAFETY: the device holds no chain pointing into the buffer: the
        // previous command (if any) came back through the used ring.
        let bytes = unsafe { ctrl.buffer.bytes_mut() };
        bytes[0] = class;
        bytes[1] = command;
        bytes[CTRL_DATA_OFFSET..CTRL_DATA_OFFSET + data.len()].copy_from_slice(data);
        bytes[CTRL_ACK_OFFSET] = CTRL_ACK_UNSET;
        // As Linux lays a command out: header, data, ack, each in its own
        // descriptor (a device must not assume any framing, 5.1.6.5).
        let parts = [
            (0, 2, VIRTQ_DESC_F_NEXT),
            (CTRL_DATA_OFFSET, data.len(), VIRTQ_DESC_F_NEXT),
            (CTRL_ACK_OFFSET, 1, VIRTQ_DESC_F_WRITE),
        ];
        for (i, &(offset, len, flags)) in parts.iter().enumerate() {
            ctrl.queue.set_descriptor(
                i as u16,
                Descriptor {
                    addr: paddr + offset as u64,
                    len: len as u32,
                    flags,
                    next: i as u16 + 1,
                },
            );
        }
        ctrl.queue.push_avail(0);
        ctrl.queue.publish();
        let mut spins = 0u64;
        let used = loop {
            if let Some(used) = ctrl.queue.pop_used() {
                break used;
            }
            spins += 1;
            if spins == CTRL_ANSWER_SPINS {
                return Err(NetError::CtrlNoAnswer { command: name });
            }
            core::hint::spin_loop();
        };
        // SAFETY: CTRL_ACK_OFFSET + 1 <= CTRL_BUFFER_BYTES (ptr_at checks);
        // the device returned the chain, it writes the ack no more.
        let ack = unsafe { ptr::read_volatile(ctrl.buffer.ptr_at::<u8>(CTRL_ACK_OFFSET)) };
        match ack {
            VIRTIO_NET_OK => Ok(()),
            VIRTIO_NET_ERR => Err(NetError::CtrlRejected { command: name }),
            ack => Err(NetError::CtrlBadAck {
                command: name,
                ack,
                used_len: used.len,
            }),
        }
    }
}

impl QueuePair {
    fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// The next received frame (without its virtio header), copied into
    /// `frame`, its checksum completed if the device left it partial
    /// (NEEDS_CSUM; with csum_start/csum_offset outside the frame it stays
    /// as it came, and the caller's checks find it wrong): `Some(Ok(len))`,
    /// `Some(Err(why))` for a packet dropped, `None` when nothing has
    /// arrived.
    pub fn recv(&mut self, frame: &mut [u8]) -> Option<Result<usize, RxDrop>> {
        let received = self.recv_offloaded(frame)?;
        Some(received.map(|(len, hdr)| {
            if hdr.flags & netproto::VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                netproto::complete_checksum(
                    &mut frame[..len],
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                );
            }
            len
        }))
    }

    /// [`recv`](Self::recv) without completing a partial checksum: the
    /// frame's length and its virtio-net header (offload flags, GSO type).
    pub fn recv_offloaded(&mut self, frame: &mut [u8]) -> Option<Result<(usize, NetHdr), RxDrop>> {
        let first = self.pop_rx()?;
        self.rx_packets += 1;
        let mut result = self.copy_out(first.id, first.len, 0, frame);
        let hdr = if result.is_ok() {
            let mut bytes = [0u8; NET_HDR_BYTES];
            // SAFETY: the device returned this buffer through the used ring
            // (copy_out checked that its used length covers the header) and
            // does not write it until it is posted again.
            let buffer = unsafe { self.rx_buffers[first.id as usize].bytes_mut() };
            bytes.copy_from_slice(&buffer[..NET_HDR_BYTES]);
            NetHdr::parse(&bytes).unwrap_or_default()
        } else {
            NetHdr::default()
        };
        let num_buffers = match result {
            Ok(_) if self.has(VIRTIO_NET_F_MRG_RXBUF) => hdr.num_buffers,
            _ => 1,
        };
        self.repost(first.id);
        if num_buffers == 0 {
            result = Err(RxDrop::BadNumBuffers);
        }
        let mut copied = *result.as_ref().unwrap_or(&0);
        for _ in 1..num_buffers {
            // The device uses all of a packet's buffers before it publishes
            // the used index (5.1.6.4.2), so they are there already.
            let Some(next) = self.pop_rx() else {
                result = Err(RxDrop::BadNumBuffers);
                break;
            };
            if result.is_ok() {
                result = self.copy_out(next.id, next.len, copied, frame);
                copied = *result.as_ref().unwrap_or(&0);
            }
            self.repost(next.id);
        }
        self.rx.publish();
        Some(result.map(|len| (len, hdr)))
    }

    /// The next used receive buffer. An id that names no buffer is a device
    /// bug the driver cannot recover from (as in virtio-blk).
    fn pop_rx(&mut self) -> Option<super::queue::UsedElem> {
        let elem = self.rx.pop_used()?;
        assert!(
            (elem.id as usize) < self.rx_buffers.len(),
            "virtio-net: the device returned receive buffer {} (len {}) of {}",
            elem.id,
            elem.len,
            self.rx_buffers.len()
        );
        Some(elem)
    }

    /// Appends the payload of receive buffer `id` (`used_len` bytes written,
    /// a header first if it is a packet's first buffer, i.e. `at` is 0) to
    /// `frame[at..]`; the frame's new length.
    fn copy_out(
        &mut self,
        id: u32,
        used_len: u32,
        at: usize,
        frame: &mut [u8],
    ) -> Result<usize, RxDrop> {
        let buffer = &mut self.rx_buffers[id as usize];
        let used = (used_len as usize).min(RX_BUFFER_BYTES);
        let skip = if at == 0 { NET_HDR_BYTES } else { 0 };
        if used < skip {
            return Err(RxDrop::Short);
        }
        let payload = used - skip;
        let end = at.checked_add(payload).ok_or(RxDrop::TooLarge)?;
        if end > frame.len() {
            return Err(RxDrop::TooLarge);
        }
        // SAFETY: the device returned this buffer through the used ring and
        // does not write it until repost() puts it on the avail ring again.
        let bytes = unsafe { buffer.bytes_mut() };
        frame[at..end].copy_from_slice(&bytes[skip..used]);
        Ok(end)
    }

    /// Puts receive buffer `id` (checked by pop_rx) back on the avail ring,
    /// published by the caller.
    fn repost(&mut self, id: u32) {
        self.rx.push_avail(id as u16);
    }

    /// Largest frame [`send`](Self::send) takes.
    pub fn tx_frame_max(&self) -> usize {
        self.tx_buffers
            .first()
            .map_or(0, |b| b.len() - NET_HDR_BYTES)
    }

    /// Returns the transmit buffers the device is done with.
    fn reap_tx(&mut self) {
        while let Some(elem) = self.tx.pop_used() {
            assert!(
                (elem.id as usize) < self.tx_buffers.len(),
                "virtio-net: the device returned transmit buffer {} of {}",
                elem.id,
                self.tx_buffers.len()
            );
            self.tx_free.push(elem.id as u16);
        }
    }

    /// Queues `frame` for transmission with a zero header (no offloads) and
    /// notifies the device if it asked for it. Waits for a free buffer if all
    /// are in flight; `Ok(false)` if none came free (frame not sent).
    pub fn send(&mut self, frame: &[u8]) -> Result<bool, NetError> {
        for _ in 0..TX_FULL_SPINS {
            if self.try_send(frame)? {
                return Ok(true);
            }
            core::hint::spin_loop();
        }
        Ok(false)
    }

    /// [`send`](Self::send) without waiting: `Ok(false)` when every transmit
    /// buffer is in flight.
    pub fn try_send(&mut self, frame: &[u8]) -> Result<bool, NetError> {
        self.try_send_offloaded(&NetHdr::default(), frame, frame.len())
    }

    /// [`try_send`](Self::try_send) of a frame of `len` bytes that starts
    /// with `headers` and continues with zeros, with `hdr` as its virtio-net
    /// header (checksum offload, TSO: the caller must have checked that the
    /// features it uses were negotiated). The zeros are written only where
    /// the transmit buffer held something else, so a large frame costs its
    /// headers, not its length.
    pub fn try_send_offloaded(
        &mut self,
        hdr: &NetHdr,
        headers: &[u8],
        len: usize,
    ) -> Result<bool, NetError> {
        let max = self.tx_frame_max();
        if len > max {
            return Err(NetError::FrameTooLarge { len, max });
        }
        if headers.len() > len {
            return Err(NetError::BadHeaders {
                headers: headers.len(),
                len,
            });
        }
        if self.tx_free.is_empty() {
            self.reap_tx();
        }
        let Some(slot) = self.tx_free.pop() else {
            return Ok(false);
        };
        let buffer = &mut self.tx_buffers[usize::from(slot)];
        let dirty = &mut self.tx_dirty[usize::from(slot)];
        let head_end = NET_HDR_BYTES + headers.len();
        let len = NET_HDR_BYTES + len;
        // SAFETY: `slot` came back through the used ring (or was never
        // posted): the device holds no chain pointing into this buffer.
        let bytes = unsafe { buffer.bytes_mut() };
        hdr.write(&mut bytes[..NET_HDR_BYTES])
            .expect("the buffer holds a header");
        bytes[NET_HDR_BYTES..head_end].copy_from_slice(headers);
        if *dirty > head_end {
            bytes[head_end..*dirty].fill(0);
        }
        *dirty = head_end;
        let paddr = buffer.paddr();
        self.tx.set_descriptor(
            slot,
            Descriptor {
                addr: paddr,
                len: len as u32,
                flags: 0,
                next: 0,
            },
        );
        self.tx.push_avail(slot);
        self.tx.publish();
        self.tx_packets += 1;
        Ok(true)
    }
}

/// `features` less the offloads whose needs are missing: GUEST_TSO4 needs
/// GUEST_CSUM (5.1.3.1) and MRG_RXBUF (see the module doc), HOST_TSO4 needs
/// CSUM.
fn with_offload_needs(features: u64) -> u64 {
    let mut features = features;
    let has = |f: u64, bits: u64| f & bits == bits;
    if !has(features, VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_MRG_RXBUF) {
        features &= !VIRTIO_NET_F_GUEST_TSO4;
    }
    if !has(features, VIRTIO_NET_F_CSUM) {
        features &= !VIRTIO_NET_F_HOST_TSO4;
    }
    features
}

/// What [`set_up`] builds: the config, the pairs in use, the queues of the
/// others, the control queue.
type Parts = (
    NetConfig,
    Vec<QueuePair>,
    Vec<SplitQueue>,
    Option<ControlQueue>,
);

/// Between FEATURES_OK and DRIVER_OK: reads the config and sets up every
/// queue pair the device has, with buffers for the first `pairs` (`None`:
/// all; the receive buffers pushed, not yet published), and the control
/// queue.
fn set_up(
    transport: &VirtioPci,
    features: u64,
    tx_frame_bytes: usize,
    pairs: Option<u16>,
) -> Result<Parts, NetError> {
    let config = read_config(transport, features)?;
    let max_pairs = if features & VIRTIO_NET_F_MQ != 0 {
        if !(1..=MAX_PAIRS).contains(&config.max_virtqueue_pairs) {
            return Err(NetError::BadMaxPairs(config.max_virtqueue_pairs));
        }
        config.max_virtqueue_pairs
    } else {
        1
    };
    let used_pairs = pairs.unwrap_or(max_pairs);
    if used_pairs == 0 || used_pairs > max_pairs {
        return Err(NetError::PairsUnavailable {
            wanted: used_pairs,
            max: max_pairs,
        });
    }
    let ctrl_index = 2 * u32::from(max_pairs);
    let needed = ctrl_index + u32::from(features & VIRTIO_NET_F_CTRL_VQ != 0);
    if u32::from(transport.num_queues()) < needed {
        return Err(NetError::TooFewQueues {
            needed,
            has: transport.num_queues(),
        });
    }
    // No interrupts: every queue vector is VIRTIO_MSI_NO_VECTOR.
    transport.enable_msix(&[]);
    let event_idx = features & VIRTIO_F_EVENT_IDX != 0;
    let mut used = Vec::with_capacity(usize::from(used_pairs));
    let mut idle = Vec::new();
    for pair in 0..max_pairs {
        let rx = transport.setup_queue(2 * pair, QUEUE_ENTRIES, None, event_idx)?;
        let tx = transport.setup_queue(2 * pair + 1, QUEUE_ENTRIES, None, event_idx)?;
        if pair < used_pairs {
            used.push(set_up_pair(features, rx, tx, tx_frame_bytes)?);
        } else {
            idle.extend([rx, tx]);
        }
    }
    let ctrl = if features & VIRTIO_NET_F_CTRL_VQ != 0 {
        let index = u16::try_from(ctrl_index).expect("below num_queues (checked), a u16");
        Some(ControlQueue {
            queue: transport.setup_queue(index, CTRL_QUEUE_ENTRIES, None, event_idx)?,
            buffer: DmaBuf::alloc(CTRL_BUFFER_BYTES)
                .ok_or(NetError::OutOfMemory("the control queue's buffer"))?,
        })
    } else {
        None
    };
    Ok((config, used, idle, ctrl))
}

/// A pair with its buffers: every receive buffer pushed (not published).
fn set_up_pair(
    features: u64,
    mut rx: SplitQueue,
    tx: SplitQueue,
    tx_frame_bytes: usize,
) -> Result<QueuePair, NetError> {
    let mut rx_buffers = Vec::with_capacity(usize::from(rx.size()));
    for i in 0..rx.size() {
        let buffer = DmaBuf::alloc(RX_BUFFER_BYTES).ok_or(NetError::OutOfMemory("RX buffers"))?;
        rx.set_descriptor(
            i,
            Descriptor {
                addr: buffer.paddr(),
                len: RX_BUFFER_BYTES as u32,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            },
        );
        rx.push_avail(i);
        rx_buffers.push(buffer);
    }
    let mut tx_buffers = Vec::with_capacity(usize::from(tx.size()));
    for _ in 0..tx.size() {
        tx_buffers.push(
            DmaBuf::alloc(NET_HDR_BYTES + tx_frame_bytes)
                .ok_or(NetError::OutOfMemory("TX buffers"))?,
        );
    }
    Ok(QueuePair {
        features,
        tx_free: (0..tx.size()).rev().collect(),
        // DmaBuf::alloc zeroes the buffers.
        tx_dirty: alloc::vec![0; usize::from(tx.size())],
        rx,
        rx_buffers,
        tx,
        tx_buffers,
        rx_packets: 0,
        tx_packets: 0,
    })
}

/// The device config, read until config_generation is stable around it.
fn read_config(transport: &VirtioPci, features: u64) -> Result<NetConfig, NetError> {
    let cfg = transport.device_cfg().ok_or(NetError::NoDeviceConfig)?;
    let read16 = |offset: u64, feature: u64| {
        if features & feature != 0 && cfg.contains(offset, 2) {
            cfg.read16(offset)
        } else {
            0
        }
    };
    for _ in 0..CONFIG_READ_ATTEMPTS {
        let generation = transport.config_generation();
        let mut mac = DRIVER_MAC;
        if features & VIRTIO_NET_F_MAC != 0 && cfg.contains(CFG_MAC, 6) {
            for (i, byte) in mac.iter_mut().enumerate() {
                *byte = cfg.read8(CFG_MAC + i as u64);
            }
        }
        let status = if features & VIRTIO_NET_F_STATUS != 0 {
            read16(CFG_STATUS, VIRTIO_NET_F_STATUS)
        } else {
            VIRTIO_NET_S_LINK_UP
        };
        let config = NetConfig {
            mac,
            status,
            max_virtqueue_pairs: read16(CFG_MAX_VIRTQUEUE_PAIRS, VIRTIO_NET_F_MQ),
        };
        if transport.config_generation() == generation {
            return Ok(config);
        }
    }
    Err(NetError::UnstableConfig)
}
