//! Arbitrary guest accesses to ringvm's PCI configuration mechanism #1
//! (`PciConfigIo` on a `PciBus`) and to a `VirtioPciDevice`'s BAR (common
//! configuration, ISR, device configuration, notifications, MSI-X table and
//! PBA), in any order, width (1, 2, 4, 8 bytes) and offset. The device
//! behind the transport is a fake that checks what the transport hands it.
//!
//! Invariants:
//! - nothing panics;
//! - a configuration read of 1, 2 or 4 bytes fills the whole buffer (two
//!   reads into differently pre-filled buffers agree) and agrees with the
//!   dword read of the same register;
//! - a BAR read fills the whole buffer (same check; only the ISR, which
//!   reading clears, may differ the second time);
//! - the capability list stays a well-formed chain inside configuration
//!   space;
//! - the function decodes at most its one declared BAR, of the declared
//!   size, naturally aligned, and never wrapping the address space;
//! - the device is activated only with features it offered (and
//!   VIRTIO_F_VERSION_1), with enabled queues it has, each of a power-of-two
//!   size it allows, and never twice without a reset in between; it is
//!   reset only while active;
//! - the device's configuration is accessed only within its length.
//!
//! Input: a sequence of operations, see [`Op`]. Each input gets a fresh
//! transport on a fresh bus. The KVM VM is shared (creating one takes
//! milliseconds): each input ends by turning memory decoding off, which
//! unregisters its notification ioeventfds, and dropping the transport
//! closes its irqfds' eventfds; a VM whose GSIs ran out is replaced.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use ringvm::devices::pci::{PciBus, PciConfigIo, PciDevice};
use ringvm::devices::virtio::interrupts::InterruptsError;
use ringvm::devices::virtio::pci::{VirtioPciDevice, VirtioPciError, BAR_INDEX, BAR_SIZE};
use ringvm::devices::virtio::{ActivateError, ActiveQueue, VirtioDevice};
use ringvm::devices::PioDevice;
use ringvm::kvm::{KvmError, KvmVm};
use ringvm_fuzz::{tracing, Bytes};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Where the BAR starts (in ringvm: the first address of the MMIO hole).
const BAR_BASE: u64 = 0xc000_0000;
const NUM_QUEUES: usize = 3;
const MAX_QUEUE_SIZE: u16 = 256;
/// VERSION_1, EVENT_IDX, INDIRECT_DESC, and a few device bits.
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 29) | (1 << 28) | 0b111;
const CONFIG_LEN: usize = 60;
/// Configuration-space byte of the capabilities pointer.
const CAPABILITIES_POINTER: usize = 0x34;
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// The device's slot on the bus (the host bridge is in slot 0).
const SLOT: u32 = 1;

/// A virtio device that checks what the transport tells it.
struct FakeDevice {
    active: bool,
    config: [u8; CONFIG_LEN],
}

impl FakeDevice {
    fn new() -> FakeDevice {
        let mut config = [0u8; CONFIG_LEN];
        for (i, b) in config.iter_mut().enumerate() {
            *b = i as u8;
        }
        FakeDevice {
            active: false,
            config,
        }
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }
    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        assert!(
            start + data.len() <= CONFIG_LEN,
            "device config read {start}+{} past its {CONFIG_LEN} bytes",
            data.len()
        );
        data.copy_from_slice(&self.config[start..start + data.len()]);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        assert!(
            start + data.len() <= CONFIG_LEN,
            "device config write {start}+{} past its {CONFIG_LEN} bytes",
            data.len()
        );
        self.config[start..start + data.len()].copy_from_slice(data);
    }
    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without a reset");
        assert_eq!(
            features & !FEATURES,
            0,
            "activated with features {features:#x} the device did not offer"
        );
        assert_ne!(
            features & (1 << VIRTIO_F_VERSION_1),
            0,
            "activated without VIRTIO_F_VERSION_1"
        );
        let mut seen = [false; NUM_QUEUES];
        for q in queues {
            assert!(q.index < NUM_QUEUES, "queue {} does not exist", q.index);
            assert!(!seen[q.index], "queue {} handed over twice", q.index);
            seen[q.index] = true;
            assert!(q.config.enabled, "queue {} is not enabled", q.index);
            assert!(
                q.config.size.is_power_of_two() && q.config.size <= MAX_QUEUE_SIZE,
                "queue {} has size {}",
                q.index,
                q.config.size
            );
        }
        if tracing() {
            let queues: Vec<_> = queues.iter().map(|q| (q.index, q.config)).collect();
            eprintln!("activated with features {features:#x}, queues {queues:x?}");
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        assert!(self.active, "reset while not active");
        self.active = false;
    }
}

/// One guest access. The opcode byte's low 3 bits choose the operation, its
/// high bits the width or a shortcut.
#[derive(Debug)]
enum Op {
    /// 0: CONFIG_ADDRESS (0xCF8) write, dword: raw u32 or, with opcode bit
    /// 7, enable | this device's slot | register byte.
    ConfigAddress(u32),
    /// 1: CONFIG_DATA (0xCFC + port) read of 1, 2 or 4 bytes.
    ConfigRead { port: u16, width: usize },
    /// 2: CONFIG_DATA write.
    ConfigWrite { port: u16, data: Vec<u8> },
    /// 3: read at BAR offset (from the BAR's programmed base), 1/2/4/8 bytes.
    BarRead { offset: u64, width: usize },
    /// 4: write at BAR offset.
    BarWrite { offset: u64, data: Vec<u8> },
    /// 5: MMIO read at any address.
    MmioRead { addr: u64, width: usize },
    /// 6: MMIO write at any address.
    MmioWrite { addr: u64, data: Vec<u8> },
    /// 7: the vhost-user backend went away.
    BackendGone,
}

const WIDTHS: [usize; 4] = [1, 2, 4, 8];
const CONFIG_WIDTHS: [usize; 4] = [1, 2, 4, 4];

fn next_op(input: &mut Bytes<'_>) -> Op {
    let opcode = input.u8();
    let width = WIDTHS[usize::from(opcode >> 3) % 4];
    let data = |input: &mut Bytes<'_>, width: usize| {
        let mut data = vec![0u8; width];
        input.fill(&mut data);
        data
    };
    match opcode & 7 {
        0 if opcode & 0x80 != 0 => {
            Op::ConfigAddress((1 << 31) | (SLOT << 11) | u32::from(input.u8() & 0xfc))
        }
        0 => Op::ConfigAddress(input.u32()),
        1 => Op::ConfigRead {
            port: u16::from(input.u8() % 4),
            width: CONFIG_WIDTHS[usize::from(opcode >> 3) % 4],
        },
        2 => {
            let port = u16::from(input.u8() % 4);
            let width = CONFIG_WIDTHS[usize::from(opcode >> 3) % 4];
            Op::ConfigWrite {
                port,
                data: data(input, width),
            }
        }
        // Offsets up to a little past the BAR's end.
        3 => Op::BarRead {
            offset: u64::from(input.u16()) % (BAR_SIZE + 16),
            width,
        },
        4 => {
            let offset = u64::from(input.u16()) % (BAR_SIZE + 16);
            Op::BarWrite {
                offset,
                data: data(input, width),
            }
        }
        5 => Op::MmioRead {
            addr: input.u64(),
            width,
        },
        6 => {
            let addr = input.u64();
            Op::MmioWrite {
                addr,
                data: data(input, width),
            }
        }
        _ => Op::BackendGone,
    }
}

/// The shared VM, replaced when its GSIs run out (ringvm never frees a
/// GSI: a VM has a fixed set of devices).
fn new_transport(fake: FakeDevice) -> VirtioPciDevice {
    static VM: Mutex<Option<Arc<KvmVm>>> = Mutex::new(None);
    let mut vm = VM.lock().unwrap();
    let mut fake = Some(fake);
    loop {
        let current = vm.get_or_insert_with(|| {
            let vm = KvmVm::new(1).expect("/dev/kvm");
            vm.setup_platform().expect("KVM platform");
            Arc::new(vm)
        });
        let device = Box::new(fake.take().expect("one fake per attempt"));
        match VirtioPciDevice::new("fuzz".into(), device, current.clone(), BAR_BASE, (1, 0)) {
            Ok(dev) => return dev,
            Err(VirtioPciError::Interrupts(InterruptsError::Kvm(KvmError::OutOfGsis))) => {
                *vm = None;
                fake = Some(FakeDevice::new());
            }
            Err(e) => panic!("virtio-pci transport: {e}"),
        }
    }
}

struct Machine {
    io: PciConfigIo,
    bus: Arc<PciBus>,
    dev: Arc<Mutex<VirtioPciDevice>>,
    /// The ISR's byte range in the BAR, from the capability list.
    isr: std::ops::Range<u64>,
}

impl Machine {
    fn new() -> Machine {
        let dev = Arc::new(Mutex::new(new_transport(FakeDevice::new())));
        let mut bus = PciBus::new();
        let slot = bus.add(dev.clone()).expect("a free slot");
        assert_eq!(slot as u32, SLOT);
        let bus = Arc::new(bus);
        let mut machine = Machine {
            io: PciConfigIo::new(bus.clone()),
            bus,
            dev,
            isr: 0..0,
        };
        let caps = machine.capabilities();
        let isr = caps
            .iter()
            .find(|c| c.id == PCI_CAP_ID_VENDOR && c.cfg_type == VIRTIO_PCI_CAP_ISR_CFG)
            .expect("an ISR capability");
        machine.isr = isr.offset..isr.offset + isr.len;
        machine
    }

    /// Configuration-space bytes, as the device holds them (no side effect
    /// on CONFIG_ADDRESS).
    fn config_bytes(&self) -> [u8; 256] {
        let mut dev = self.dev.lock().unwrap();
        let mut bytes = [0u8; 256];
        for reg in 0..64 {
            bytes[reg * 4..reg * 4 + 4].copy_from_slice(&dev.read_config(reg).to_le_bytes());
        }
        bytes
    }

    /// Walks the capability list, checking that it is well formed.
    fn capabilities(&self) -> Vec<Capability> {
        let config = self.config_bytes();
        let mut caps = Vec::new();
        let mut at = usize::from(config[CAPABILITIES_POINTER]);
        while at != 0 {
            assert!(
                (0x40..=0xfc).contains(&at) && at % 4 == 0,
                "capability pointer {at:#x} outside the device-specific area or unaligned"
            );
            assert!(caps.len() < 48, "capability list loops");
            let bar_field =
                |i: usize| u32::from_le_bytes(config[at + i..at + i + 4].try_into().unwrap());
            caps.push(Capability {
                id: config[at],
                cfg_type: config[at + 3],
                offset: u64::from(if at + 12 <= 256 { bar_field(8) } else { 0 }),
                len: u64::from(if at + 16 <= 256 { bar_field(12) } else { 0 }),
            });
            at = usize::from(config[at + 1]);
        }
        caps
    }

    fn bar_base(&self) -> u64 {
        let mut dev = self.dev.lock().unwrap();
        let lo = dev.read_config(4 + BAR_INDEX) & !0xf;
        let hi = dev.read_config(5 + BAR_INDEX);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    fn config_read(&mut self, port: u16, data: &mut [u8]) {
        self.io.read(4 + port, data);
    }

    fn check_config_read(&mut self, port: u16, width: usize) {
        let mut a = vec![0x00; width];
        let mut b = vec![0x5a; width];
        self.config_read(port, &mut a);
        self.config_read(port, &mut b);
        assert_eq!(
            a, b,
            "config read of {width} at port {port} left bytes unfilled"
        );
        let mut dword = [0u8; 4];
        self.config_read(0, &mut dword);
        let start = usize::from(port);
        if start + width <= 4 {
            assert_eq!(
                a,
                dword[start..start + width],
                "config read of {width} at port {port} disagrees with the dword"
            );
        } else {
            assert!(a.iter().all(|&x| x == 0xff), "a read across the dword");
        }
    }

    fn check_mmio_read(&mut self, addr: u64, width: usize) {
        let mut a = vec![0x00; width];
        let mut b = vec![0x5a; width];
        let decoded = self.bus.mmio_read(addr, &mut a);
        if !decoded {
            return;
        }
        assert!(self.bus.mmio_read(addr, &mut b));
        let base = self.decoded_base();
        let in_isr = base.is_some_and(|base| {
            let offset = addr - base;
            offset < self.isr.end && self.isr.start < offset + width as u64
        });
        if !in_isr {
            assert_eq!(a, b, "BAR read of {width} at {addr:#x} left bytes unfilled");
        }
    }

    /// Where the device's BAR decodes now, checked against what it declared.
    fn decoded_base(&self) -> Option<u64> {
        let bars = self.dev.lock().unwrap().mmio_bars();
        assert!(bars.len() <= 1, "more BARs than declared: {bars:x?}");
        bars.first().map(|&(index, base, size)| {
            assert_eq!(index, BAR_INDEX, "a BAR that was not declared");
            assert_eq!(size, BAR_SIZE, "the BAR changed size");
            assert_eq!(base % size, 0, "BAR at {base:#x} is not naturally aligned");
            // A BAR may end at the top of the address space, not past it.
            assert!(
                base.checked_add(size - 1).is_some(),
                "BAR wraps at {base:#x}"
            );
            base
        })
    }

    fn run(&mut self, op: Op) {
        if tracing() {
            eprintln!("{op:x?}");
        }
        match op {
            Op::ConfigAddress(value) => self.io.write(0, &value.to_le_bytes()),
            Op::ConfigRead { port, width } => self.check_config_read(port, width),
            Op::ConfigWrite { port, data } => self.io.write(4 + port, &data),
            Op::BarRead { offset, width } => {
                let addr = self.bar_base().wrapping_add(offset);
                self.check_mmio_read(addr, width);
            }
            Op::BarWrite { offset, data } => {
                let addr = self.bar_base().wrapping_add(offset);
                self.bus.mmio_write(addr, &data);
            }
            Op::MmioRead { addr, width } => self.check_mmio_read(addr, width),
            Op::MmioWrite { addr, data } => {
                self.bus.mmio_write(addr, &data);
            }
            Op::BackendGone => self.dev.lock().unwrap().on_backend_gone(),
        }
        self.decoded_base();
        self.capabilities();
    }
}

impl Drop for Machine {
    /// Memory decoding off: the transport unregisters its ioeventfds from
    /// the shared VM.
    fn drop(&mut self) {
        self.dev.lock().unwrap().write_config(1, 0, &[0, 0]);
    }
}

struct Capability {
    id: u8,
    cfg_type: u8,
    offset: u64,
    len: u64,
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let mut machine = Machine::new();
    while !input.is_empty() {
        let op = next_op(&mut input);
        machine.run(op);
    }
});
