"""Seeds for the net_frames target (see the decoder in
fuzz_targets/net_frames.rs): plain and offloaded TX frames up to the
largest, TX chains of every bad kind, receive chains with and without
MRG_RXBUF (frames in one chain, merged over several, truncated), bad
receive chains, frames waiting for buffers, the RX queue stopped with
chains taken, the TX queue stopped with chains waiting, both started again,
and rings whose indices wrap."""

import struct

MRG, CSUM, TSO4, TSO6, EVENT_IDX, RAW_FEATURES, INDICES = (1 << i for i in range(7))
# Descriptor address kinds, the "other direction" bit, length kinds.
BUMP, DATA, BOUNDARY, HIGH, HOLE, RINGS, HEADER, ANY = range(8)
OTHER_DIR = 0x08
STRAY_INDIRECT = 0x30
SMALL, U16, BIG, U32 = range(4)
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 0, 1, 3, 4
GSO_ECN = 0x80
RX_MERGE_BYTES = 12 + 65535 + 18


def sizes(tx, rx):
    return struct.pack("<B", tx.bit_length() - 1 | (rx.bit_length() - 1) << 3)


def desc(area, length, offset=0, other_dir=False, extra=0):
    """A descriptor of `length` bytes (the length kind is picked to fit)."""
    if length < 32:
        kind, w, tail = SMALL, length, b""
    elif length < 0x10000:
        kind, w, tail = U16, length, b""
    elif length >= 0x10000 and (length - 0x10000) % 2 == 0 and (length - 0x10000) // 2 < 0x10000:
        kind, w, tail = BIG, (length - 0x10000) // 2, b""
    else:
        kind, w, tail = U32, 0, struct.pack("<I", length)
    b = struct.pack("<BHH", area | (OTHER_DIR if other_dir else 0) | extra | kind << 6, offset, w)
    return b + tail


def header(flags=0, gso=GSO_NONE, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_offset, 0)


def chain(descs, indirect=False, hdr=None):
    shape = (len(descs) - 1) | (0x08 if indirect else 0)
    return struct.pack("<B", shape) + (hdr if hdr is not None else b"") + b"".join(descs)


def tx_chains(*chains):
    assert 1 <= len(chains) <= 8
    return struct.pack("<B", 0 | (len(chains) - 1) << 2) + b"".join(chains)


def rx_chains(*chains):
    assert 1 <= len(chains) <= 8
    return struct.pack("<B", 2 | (len(chains) - 1) << 2) + b"".join(chains)


TX_KICK = b"\x01"
# GET_VRING_BASE on a ring, then the ring started again.
RX_STOP = b"\x05"
TX_STOP = b"\x0d"


def frame(kind, v, head=b""):
    length = {0: 12 + v % 128, 1: 12 + 14 + v % 1501, 2: 12 + v, 3: RX_MERGE_BYTES - 8 + v % 16}[kind]
    return struct.pack("<BH", kind, v) + head[:16].ljust(min(16, length), b"\x00")


def rx(frames=(), tap=False):
    assert len(frames) <= 3
    return struct.pack("<B", 3 | len(frames) << 2 | (0x10 if tap else 0)) + b"".join(frames)


def plain_tx(length, hdr=None):
    return chain([desc(HEADER, 12), desc(BUMP, length)], hdr=hdr if hdr is not None else header())


eth = bytes(12) + b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56"[:4]

seeds = {
    "tx-plain": struct.pack("<B", 0) + sizes(16, 16)
    + tx_chains(plain_tx(60), plain_tx(1514), chain([desc(HEADER, 12)], hdr=header())) + TX_KICK,
    "tx-offloads": struct.pack("<B", CSUM | TSO4 | TSO6) + sizes(16, 16)
    + tx_chains(
        plain_tx(0x10000, header(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)),
        plain_tx(9000, header(NEEDS_CSUM, GSO_TCPV6, 74, 1428, 54, 16)),
        plain_tx(0x10000 + 2, header(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)),
        chain([desc(HEADER, 4), desc(HEADER, 8, offset=4), desc(BUMP, 1000), desc(BOUNDARY, 0x200)],
              hdr=header(NEEDS_CSUM, 0, 0, 0, 34, 6)),
    ) + TX_KICK,
    "tx-bad": struct.pack("<B", CSUM) + sizes(16, 16)
    + tx_chains(
        chain([desc(HEADER, 12), desc(BUMP, 100, other_dir=True)], hdr=header()),
        chain([desc(HEADER, 12), desc(HOLE, 100)], hdr=header()),
        chain([desc(HEADER, 12), desc(HIGH, 0x200, offset=0xf00)], hdr=header()),
        chain([desc(HEADER, 8)], hdr=header()),
        plain_tx(100, header(0, GSO_TCPV4)),
        plain_tx(100, header(0, GSO_UDP)),
        plain_tx(100, header(0, GSO_TCPV4 | GSO_ECN)),
        plain_tx(100, header(0, 7)),
    ) + TX_KICK
    + tx_chains(plain_tx(100, header(NEEDS_CSUM, 0))) + TX_KICK,
    "tx-indirect": struct.pack("<B", 0) + sizes(4, 4)
    + tx_chains(chain([desc(HEADER, 12), desc(BUMP, 300), desc(BUMP, 300)], indirect=True, hdr=header()),
                plain_tx(200))
    + TX_KICK
    + tx_chains(chain([desc(HEADER, 12), desc(BUMP, 64, extra=STRAY_INDIRECT)], hdr=header()))
    + TX_KICK,
    "rx-one-chain": struct.pack("<B", 0) + sizes(16, 16)
    + rx_chains(chain([desc(BUMP, 1526)]), chain([desc(BUMP, 12), desc(BUMP, 1514)]), chain([desc(BUMP, 100)]))
    + rx([frame(0, 60, eth), frame(1, 1500, eth), frame(1, 1500, eth)]),
    "rx-mergeable": struct.pack("<B", MRG) + sizes(16, 16)
    + rx_chains(*[chain([desc(BUMP, 0x4000)]) for _ in range(4)],
                chain([desc(BUMP, 0x2000), desc(BUMP, 0x2000)]), chain([desc(BUMP, 0x4000)]))
    + rx([frame(2, 65535, eth), frame(1, 1000, eth)])
    + rx_chains(*[chain([desc(BUMP, 0x4000)]) for _ in range(4)])
    + rx([], tap=True),
    # Chains of exactly a frame's worth, a frame just past it (truncated),
    # then one that fits.
    "rx-merged-truncated": struct.pack("<B", MRG) + sizes(16, 16)
    + rx_chains(chain([desc(BUMP, 0x8000)]), chain([desc(BUMP, 0x8000)]), chain([desc(BUMP, RX_MERGE_BYTES - 0x10000)]))
    + rx([frame(3, 15, eth), frame(3, 0, eth)])
    + rx_chains(chain([desc(BUMP, 0x8000)]), chain([desc(BUMP, 0x8000)]), chain([desc(BUMP, 0x100)]))
    + rx([], tap=True),
    "rx-bad-chains": struct.pack("<B", 0) + sizes(16, 16)
    + rx_chains(chain([desc(BUMP, 100, other_dir=True)]), chain([desc(HOLE, 100)]),
                chain([desc(BUMP, 0)]), chain([desc(BUMP, 8), desc(HIGH, 0x200, offset=0xf00)]),
                chain([desc(BUMP, 2048)]))
    + rx([frame(1, 100, eth)]),
    "rx-waits-for-buffers": struct.pack("<B", MRG | EVENT_IDX) + sizes(16, 16)
    + rx([frame(0, 50, eth), frame(1, 1400, eth)], tap=True)
    + rx_chains(chain([desc(BUMP, 0x8000)]))
    + rx([])
    + rx_chains(chain([desc(BUMP, 0x8000)]), chain([desc(BUMP, 0x1000)]))
    + rx([], tap=True)
    # The queue stops with chains taken and not used: they go back; it
    # starts again and is served.
    + RX_STOP + rx_chains(chain([desc(BUMP, 0x10100)])) + rx([frame(0, 9)]),
    "rings-wrap": struct.pack("<B", EVENT_IDX | INDICES) + struct.pack("<HHHH", 0xfffe, 0xfffe, 0xffff, 0xffff)
    + sizes(2, 4)
    + tx_chains(plain_tx(60), plain_tx(70)) + TX_KICK + tx_chains(plain_tx(80)) + TX_STOP
    + rx_chains(*[chain([desc(BUMP, 1600)]) for _ in range(4)])
    + rx([frame(0, 1), frame(0, 2), frame(0, 3)]) + rx([frame(1, 4)]),
}
