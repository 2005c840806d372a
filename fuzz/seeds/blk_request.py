"""Seeds for the blk_request target (see the decoder in
fuzz_targets/blk_request.rs): a read, a write then a read back, a discard
and a write-zeroes, GET_ID, a flush, an indirect chain, and a few bad
requests."""

import struct

IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = range(6)
HDR, DATA, BOUNDARY, HIGH, HOLE, RING, RAW = range(7)
WRITABLE = 0x08
SMALL, SECTORS, U16 = 0, 1, 2


def sector(n):
    return struct.pack("<BB", 0, n) if n < 256 else struct.pack("<BH", 1, n)


def desc(area, offset, length, writable=False, len_kind=None):
    if len_kind is None:
        len_kind = SMALL if length < 32 else U16
    kind = area | (WRITABLE if writable else 0) | (len_kind << 6)
    return struct.pack("<BHH", kind, offset, length)


def request(rtype, sec, descs, segments=(), indirect=False):
    """rtype: one of the six (by index) or any u32."""
    b = struct.pack("<B", rtype) if rtype < 6 else struct.pack("<BI", 6, rtype)
    b += sector(sec)
    b += struct.pack("<B", len(segments))
    for s, n, flags in segments:
        b += sector(s) + struct.pack("<HB", n, flags)
    b += struct.pack("<B", (len(descs) - 1) | (0x80 if indirect else 0))
    return b + b"".join(descs)


def header():
    return desc(HDR, 0, 16)


def status(offset=0x8000):
    return desc(DATA, offset, 1, writable=True)


def read(sec, sectors, indirect=False):
    return request(IN, sec, [header(), desc(DATA, 0, sectors, True, SECTORS), status()], indirect=indirect)


def write(sec, sectors):
    return request(OUT, sec, [header(), desc(DATA, 0x2000, sectors, False, SECTORS), status()])


seeds = {
    "read": b"\x00" + read(8, 2),
    "write-read": b"\x00" + write(16, 3) + read(16, 3),
    "readonly-write": b"\x01" + write(0, 1),
    "discard-zeroes": b"\x02"
    + request(DISCARD, 0, [desc(HDR, 0, 48), status()], [(0, 8, 0), (64, 16, 0)])
    + request(WRITE_ZEROES, 0, [desc(HDR, 0, 32), status()], [(100, 4, 1)]),
    "get-id-flush": b"\x00"
    + request(GET_ID, 0, [header(), desc(DATA, 0, 20, True), status()])
    + request(FLUSH, 0, [header(), status()]),
    "indirect": b"\x00" + read(1, 1, indirect=True),
    "split-buffers": b"\x00"
    + request(IN, 3, [desc(HDR, 0, 4), desc(HDR, 4, 12), desc(BOUNDARY, 0, 512, True, U16), desc(HIGH, 0, 1, True)]),
    "bad": b"\x00"
    + request(IN, 127, [header(), desc(DATA, 0, 2, True, SECTORS), status()])
    + request(OUT, 0, [header(), desc(HOLE, 0, 1, False, SECTORS), status()])
    + request(14, 0, [header(), status()])
    + request(IN, 0, [header(), desc(DATA, 0, 100, True), status()]),
}
