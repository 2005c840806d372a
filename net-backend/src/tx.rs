//! Guest-to-host frames (the TX queue): a descriptor chain becomes the
//! iovecs of one writev on the tap, header included, once [`check_frame`]
//! accepts it. Pure: no tap, no queue; the worker calls [`tx_iovecs`].

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, Permissions};

use crate::queue::GuestRam;
use crate::tap::{IoVec, VNET_HDR_BYTES};

/// Largest frame after the header: 64 KiB, the most a TSO frame from a
/// Linux guest holds (its GSO_MAX_SIZE); anything longer is not a frame the
/// tap would take.
pub const MAX_TX_FRAME_BYTES: usize = 64 << 10;

/// Why a frame from the guest was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadFrame {
    /// The chain is shorter than the virtio-net header.
    Short,
    /// A GSO type the guest did not negotiate (HOST_TSO4/6), or one this
    /// device never offers (UDP, UDP_L4, ECN).
    GsoNotNegotiated,
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM without VIRTIO_NET_F_CSUM.
    CsumNotNegotiated,
    /// Longer than MAX_TX_FRAME_BYTES plus the header.
    TooLong,
    /// A buffer outside guest memory.
    OutsideMemory,
    /// A device-writable buffer in a TX chain.
    WritableBuffer,
}

impl BadFrame {
    pub const ALL: [BadFrame; 6] = [
        BadFrame::Short,
        BadFrame::GsoNotNegotiated,
        BadFrame::CsumNotNegotiated,
        BadFrame::TooLong,
        BadFrame::OutsideMemory,
        BadFrame::WritableBuffer,
    ];

    /// The counter name (README.md lists them).
    pub fn name(self) -> &'static str {
        match self {
            BadFrame::Short => "tx_bad_short",
            BadFrame::GsoNotNegotiated => "tx_bad_gso",
            BadFrame::CsumNotNegotiated => "tx_bad_csum",
            BadFrame::TooLong => "tx_bad_too_long",
            BadFrame::OutsideMemory => "tx_bad_memory",
            BadFrame::WritableBuffer => "tx_bad_writable",
        }
    }

    pub fn index(self) -> usize {
        BadFrame::ALL
            .iter()
            .position(|k| *k == self)
            .expect("ALL lists every kind")
    }
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// Checks a frame from the guest: `header` is its first bytes (at least the
/// virtio-net header if the chain is that long), `total_bytes` the chain's
/// length with the header, `features` what the guest negotiated.
pub fn check_frame(header: &[u8], total_bytes: usize, features: u64) -> Result<(), BadFrame> {
    if total_bytes < VNET_HDR_BYTES || header.len() < VNET_HDR_BYTES {
        return Err(BadFrame::Short);
    }
    if total_bytes > VNET_HDR_BYTES + MAX_TX_FRAME_BYTES {
        return Err(BadFrame::TooLong);
    }
    let flags = u32::from(header[0]);
    let gso_type = u32::from(header[1]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(features, VIRTIO_NET_F_CSUM) {
        return Err(BadFrame::CsumNotNegotiated);
    }
    if gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 {
        return Err(BadFrame::GsoNotNegotiated);
    }
    let allowed = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(features, VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(features, VIRTIO_NET_F_HOST_TSO6),
        _ => false,
    };
    if !allowed {
        return Err(BadFrame::GsoNotNegotiated);
    }
    Ok(())
}

/// The iovecs of the frame in `chain` (appended to `iovecs`, which is
/// cleared first), checked with [`check_frame`]; returns its length.
pub fn tx_iovecs<'m>(
    chain: DescriptorChain<&'m GuestRam>,
    mem: &'m GuestRam,
    features: u64,
    iovecs: &mut Vec<IoVec<'m>>,
) -> Result<usize, BadFrame> {
    iovecs.clear();
    let mut header = [0u8; VNET_HDR_BYTES];
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(BadFrame::WritableBuffer);
        }
        let len = desc.len() as usize;
        if total + len > VNET_HDR_BYTES + MAX_TX_FRAME_BYTES {
            return Err(BadFrame::TooLong);
        }
        let slices = mem
            .get_slices(desc.addr(), len, Permissions::Read)
            .map_err(|_| BadFrame::OutsideMemory)?;
        for slice in slices {
            let slice = slice.map_err(|_| BadFrame::OutsideMemory)?;
            if total < VNET_HDR_BYTES {
                // From the slice just looked up: no second lookup of the
                // address.
                slice.copy_to(&mut header[total..]);
            }
            total += slice.len();
            iovecs.push(IoVec::from_volatile(&slice));
        }
    }
    let header_len = total.min(VNET_HDR_BYTES);
    check_frame(&header[..header_len], total, features)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{Bytes, GuestAddress};

    const ALL_TX: u64 =
        1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6;

    fn header(flags: u32, gso: u32) -> [u8; VNET_HDR_BYTES] {
        let mut h = [0u8; VNET_HDR_BYTES];
        h[0] = flags as u8;
        h[1] = gso as u8;
        h
    }

    #[test]
    fn plain_and_offloaded_frames_pass() {
        assert_eq!(check_frame(&header(0, 0), 60 + 12, 0), Ok(()));
        assert_eq!(check_frame(&header(0, 0), 12, 0), Ok(()));
        let tso4 = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
        let tso6 = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6);
        assert_eq!(check_frame(&tso4, 12 + MAX_TX_FRAME_BYTES, ALL_TX), Ok(()));
        assert_eq!(check_frame(&tso6, 9000, ALL_TX), Ok(()));
    }

    #[test]
    fn a_chain_shorter_than_the_header_is_dropped() {
        assert_eq!(check_frame(&[0; 11], 11, ALL_TX), Err(BadFrame::Short));
        assert_eq!(check_frame(&[], 0, ALL_TX), Err(BadFrame::Short));
    }

    #[test]
    fn a_gso_type_not_negotiated_is_dropped() {
        let csum_only = 1 << VIRTIO_NET_F_CSUM;
        for (gso, features) in [
            (VIRTIO_NET_HDR_GSO_TCPV4, csum_only),
            (
                VIRTIO_NET_HDR_GSO_TCPV6,
                csum_only | 1 << VIRTIO_NET_F_HOST_TSO4,
            ),
            (VIRTIO_NET_HDR_GSO_UDP, ALL_TX),
            (VIRTIO_NET_HDR_GSO_UDP_L4, ALL_TX),
            (VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, ALL_TX),
            (77, ALL_TX),
        ] {
            assert_eq!(
                check_frame(&header(0, gso), 1000, features),
                Err(BadFrame::GsoNotNegotiated),
                "gso type {gso}"
            );
        }
        let needs_csum = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
        assert_eq!(
            check_frame(&needs_csum, 100, 0),
            Err(BadFrame::CsumNotNegotiated)
        );
    }

    #[test]
    fn a_frame_longer_than_64k_plus_header_is_dropped() {
        assert_eq!(
            check_frame(&header(0, 0), 12 + MAX_TX_FRAME_BYTES + 1, ALL_TX),
            Err(BadFrame::TooLong)
        );
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Runs tx_iovecs on a one-chain mock queue holding `descs`.
    fn on_chain(mem: &GuestRam, descs: &[RawDescriptor]) -> Result<(usize, Vec<usize>), BadFrame> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        let mut iovecs = Vec::new();
        let len = tx_iovecs(chain, mem, ALL_TX, &mut iovecs)?;
        Ok((len, iovecs.iter().map(IoVec::len_bytes).collect()))
    }

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn chains_become_iovecs() {
        let mem = memory();
        mem.write_slice(&header(0, 0), GuestAddress(0x8000))
            .unwrap();
        let got = on_chain(&mem, &[desc(0x8000, 12, false), desc(0x9000, 100, false)]);
        assert_eq!(got, Ok((112, vec![12, 100])));
        // The header split over two descriptors.
        mem.write_slice(&header(0, VIRTIO_NET_HDR_GSO_UDP), GuestAddress(0xa000))
            .unwrap();
        let got = on_chain(&mem, &[desc(0xa000, 4, false), desc(0xa004, 60, false)]);
        assert_eq!(got, Err(BadFrame::GsoNotNegotiated));
    }

    #[test]
    fn a_buffer_outside_guest_memory_is_dropped() {
        let mem = memory();
        let got = on_chain(
            &mem,
            &[desc(0x8000, 12, false), desc(0x10_0000 - 10, 100, false)],
        );
        assert_eq!(got, Err(BadFrame::OutsideMemory));
        let got = on_chain(&mem, &[desc(0x20_0000, 64, false)]);
        assert_eq!(got, Err(BadFrame::OutsideMemory));
    }

    #[test]
    fn a_writable_buffer_or_a_long_chain_is_dropped() {
        let mem = memory();
        let got = on_chain(&mem, &[desc(0x8000, 12, false), desc(0x9000, 64, true)]);
        assert_eq!(got, Err(BadFrame::WritableBuffer));
        let got = on_chain(
            &mem,
            &[desc(0x8000, 12, false), desc(0x1_0000, 0x1_0001, false)],
        );
        assert_eq!(got, Err(BadFrame::TooLong));
        let got = on_chain(&mem, &[desc(0x8000, 8, false)]);
        assert_eq!(got, Err(BadFrame::Short));
    }
}
