"""Seeds for the virtio_pci_registers target (see Op in
fuzz_targets/virtio_pci_registers.rs): a driver bringing the device up
(BAR, features, queues, MSI-X, DRIVER_OK, notifications, reset), BAR sizing
and moves, and the sequences behind the two transport bugs it found."""

import struct

# Common configuration offsets (virtio 1.2, 4.1.4.3).
DFSEL, DF, GFSEL, GF, MSIX_CONFIG, NUMQ, STATUS, GEN, QSEL, QSIZE, QMSIX, QENABLE, QNOFF, QDESC, QDRIVER, QDEVICE = (
    0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1A, 0x1C, 0x1E, 0x20, 0x28, 0x30)
ISR, DEVICE_CFG, NOTIFY, MSIX_TABLE, MSIX_PBA = 0x1000, 0x2000, 0x3000, 0x4000, 0x6000
MSIX_CAP = 0x84
FEATURES = (1 << 32) | (1 << 29) | (1 << 28) | 0b111
WIDTH = {1: 0, 2: 1, 4: 2, 8: 3}
CONFIG_WIDTH = {1: 0, 2: 1, 4: 2}


def cfg_addr(reg_byte):
    return bytes([0x80, reg_byte])


def cfg_write(byte, value, width):
    return cfg_addr(byte & 0xFC) + bytes([2 | CONFIG_WIDTH[width] << 3, byte & 3]) + value.to_bytes(width, "little")


def cfg_read(byte, width):
    return cfg_addr(byte & 0xFC) + bytes([1 | CONFIG_WIDTH[width] << 3, byte & 3])


def bar_write(offset, value, width):
    return bytes([4 | WIDTH[width] << 3]) + struct.pack("<H", offset) + value.to_bytes(width, "little")


def bar_read(offset, width):
    return bytes([3 | WIDTH[width] << 3]) + struct.pack("<H", offset)


def enable_memory():
    return cfg_write(0x04, 0x06, 1)


def negotiate(features=FEATURES):
    return (bar_write(STATUS, 1, 1) + bar_write(STATUS, 3, 1)
            + bar_write(DFSEL, 1, 4) + bar_read(DF, 4)
            + bar_write(GFSEL, 0, 4) + bar_write(GF, features & 0xFFFFFFFF, 4)
            + bar_write(GFSEL, 1, 4) + bar_write(GF, features >> 32, 4)
            + bar_write(STATUS, 0x0B, 1) + bar_read(STATUS, 1))


def queue(q, size, base, vector):
    return (bar_write(QSEL, q, 2) + bar_write(QSIZE, size, 2) + bar_write(QMSIX, vector, 2)
            + bar_write(QDESC, base, 8) + bar_write(QDRIVER, base + 0x1000, 4)
            + bar_write(QDRIVER + 4, 0, 4) + bar_write(QDEVICE, base + 0x2000, 8)
            + bar_write(QENABLE, 1, 2) + bar_read(QNOFF, 2))


def msix_entry(vector, data):
    at = MSIX_TABLE + 16 * vector
    return bar_write(at, 0xFEE00000, 4) + bar_write(at + 4, 0, 4) + bar_write(at + 8, data, 4) + bar_write(at + 12, 0, 4)


bring_up = (enable_memory() + cfg_read(0x00, 4) + cfg_read(0x34, 1)
            + cfg_write(MSIX_CAP + 2, 0x8000, 2) + msix_entry(0, 0x41) + msix_entry(1, 0x42)
            + bar_write(MSIX_CONFIG, 0, 2) + negotiate()
            + queue(0, 128, 0x10_0000, 1) + queue(1, 64, 0x20_0000, 0xFFFF)
            + bar_write(STATUS, 0x0F, 1) + bar_read(STATUS, 1)
            + bar_write(NOTIFY, 0, 2) + bar_write(NOTIFY + 4, 1, 2)
            + bar_read(DEVICE_CFG, 8) + bar_read(DEVICE_CFG + 58, 4)
            + bar_read(ISR, 1) + bar_read(MSIX_PBA, 8) + bar_read(MSIX_TABLE + 8, 4)
            + bytes([7]) + bar_read(ISR, 1) + bar_write(STATUS, 0, 1))

bar_moves = (cfg_write(0x10, 0xFFFFFFFF, 4) + cfg_write(0x14, 0xFFFFFFFF, 4) + cfg_read(0x10, 4)
             + cfg_read(0x14, 4) + cfg_write(0x10, 0xD0000000, 4) + cfg_write(0x14, 0, 4)
             + enable_memory() + bar_read(NUMQ, 2) + cfg_write(0x10, 0xE0008000, 4)
             + bar_read(QSIZE, 2) + cfg_write(0x04, 0, 1) + bar_read(QSIZE, 2)
             + bytes([5]) + struct.pack("<Q", 0xE000_0012) + bytes([1 | 1 << 3, 0]))

unoffered = enable_memory() + negotiate(FEATURES | 1 << 63) + bar_write(STATUS, 0x0F, 1)

driver_ok_twice = (enable_memory() + negotiate() + bar_write(STATUS, 0x0F, 1)
                   + bar_write(STATUS, 0x0B, 1) + bar_write(STATUS, 0x0F, 1))

seeds = {
    "bring-up": bring_up,
    "bar-moves": bar_moves,
    "unoffered-features": unoffered,
    "driver-ok-twice": driver_ok_twice,
}
