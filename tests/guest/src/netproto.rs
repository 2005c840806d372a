//! Ethernet, ARP (RFC 826), IPv4 (RFC 791), ICMP echo (RFC 792) and UDP
//! (RFC 768), as much as `job=net-echo` needs: [`answer`] turns one received
//! frame into the frame to send back, if any.
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
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(src);
    p[4..8].copy_from_slice(dst);
    p[9] = IPV4_PROTO_UDP;
    p[10..12].copy_from_slice(&udp_len.to_be_bytes());
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

/// The payload of a UDP datagram to `iface`'s IP and port, checksums
/// checked; `Err` says why `frame` is not one (as [`answer`]'s verdicts).
pub fn udp_payload<'a>(iface: &Iface, frame: &'a [u8]) -> Result<&'a [u8], Verdict> {
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
    if header[9] != IPV4_PROTO_UDP || header[16..20] != iface.ip {
        return Err(Verdict::Ignored("not UDP to this IP"));
    }
    if be16(header, 6) & IPV4_FRAGMENT_MASK != 0 {
        return Err(Verdict::Ignored("IPv4 fragment"));
    }
    let udp = &packet[header_len..total_len];
    if udp.len() < UDP_HEADER_BYTES || usize::from(be16(udp, 4)) != udp.len() {
        return Err(Verdict::Malformed("bad UDP length"));
    }
    if be16(udp, 6) != 0 {
        let pseudo = pseudo_header(&header[12..16], &header[16..20], udp.len() as u16);
        if checksum(&[&pseudo, udp]) != 0 {
            return Err(Verdict::Malformed("bad UDP checksum"));
        }
    }
    if be16(udp, 2) != iface.udp_port {
        return Err(Verdict::Ignored("UDP to another port"));
    }
    Ok(&udp[UDP_HEADER_BYTES..])
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
}
