//! Ethernet, ARP (RFC 826), IPv4 (RFC 791), ICMP echo (RFC 792) and UDP
//! (RFC 768), as much as `job=net-echo` needs: [`answer`] turns one received
//! frame into the frame to send back, if any. For `job=net-bench`: UDP
//! datagrams and one-way TCP (RFC 793) segments to send and to count, and the
//! virtio-net header's offload fields (virtio 1.2 5.1.6: checksum offload and
//! TSO), which `ringvm-bench net` also uses on the host side.
//!
//! Pure `core` code with no other dependency on the guest, so that the host
//! test `tests/tests/guest_netproto.rs` compiles this file (`#[path]`) and
//! runs the unit tests at its bottom; the guest crate has no test harness.

/// EtherType of IPv4 and ARP.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETH_HEADER_BYTES: usize = 14;
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];
/// An Ethernet payload without a VLAN tag (and a 1514-byte frame).
pub const ETH_MTU_BYTES: usize = 1500;

const ARP_BYTES: usize = 28;
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;

const IPV4_HEADER_BYTES: usize = 20;
const IPV4_PROTO_ICMP: u8 = 1;
const IPV4_PROTO_UDP: u8 = 17;
const IPV4_PROTO_TCP: u8 = 6;
/// Flags + fragment offset: more fragments (MF) and the offset bits.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
/// TTL of the replies (Linux's default).
const IPV4_TTL: u8 = 64;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_HEADER_BYTES: usize = 8;
const UDP_HEADER_BYTES: usize = 8;

/// The guest's side of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iface {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    /// UDP port whose datagrams are echoed.
    pub udp_port: u16,
}

/// What a reply answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    Arp,
    Icmp,
    Udp,
}

/// What to do with a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the first `len` bytes of the output buffer.
    Reply { kind: ReplyKind, len: usize },
    /// Well-formed, but nothing this guest answers (another address, another
    /// protocol or port, an ARP reply).
    Ignored(&'static str),
    /// Truncated, inconsistent lengths, bad checksum.
    Malformed(&'static str),
}

/// An IPv4 address with its prefix length, as `ip=10.0.0.2/24` writes it.
pub fn parse_ipv4_cidr(text: &str) -> Option<([u8; 4], u8)> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, prefix.parse::<u8>().ok().filter(|&p| p <= 32)?),
        None => (text, 32),
    };
    let mut ip = [0u8; 4];
    let mut parts = addr.split('.');
    for byte in &mut ip {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *byte = part.parse().ok()?;
    }
    parts.next().is_none().then_some((ip, prefix))
}

/// The Internet checksum (RFC 1071) of `parts` concatenated: the one's
/// complement of the one's-complement sum of 16-bit big-endian words, an odd
/// last byte padded with zero. Summing over a correct checksum gives 0.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(high) => sum += u64::from(u16::from_be_bytes([high, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(high) = odd {
        sum += u64::from(u16::from_be_bytes([high, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn put16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// The UDP pseudo-header (RFC 768) for a datagram of `udp_len` bytes.
fn pseudo_header(src: &[u8], dst: &[u8], udp_len: u16) -> [u8; 12] {
    pseudo_header_of(src, dst, IPV4_PROTO_UDP, udp_len)
}

/// The IPv4 pseudo-header of UDP and TCP checksums (RFC 768, RFC 793) for
/// `len` bytes of protocol `proto`.
fn pseudo_header_of(src: &[u8], dst: &[u8], proto: u8, len: u16) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(src);
    p[4..8].copy_from_slice(dst);
    p[9] = proto;
    p[10..12].copy_from_slice(&len.to_be_bytes());
    p
}

/// The answer of `iface` to `frame` (an Ethernet frame without FCS), written
/// to `out`. Never panics, whatever the bytes.
pub fn answer(iface: &Iface, frame: &[u8], out: &mut [u8]) -> Verdict {
    if frame.len() < ETH_HEADER_BYTES {
        return Verdict::Malformed("shorter than an Ethernet header");
    }
    let dst_mac = &frame[0..6];
    if dst_mac != iface.mac && dst_mac != BROADCAST_MAC {
        return Verdict::Ignored("another MAC");
    }
    let payload = &frame[ETH_HEADER_BYTES..];
    match be16(frame, 12) {
        ETHERTYPE_ARP => answer_arp(iface, frame, payload, out),
        ETHERTYPE_IPV4 => answer_ipv4(iface, frame, payload, out),
        _ => Verdict::Ignored("not ARP or IPv4"),
    }
}

/// The Ethernet header of a reply to `frame`, from `iface`.
fn reply_eth_header(iface: &Iface, frame: &[u8], ethertype: u16, out: &mut [u8]) {
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&iface.mac);
    put16(out, 12, ethertype);
}

fn answer_arp(iface: &Iface, frame: &[u8], arp: &[u8], out: &mut [u8]) -> Verdict {
    if arp.len() < ARP_BYTES {
        return Verdict::Malformed("truncated ARP packet");
    }
    if be16(arp, 0) != ARP_HTYPE_ETHERNET || be16(arp, 2) != ETHERTYPE_IPV4 {
        return Verdict::Ignored("ARP for another protocol");
    }
    if arp[4] != 6 || arp[5] != 4 {
        return Verdict::Malformed("ARP address lengths are not 6 and 4");
    }
    if be16(arp, 6) != ARP_OP_REQUEST {
        return Verdict::Ignored("not an ARP request");
    }
    if arp[24..28] != iface.ip {
        return Verdict::Ignored("ARP request for another IP");
    }
    let len = ETH_HEADER_BYTES + ARP_BYTES;
    if out.len() < len {
        return Verdict::Malformed("output buffer too small");
    }
    reply_eth_header(iface, frame, ETHERTYPE_ARP, out);
    let reply = &mut out[ETH_HEADER_BYTES..len];
    reply[0..6].copy_from_slice(&arp[0..6]);
    put16(reply, 6, ARP_OP_REPLY);
    reply[8..14].copy_from_slice(&iface.mac);
    reply[14..18].copy_from_slice(&iface.ip);
    reply[18..28].copy_from_slice(&arp[8..18]);
    Verdict::Reply {
        kind: ReplyKind::Arp,
        len,
    }
}

fn answer_ipv4(iface: &Iface, frame: &[u8], packet: &[u8], out: &mut [u8]) -> Verdict {
    if packet.len() < IPV4_HEADER_BYTES {
        return Verdict::Malformed("truncated IPv4 header");
    }
    if packet[0] >> 4 != 4 {
        return Verdict::Malformed("IP version is not 4");
    }
    let header_len = usize::from(packet[0] & 0xf) * 4;
    let total_len = usize::from(be16(packet, 2));
    if header_len < IPV4_HEADER_BYTES || total_len < header_len || total_len > packet.len() {
        return Verdict::Malformed("inconsistent IPv4 lengths");
    }
    // Ethernet pads short frames: the IP total length says where the packet ends.
    let packet = &packet[..total_len];
    let header = &packet[..header_len];
    if checksum(&[header]) != 0 {
        return Verdict::Malformed("bad IPv4 header checksum");
    }
    if header[16..20] != iface.ip {
        return Verdict::Ignored("IPv4 for another address");
    }
    if be16(header, 6) & IPV4_FRAGMENT_MASK != 0 {
        return Verdict::Ignored("IPv4 fragment");
    }
    let body = &packet[header_len..];
    let reply_len = ETH_HEADER_BYTES + IPV4_HEADER_BYTES + body.len();
    if out.len() < reply_len {
        return Verdict::Malformed("output buffer too small");
    }
    let (kind, body_verdict) = match header[9] {
        IPV4_PROTO_ICMP => (ReplyKind::Icmp, icmp_echo(body, out)),
        IPV4_PROTO_UDP => (ReplyKind::Udp, udp_echo(iface, header, body, out)),
        _ => return Verdict::Ignored("not ICMP or UDP"),
    };
    if let Some(verdict) = body_verdict {
        return verdict;
    }
    reply_eth_header(iface, frame, ETHERTYPE_IPV4, out);
    // An IPv4 header without options, from us to the sender.
    let ip = &mut out[ETH_HEADER_BYTES..ETH_HEADER_BYTES + IPV4_HEADER_BYTES];
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip, 2, (IPV4_HEADER_BYTES + body.len()) as u16);
    ip[4..6].copy_from_slice(&header[4..6]);
    put16(ip, 6, 0);
    ip[8] = IPV4_TTL;
    ip[9] = header[9];
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&iface.ip);
    ip[16..20].copy_from_slice(&header[12..16]);
    let sum = checksum(&[ip]);
    put16(ip, 10, sum);
    if kind == ReplyKind::Udp {
        // The UDP checksum covers the pseudo-header, known only now.
        let at = ETH_HEADER_BYTES + IPV4_HEADER_BYTES;
        let pseudo = pseudo_header(&iface.ip, &header[12..16], body.len() as u16);
        let sum = checksum(&[&pseudo, &out[at..reply_len]]);
        // 0 means "no checksum": a computed 0 is sent as 0xffff.
        put16(out, at + 6, if sum == 0 { 0xffff } else { sum });
    }
    Verdict::Reply {
        kind,
        len: reply_len,
    }
}

/// Writes the ICMP echo reply to `icmp` at its place in `out`; `Some` if
/// there is none.
fn icmp_echo(icmp: &[u8], out: &mut [u8]) -> Option<Verdict> {
    if icmp.len() < ICMP_HEADER_BYTES {
        return Some(Verdict::Malformed("truncated ICMP header"));
    }
    if checksum(&[icmp]) != 0 {
        return Some(Verdict::Malformed("bad ICMP checksum"));
    }
    if icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 {
        return Some(Verdict::Ignored("ICMP other than an echo request"));
    }
    let at = ETH_HEADER_BYTES + IPV4_HEADER_BYTES;
    let reply = &mut out[at..at + icmp.len()];
    reply.copy_from_slice(icmp);
    reply[0] = ICMP_ECHO_REPLY;
    put16(reply, 2, 0);
    let sum = checksum(&[reply]);
    put16(reply, 2, sum);
    None
}

/// Writes the UDP echo of `udp` (checksum still 0) at its place in `out`;
/// `Some` if there is none.
fn udp_echo(iface: &Iface, ip_header: &[u8], udp: &[u8], out: &mut [u8]) -> Option<Verdict> {
    if udp.len() < UDP_HEADER_BYTES {
        return Some(Verdict::Malformed("truncated UDP header"));
    }
    if usize::from(be16(udp, 4)) != udp.len() {
        return Some(Verdict::Malformed("UDP length is not the IPv4 payload's"));
    }
    if be16(udp, 6) != 0 {
        let pseudo = pseudo_header(&ip_header[12..16], &ip_header[16..20], udp.len() as u16);
        if checksum(&[&pseudo, udp]) != 0 {
            return Some(Verdict::Malformed("bad UDP checksum"));
        }
    }
    if be16(udp, 2) != iface.udp_port {
        return Some(Verdict::Ignored("UDP to another port"));
    }
    let at = ETH_HEADER_BYTES + IPV4_HEADER_BYTES;
    let reply = &mut out[at..at + udp.len()];
    reply.copy_from_slice(udp);
    reply[0..2].copy_from_slice(&udp[2..4]);
    reply[2..4].copy_from_slice(&udp[0..2]);
    put16(reply, 6, 0);
    None
}

/// Bytes of the Ethernet, IPv4 and UDP headers of a frame [`udp_frame`] builds.
pub const UDP_FRAME_HEADER_BYTES: usize = ETH_HEADER_BYTES + IPV4_HEADER_BYTES + UDP_HEADER_BYTES;

/// Writes an ARP request from `iface` for `target` to `out` (at least 42
/// bytes); its length.
pub fn arp_request(iface: &Iface, target: [u8; 4], out: &mut [u8]) -> usize {
    out[0..6].copy_from_slice(&BROADCAST_MAC);
    out[6..12].copy_from_slice(&iface.mac);
    put16(out, 12, ETHERTYPE_ARP);
    let arp = &mut out[ETH_HEADER_BYTES..ETH_HEADER_BYTES + ARP_BYTES];
    put16(arp, 0, ARP_HTYPE_ETHERNET);
    put16(arp, 2, ETHERTYPE_IPV4);
    arp[4] = 6;
    arp[5] = 4;
    put16(arp, 6, ARP_OP_REQUEST);
    arp[8..14].copy_from_slice(&iface.mac);
    arp[14..18].copy_from_slice(&iface.ip);
    arp[18..24].fill(0);
    arp[24..28].copy_from_slice(&target);
    ETH_HEADER_BYTES + ARP_BYTES
}

/// The sender (IP, MAC) of an ARP packet addressed to `iface`'s IP (request
/// or reply), if `frame` is one.
pub fn arp_sender(iface: &Iface, frame: &[u8]) -> Option<([u8; 4], [u8; 6])> {
    let arp = frame.get(ETH_HEADER_BYTES..ETH_HEADER_BYTES + ARP_BYTES)?;
    let ok = be16(frame, 12) == ETHERTYPE_ARP
        && be16(arp, 0) == ARP_HTYPE_ETHERNET
        && be16(arp, 2) == ETHERTYPE_IPV4
        && arp[4] == 6
        && arp[5] == 4
        && arp[24..28] == iface.ip;
    ok.then(|| {
        let mut ip = [0u8; 4];
        let mut mac = [0u8; 6];
        ip.copy_from_slice(&arp[14..18]);
        mac.copy_from_slice(&arp[8..14]);
        (ip, mac)
    })
}

/// Writes the Ethernet, IPv4 and UDP headers of a datagram of `payload_len`
/// bytes from `iface` (source port `iface.udp_port`) to `dst_ip:dst_port`
/// at `dst_mac` into `out`, UDP checksum 0 (none: the payload may change
/// after); the frame's length. The payload goes at
/// [`UDP_FRAME_HEADER_BYTES`].. `None` if it does not fit `out` or IPv4.
pub fn udp_frame(
    iface: &Iface,
    dst_mac: [u8; 6],
    dst_ip: [u8; 4],
    dst_port: u16,
    payload_len: usize,
    out: &mut [u8],
) -> Option<usize> {
    let len = UDP_FRAME_HEADER_BYTES.checked_add(payload_len)?;
    if len > out.len() || len - ETH_HEADER_BYTES > usize::from(u16::MAX) {
        return None;
    }
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&iface.mac);
    put16(out, 12, ETHERTYPE_IPV4);
    let ip = &mut out[ETH_HEADER_BYTES..ETH_HEADER_BYTES + IPV4_HEADER_BYTES];
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip, 2, (len - ETH_HEADER_BYTES) as u16);
    put16(ip, 4, 0);
    // Don't fragment.
    put16(ip, 6, 0x4000);
    ip[8] = IPV4_TTL;
    ip[9] = IPV4_PROTO_UDP;
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&iface.ip);
    ip[16..20].copy_from_slice(&dst_ip);
    let sum = checksum(&[ip]);
    put16(ip, 10, sum);
    let udp = &mut out[ETH_HEADER_BYTES + IPV4_HEADER_BYTES..UDP_FRAME_HEADER_BYTES];
    put16(udp, 0, iface.udp_port);
    put16(udp, 2, dst_port);
    put16(udp, 4, (UDP_HEADER_BYTES + payload_len) as u16);
    put16(udp, 6, 0);
    Some(len)
}

/// The transport protocols [`transport_payload`] takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// A UDP datagram or TCP segment to `iface`'s IP and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport<'a> {
    pub proto: Proto,
    pub payload: &'a [u8],
    /// TCP: the sequence number of the first payload byte.
    pub tcp_seq: Option<u32>,
}

/// The UDP datagram or TCP segment to `iface`'s IP and port (`udp_port`,
/// for both) in `frame`. The IPv4 header checksum is always checked; the
/// UDP/TCP checksum only with `verify_checksum`, which is false for frames
/// whose virtio-net header says that their checksum is partial
/// (VIRTIO_NET_HDR_F_NEEDS_CSUM: only the pseudo-header sum is there) or
/// was checked by the host (DATA_VALID). A TCP frame may be a TSO frame
/// larger than one segment (up to 64 KiB). `Err` says why `frame` is not
/// one (as [`answer`]'s verdicts).
pub fn transport_payload<'a>(
    iface: &Iface,
    frame: &'a [u8],
    verify_checksum: bool,
) -> Result<Transport<'a>, Verdict> {
    if frame.len() < ETH_HEADER_BYTES {
        return Err(Verdict::Malformed("shorter than an Ethernet header"));
    }
    if be16(frame, 12) != ETHERTYPE_IPV4 || frame[0..6] != iface.mac {
        return Err(Verdict::Ignored("not IPv4 to this MAC"));
    }
    let packet = &frame[ETH_HEADER_BYTES..];
    if packet.len() < IPV4_HEADER_BYTES || packet[0] >> 4 != 4 {
        return Err(Verdict::Malformed("truncated IPv4 header"));
    }
    let header_len = usize::from(packet[0] & 0xf) * 4;
    let total_len = usize::from(be16(packet, 2));
    if header_len < IPV4_HEADER_BYTES || total_len < header_len || total_len > packet.len() {
        return Err(Verdict::Malformed("inconsistent IPv4 lengths"));
    }
    let header = &packet[..header_len];
    if checksum(&[header]) != 0 {
        return Err(Verdict::Malformed("bad IPv4 header checksum"));
    }
    if header[16..20] != iface.ip {
        return Err(Verdict::Ignored("IPv4 for another address"));
    }
    if be16(header, 6) & IPV4_FRAGMENT_MASK != 0 {
        return Err(Verdict::Ignored("IPv4 fragment"));
    }
    let body = &packet[header_len..total_len];
    let Ok(body_len) = u16::try_from(body.len()) else {
        return Err(Verdict::Malformed("inconsistent IPv4 lengths"));
    };
    let pseudo = pseudo_header_of(&header[12..16], &header[16..20], header[9], body_len);
    match header[9] {
        IPV4_PROTO_UDP => {
            let udp = body;
            if udp.len() < UDP_HEADER_BYTES || usize::from(be16(udp, 4)) != udp.len() {
                return Err(Verdict::Malformed("bad UDP length"));
            }
            if verify_checksum && be16(udp, 6) != 0 && checksum(&[&pseudo, udp]) != 0 {
                return Err(Verdict::Malformed("bad UDP checksum"));
            }
            if be16(udp, 2) != iface.udp_port {
                return Err(Verdict::Ignored("UDP to another port"));
            }
            Ok(Transport {
                proto: Proto::Udp,
                payload: &udp[UDP_HEADER_BYTES..],
                tcp_seq: None,
            })
        }
        IPV4_PROTO_TCP => {
            let tcp = body;
            if tcp.len() < TCP_HEADER_BYTES {
                return Err(Verdict::Malformed("truncated TCP header"));
            }
            let data_offset = usize::from(tcp[12] >> 4) * 4;
            if data_offset < TCP_HEADER_BYTES || data_offset > tcp.len() {
                return Err(Verdict::Malformed("bad TCP data offset"));
            }
            // Unlike UDP's, a TCP checksum of 0 is a checksum.
            if verify_checksum && checksum(&[&pseudo, tcp]) != 0 {
                return Err(Verdict::Malformed("bad TCP checksum"));
            }
            if be16(tcp, 2) != iface.udp_port {
                return Err(Verdict::Ignored("TCP to another port"));
            }
            Ok(Transport {
                proto: Proto::Tcp,
                payload: &tcp[data_offset..],
                tcp_seq: Some(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]])),
            })
        }
        _ => Err(Verdict::Ignored("not UDP or TCP")),
    }
}

const TCP_HEADER_BYTES: usize = 20;
/// TCP flags of the segments [`tcp_frame`] builds: ACK.
const TCP_FLAG_ACK: u8 = 0x10;
/// Where the TCP checksum is in the TCP header.
const TCP_CHECKSUM_OFFSET: usize = 16;
/// Bytes of the Ethernet, IPv4 and TCP headers of a frame [`tcp_frame`]
/// builds (no IP or TCP options).
pub const TCP_FRAME_HEADER_BYTES: usize = ETH_HEADER_BYTES + IPV4_HEADER_BYTES + TCP_HEADER_BYTES;
/// The TCP maximum segment size on a 1500-byte MTU without TCP options: each
/// segment of a TSO frame is then a 1514-byte Ethernet frame.
pub const TCP_MSS_BYTES: usize = ETH_MTU_BYTES - IPV4_HEADER_BYTES - TCP_HEADER_BYTES;

/// Writes the Ethernet, IPv4 and TCP headers (ACK, window 65535, no options)
/// of a segment with `payload_len` bytes of payload and sequence number
/// `seq`, from `iface` (source port `iface.udp_port`) to `dst_ip:dst_port`
/// at `dst_mac`, into `out[..TCP_FRAME_HEADER_BYTES]`; the payload follows
/// them and is not written. The TCP checksum is left to checksum offload:
/// its field holds the pseudo-header sum, and the returned virtio-net header
/// says NEEDS_CSUM with csum_start/csum_offset; a payload of more than one
/// [`TCP_MSS_BYTES`] makes it a TSO frame (GSO_TCPV4, gso_size = the MSS),
/// which the device or the host cuts into segments, completing each one's
/// checksum. Returns the frame's length and that header; `None` if `out` is
/// shorter than the headers or the packet is larger than IPv4 allows.
pub fn tcp_frame(
    iface: &Iface,
    dst_mac: [u8; 6],
    dst_ip: [u8; 4],
    dst_port: u16,
    seq: u32,
    payload_len: usize,
    out: &mut [u8],
) -> Option<(usize, NetHdr)> {
    let len = TCP_FRAME_HEADER_BYTES.checked_add(payload_len)?;
    let ip_len = u16::try_from(len - ETH_HEADER_BYTES).ok()?;
    let out = out.get_mut(..TCP_FRAME_HEADER_BYTES)?;
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&iface.mac);
    put16(out, 12, ETHERTYPE_IPV4);
    let ip = &mut out[ETH_HEADER_BYTES..ETH_HEADER_BYTES + IPV4_HEADER_BYTES];
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip, 2, ip_len);
    put16(ip, 4, 0);
    // Don't fragment.
    put16(ip, 6, 0x4000);
    ip[8] = IPV4_TTL;
    ip[9] = IPV4_PROTO_TCP;
    put16(ip, 10, 0);
    ip[12..16].copy_from_slice(&iface.ip);
    ip[16..20].copy_from_slice(&dst_ip);
    let sum = checksum(&[ip]);
    put16(ip, 10, sum);
    let tcp_start = ETH_HEADER_BYTES + IPV4_HEADER_BYTES;
    let tcp = &mut out[tcp_start..];
    put16(tcp, 0, iface.udp_port);
    put16(tcp, 2, dst_port);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].fill(0);
    tcp[12] = ((TCP_HEADER_BYTES / 4) as u8) << 4;
    tcp[13] = TCP_FLAG_ACK;
    put16(tcp, 14, u16::MAX);
    put16(tcp, 18, 0);
    // The pseudo-header sum, folded but not complemented (what the checksum
    // over the segment then starts from).
    let pseudo = pseudo_header_of(
        &iface.ip,
        &dst_ip,
        IPV4_PROTO_TCP,
        ip_len - IPV4_HEADER_BYTES as u16,
    );
    put16(tcp, TCP_CHECKSUM_OFFSET, !checksum(&[&pseudo]));
    let tso = payload_len > TCP_MSS_BYTES;
    let hdr = NetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: if tso {
            VIRTIO_NET_HDR_GSO_TCPV4
        } else {
            VIRTIO_NET_HDR_GSO_NONE
        },
        hdr_len: TCP_FRAME_HEADER_BYTES as u16,
        gso_size: if tso { TCP_MSS_BYTES as u16 } else { 0 },
        csum_start: tcp_start as u16,
        csum_offset: TCP_CHECKSUM_OFFSET as u16,
        num_buffers: 0,
    };
    Some((len, hdr))
}

/// Completes a partial checksum as a device does for a frame sent with
/// VIRTIO_NET_HDR_F_NEEDS_CSUM (virtio 1.2 5.1.6.2): the Internet checksum
/// of `frame[csum_start..]`, whose checksum field at `csum_start +
/// csum_offset` holds the pseudo-header sum, is stored in that field.
/// `false` (nothing changed) when the field is not inside the frame.
pub fn complete_checksum(frame: &mut [u8], csum_start: usize, csum_offset: usize) -> bool {
    let Some(field) = csum_start.checked_add(csum_offset) else {
        return false;
    };
    if field.checked_add(2).is_none_or(|end| end > frame.len()) {
        return false;
    }
    let sum = checksum(&[&frame[csum_start..]]);
    put16(frame, field, sum);
    true
}

/// A MAC address as six hex bytes separated by `:` (`52:54:00:12:34:56`).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// struct virtio_net_hdr_v1 (virtio 1.2 5.1.6): the 12 bytes in front of
/// every frame on a virtio-net queue (with VERSION_1) and on a tap with
/// IFF_VNET_HDR and TUNSETVNETHDRSZ 12. The legacy header, which AF_PACKET's
/// PACKET_VNET_HDR uses, is its first 10 bytes (no num_buffers).
pub const NET_HDR_BYTES: usize = 12;
pub const NET_HDR_LEGACY_BYTES: usize = 10;
/// flags: the checksum from csum_start to the end is still to be computed
/// and stored at csum_start + csum_offset.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// flags (received frames): the host has checked the checksum.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;

/// The fields of a virtio-net header, little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// With MRG_RXBUF, the receive buffers a frame spans (0 in a legacy
    /// header).
    pub num_buffers: u16,
}

impl NetHdr {
    /// A header from its first 10 (legacy) or 12 bytes; `None` if shorter.
    pub fn parse(bytes: &[u8]) -> Option<NetHdr> {
        let le16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        if bytes.len() < NET_HDR_LEGACY_BYTES {
            return None;
        }
        Some(NetHdr {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: if bytes.len() >= NET_HDR_BYTES {
                le16(10)
            } else {
                0
            },
        })
    }

    /// Writes the header to `out`: 12 bytes if it has room for them, else
    /// the legacy 10; `None` if it has room for neither.
    pub fn write(&self, out: &mut [u8]) -> Option<usize> {
        if out.len() < NET_HDR_LEGACY_BYTES {
            return None;
        }
        out[0] = self.flags;
        out[1] = self.gso_type;
        for (at, value) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
        ] {
            out[at..at + 2].copy_from_slice(&value.to_le_bytes());
        }
        if out.len() < NET_HDR_BYTES {
            return Some(NET_HDR_LEGACY_BYTES);
        }
        out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        Some(NET_HDR_BYTES)
    }

    /// Whether the frame's UDP/TCP checksum is not to be checked: partial
    /// (NEEDS_CSUM) or checked by the host already (DATA_VALID).
    pub fn checksum_offloaded(&self) -> bool {
        self.flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0
    }

    /// Whether the frame is a TSO/GSO frame of several segments.
    pub fn is_gso(&self) -> bool {
        self.gso_type != VIRTIO_NET_HDR_GSO_NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
    const HOST_IP: [u8; 4] = [10, 0, 0, 1];
    const IFACE: Iface = Iface {
        mac: GUEST_MAC,
        ip: GUEST_IP,
        udp_port: 7,
    };

    fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], body: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&((20 + body.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        let sum = checksum(&[&h]);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn arp_request_bytes(target: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&HOST_MAC);
        a.extend_from_slice(&HOST_IP);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&target);
        eth(BROADCAST_MAC, ETHERTYPE_ARP, &a)
    }

    fn ping(payload: &[u8]) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0, 0xab, 0xcd, 0, 7];
        icmp.extend_from_slice(payload);
        let sum = checksum(&[&icmp]);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        eth(
            GUEST_MAC,
            ETHERTYPE_IPV4,
            &ipv4(1, HOST_IP, GUEST_IP, &icmp),
        )
    }

    fn udp(dst_port: u16, payload: &[u8], with_checksum: bool) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&40000u16.to_be_bytes());
        u.extend_from_slice(&dst_port.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        if with_checksum {
            let pseudo = pseudo_header(&HOST_IP, &GUEST_IP, u.len() as u16);
            let sum = checksum(&[&pseudo, &u]);
            u[6..8].copy_from_slice(&sum.to_be_bytes());
        }
        eth(GUEST_MAC, ETHERTYPE_IPV4, &ipv4(17, HOST_IP, GUEST_IP, &u))
    }

    /// The payload of a UDP datagram to `iface`'s IP and port, checksums
    /// checked.
    fn udp_payload<'a>(iface: &Iface, frame: &'a [u8]) -> Result<&'a [u8], Verdict> {
        match transport_payload(iface, frame, true)? {
            Transport {
                proto: Proto::Udp,
                payload,
                ..
            } => Ok(payload),
            Transport { .. } => Err(Verdict::Ignored("not UDP")),
        }
    }

    fn reply(frame: &[u8]) -> (ReplyKind, Vec<u8>) {
        let mut out = [0u8; 2048];
        match answer(&IFACE, frame, &mut out) {
            Verdict::Reply { kind, len } => (kind, out[..len].to_vec()),
            other => panic!("no reply: {other:?}"),
        }
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Split anywhere, odd parts included, the result is the same.
        assert_eq!(checksum(&[&data[..3], &data[3..]]), !0xddf2);
        assert_eq!(checksum(&[&[0x01]]), !0x0100);
    }

    #[test]
    fn ipv4_cidr_parses_and_rejects() {
        assert_eq!(parse_ipv4_cidr("10.0.0.2/24"), Some(([10, 0, 0, 2], 24)));
        assert_eq!(parse_ipv4_cidr("192.168.1.1"), Some(([192, 168, 1, 1], 32)));
        for bad in [
            "10.0.0/24",
            "10.0.0.2.1",
            "10.0.0.256",
            "10.0.0.2/33",
            "10..0.2",
            "a.b.c.d",
            "10.0.0.+2",
        ] {
            assert_eq!(parse_ipv4_cidr(bad), None, "{bad}");
        }
    }

    #[test]
    fn arp_request_for_our_ip_is_answered() {
        let (kind, r) = reply(&arp_request_bytes(GUEST_IP));
        assert_eq!(kind, ReplyKind::Arp);
        assert_eq!(r.len(), 42);
        assert_eq!(&r[0..6], &HOST_MAC);
        assert_eq!(&r[6..12], &GUEST_MAC);
        assert_eq!(be16(&r, 12), ETHERTYPE_ARP);
        assert_eq!(be16(&r, 20), ARP_OP_REPLY);
        assert_eq!(&r[22..28], &GUEST_MAC);
        assert_eq!(&r[28..32], &GUEST_IP);
        assert_eq!(&r[32..38], &HOST_MAC);
        assert_eq!(&r[38..42], &HOST_IP);
    }

    #[test]
    fn arp_request_for_another_ip_is_ignored() {
        let mut out = [0u8; 128];
        assert!(matches!(
            answer(&IFACE, &arp_request_bytes([10, 0, 0, 3]), &mut out),
            Verdict::Ignored(_)
        ));
    }

    #[test]
    fn ping_gets_an_echo_reply_with_valid_checksums() {
        let payload: Vec<u8> = (0..56).collect();
        let (kind, r) = reply(&ping(&payload));
        assert_eq!(kind, ReplyKind::Icmp);
        assert_eq!(&r[0..6], &HOST_MAC);
        let ip = &r[14..34];
        assert_eq!(checksum(&[ip]), 0);
        assert_eq!(&ip[12..16], &GUEST_IP);
        assert_eq!(&ip[16..20], &HOST_IP);
        assert_eq!(usize::from(be16(ip, 2)), r.len() - 14);
        let icmp = &r[34..];
        assert_eq!(checksum(&[icmp]), 0);
        assert_eq!(icmp[0], ICMP_ECHO_REPLY);
        assert_eq!(&icmp[4..8], &[0xab, 0xcd, 0, 7]);
        assert_eq!(&icmp[8..], &payload[..]);
    }

    #[test]
    fn ethernet_padding_is_not_echoed() {
        let mut frame = ping(&[1, 2]);
        frame.resize(60, 0xee);
        let (_, r) = reply(&frame);
        assert_eq!(r.len(), 14 + 20 + 8 + 2);
    }

    #[test]
    fn udp_is_echoed_byte_for_byte() {
        for with_checksum in [true, false] {
            let payload: Vec<u8> = (0..=255).cycle().take(1000).collect();
            let (kind, r) = reply(&udp(7, &payload, with_checksum));
            assert_eq!(kind, ReplyKind::Udp);
            let ip = &r[14..34];
            assert_eq!(checksum(&[ip]), 0);
            let u = &r[34..];
            assert_eq!(be16(u, 0), 7);
            assert_eq!(be16(u, 2), 40000);
            assert_eq!(usize::from(be16(u, 4)), u.len());
            let pseudo = pseudo_header(&GUEST_IP, &HOST_IP, u.len() as u16);
            assert_eq!(checksum(&[&pseudo, u]), 0);
            assert_eq!(&u[8..], &payload[..]);
        }
    }

    #[test]
    fn udp_to_another_port_is_ignored() {
        let mut out = [0u8; 2048];
        assert!(matches!(
            answer(&IFACE, &udp(9, b"x", true), &mut out),
            Verdict::Ignored(_)
        ));
    }

    #[test]
    fn corrupted_checksums_are_malformed() {
        let mut out = [0u8; 2048];
        // Byte 30 is in the IPv4 header (destination), 40 in the UDP/ICMP
        // header, the last one in the payload.
        for frame in [ping(b"abcd"), udp(7, b"abcd", true)] {
            for at in [30, 40, frame.len() - 1] {
                let mut bad = frame.clone();
                bad[at] ^= 0x40;
                let verdict = answer(&IFACE, &bad, &mut out);
                assert!(
                    matches!(verdict, Verdict::Malformed(_)),
                    "{at}: {verdict:?}"
                );
            }
        }
    }

    #[test]
    fn every_truncation_and_byte_flip_is_handled_without_panic() {
        let mut out = [0u8; 2048];
        for frame in [
            arp_request_bytes(GUEST_IP),
            ping(b"hello"),
            udp(7, b"hello", true),
        ] {
            for len in 0..frame.len() {
                let verdict = answer(&IFACE, &frame[..len], &mut out);
                assert!(
                    !matches!(verdict, Verdict::Reply { .. }),
                    "{len}: {verdict:?}"
                );
            }
            for at in 0..frame.len() {
                for bit in 0..8 {
                    let mut bad = frame.clone();
                    bad[at] ^= 1 << bit;
                    let _ = answer(&IFACE, &bad, &mut out);
                }
            }
        }
        // A reply that does not fit the output buffer is refused, not written.
        let mut small = [0u8; 40];
        assert!(matches!(
            answer(&IFACE, &ping(b"hello"), &mut small),
            Verdict::Malformed(_)
        ));
    }

    #[test]
    fn frames_for_other_macs_or_protocols_are_ignored() {
        let mut out = [0u8; 2048];
        let mut other_mac = ping(b"x");
        other_mac[0] = 0x02;
        assert!(matches!(
            answer(&IFACE, &other_mac, &mut out),
            Verdict::Ignored(_)
        ));
        let ipv6 = eth(GUEST_MAC, 0x86dd, &[0x60; 40]);
        assert!(matches!(
            answer(&IFACE, &ipv6, &mut out),
            Verdict::Ignored(_)
        ));
    }

    #[test]
    fn arp_request_is_answered_by_our_own_answer() {
        let host = Iface {
            mac: HOST_MAC,
            ip: HOST_IP,
            udp_port: 7,
        };
        let mut request = [0u8; 64];
        let len = arp_request(&host, GUEST_IP, &mut request);
        assert_eq!(request[..len], arp_request_bytes(GUEST_IP)[..]);
        let (kind, r) = reply(&request[..len]);
        assert_eq!(kind, ReplyKind::Arp);
        assert_eq!(arp_sender(&host, &r), Some((GUEST_IP, GUEST_MAC)));
        assert_eq!(
            arp_sender(&IFACE, &request[..len]),
            Some((HOST_IP, HOST_MAC))
        );
        assert_eq!(arp_sender(&host, &request[..len]), None);
    }

    #[test]
    fn udp_frame_round_trips_through_udp_payload() {
        let host = Iface {
            mac: HOST_MAC,
            ip: HOST_IP,
            udp_port: 40000,
        };
        let mut out = [0u8; 2048];
        let len = udp_frame(&host, GUEST_MAC, GUEST_IP, 7, 5, &mut out).unwrap();
        out[UDP_FRAME_HEADER_BYTES..len].copy_from_slice(b"hello");
        assert_eq!(udp_payload(&IFACE, &out[..len]), Ok(&b"hello"[..]));
        // The same frame as the test's own builder, checksum aside.
        let mut expected = udp(7, b"hello", false);
        expected[18..20].copy_from_slice(&[0, 0]);
        expected[20..22].copy_from_slice(&[0x40, 0]);
        expected[24..26].copy_from_slice(&[0, 0]);
        let sum = checksum(&[&expected[14..34]]);
        expected[24..26].copy_from_slice(&sum.to_be_bytes());
        let mut got = out[..len].to_vec();
        got[18..20].copy_from_slice(&[0, 0]);
        assert_eq!(got, expected);
        assert!(udp_payload(&IFACE, &udp(7, b"x", true)).is_ok());
        assert!(matches!(
            udp_payload(&IFACE, &udp(9, b"x", true)),
            Err(Verdict::Ignored(_))
        ));
        let mut bad = udp(7, b"abc", true);
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            udp_payload(&IFACE, &bad),
            Err(Verdict::Malformed(_))
        ));
        assert_eq!(
            udp_frame(&host, GUEST_MAC, GUEST_IP, 7, 2048, &mut out),
            None
        );
        for cut in 0..len {
            assert!(udp_payload(&IFACE, &out[..cut]).is_err());
        }
    }

    /// A TCP frame from the host to the guest as [`tcp_frame`] builds it,
    /// with `payload` and its checksum completed as a device would.
    fn tcp_to_guest(seq: u32, payload: &[u8]) -> (Vec<u8>, NetHdr) {
        let host = Iface {
            mac: HOST_MAC,
            ip: HOST_IP,
            udp_port: 40000,
        };
        let mut frame = vec![0u8; TCP_FRAME_HEADER_BYTES + payload.len()];
        let (len, hdr) = tcp_frame(
            &host,
            GUEST_MAC,
            GUEST_IP,
            7,
            seq,
            payload.len(),
            &mut frame,
        )
        .unwrap();
        assert_eq!(len, frame.len());
        frame[TCP_FRAME_HEADER_BYTES..].copy_from_slice(payload);
        (frame, hdr)
    }

    #[test]
    fn tcp_frame_checksum_completes_to_a_valid_segment() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 13) as u8).collect();
        let (mut frame, hdr) = tcp_to_guest(0xfffff000, &payload);
        assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_NONE);
        assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 16));
        // The partial checksum alone does not verify, and is trusted only
        // when the header says so.
        assert_eq!(
            transport_payload(&IFACE, &frame, true),
            Err(Verdict::Malformed("bad TCP checksum"))
        );
        let trusted = transport_payload(&IFACE, &frame, false).unwrap();
        assert_eq!(trusted.payload, &payload[..]);
        assert!(complete_checksum(
            &mut frame,
            usize::from(hdr.csum_start),
            usize::from(hdr.csum_offset)
        ));
        let segment = transport_payload(&IFACE, &frame, true).unwrap();
        assert_eq!(segment.proto, Proto::Tcp);
        assert_eq!(segment.tcp_seq, Some(0xfffff000));
        assert_eq!(segment.payload, &payload[..]);
        let ip = &frame[14..34];
        assert_eq!(checksum(&[ip]), 0);
        assert_eq!(usize::from(be16(ip, 2)), frame.len() - 14);
        assert_eq!(&ip[12..16], &HOST_IP);
        // A completed checksum over a changed payload no longer verifies.
        *frame.last_mut().unwrap() ^= 1;
        assert_eq!(
            transport_payload(&IFACE, &frame, true),
            Err(Verdict::Malformed("bad TCP checksum"))
        );
    }

    #[test]
    fn tcp_frame_of_64k_is_a_tso_frame_of_mss_segments() {
        let payload = vec![0x5a; 65536 - TCP_FRAME_HEADER_BYTES];
        let (mut frame, hdr) = tcp_to_guest(7, &payload);
        assert_eq!(frame.len(), 65536);
        assert_eq!(
            hdr,
            NetHdr {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1460,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            }
        );
        assert!(hdr.is_gso() && hdr.checksum_offloaded());
        assert_eq!(TCP_MSS_BYTES + TCP_FRAME_HEADER_BYTES, 1514);
        assert!(complete_checksum(&mut frame, 34, 16));
        let segment = transport_payload(&IFACE, &frame, true).unwrap();
        assert_eq!(segment.payload.len(), 65536 - 54);
        // One MSS is a plain segment; IPv4's limit is 65535 bytes.
        assert!(!tcp_to_guest(0, &[1; TCP_MSS_BYTES]).1.is_gso());
        assert!(tcp_to_guest(0, &[1; TCP_MSS_BYTES + 1]).1.is_gso());
        let host = IFACE;
        let mut out = [0u8; 64];
        assert!(tcp_frame(&host, HOST_MAC, HOST_IP, 1, 0, 65535 - 40, &mut out).is_some());
        assert_eq!(
            tcp_frame(&host, HOST_MAC, HOST_IP, 1, 0, 65535 - 39, &mut out),
            None
        );
        assert_eq!(
            tcp_frame(&host, HOST_MAC, HOST_IP, 1, 0, 0, &mut out[..53]),
            None
        );
    }

    #[test]
    fn tcp_segments_are_checked() {
        let (mut frame, hdr) = tcp_to_guest(1, b"abcdef");
        complete_checksum(&mut frame, hdr.csum_start.into(), hdr.csum_offset.into());
        let mut other_port = frame.clone();
        other_port[36..38].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(
            transport_payload(&IFACE, &other_port, false),
            Err(Verdict::Ignored("TCP to another port"))
        );
        let mut bad_offset = frame.clone();
        bad_offset[46] = 0x40;
        assert_eq!(
            transport_payload(&IFACE, &bad_offset, false),
            Err(Verdict::Malformed("bad TCP data offset"))
        );
        assert!(matches!(
            udp_payload(&IFACE, &frame),
            Err(Verdict::Ignored(_))
        ));
        for cut in 0..frame.len() {
            assert!(transport_payload(&IFACE, &frame[..cut], false).is_err());
        }
        for at in 0..frame.len() {
            for bit in 0..8 {
                let mut bad = frame.clone();
                bad[at] ^= 1 << bit;
                let _ = transport_payload(&IFACE, &bad, true);
                let _ = transport_payload(&IFACE, &bad, false);
            }
        }
    }

    #[test]
    fn udp_checksum_is_skipped_only_when_offloaded() {
        let mut bad = udp(7, b"abc", true);
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            transport_payload(&IFACE, &bad, true),
            Err(Verdict::Malformed("bad UDP checksum"))
        );
        let datagram = transport_payload(&IFACE, &bad, false).unwrap();
        assert_eq!(datagram.proto, Proto::Udp);
        assert_eq!(datagram.tcp_seq, None);
        assert_eq!(datagram.payload.len(), 3);
    }

    #[test]
    fn partial_udp_checksum_completes_like_a_device() {
        let mut frame = udp(7, b"hello, partial", false);
        // What a host with checksum offload hands over: the pseudo-header
        // sum in the checksum field.
        let pseudo = pseudo_header(&HOST_IP, &GUEST_IP, (frame.len() - 34) as u16);
        let partial = !checksum(&[&pseudo]);
        frame[40..42].copy_from_slice(&partial.to_be_bytes());
        assert!(matches!(
            udp_payload(&IFACE, &frame),
            Err(Verdict::Malformed("bad UDP checksum"))
        ));
        assert!(complete_checksum(&mut frame, 34, 6));
        assert_eq!(udp_payload(&IFACE, &frame), Ok(&b"hello, partial"[..]));
        // A field outside the frame changes nothing.
        let before = frame.clone();
        let len = frame.len();
        assert!(!complete_checksum(&mut frame, len - 1, 0));
        assert!(!complete_checksum(&mut frame, 34, len));
        assert!(!complete_checksum(&mut frame, usize::MAX, 2));
        assert!(!complete_checksum(&mut frame, len + 1, 0));
        assert_eq!(frame, before);
    }

    #[test]
    fn net_hdr_layout_round_trips() {
        let hdr = NetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1460,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let mut bytes = [0xee; 16];
        assert_eq!(hdr.write(&mut bytes[..12]), Some(12));
        assert_eq!(
            &bytes[..13],
            &[1, 1, 54, 0, 0xb4, 5, 34, 0, 16, 0, 3, 0, 0xee]
        );
        assert_eq!(NetHdr::parse(&bytes[..12]), Some(hdr));
        let mut legacy = [0u8; 10];
        assert_eq!(hdr.write(&mut legacy), Some(10));
        assert_eq!(legacy[..], bytes[..10]);
        assert_eq!(
            NetHdr::parse(&legacy),
            Some(NetHdr {
                num_buffers: 0,
                ..hdr
            })
        );
        assert_eq!(NetHdr::parse(&legacy[..9]), None);
        assert_eq!(hdr.write(&mut [0u8; 9]), None);
        let plain = NetHdr::default();
        assert!(!plain.is_gso() && !plain.checksum_offloaded());
        let valid = NetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            ..plain
        };
        assert!(valid.checksum_offloaded());
    }

    #[test]
    fn mac_addresses_parse_and_reject() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5a"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5a])
        );
        assert_eq!(
            parse_mac("02:AB:cd:00:00:FE"),
            Some([2, 0xab, 0xcd, 0, 0, 0xfe])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:5g",
            "52-54-00-12-34-56",
            "+2:54:00:12:34:56",
            "52:54:00:12:34:56:",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
