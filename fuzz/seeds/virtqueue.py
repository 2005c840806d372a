"""Seeds for the virtqueue target (see fuzz_targets/virtqueue.rs): a
header (flags, queue size, ring addresses, next_avail, next_used), then
guest memory from address 0. Layout: descriptors at 0x0, available ring at
0x100, used ring at 0x200, request headers at 0x300, status bytes at 0x3c0,
indirect tables at 0x400; data buffers in the high page at 0x8000."""

import struct

NEXT, WRITE, INDIRECT = 1, 2, 4
EVENT_IDX = 1
SIZE = 16
DESC, AVAIL, USED, HDR, STATUS, TABLE, HIGH = 0x0, 0x100, 0x200, 0x300, 0x3C0, 0x400, 0x8000
IN, OUT, FLUSH = 0, 1, 4


def header(flags, next_avail=0, next_used=0, size=SIZE, desc=DESC, avail=AVAIL, used=USED):
    return struct.pack("<BHHHHHH", flags, size, desc, avail, used, next_avail, next_used)


class Memory:
    def __init__(self):
        self.b = bytearray(0x480)

    def put(self, addr, data):
        self.b[addr : addr + len(data)] = data

    def desc(self, index, addr, length, flags=0, next=0, table=DESC):
        self.put(table + 16 * index, struct.pack("<QIHH", addr, length, flags, next))

    def request(self, at, rtype, sector):
        self.put(at, struct.pack("<IIQ", rtype, 0, sector))

    def avail(self, heads, idx=None, used_event=0):
        self.put(AVAIL, struct.pack("<HH", 0, len(heads) if idx is None else idx))
        for i, h in enumerate(heads):
            self.put(AVAIL + 4 + 2 * (i % SIZE), struct.pack("<H", h))
        self.put(AVAIL + 4 + 2 * SIZE, struct.pack("<H", used_event))


def three_chains():
    m = Memory()
    m.request(HDR, IN, 8)
    m.desc(0, HDR, 16, NEXT, 1)
    m.desc(1, HIGH, 1024, NEXT | WRITE, 2)
    m.desc(2, STATUS, 1, WRITE)
    m.request(HDR + 16, OUT, 0)
    m.desc(3, HDR + 16, 16, NEXT, 4)
    m.desc(4, HIGH + 0x400, 512, NEXT, 5)
    m.desc(5, STATUS + 1, 1, WRITE)
    m.request(HDR + 32, FLUSH, 0)
    m.desc(6, HDR + 32, 16, NEXT, 7)
    m.desc(7, STATUS + 2, 1, WRITE)
    m.avail([0, 3, 6], used_event=1)
    return header(EVENT_IDX) + bytes(m.b)


def indirect():
    m = Memory()
    m.request(HDR, IN, 1)
    m.desc(0, HDR, 16, NEXT, 1, table=TABLE)
    m.desc(1, HIGH, 512, NEXT | WRITE, 2, table=TABLE)
    m.desc(2, STATUS, 1, WRITE, table=TABLE)
    m.desc(5, TABLE, 48, INDIRECT)
    m.avail([5])
    return header(0) + bytes(m.b)


def loop():
    m = Memory()
    m.request(HDR, IN, 0)
    m.desc(0, HDR, 16, NEXT, 1)
    m.desc(1, STATUS, 1, NEXT | WRITE, 0)
    m.avail([0, 1])
    return header(0) + bytes(m.b)


def wrapping():
    # next_avail 0xfffe, the available index wraps to 1: three chains.
    m = Memory()
    for i in range(3):
        m.request(HDR + 16 * i, FLUSH, 0)
        m.desc(2 * i, HDR + 16 * i, 16, NEXT, 2 * i + 1)
        m.desc(2 * i + 1, STATUS + i, 1, WRITE)
    m.put(AVAIL + 2, struct.pack("<H", 1))
    for n, slot in enumerate([0xFFFE, 0xFFFF, 0]):
        m.put(AVAIL + 4 + 2 * (slot % SIZE), struct.pack("<H", 2 * n))
    return header(EVENT_IDX, next_avail=0xFFFE, next_used=0xFFFE) + bytes(m.b)


def far_ahead():
    m = Memory()
    m.avail([0], idx=100)
    return header(0) + bytes(m.b)


def nested_indirect():
    m = Memory()
    m.desc(0, TABLE + 32, 32, INDIRECT, table=TABLE)
    m.desc(1, STATUS, 1, WRITE, table=TABLE)
    m.desc(0, TABLE, 32, INDIRECT)
    m.avail([0])
    return header(0) + bytes(m.b)


seeds = {
    "three-chains": three_chains(),
    "indirect": indirect(),
    "loop": loop(),
    "wrapping": wrapping(),
    "far-ahead": far_ahead(),
    "nested-indirect": nested_indirect(),
}
