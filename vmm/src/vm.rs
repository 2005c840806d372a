//! Builds a VM from a VmConfig and runs it until the guest or the user ends it.

use std::fs::File;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::boot::acpi::{create_acpi_tables, AcpiConfig, AcpiError};
use crate::boot::layout::ports;
use crate::boot::layout::{IOAPIC_START, MMIO_HOLE_START};
use crate::boot::{self, BootError, EntryPoint};
use crate::devices::acpi_pm::{Pm1Control, Pm1Event};
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::I8042;
use crate::devices::pci::{PciBus, PciConfigIo};
use crate::devices::pvpanic::PvPanic;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{PanicWatch, SerialConsole, SerialOut};
use crate::devices::virtio::pci::{VirtioPciDevice, VirtioPciError, BAR_SIZE};
use crate::devices::virtio::vhost_user::blk::{self, DiskConfig};
use crate::devices::virtio::vhost_user::net::{self, NetConfig};
use crate::devices::virtio::vhost_user::VhostUserError;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{BusError, ExitReason, ExitSignal, PioBus};
use crate::event_loop::BackendWatch;
use crate::event_loop::{
    block_stop_signals, ConsoleInput, EventLoop, EventLoopError, TerminalGuard,
};
use crate::kvm::{KvmError, KvmVm};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{kick_signal, on_kick_signal, write_boot_gdt, BootState, Buses, Vcpu, VcpuError};

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    Stdio,
    File(PathBuf),
    Off,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub num_vcpus: u8,
    pub memory_bytes: u64,
    pub serial: SerialMode,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
}

/// PCI class of virtio-blk functions: mass storage, SCSI (as QEMU uses).
const PCI_CLASS_STORAGE: (u8, u8) = (0x01, 0x00);
/// PCI class of virtio-net functions: network, Ethernet.
const PCI_CLASS_NETWORK: (u8, u8) = (0x02, 0x00);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("building the ACPI tables failed")]
    Acpi(#[source] AcpiError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("placing a device on the I/O port bus failed")]
    Bus(#[source] BusError),
    #[error("cannot open the serial output file {path} (--serial file=PATH)")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating an eventfd for {what} failed")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("--disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: VhostUserError,
    },
    #[error("--net {index}")]
    Net {
        index: usize,
        #[source]
        source: VhostUserError,
    },
    #[error("setting up the PCI function of {name}")]
    VirtioPci {
        name: String,
        #[source]
        source: VirtioPciError,
    },
    #[error("the PCI bus has no room for {0}")]
    PciFull(String, #[source] crate::devices::pci::PciError),
    #[error("the 32-bit MMIO hole has no room left for the BAR of {0}")]
    MmioHoleFull(String),
    #[error("installing the vCPU kick signal handler failed")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
}

impl VmError {
    /// Whether the error comes from what the user gave (files, sizes), as
    /// opposed to the host: main maps these to exit status 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            VmError::Boot(_)
                | VmError::SerialFile { .. }
                | VmError::Memory(MemoryError::TooSmall(_))
                | VmError::Disk { .. }
                | VmError::Net { .. }
        )
    }
}

fn eventfd(what: &'static str) -> Result<EventFd, VmError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|source| VmError::EventFd { what, source })
}

/// Serial output that writes each byte straight through (no buffering), so
/// a guest prompt shows up at once.
fn serial_output(mode: &SerialMode) -> Result<SerialOut, VmError> {
    Ok(match mode {
        SerialMode::Stdio => Box::new(std::io::stdout()) as SerialOut,
        SerialMode::File(path) => {
            Box::new(File::create(path).map_err(|source| VmError::SerialFile {
                path: path.clone(),
                source,
            })?)
        }
        SerialMode::Off => Box::new(std::io::sink()),
    })
}

/// Stdout through the serial console flushes after every byte the guest sends.
struct Unbuffered<W: Write>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Loads the kernel, initramfs, command line, ACPI tables and boot info.
fn load_guest(ram: &GuestRam, cfg: &VmConfig) -> Result<BootState, VmError> {
    let kernel = boot::load_kernel(ram, &cfg.kernel)?;
    let (cmdline_max, initramfs_limit) = match &kernel.setup_header {
        Some(hdr) => (hdr.cmdline_size as usize, boot::linux::initramfs_limit(hdr)),
        None => (usize::MAX, u64::MAX),
    };
    let cmdline = boot::write_cmdline(ram, &cfg.cmdline, cmdline_max)?;
    let initramfs = cfg
        .initramfs
        .as_deref()
        .map(|p| boot::load_initramfs(ram, p, kernel.kernel_end, initramfs_limit))
        .transpose()?;
    let map = boot::memory_map(ram);
    let rsdp = create_acpi_tables(
        ram.memory(),
        &AcpiConfig {
            num_cpus: cfg.num_vcpus,
            pci: true,
        },
    )
    .map_err(VmError::Acpi)?;
    write_boot_gdt(ram.memory())?;
    Ok(match (kernel.entry, kernel.setup_header) {
        (EntryPoint::Pvh { .. }, _) => BootState {
            entry: kernel.entry,
            boot_info: boot::pvh::write_start_info(ram, cmdline, &map, initramfs, rsdp)?,
            page_tables: None,
        },
        (EntryPoint::Linux64 { .. }, Some(hdr)) => BootState {
            entry: kernel.entry,
            boot_info: boot::linux::write_boot_params(
                ram,
                hdr,
                cmdline,
                cfg.cmdline.len(),
                &map,
                initramfs,
                rsdp,
            )?,
            page_tables: Some(boot::linux::write_identity_page_tables(ram)?),
        },
        (EntryPoint::Linux64 { .. }, None) => {
            unreachable!("a 64-bit Linux entry always comes from a setup header")
        }
    })
}

/// Runs the VM described by `cfg` to its end.
pub fn run(cfg: &VmConfig) -> Result<ExitReason, VmError> {
    let started = Instant::now();
    let kvm = Arc::new(KvmVm::new(cfg.num_vcpus)?);
    let ram = GuestRam::new(cfg.memory_bytes)?;
    kvm.setup_platform()?;
    kvm.set_memory(&ram)?;
    let boot = load_guest(&ram, cfg)?;

    let exit = ExitSignal::new().map_err(|source| VmError::EventFd {
        what: "VM exit",
        source,
    })?;
    let serial_irq = eventfd("the serial interrupt")?;
    kvm.register_irqfd(&serial_irq, ports::SERIAL_COM1_IRQ)?;
    let drained = eventfd("serial input")?;
    let out: SerialOut = match serial_output(&cfg.serial)? {
        out if cfg.serial == SerialMode::Stdio => Box::new(Unbuffered(out)),
        out => out,
    };
    let out: SerialOut = Box::new(PanicWatch::new(out, exit.clone()));
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        drained.try_clone().map_err(|source| VmError::EventFd {
            what: "serial input",
            source,
        })?,
        out,
    )));
    let mut pio = PioBus::default();
    let bus = |pio: &mut PioBus, base, len, dev| pio.insert(base, len, dev).map_err(VmError::Bus);
    bus(&mut pio, ports::SERIAL_COM1, 8, serial.clone())?;
    bus(
        &mut pio,
        ports::I8042_DATA,
        5,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    bus(&mut pio, ports::RTC, 2, Arc::new(Mutex::new(Rtc::new())))?;
    bus(
        &mut pio,
        ports::PVPANIC,
        1,
        Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
    )?;
    let (pci, backends) = attach_devices(&kvm, &ram, &cfg.disks, &cfg.nets)?;
    let pci = Arc::new(pci);
    bus(
        &mut pio,
        ports::PCI_CONFIG,
        ports::PCI_CONFIG_LEN,
        Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
    )?;
    bus(
        &mut pio,
        ports::DEBUG_EXIT,
        1,
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
    )?;
    bus(
        &mut pio,
        ports::ACPI_PM1A_EVT,
        u16::from(ports::ACPI_PM1A_EVT_LEN),
        Arc::new(Mutex::new(Pm1Event::default())),
    )?;
    bus(
        &mut pio,
        ports::ACPI_PM1A_CNT,
        u16::from(ports::ACPI_PM1A_CNT_LEN),
        Arc::new(Mutex::new(Pm1Control::new(exit.clone()))),
    )?;
    let buses = Arc::new(Buses { pio, pci });

    let base_cpuid = kvm.supported_cpuid()?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.num_vcpus));
    for id in 0..cfg.num_vcpus {
        let fd = kvm.create_vcpu(id)?;
        vcpus.push(Vcpu::new(
            id,
            fd,
            &base_cpuid,
            cfg.num_vcpus,
            (id == 0).then_some(boot),
        )?);
    }

    register_signal_handler(kick_signal(), on_kick_signal).map_err(VmError::KickHandler)?;
    let signal_set = block_stop_signals()?;
    let console = (cfg.serial == SerialMode::Stdio).then(|| ConsoleInput {
        serial: serial.clone(),
        drained,
    });
    let mut event_loop = EventLoop::new(exit.clone(), &signal_set, console, backends)?;
    let _terminal = if cfg.serial == SerialMode::Stdio {
        TerminalGuard::raw_stdin()
    } else {
        None
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        match v.spawn(buses.clone(), exit.clone(), stop.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                stop_vcpus(&stop, threads);
                return Err(e.into());
            }
        }
    }
    tracing::info!(
        vcpus = cfg.num_vcpus,
        memory_mib = ram.size_bytes() >> 20,
        setup_ms = started.elapsed().as_millis() as u64,
        "guest started"
    );
    let reason = event_loop.run();
    stop_vcpus(&stop, threads);
    tracing::info!(
        ?reason,
        run_ms = started.elapsed().as_millis() as u64,
        "guest ended"
    );
    Ok(reason)
}

/// Connects every `--disk`, then every `--net`, to its backend and puts its
/// virtio-pci function on the bus, BARs placed upwards from the start of
/// the MMIO hole.
fn attach_devices(
    kvm: &Arc<KvmVm>,
    ram: &GuestRam,
    disks: &[DiskConfig],
    nets: &[NetConfig],
) -> Result<(PciBus, Vec<BackendWatch>), VmError> {
    let mut slots = DeviceSlots {
        kvm,
        pci: PciBus::new(),
        watches: Vec::with_capacity(disks.len() + nets.len()),
        next_bar: MMIO_HOLE_START.0,
    };
    for (index, disk) in disks.iter().enumerate() {
        let frontend = blk::connect(disk, ram).map_err(|source| VmError::Disk { index, source })?;
        let (socket, fd) = (frontend.socket().to_owned(), frontend.raw_fd());
        let name = format!("disk{index} ({})", socket.display());
        slots.add(name, Box::new(frontend), fd, PCI_CLASS_STORAGE)?;
    }
    for (index, net) in nets.iter().enumerate() {
        let frontend = net::connect(net, ram).map_err(|source| VmError::Net { index, source })?;
        let (socket, fd) = (frontend.socket().to_owned(), frontend.raw_fd());
        let name = format!("net{index} ({})", socket.display());
        slots.add(name, Box::new(frontend), fd, PCI_CLASS_NETWORK)?;
    }
    Ok((slots.pci, slots.watches))
}

/// The PCI bus being filled, and where the next BAR goes.
struct DeviceSlots<'a> {
    kvm: &'a Arc<KvmVm>,
    pci: PciBus,
    watches: Vec<BackendWatch>,
    next_bar: u64,
}

impl DeviceSlots<'_> {
    /// Puts `device` behind a virtio-pci function named `name`; the event
    /// loop watches its backend socket `fd`.
    fn add(
        &mut self,
        name: String,
        device: Box<dyn VirtioDevice>,
        fd: RawFd,
        class: (u8, u8),
    ) -> Result<(), VmError> {
        if self.next_bar + BAR_SIZE > IOAPIC_START.0 {
            return Err(VmError::MmioHoleFull(name));
        }
        let dev =
            VirtioPciDevice::new(name.clone(), device, self.kvm.clone(), self.next_bar, class)
                .map_err(|source| VmError::VirtioPci {
                    name: name.clone(),
                    source,
                })?;
        self.next_bar += BAR_SIZE;
        let dev = Arc::new(Mutex::new(dev));
        self.pci
            .add(dev.clone())
            .map_err(|e| VmError::PciFull(name, e))?;
        self.watches.push(BackendWatch { fd, device: dev });
        Ok(())
    }
}

fn stop_vcpus(stop: &AtomicBool, threads: Vec<std::thread::JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for t in &threads {
        if let Err(e) = t.kill(kick_signal()) {
            tracing::warn!("kicking a vCPU thread failed: {e}");
        }
    }
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
