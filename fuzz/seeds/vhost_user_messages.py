"""Seeds for the vhost_user_messages target (see the decoder in
fuzz_targets/vhost_user_messages.rs): the sessions a frontend (ringvm,
QEMU) opens with ringvm-blk and ringvm-net, queues served from guest RAM in
a memfd (disk requests; frames sent, and frames received from the tap
double, with and without merged buffers), and a few malformed messages."""

import struct

(GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE, SET_LOG_BASE, SET_LOG_FD,
 SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL,
 SET_VRING_ERR, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
 SET_VRING_ENABLE) = range(1, 19)
GET_CONFIG, SET_CONFIG = 24, 25
GET_INFLIGHT_FD, SET_INFLIGHT_FD, RESET_DEVICE = 31, 32, 34
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG, SET_STATUS, GET_STATUS = 36, 37, 38, 39, 40

VERSION, NEED_REPLY = 0x1, 0x8
MEMFD, EVENTFD, SIGNALLED, PIPE = range(4)
# VERSION_1, PROTOCOL_FEATURES, EVENT_IDX, INDIRECT_DESC, and the blk bits.
FEATURES = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | (1 << 12) | (1 << 9) | (1 << 6) | (1 << 2) | (1 << 13) | (1 << 14)
# MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS.
PROTOCOL = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15)
VA = 0x7F00_0000_0000
RAM = 1 << 20
QSIZE = 16
DESC, AVAIL, USED, HDR, STATUS, DATA = 0x0, 0x100, 0x200, 0x300, 0x340, 0x1000


def send(request, payload=b"", fds=(), flags=VERSION):
    message = struct.pack("<III", request, flags, len(payload)) + payload
    control = len(fds)
    for i, kind in enumerate(fds):
        control |= kind << (2 + 2 * i)
    return struct.pack("<BH", control, len(message)) + message


PAUSE = struct.pack("<BH", 0, 0)


def u64(request, value, **kw):
    return send(request, struct.pack("<Q", value), **kw)


def state(request, index, num, **kw):
    return send(request, struct.pack("<II", index, num), **kw)


def mem_table(regions):
    payload = struct.pack("<II", len(regions), 0)
    for gpa, size, va, offset in regions:
        payload += struct.pack("<QQQQ", gpa, size, va, offset)
    return send(SET_MEM_TABLE, payload, fds=[MEMFD] * len(regions))


def vring_addr(index, desc, used, avail):
    return send(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, VA + desc, VA + used, VA + avail, 0))


def handshake(protocol=PROTOCOL):
    return (send(SET_OWNER) + send(GET_FEATURES) + send(GET_PROTOCOL_FEATURES)
            + u64(SET_PROTOCOL_FEATURES, protocol) + send(GET_QUEUE_NUM)
            + send(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
            + u64(SET_FEATURES, FEATURES))


def start_queue(index, kick=SIGNALLED):
    return (state(SET_VRING_NUM, index, QSIZE) + vring_addr(index, DESC, USED, AVAIL)
            + state(SET_VRING_BASE, index, 0) + u64(SET_VRING_CALL, index, fds=[EVENTFD])
            + u64(SET_VRING_KICK, index, fds=[kick]) + state(SET_VRING_ENABLE, index, 1))


def ram_with_requests():
    """Guest RAM: a read of 2 sectors and a write of 1, made available."""
    ram = bytearray(0x350)

    def put(addr, data):
        ram[addr:addr + len(data)] = data

    def desc(i, addr, length, flags, nxt):
        put(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    put(HDR, struct.pack("<IIQ", 0, 0, 4))        # IN, sector 4
    put(HDR + 16, struct.pack("<IIQ", 1, 0, 8))   # OUT, sector 8
    desc(0, HDR, 16, 1, 1)
    desc(1, DATA, 1024, 1 | 2, 2)
    desc(2, STATUS, 1, 2, 0)
    desc(3, HDR + 16, 16, 1, 4)
    desc(4, DATA + 0x400, 512, 1, 5)
    desc(5, STATUS + 1, 1, 2, 0)
    put(AVAIL, struct.pack("<HHHH", 0, 2, 0, 3))
    return bytes(ram)


def ram_prefix(ram):
    return struct.pack("<H", len(ram)) + ram


NET = 0x80
NET_MAC, NET_TWO_PAIRS, NET_FRAMES_WAITING = 0x01, 0x02, 0x04
# VERSION_1, PROTOCOL_FEATURES, INDIRECT_DESC, CSUM, GUEST_CSUM, GUEST_TSO4/6,
# HOST_TSO4/6, STATUS, MQ (and EVENT_IDX, MRG_RXBUF, MAC where asked).
NET_FEATURES = ((1 << 32) | (1 << 30) | (1 << 28) | (1 << 0) | (1 << 1) | (1 << 7) | (1 << 8)
                | (1 << 11) | (1 << 12) | (1 << 16) | (1 << 22))
EVENT_IDX, MRG_RXBUF, MAC = 1 << 29, 1 << 15, 1 << 5
RX_DESC, RX_AVAIL, RX_USED = 0x0, 0x100, 0x200
TX_DESC, TX_AVAIL, TX_USED = 0x400, 0x500, 0x600
TX_HDR, TX_DATA, RX_DATA = 0x800, 0x900, 0x1_0000


def net_handshake(features):
    return (send(SET_OWNER) + send(GET_FEATURES) + send(GET_PROTOCOL_FEATURES)
            + u64(SET_PROTOCOL_FEATURES, PROTOCOL) + send(GET_QUEUE_NUM)
            + send(GET_CONFIG, struct.pack("<III", 0, 10, 0) + bytes(10))
            + u64(SET_FEATURES, features))


def net_queue(index, desc, avail, used, kick=SIGNALLED):
    return (state(SET_VRING_NUM, index, QSIZE) + vring_addr(index, desc, used, avail)
            + state(SET_VRING_BASE, index, 0) + u64(SET_VRING_CALL, index, fds=[EVENTFD])
            + u64(SET_VRING_KICK, index, fds=[kick]) + state(SET_VRING_ENABLE, index, 1))


def net_ram(rx_buffer_bytes, rx_chains):
    """Guest RAM: `rx_chains` receive chains of `rx_buffer_bytes` each, and
    one frame to send (header and 60 bytes in two buffers)."""
    ram = bytearray(TX_DATA + 60)

    def put(addr, data):
        ram[addr:addr + len(data)] = data

    for i in range(rx_chains):
        put(RX_DESC + 16 * i, struct.pack("<QIHH", RX_DATA + i * rx_buffer_bytes, rx_buffer_bytes, 2, 0))
    put(RX_AVAIL, struct.pack("<HH", 0, rx_chains) + b"".join(struct.pack("<H", i) for i in range(rx_chains)))
    put(TX_DESC, struct.pack("<QIHH", TX_HDR, 12, 1, 1))
    put(TX_DESC + 16, struct.pack("<QIHH", TX_DATA, 60, 0, 0))
    put(TX_AVAIL, struct.pack("<HHH", 0, 1, 0))
    put(TX_DATA, b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x06")
    return bytes(ram)


def net_session(flags, features, rx_buffer_bytes, rx_chains):
    return (struct.pack("<B", NET | flags) + ram_prefix(net_ram(rx_buffer_bytes, rx_chains))
            + net_handshake(features) + mem_table([(0, RAM, VA, 0)])
            + net_queue(0, RX_DESC, RX_AVAIL, RX_USED) + net_queue(1, TX_DESC, TX_AVAIL, TX_USED)
            + PAUSE + state(GET_VRING_BASE, 0, 0) + state(GET_VRING_BASE, 1, 0))


seeds = {
    "session": b"\x00" + ram_prefix(b"") + handshake()
    + mem_table([(0, RAM, VA, 0)]) + start_queue(0, kick=EVENTFD)
    + state(GET_VRING_BASE, 0, 0),
    "serve-requests": b"\x00" + ram_prefix(ram_with_requests()) + handshake()
    + mem_table([(0, RAM, VA, 0)]) + start_queue(0)
    + PAUSE + state(GET_VRING_BASE, 0, 0),
    "two-queues-mem-slots": b"\x02" + ram_prefix(b"") + handshake()
    + send(GET_MAX_MEM_SLOTS)
    + send(ADD_MEM_REG, struct.pack("<QQQQQ", 0, 0, RAM, VA, 0), fds=[MEMFD])
    + start_queue(0, kick=EVENTFD) + start_queue(1, kick=EVENTFD)
    + send(REM_MEM_REG, struct.pack("<QQQQQ", 0, 0, RAM, VA, 0), fds=[MEMFD])
    + send(RESET_OWNER),
    "reply-ack": b"\x01" + ram_prefix(b"") + send(SET_OWNER, flags=VERSION | NEED_REPLY)
    + u64(SET_FEATURES, FEATURES, flags=VERSION | NEED_REPLY) + send(GET_FEATURES)
    + u64(SET_PROTOCOL_FEATURES, PROTOCOL) + send(SET_OWNER, flags=VERSION | NEED_REPLY),
    "bad-messages": b"\x00" + ram_prefix(b"") + handshake()
    + send(GET_CONFIG, struct.pack("<III", 0xFFFFFF00, 0x200, 0))
    + state(SET_VRING_NUM, 7, 3) + mem_table([(0, RAM * 4, VA, RAM)])
    + u64(SET_VRING_KICK, 0x100, fds=[PIPE]) + send(0x7F),
    "net-session": net_session(NET_FRAMES_WAITING, NET_FEATURES, 1526, 3),
    "net-merged-buffers": net_session(NET_FRAMES_WAITING | NET_MAC, NET_FEATURES | MRG_RXBUF | EVENT_IDX | MAC,
                                      0x4000, 8),
    "net-two-pairs": struct.pack("<B", NET | NET_TWO_PAIRS) + ram_prefix(b"") + net_handshake(NET_FEATURES)
    + mem_table([(0, RAM, VA, 0)]) + net_queue(0, RX_DESC, RX_AVAIL, RX_USED, kick=EVENTFD)
    + net_queue(3, TX_DESC, TX_AVAIL, TX_USED, kick=EVENTFD) + state(SET_VRING_ENABLE, 3, 0)
    + state(GET_VRING_BASE, 3, 0) + send(RESET_OWNER),
}
