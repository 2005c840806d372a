//! The frames of the benchmark, built with the test guest's own protocol code
//! (tests/guest/src/netproto.rs) so that the host sends exactly what the
//! guest parses and the ceiling writes exactly what the guest sends.

use super::netproto::{self, Iface, NetHdr, TCP_FRAME_HEADER_BYTES, UDP_FRAME_HEADER_BYTES};
use super::packet::FrameStream;
use super::Size;

/// The guest's addresses (its MAC is given to ringvm and QEMU).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x72, 0x76, 0x01];
pub const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
/// The host's end: the IP and port the guest sends to, and the source of
/// what the host sends.
pub const HOST_IP: [u8; 4] = [10, 77, 0, 1];
pub const HOST_PORT: u16 = 9999;
/// The destination MAC of the guest's frames: no tap has it, so the host
/// counts them on the tap and drops them at the IP layer (see netns.rs).
pub const PEER_MAC: [u8; 6] = [0x02, 0x72, 0x76, 0x62, 0x00, 0xfe];
/// The taps' own MACs: the source of what the host sends.
pub const TAP_MQ_MAC: [u8; 6] = [0x02, 0x72, 0x76, 0x62, 0x00, 0x01];
pub const TAP_SQ_MAC: [u8; 6] = [0x02, 0x72, 0x76, 0x62, 0x00, 0x02];
/// The guest's first port (run `i` uses `GUEST_PORT + i`).
pub const GUEST_PORT: u16 = 9000;

/// One end of a stream of frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub port: u16,
}

impl Endpoint {
    fn iface(&self) -> Iface {
        Iface {
            mac: self.mac,
            ip: self.ip,
            udp_port: self.port,
        }
    }
}

/// The host's end of what it sends the guest: the tap's MAC, as if the
/// host's stack sent it through the tap.
pub fn host(tap_mac: [u8; 6]) -> Endpoint {
    Endpoint {
        mac: tap_mac,
        ip: HOST_IP,
        port: HOST_PORT,
    }
}

/// The guest on one of its ports.
pub fn guest(port: u16) -> Endpoint {
    Endpoint {
        mac: GUEST_MAC,
        ip: GUEST_IP,
        port,
    }
}

/// Where the guest sends: the host's IP and port at [`PEER_MAC`].
pub fn peer() -> Endpoint {
    Endpoint {
        mac: PEER_MAC,
        ip: HOST_IP,
        port: HOST_PORT,
    }
}

/// The frames of one case from `from` to `to`: UDP datagrams of the case's
/// frame size with a sequence number at the start of their payload, or TSO
/// frames (TCP/IPv4, 64 KiB, GSO_TCPV4 at the MSS, partial checksum) whose
/// TCP sequence number counts their payload bytes; the rest of each payload
/// is zero, as in the guest's.
pub fn stream(size: Size, from: Endpoint, to: Endpoint) -> Box<dyn FrameStream> {
    let frame_len = size.frame_bytes();
    match size {
        Size::Min64 | Size::Mtu1500 => {
            let mut template = vec![0u8; frame_len];
            netproto::udp_frame(
                &from.iface(),
                to.mac,
                to.ip,
                to.port,
                frame_len - UDP_FRAME_HEADER_BYTES,
                &mut template,
            )
            .expect("the case's frame sizes are UDP frames");
            Box::new(UdpStream { template })
        }
        Size::Tso64k => Box::new(TcpStream {
            from: from.iface(),
            to,
            frame_len,
        }),
    }
}

/// A frame with sequence number 0 of the case, and its virtio-net header.
pub fn first_frame(size: Size, from: Endpoint, to: Endpoint) -> (NetHdr, Vec<u8>) {
    let mut stream = stream(size, from, to);
    let mut frame = vec![0u8; stream.frame_len()];
    stream.write(0, &mut frame);
    (stream.header(), frame)
}

struct UdpStream {
    template: Vec<u8>,
}

impl FrameStream for UdpStream {
    fn frame_len(&self) -> usize {
        self.template.len()
    }

    fn header(&self) -> NetHdr {
        NetHdr::default()
    }

    fn write(&mut self, seq: u64, out: &mut [u8]) {
        out.copy_from_slice(&self.template);
        out[UDP_FRAME_HEADER_BYTES..UDP_FRAME_HEADER_BYTES + 8].copy_from_slice(&seq.to_le_bytes());
    }
}

struct TcpStream {
    from: Iface,
    to: Endpoint,
    frame_len: usize,
}

impl TcpStream {
    fn payload_len(&self) -> usize {
        self.frame_len - TCP_FRAME_HEADER_BYTES
    }

    fn headers(&self, seq: u64, out: &mut [u8]) -> NetHdr {
        // Payload bytes before this frame, modulo 2^32 as TCP counts them.
        let tcp_seq = seq.wrapping_mul(self.payload_len() as u64) as u32;
        let (_, header) = netproto::tcp_frame(
            &self.from,
            self.to.mac,
            self.to.ip,
            self.to.port,
            tcp_seq,
            self.payload_len(),
            out,
        )
        .expect("a 64 KiB frame fits IPv4");
        header
    }
}

impl FrameStream for TcpStream {
    fn frame_len(&self) -> usize {
        self.frame_len
    }

    fn header(&self) -> NetHdr {
        self.headers(0, &mut [0u8; TCP_FRAME_HEADER_BYTES])
    }

    fn write(&mut self, seq: u64, out: &mut [u8]) {
        self.headers(seq, out);
        out[TCP_FRAME_HEADER_BYTES..].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::netproto::{transport_payload, Proto, VIRTIO_NET_HDR_GSO_TCPV4};

    fn guest_iface(port: u16) -> Iface {
        guest(port).iface()
    }

    #[test]
    fn host_udp_frames_are_what_the_guest_counts() {
        for size in [Size::Min64, Size::Mtu1500] {
            let mut stream = stream(size, host(TAP_MQ_MAC), guest(9003));
            assert_eq!(stream.frame_len(), size.frame_bytes());
            assert_eq!(stream.header(), NetHdr::default());
            let mut frame = vec![0xaa; stream.frame_len()];
            stream.write(41, &mut frame);
            let datagram = transport_payload(&guest_iface(9003), &frame, true).unwrap();
            assert_eq!(datagram.proto, Proto::Udp);
            assert_eq!(datagram.payload.len(), size.frame_bytes() - 42);
            assert_eq!(datagram.payload[..8], 41u64.to_le_bytes());
            assert!(datagram.payload[8..].iter().all(|&b| b == 0));
            assert_eq!(&frame[6..12], &TAP_MQ_MAC);
            // Another port is not the guest's.
            assert!(transport_payload(&guest_iface(9004), &frame, true).is_err());
        }
        assert_eq!(Size::Min64.frame_bytes(), 60);
        assert_eq!(Size::Mtu1500.frame_bytes(), 1514);
    }

    #[test]
    fn tso_frames_count_their_bytes_in_the_tcp_sequence() {
        let mut stream = stream(Size::Tso64k, host(TAP_SQ_MAC), guest(9000));
        assert_eq!(stream.frame_len(), 65535);
        let header = stream.header();
        assert_eq!(header.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(header.gso_size, 1460);
        assert!(header.checksum_offloaded());
        let mut frame = vec![0xaa; 65535];
        for seq in [0u64, 1, 70_000] {
            stream.write(seq, &mut frame);
            // The checksum is partial: the guest trusts it as the header
            // says.
            let segment = transport_payload(&guest_iface(9000), &frame, false).unwrap();
            assert_eq!(segment.proto, Proto::Tcp);
            assert_eq!(
                segment.tcp_seq,
                Some((seq * (65535 - 54)) as u32),
                "frame {seq}"
            );
            assert_eq!(segment.payload.len(), 65535 - 54);
            assert!(segment.payload.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn the_guests_frames_go_to_the_peer_mac() {
        let (header, frame) = first_frame(Size::Min64, guest(9000), peer());
        assert_eq!(header, NetHdr::default());
        assert_eq!(&frame[0..6], &PEER_MAC);
        assert_eq!(&frame[6..12], &GUEST_MAC);
        let host_side = Iface {
            mac: PEER_MAC,
            ip: HOST_IP,
            udp_port: HOST_PORT,
        };
        assert!(transport_payload(&host_side, &frame, true).is_ok());
        assert_ne!(PEER_MAC, TAP_MQ_MAC);
        assert_ne!(PEER_MAC, TAP_SQ_MAC);
    }
}
