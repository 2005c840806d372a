//! Boots Debian's stock kernel (package linux-image-amd64) under ringvm, or
//! under QEMU for comparison, with an initramfs built from installed
//! packages, runs one shell command in the guest and reports what happened:
//! for the integration tests (tests/tests/linux_boot.rs) and `ringvm-bench`.
//!
//! # The guest (L2)
//!
//! [`LinuxHost::prepare`] finds the kernel (`/boot/vmlinuz-<version>` with a
//! `/lib/modules/<version>`) and builds the guest's initramfs (see
//! [`initramfs`]): busybox-static with its applet links, fio and iperf3 with
//! their shared libraries, the virtio_pci, virtio_blk and virtio_net modules
//! with their dependencies (from the same kernel), and `l2_init.sh` as
//! `/init`. The command travels base64-encoded in the kernel command line word
//! `ringvm.cmd=`; `/init` prints [`INIT_MARKER`] first, runs the command after
//! [`OUTPUT_MARKER`], prints `RINGVM-RESULT: status=<N>` and then powers off
//! or reboots (`ringvm.end=`, [`EndAction`]), both forced.
//!
//! # Devices
//!
//! A run may have a disk ([`DiskSpec`]: an image served by ringvm-blk) and a
//! NIC ([`NetSpec`]: a tap served by ringvm-net, with an iperf3 server on the
//! tap's address if asked), each started next to the VMM before it and
//! reported on after it ([`LinuxRun::disk`], [`LinuxRun::net`]). In direct
//! mode the tap lives in a network namespace the run makes and deletes.
//!
//! # Where the VMM runs
//!
//! A stock kernel needs hardware virtualization. [`HostMode::choose`] picks:
//!
//! - [`HostMode::Direct`] when /dev/kvm comes from kvm_intel or kvm_amd: the
//!   VMM runs here as a child process.
//! - [`HostMode::Emulated`] when /dev/kvm is kvm_pvm (which cannot run a
//!   stock kernel's CPL0 code) or absent: QEMU with TCG (`-cpu EPYC`, 2 vCPUs,
//!   2 GiB) boots the same kernel as an L1 host with its own small initramfs
//!   (`l1_init.sh`, kvm-amd and the 9p modules). L1 mounts this machine's root
//!   file system read-only over 9p, mounts a tmpfs on the run's work directory
//!   (sockets and files of the run live there, not on 9p) and runs a job
//!   script chrooted into that root, so the VMM and the guest files are at the
//!   same paths as here. The job frames the VMM's stdout line by line with L1
//!   uptimes, so L1's console and the guest's console can be told apart and
//!   timed.
//!
//! `RINGVM_LINUX_HOST=direct` or `RINGVM_LINUX_HOST=emulated` forces the
//! mode. [`HostChoice`] says which one was chosen and why.
//!
//! # Bounds
//!
//! Every run has a timeout ([`RunSpec::timeout`], by default
//! [`DEFAULT_TIMEOUT_DIRECT`] or [`DEFAULT_TIMEOUT_EMULATED`]); in emulated
//! mode the VMM gets it inside L1 and L1 as a whole gets
//! [`L1_BOOT_BUDGET`] more. Processes are killed when it passes. A
//! [`LinuxRun`] displays everything (status, times, the guest console, the
//! VMM's stderr, L1's console) for assertion messages.
//!
//! Built initramfs files are cached under the cargo target directory
//! (`<target>/<profile>/ringvm-linux/`, or `$RINGVM_LINUX_CACHE`).

pub mod cpio;
mod emulated;
mod host;
pub mod initramfs;
pub mod modules;

use std::cmp::Ordering;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, run_bounded, ExitOutcome};
use crate::netns;

pub use host::{HostChoice, HostMode, HOST_ENV};
use initramfs::{Initramfs, InitramfsError, InitramfsSpec};
use modules::ModuleIndex;

/// First line of the guest's /init.
pub const INIT_MARKER: &str = "RINGVM-INIT";
/// Printed by /init right before it runs the command.
pub const OUTPUT_MARKER: &str = "RINGVM-OUTPUT-BEGIN";
/// Printed by /init after the command, followed by its exit status.
pub const RESULT_PREFIX: &str = "RINGVM-RESULT: status=";
/// Overrides where built initramfs files are cached.
pub const CACHE_ENV: &str = "RINGVM_LINUX_CACHE";

/// Modules the guest loads at boot (their dependencies come along).
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net"];
/// Modules the emulated host loads: KVM on emulated SVM, the 9p client over
/// virtio-pci for the host root, and tun for the guest's tap ([`NetSpec`]).
pub const L1_MODULES: &[&str] = &["kvm_amd", "9p", "9pnet_virtio", "virtio_pci", "tun"];
/// Programs copied into the guest's initramfs with their libraries.
pub const GUEST_PROGRAMS: &[&str] = &["fio", "iperf3"];

/// Kernel command line before the caller's words. `quiet` keeps the kernel
/// log off the serial console (every byte is an exit, which in an emulated
/// host costs a nested VM exit); panics still print. Add `loglevel=7` to
/// [`RunSpec::extra_cmdline`] to see the whole log.
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet";
/// The x86 kernel's COMMAND_LINE_SIZE, including the terminating NUL.
const CMDLINE_MAX_BYTES: usize = 2048;

/// Default bound of one VMM run on a host with hardware virtualization.
pub const DEFAULT_TIMEOUT_DIRECT: Duration = Duration::from_secs(60);
/// Default bound of one VMM run inside the emulated host: the guest kernel
/// runs at TCG speed with nested paging emulated. Measured: 30-60 s to /init
/// on a 2-core machine that was also compiling (QEMU as the VMM, whose
/// firmware adds about 12 s, and ringvm alike).
pub const DEFAULT_TIMEOUT_EMULATED: Duration = Duration::from_secs(120);
/// Added to the VMM's bound for the emulated host as a whole: QEMU start and
/// L1 boot (measured 7-14 s to L1's /init), modules and mounts (2-3 s),
/// power-off.
pub const L1_BOOT_BUDGET: Duration = Duration::from_secs(60);

/// Why the Linux tests cannot run here (they print `SKIPPED: <reason>`).
#[derive(Debug, thiserror::Error)]
pub enum LinuxSetupError {
    /// Something is not installed (a package, the kernel, QEMU).
    #[error("{0}")]
    Missing(String),
    /// `RINGVM_LINUX_HOST` has a bad value.
    #[error("{0}")]
    BadHostMode(String),
    #[error("building the {which} initramfs")]
    Initramfs {
        which: &'static str,
        #[source]
        source: InitramfsError,
    },
    #[error("cache directory {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The installed stock kernel and its modules.
#[derive(Debug)]
pub struct LinuxGuest {
    /// `/boot/vmlinuz-<version>` (a bzImage).
    pub kernel: PathBuf,
    pub version: String,
    pub modules: ModuleIndex,
}

impl LinuxGuest {
    /// The newest `/boot/vmlinuz-*` whose `/lib/modules/<version>` exists.
    pub fn discover() -> Result<LinuxGuest, LinuxSetupError> {
        Self::discover_in(Path::new("/boot"), Path::new("/lib/modules"))
    }

    fn discover_in(boot: &Path, modules_root: &Path) -> Result<LinuxGuest, LinuxSetupError> {
        let missing = |what: String| LinuxSetupError::Missing(what);
        let entries = fs::read_dir(boot)
            .map_err(|err| missing(format!("no kernel: cannot list {}: {err}", boot.display())))?;
        let mut versions: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let version = name.strip_prefix("vmlinuz-")?.to_owned();
                modules_root
                    .join(&version)
                    .join("modules.dep")
                    .is_file()
                    .then_some(version)
            })
            .collect();
        versions.sort_by(|a, b| version_cmp(a, b));
        let version = versions.pop().ok_or_else(|| {
            missing(format!(
                "no {}/vmlinuz-<version> with a {}/<version>/modules.dep \
                 (install linux-image-amd64)",
                boot.display(),
                modules_root.display()
            ))
        })?;
        let kernel = boot.join(format!("vmlinuz-{version}"));
        fs::File::open(&kernel)
            .map_err(|err| missing(format!("cannot read {}: {err}", kernel.display())))?;
        let modules = ModuleIndex::load(&modules_root.join(&version))
            .map_err(|err| missing(format!("kernel modules of {version}: {err}")))?;
        Ok(LinuxGuest {
            kernel,
            version,
            modules,
        })
    }
}

/// Compares version strings with digit runs as numbers
/// (`6.1.0-9` < `6.1.0-56`).
fn version_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (a, b) = (chunks(a), chunks(b));
    for (x, y) in a.iter().zip(&b) {
        let ord = if x.0 && y.0 {
            let (xs, ys) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
            xs.len().cmp(&ys.len()).then_with(|| xs.cmp(ys))
        } else {
            x.1.cmp(y.1)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    a.len().cmp(&b.len())
}

/// The VMM that boots the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Vmm {
    Ringvm,
    /// `qemu-system-x86_64 -accel kvm`, for comparison and for debugging the
    /// harness independently of ringvm.
    Qemu,
}

impl fmt::Display for L2Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L2Vmm::Ringvm => "ringvm",
            L2Vmm::Qemu => "qemu",
        })
    }
}

/// What the guest's /init does after the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndAction {
    /// `poweroff -f` (ACPI S5).
    PowerOff,
    /// `reboot -f` (the VMM sees a reset).
    Reboot,
}

impl EndAction {
    fn cmdline_value(self) -> &'static str {
        match self {
            EndAction::PowerOff => "poweroff",
            EndAction::Reboot => "reboot",
        }
    }
}

/// An image of `size_mib` in the run's work directory (a tmpfs in emulated
/// mode), served by `ringvm-blk --queues queues` on `blk.sock` there and
/// attached with `--disk`; the guest sees it as /dev/vda. ringvm-blk finds
/// the format in the image's header. After ringvm-blk exits the run reports
/// the image's allocated bytes and, for qcow2, `qemu-img check`
/// ([`LinuxRun::disk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub size_mib: u32,
    pub queues: u16,
    pub format: DiskFormat,
}

/// How the harness creates the disk image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// A sparse raw file (`truncate -s`).
    Raw,
    /// A thin qcow2, no cluster allocated (`qemu-img create -f qcow2`).
    Qcow2,
}

impl DiskSpec {
    /// The image's file name in the run's work directory.
    pub(crate) fn image_name(&self) -> &'static str {
        match self.format {
            DiskFormat::Raw => "disk.raw",
            DiskFormat::Qcow2 => "disk.qcow2",
        }
    }

    /// The command that creates the image in `work`.
    pub(crate) fn create_argv(&self, work: &Path) -> Vec<String> {
        let image = work.join(self.image_name()).to_string_lossy().into_owned();
        let size = format!("{}M", self.size_mib);
        match self.format {
            DiskFormat::Raw => vec!["truncate".into(), "-s".into(), size, image],
            DiskFormat::Qcow2 => vec![
                "qemu-img".into(),
                "create".into(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                image,
                size,
            ],
        }
    }

    /// `qemu-img check` of the image in `work` (qcow2 only).
    pub(crate) fn check_argv(&self, work: &Path) -> Option<Vec<String>> {
        (self.format == DiskFormat::Qcow2).then(|| {
            let image = work.join(self.image_name()).to_string_lossy().into_owned();
            vec![
                "qemu-img".into(),
                "check".into(),
                "-f".into(),
                "qcow2".into(),
                image,
            ]
        })
    }
}

/// The disk image after ringvm-blk exited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskReport {
    /// st_blocks * 512 of the image file.
    pub allocated_bytes: Option<u64>,
    /// `qemu-img check` (qcow2 images): its exit status and output.
    pub check_status: Option<i32>,
    pub check_output: String,
}

/// File names of the disk in the run's work directory.
pub(crate) const DISK_SOCKET: &str = "blk.sock";
/// ringvm-net's socket in the run's work directory.
pub(crate) const NET_SOCKET: &str = "net.sock";
/// Bound on creating and checking a disk image (qemu-img, truncate).
const DISK_TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the backend may take to create its socket.
const BACKEND_SOCKET_WAIT: Duration = Duration::from_secs(30);

/// A virtio-net device: a multi-queue tap named [`netns::TAP`] on the host
/// (L1 in emulated mode; in direct mode inside a network namespace the run
/// makes, never beside the host's own interfaces), addressed
/// [`netns::HOST_IP`]/24 and up, served by `ringvm-net` on `net.sock` in
/// the run's work directory and attached with `--net socket=...,mac=...`.
/// The guest sees it as eth0 with `mac`; [`netns::GUEST_IP`] is the address
/// meant for it. With `iperf3_server`, `iperf3 -s -1 -B <HOST_IP>` serves
/// one test on the tap's address during the run. [`LinuxRun::net`] reports
/// on both after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub mac: [u8; 6],
    pub iperf3_server: bool,
}

impl NetSpec {
    /// The MAC as ringvm's `mac=` and Linux's sysfs spell it.
    pub fn mac_text(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The ringvm-net command line (run in the tap's namespace).
    pub(crate) fn backend_argv(work: &Path) -> io::Result<Vec<String>> {
        let net = harness::try_binary("ringvm-net")?;
        Ok(vec![
            net.to_string_lossy().into_owned(),
            "--tap".into(),
            netns::TAP.into(),
            "--socket".into(),
            work.join(NET_SOCKET).to_string_lossy().into_owned(),
        ])
    }

    /// The iperf3 server's command line: one test, on the tap's address,
    /// its output flushed as it goes (a server killed for want of a client
    /// still shows that it listened).
    pub(crate) fn iperf3_server_argv() -> Vec<String> {
        vec![
            "iperf3".into(),
            "-s".into(),
            "-1".into(),
            "--forceflush".into(),
            "-B".into(),
            netns::HOST_IP.to_string(),
        ]
    }
}

/// ringvm-net and the iperf3 server after the run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetReport {
    /// ringvm-net's exit status (`None`: it did not exit in time and was
    /// killed, or never ran) and its log (stderr, with its counters).
    pub backend_status: Option<i32>,
    pub backend_log: String,
    /// The iperf3 server's status (`None`: still waiting for a client at the
    /// end, or not run) and its output.
    pub iperf3_status: Option<i32>,
    pub iperf3_log: String,
}

/// One guest boot.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub vmm: L2Vmm,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Shell command the guest runs (with busybox sh).
    pub command: String,
    pub end: EndAction,
    /// Kernel command line words added after [`BASE_CMDLINE`].
    pub extra_cmdline: String,
    /// More arguments for the VMM.
    pub vmm_args: Vec<String>,
    /// A disk served by ringvm-blk next to the VMM (ringvm only).
    pub disk: Option<DiskSpec>,
    /// A NIC served by ringvm-net on a tap (ringvm only).
    pub net: Option<NetSpec>,
    /// Bound of the VMM run; `None` for the mode's default.
    pub timeout: Option<Duration>,
}

impl RunSpec {
    /// ringvm, 2 vCPUs, 512 MiB, power off after `command`.
    pub fn new(command: &str) -> Self {
        RunSpec {
            vmm: L2Vmm::Ringvm,
            cpus: 2,
            memory_mib: 512,
            command: command.to_owned(),
            end: EndAction::PowerOff,
            extra_cmdline: String::new(),
            vmm_args: Vec::new(),
            disk: None,
            net: None,
            timeout: None,
        }
    }

    /// The guest kernel's command line.
    pub fn cmdline(&self) -> io::Result<String> {
        let mut words = vec![BASE_CMDLINE.to_owned()];
        if !self.extra_cmdline.trim().is_empty() {
            words.push(self.extra_cmdline.trim().to_owned());
        }
        words.push(format!("ringvm.cmd={}", base64(self.command.as_bytes())));
        words.push(format!("ringvm.end={}", self.end.cmdline_value()));
        let cmdline = words.join(" ");
        if cmdline.len() >= CMDLINE_MAX_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the kernel command line would be {} bytes, over Linux's {} \
                     (the command is base64-encoded into it; shorten it)",
                    cmdline.len(),
                    CMDLINE_MAX_BYTES - 1
                ),
            ));
        }
        Ok(cmdline)
    }
}

/// Standard base64 with padding, as busybox `base64 -d` reads it.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What one guest boot produced. Times are from the VMM's start.
#[derive(Clone, Debug)]
pub struct LinuxRun {
    pub mode: HostMode,
    pub vmm: L2Vmm,
    /// The VMM's command line (in emulated mode, as run inside L1).
    pub vmm_command: String,
    /// How the VMM ended; `None` when it never ran or L1 died around it. In
    /// emulated mode this comes from L1's shell: a status above 128 is
    /// reported as death by signal.
    pub vmm_status: Option<ExitOutcome>,
    /// The VMM's stdout: the guest's serial console.
    pub l2_console: String,
    pub vmm_stderr: String,
    /// Until the guest's /init printed [`INIT_MARKER`].
    pub to_init: Option<Duration>,
    /// Until the VMM exited.
    pub to_exit: Option<Duration>,
    /// The emulated host's side of the run.
    pub l1: Option<L1Report>,
    /// ringvm-blk's exit status and log, when the run had a disk.
    pub backend_status: Option<i32>,
    pub backend_log: String,
    /// The disk image after ringvm-blk exited, when the run had a disk.
    pub disk: Option<DiskReport>,
    /// ringvm-net and the iperf3 server, when the run had a NIC.
    pub net: Option<NetReport>,
    /// The whole run as this process saw it (including L1).
    pub wall: Duration,
}

/// The emulated host: its QEMU, its console and its times.
#[derive(Clone, Debug)]
pub struct L1Report {
    pub qemu_command: String,
    pub qemu_status: ExitOutcome,
    /// L1's console without the lines of the VMM's output.
    pub console: String,
    pub qemu_stderr: String,
    /// From QEMU's start to L1's /init (host wall clock).
    pub to_init: Option<Duration>,
    /// L1 uptime when the modules were loaded and file systems mounted.
    pub ready_uptime: Option<Duration>,
    /// L1 uptime when the VMM started.
    pub vmm_start_uptime: Option<Duration>,
    /// Errors L1's init reported (`RINGVM-L1: error: ...`).
    pub errors: Vec<String>,
}

impl LinuxRun {
    /// The guest console's lines, without the serial line endings (`\r`).
    pub fn console_lines(&self) -> impl Iterator<Item = &str> {
        self.l2_console
            .lines()
            .map(|line| line.trim_end_matches('\r'))
    }

    /// Whether the guest's /init started.
    pub fn init_seen(&self) -> bool {
        self.console_lines().any(|line| line == INIT_MARKER)
    }

    /// The lines the command printed: after [`OUTPUT_MARKER`], up to the
    /// result line (or the end of the console when there is none). `None`
    /// when the command never started.
    pub fn output_lines(&self) -> Option<Vec<&str>> {
        let mut lines = self
            .console_lines()
            .skip_while(|line| *line != OUTPUT_MARKER);
        lines.next()?;
        Some(
            lines
                .take_while(|line| !line.starts_with(RESULT_PREFIX))
                .collect(),
        )
    }

    /// The command's exit status from `RINGVM-RESULT: status=<N>`.
    pub fn result_status(&self) -> Option<i32> {
        self.console_lines()
            .find_map(|line| line.strip_prefix(RESULT_PREFIX))
            .and_then(|status| status.trim().parse().ok())
    }

    /// Whether the VMM exited (not killed, not timed out) with `code`.
    pub fn vmm_exited_with(&self, code: i32) -> bool {
        self.vmm_status == Some(ExitOutcome::Exited(code))
    }

    /// One line of timings for reports.
    pub fn timings(&self) -> String {
        let secs = |d: Option<Duration>| {
            d.map_or_else(|| "-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
        };
        let mut line = format!(
            "{} ({} host): to /init {}, to exit {}",
            self.vmm,
            self.mode,
            secs(self.to_init),
            secs(self.to_exit)
        );
        if let Some(l1) = &self.l1 {
            line.push_str(&format!(
                "; L1: QEMU start to L1 /init {}, L1 ready at uptime {}, VMM started at uptime {}",
                secs(l1.to_init),
                secs(l1.ready_uptime),
                secs(l1.vmm_start_uptime)
            ));
        }
        line.push_str(&format!("; whole run {:.2} s", self.wall.as_secs_f64()));
        line
    }
}

/// Everything, for assertion messages.
impl fmt::Display for LinuxRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self
            .vmm_status
            .map_or_else(|| "did not report an exit".to_owned(), |s| s.to_string());
        writeln!(f, "{} {status}", self.vmm)?;
        writeln!(f, "{}", self.timings())?;
        writeln!(f, "command: {}", self.vmm_command)?;
        let mut section = |name: &str, text: &str| -> fmt::Result {
            writeln!(f, "--- {name} ({} bytes) ---", text.len())?;
            for line in text.lines() {
                writeln!(f, "{}", line.trim_end_matches('\r'))?;
            }
            Ok(())
        };
        section("guest console (L2, the VMM's stdout)", &self.l2_console)?;
        section("VMM stderr", &self.vmm_stderr)?;
        if self.backend_status.is_some() || !self.backend_log.is_empty() {
            section(
                &format!("ringvm-blk (exit {:?})", self.backend_status),
                &self.backend_log,
            )?;
        }
        if let Some(disk) = &self.disk {
            section(
                &format!(
                    "disk image after ringvm-blk: {:?} bytes allocated, qemu-img check \
                     status {:?}",
                    disk.allocated_bytes, disk.check_status
                ),
                &disk.check_output,
            )?;
        }
        if let Some(net) = &self.net {
            section(
                &format!("ringvm-net (exit {:?})", net.backend_status),
                &net.backend_log,
            )?;
            section(
                &format!("iperf3 server on the tap (exit {:?})", net.iperf3_status),
                &net.iperf3_log,
            )?;
        }
        if let Some(l1) = &self.l1 {
            section(
                &format!("L1 console (QEMU {})", l1.qemu_status),
                &l1.console,
            )?;
            section("L1 QEMU stderr", &l1.qemu_stderr)?;
            writeln!(f, "L1 QEMU: {}", l1.qemu_command)?;
        }
        write!(f, "--- end ---")
    }
}

/// A prepared place to boot the stock kernel: the kernel, the host mode and
/// the initramfs files it needs.
#[derive(Debug)]
pub struct LinuxHost {
    pub guest: LinuxGuest,
    pub choice: HostChoice,
    pub l2_initramfs: Initramfs,
    /// The emulated host's initramfs (emulated mode only).
    pub l1_initramfs: Option<Initramfs>,
    /// QEMU, when installed (needed for emulated mode and for [`L2Vmm::Qemu`]).
    pub qemu: Option<PathBuf>,
}

impl LinuxHost {
    /// Finds the kernel and the packages, chooses the host mode
    /// ([`HostMode::choose`]) and builds (or finds cached) the initramfs
    /// files.
    pub fn prepare() -> Result<LinuxHost, LinuxSetupError> {
        let choice = HostMode::choose().map_err(LinuxSetupError::BadHostMode)?;
        Self::prepare_with(choice)
    }

    /// [`LinuxHost::prepare`] in a given mode.
    pub fn prepare_with(choice: HostChoice) -> Result<LinuxHost, LinuxSetupError> {
        let guest = LinuxGuest::discover()?;
        let qemu = harness::qemu_path();
        if choice.mode == HostMode::Emulated && qemu.is_none() {
            return Err(LinuxSetupError::Missing(
                "the emulated KVM host needs qemu-system-x86_64 (install qemu-system-x86)"
                    .to_owned(),
            ));
        }
        let busybox = find_program("busybox", "busybox-static")?;
        let programs = GUEST_PROGRAMS
            .iter()
            .map(|name| find_program(name, name))
            .collect::<Result<Vec<_>, _>>()?;
        let cache = cache_dir();
        fs::create_dir_all(&cache).map_err(|source| LinuxSetupError::Cache {
            path: cache.clone(),
            source,
        })?;
        let build = |which: &'static str, spec: &InitramfsSpec<'_>| {
            Initramfs::build(spec, &guest.modules, &guest.version, &cache)
                .map_err(|source| LinuxSetupError::Initramfs { which, source })
        };
        let l2_initramfs = build(
            "guest",
            &InitramfsSpec {
                name: "l2",
                init_script: include_str!("l2_init.sh"),
                busybox: &busybox,
                programs: &programs,
                modules: GUEST_MODULES,
            },
        )?;
        let l1_initramfs = match choice.mode {
            HostMode::Direct => None,
            HostMode::Emulated => Some(build(
                "emulated host",
                &InitramfsSpec {
                    name: "l1",
                    init_script: include_str!("l1_init.sh"),
                    busybox: &busybox,
                    programs: &[],
                    modules: L1_MODULES,
                },
            )?),
        };
        Ok(LinuxHost {
            guest,
            choice,
            l2_initramfs,
            l1_initramfs,
            qemu,
        })
    }

    pub fn mode(&self) -> HostMode {
        self.choice.mode
    }

    /// The VMM bound [`RunSpec::timeout`] `None` stands for.
    pub fn default_timeout(&self) -> Duration {
        match self.mode() {
            HostMode::Direct => DEFAULT_TIMEOUT_DIRECT,
            HostMode::Emulated => DEFAULT_TIMEOUT_EMULATED,
        }
    }

    /// Boots the guest as `spec` says and waits (bounded) for the VMM to end.
    /// Errors are the harness's own (spawning, a too-long command line);
    /// whatever the guest or the VMM did is in the [`LinuxRun`].
    pub fn run(&self, spec: &RunSpec) -> io::Result<LinuxRun> {
        let timeout = spec.timeout.unwrap_or_else(|| self.default_timeout());
        let run_dir = tempfile::Builder::new().prefix("ringvm-linux-").tempdir()?;
        let work = run_dir.path().join("work");
        fs::create_dir(&work)?;
        let mut vmm_argv = self.vmm_argv(spec)?;
        if let Some(disk) = spec.disk {
            if spec.vmm != L2Vmm::Ringvm {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "RunSpec::disk needs ringvm as the VMM",
                ));
            }
            vmm_argv.push("--disk".into());
            vmm_argv.push(format!(
                "socket={},num_queues={}",
                work.join(DISK_SOCKET).display(),
                disk.queues
            ));
        }
        if let Some(net) = spec.net {
            if spec.vmm != L2Vmm::Ringvm {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "RunSpec::net needs ringvm as the VMM",
                ));
            }
            vmm_argv.push("--net".into());
            vmm_argv.push(format!(
                "socket={},mac={}",
                work.join(NET_SOCKET).display(),
                net.mac_text()
            ));
        }
        match self.mode() {
            HostMode::Direct => self.run_direct(spec, &vmm_argv, &work, timeout),
            HostMode::Emulated => {
                emulated::run(self, spec, &vmm_argv, run_dir.path(), &work, timeout)
            }
        }
    }

    /// The ringvm-blk command line for `disk` in `work`.
    fn backend_argv(disk: DiskSpec, work: &Path) -> io::Result<Vec<String>> {
        let blk = harness::try_binary("ringvm-blk")?;
        Ok(vec![
            blk.to_string_lossy().into_owned(),
            "--image".into(),
            work.join(disk.image_name()).to_string_lossy().into_owned(),
            "--socket".into(),
            work.join(DISK_SOCKET).to_string_lossy().into_owned(),
            "--queues".into(),
            disk.queues.to_string(),
        ])
    }

    /// Program and arguments of the L2 VMM.
    fn vmm_argv(&self, spec: &RunSpec) -> io::Result<Vec<String>> {
        let cmdline = spec.cmdline()?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let kernel = path(&self.guest.kernel);
        let initramfs = path(&self.l2_initramfs.path);
        let mut argv = match spec.vmm {
            L2Vmm::Ringvm => {
                let ringvm = harness::try_binary("ringvm")?;
                vec![
                    path(&ringvm),
                    "--kernel".into(),
                    kernel,
                    "--initramfs".into(),
                    initramfs,
                    "--cmdline".into(),
                    cmdline,
                    "--cpus".into(),
                    spec.cpus.to_string(),
                    "--memory".into(),
                    format!("{}M", spec.memory_mib),
                    "--serial".into(),
                    "stdio".into(),
                ]
            }
            L2Vmm::Qemu => {
                let qemu = self.qemu.as_ref().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "qemu-system-x86_64 is not installed",
                    )
                })?;
                vec![
                    path(qemu),
                    "-accel".into(),
                    "kvm".into(),
                    "-cpu".into(),
                    "host".into(),
                    "-smp".into(),
                    spec.cpus.to_string(),
                    "-m".into(),
                    spec.memory_mib.to_string(),
                    "-nodefaults".into(),
                    "-display".into(),
                    "none".into(),
                    "-serial".into(),
                    "stdio".into(),
                    "-no-reboot".into(),
                    "-kernel".into(),
                    kernel,
                    "-initrd".into(),
                    initramfs,
                    "-append".into(),
                    cmdline,
                ]
            }
        };
        argv.extend(spec.vmm_args.iter().cloned());
        Ok(argv)
    }

    fn run_direct(
        &self,
        spec: &RunSpec,
        vmm_argv: &[String],
        work: &Path,
        timeout: Duration,
    ) -> io::Result<LinuxRun> {
        let started = Instant::now();
        let mut backend = match spec.disk {
            Some(disk) => {
                run_to_success(&disk.create_argv(work))?;
                let argv = Self::backend_argv(disk, work)?;
                let child = Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(fs::File::create(work.join("backend.log"))?)
                    .spawn()?;
                wait_for_socket(&work.join(DISK_SOCKET));
                Some(child)
            }
            None => None,
        };
        let mut net = match spec.net {
            Some(net) => Some(DirectNet::start(net, work)?),
            None => None,
        };
        let mut cmd = Command::new(&vmm_argv[0]);
        cmd.args(&vmm_argv[1..]);
        let out = run_bounded(cmd, timeout, Some(INIT_MARKER));
        let backend_status = backend
            .as_mut()
            .and_then(|b| exit_within(b, BACKEND_SOCKET_WAIT));
        let backend_log = fs::read_to_string(work.join("backend.log")).unwrap_or_default();
        let disk = spec.disk.map(|disk| disk_report(&disk, work));
        let net = net.as_mut().map(|net| net.finish(work));
        let out = out?;
        Ok(LinuxRun {
            mode: HostMode::Direct,
            vmm: spec.vmm,
            vmm_command: shell_words(vmm_argv),
            vmm_status: Some(out.status),
            l2_console: out.stdout,
            vmm_stderr: out.stderr,
            to_init: out.first_match,
            to_exit: Some(out.elapsed),
            l1: None,
            backend_status,
            backend_log,
            disk,
            net,
            wall: started.elapsed(),
        })
    }
}

/// How long the iperf3 server may take to end after the VMM did (it ends
/// after its one test; without a client it is killed then).
const IPERF3_SERVER_GRACE: Duration = Duration::from_secs(5);
/// Logs of [`DirectNet`] in the run's work directory.
const NET_BACKEND_LOG: &str = "net-backend.log";
const IPERF3_LOG: &str = "iperf3.log";

/// Direct mode's NIC ([`NetSpec`]): a network namespace of the run's own
/// with the tap, ringvm-net and the iperf3 server in it (the host's own
/// interfaces are never touched). What still runs when it drops is killed;
/// then the namespace and its tap are deleted.
struct DirectNet {
    backend: Option<Child>,
    iperf3: Option<Child>,
    ns: netns::Netns,
}

impl DirectNet {
    fn start(spec: NetSpec, work: &Path) -> io::Result<DirectNet> {
        let ns = netns::Netns::create("linux", true)?;
        let mut net = DirectNet {
            backend: None,
            iperf3: None,
            ns,
        };
        if spec.iperf3_server {
            let argv = NetSpec::iperf3_server_argv();
            net.iperf3 = Some(net.spawn(&argv, &work.join(IPERF3_LOG))?);
        }
        let argv = NetSpec::backend_argv(work)?;
        net.backend = Some(net.spawn(&argv, &work.join(NET_BACKEND_LOG))?);
        wait_for_socket(&work.join(NET_SOCKET));
        Ok(net)
    }

    /// `argv` in the namespace, stdout and stderr to `log`.
    fn spawn(&self, argv: &[String], log: &Path) -> io::Result<Child> {
        let log = fs::File::create(log)?;
        Command::new("ip")
            .args(["netns", "exec", &self.ns.0])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
    }

    /// After the VMM ended: ringvm-net's and the server's ends and logs.
    fn finish(&mut self, work: &Path) -> NetReport {
        let backend_status = self
            .backend
            .as_mut()
            .and_then(|b| exit_within(b, BACKEND_SOCKET_WAIT));
        let iperf3_status = self
            .iperf3
            .as_mut()
            .and_then(|s| exit_within(s, IPERF3_SERVER_GRACE));
        NetReport {
            backend_status,
            backend_log: fs::read_to_string(work.join(NET_BACKEND_LOG)).unwrap_or_default(),
            iperf3_status,
            iperf3_log: if self.iperf3.is_some() {
                fs::read_to_string(work.join(IPERF3_LOG)).unwrap_or_default()
            } else {
                String::new()
            },
        }
    }
}

impl Drop for DirectNet {
    fn drop(&mut self) {
        for child in [self.backend.as_mut(), self.iperf3.as_mut()]
            .into_iter()
            .flatten()
        {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Waits (at most [`BACKEND_SOCKET_WAIT`]) for a backend to create its
/// socket; a backend that does not is seen in its log and the VMM's error.
fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + BACKEND_SOCKET_WAIT;
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The child's exit code if it exits within `timeout`; else it is killed
/// and the answer is `None` (as for a death by signal).
fn exit_within(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Runs `argv` (bounded) and fails unless it exits 0.
fn run_to_success(argv: &[String]) -> io::Result<()> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let out = run_bounded(cmd, DISK_TOOL_TIMEOUT, None)?;
    if out.status == ExitOutcome::Exited(0) {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`{}` {}: {}{}",
            shell_words(argv),
            out.status,
            out.stdout,
            out.stderr
        )))
    }
}

/// The image after ringvm-blk exited (direct mode): its allocated bytes and,
/// for qcow2, `qemu-img check`.
fn disk_report(disk: &DiskSpec, work: &Path) -> DiskReport {
    use std::os::unix::fs::MetadataExt;
    let allocated_bytes = fs::metadata(work.join(disk.image_name()))
        .ok()
        .map(|meta| meta.blocks() * 512);
    let (check_status, check_output) = match disk.check_argv(work) {
        Some(argv) => {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            match run_bounded(cmd, DISK_TOOL_TIMEOUT, None) {
                Ok(out) => (
                    match out.status {
                        ExitOutcome::Exited(code) => Some(code),
                        _ => None,
                    },
                    format!("{}{}", out.stdout, out.stderr),
                ),
                Err(err) => (None, format!("running {}: {err}", shell_words(&argv))),
            }
        }
        None => (None, String::new()),
    };
    DiskReport {
        allocated_bytes,
        check_status,
        check_output,
    }
}

/// `name` on PATH or in /bin, /usr/bin, /sbin.
fn find_program(name: &str, package: &str) -> Result<PathBuf, LinuxSetupError> {
    let fixed = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name));
    harness::find_on_path(name)
        .into_iter()
        .chain(fixed)
        .find(|path| path.is_file())
        .ok_or_else(|| {
            LinuxSetupError::Missing(format!("{name} is not installed (package {package})"))
        })
}

/// Where built initramfs files are kept: `$RINGVM_LINUX_CACHE`, else
/// `ringvm-linux/` in the cargo profile directory this crate was built in
/// (`target/debug`), else in the system temp directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV) {
        return PathBuf::from(dir);
    }
    // OUT_DIR is <target>/<profile>/build/ringvm-tests-<hash>/out.
    let profile_dir = Path::new(env!("OUT_DIR")).ancestors().nth(3);
    match profile_dir {
        Some(dir) if dir.is_dir() => dir.join("ringvm-linux"),
        _ => std::env::temp_dir().join("ringvm-linux"),
    }
}

/// `argv` as a POSIX shell command line.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| shell_quote(arg))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `arg` quoted for a POSIX shell: as is when that is safe, else in single
/// quotes.
fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_reference_vectors() {
        // RFC 4648, section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn cmdline_carries_the_command_in_one_word() {
        let mut spec = RunSpec::new("echo 'a b'; uname -r");
        spec.end = EndAction::Reboot;
        spec.extra_cmdline = " panic=-1 ".to_owned();
        assert_eq!(
            spec.cmdline().unwrap(),
            "console=ttyS0 quiet panic=-1 ringvm.cmd=ZWNobyAnYSBiJzsgdW5hbWUgLXI= ringvm.end=reboot"
        );
        spec.command = "x".repeat(2000);
        let err = spec.cmdline().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("over Linux's 2047"), "{err}");
    }

    #[test]
    fn versions_compare_by_number() {
        let mut versions = vec![
            "6.1.0-9-amd64",
            "6.1.0-56-amd64",
            "6.10.0-1-amd64",
            "5.10.0-30-amd64",
        ];
        versions.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(
            versions,
            [
                "5.10.0-30-amd64",
                "6.1.0-9-amd64",
                "6.1.0-56-amd64",
                "6.10.0-1-amd64"
            ]
        );
    }

    #[test]
    fn discover_picks_the_newest_kernel_with_modules() {
        let root = tempfile::tempdir().unwrap();
        let boot = root.path().join("boot");
        let lib = root.path().join("modules");
        fs::create_dir_all(&boot).unwrap();
        for version in ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.2.0-1-amd64"] {
            fs::write(boot.join(format!("vmlinuz-{version}")), b"bzImage").unwrap();
        }
        for version in ["6.1.0-9-amd64", "6.1.0-56-amd64"] {
            fs::create_dir_all(lib.join(version)).unwrap();
            fs::write(lib.join(version).join("modules.dep"), "kernel/a.ko:\n").unwrap();
        }
        let guest = LinuxGuest::discover_in(&boot, &lib).unwrap();
        assert_eq!(guest.version, "6.1.0-56-amd64");
        assert_eq!(guest.kernel, boot.join("vmlinuz-6.1.0-56-amd64"));

        let empty = root.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let err = LinuxGuest::discover_in(&empty, &lib).unwrap_err();
        assert!(
            err.to_string().contains("install linux-image-amd64"),
            "{err}"
        );
    }

    fn run_with_console(console: &str) -> LinuxRun {
        LinuxRun {
            mode: HostMode::Direct,
            vmm: L2Vmm::Ringvm,
            vmm_command: "ringvm".to_owned(),
            vmm_status: Some(ExitOutcome::Exited(0)),
            l2_console: console.to_owned(),
            vmm_stderr: String::new(),
            to_init: None,
            to_exit: None,
            l1: None,
            backend_status: None,
            backend_log: String::new(),
            disk: None,
            net: None,
            wall: Duration::ZERO,
        }
    }

    #[test]
    fn console_gives_output_and_result() {
        let run = run_with_console(
            "[    0.0] Linux version\r\nRINGVM-INIT\r\nRINGVM-OUTPUT-BEGIN\r\n6.1.0-56-amd64\r\n2\r\nRINGVM-RESULT: status=3\r\n[ 1.0] reboot: Power down\r\n",
        );
        assert!(run.init_seen());
        assert_eq!(run.output_lines(), Some(vec!["6.1.0-56-amd64", "2"]));
        assert_eq!(run.result_status(), Some(3));
        let panicked = run_with_console("Kernel panic - not syncing: VFS\r\n");
        assert!(!panicked.init_seen());
        assert_eq!(panicked.output_lines(), None);
        assert_eq!(panicked.result_status(), None);
    }

    #[test]
    fn shell_quote_leaves_plain_words_alone() {
        assert_eq!(shell_quote("/usr/bin/ringvm"), "/usr/bin/ringvm");
        assert_eq!(shell_quote("512M"), "512M");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
