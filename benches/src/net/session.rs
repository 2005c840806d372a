//! One VMM session: ringvm + ringvm-net, or QEMU, boots the test guest once
//! with `job=net-bench runs=...` (every case), and this side plays the host
//! of each run as the guest's console announces it.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::console::{self, Console, ConsoleError, DeviceLine, GuestResult};
use super::frames::{self, GUEST_MAC, GUEST_PORT};
use super::netns::{self, TapCounters, TapStats};
use super::packet::{self, PacketSocket, SenderTotals};
use super::report::{self, Measurement, Slot, VmmSummary};
use super::{Case, Dir, NetOptions, Size, TAP_MQ, TAP_SQ};
use crate::blk::report::ProcessCost;
use crate::process::Process;

/// Guest RAM: 256 transmit buffers of 64 KiB (TSO) and the rest fit many
/// times over.
pub const GUEST_MEMORY: &str = "512M";
/// From spawning ringvm-net to its socket appearing.
const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(10);
/// From ringvm's exit to ringvm-net's.
const BACKEND_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// From spawning the VMM to the guest's device line: ringvm boots in well
/// under a second; QEMU runs its firmware at emulated CPL0 first (about 20 s
/// on PVM, DESIGN.md), slower on a loaded machine.
const RINGVM_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const QEMU_BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// The guest's wait for a go datagram or the first frame of a run (its
/// `wait=`), and the host's for a ready line after the previous run.
const GUEST_WAIT: Duration = Duration::from_secs(30);
/// Beyond a run's time, for its result line: the guest's wait, and margin.
const RESULT_MARGIN: Duration = Duration::from_secs(60);
/// From the last result to the VMM's exit.
const VMM_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's exit status when the guest exits 0 (isa-debug-exit: (0 << 1) | 1).
const QEMU_EXIT_FOR_GUEST_SUCCESS: i32 = 1;
/// After a tx run, how long the frames the guest sent may take to reach the
/// tap (its transmit ring, 256 frames, is drained by a backend that may not
/// have run for a while on a loaded machine), and how often to look.
const TX_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const TX_DRAIN_POLL: Duration = Duration::from_millis(1);
/// The go datagram that starts a tx run, and the last one.
const GO_FRAME: Size = Size::Min64;

/// Which VMM runs the guest.
#[derive(Clone, Copy, Debug)]
pub enum Vmm<'a> {
    Ringvm,
    Qemu { path: &'a Path, vhost: bool },
}

impl Vmm<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            Vmm::Ringvm => "ringvm",
            Vmm::Qemu { vhost: false, .. } => "qemu",
            Vmm::Qemu { vhost: true, .. } => "qemu-vhost",
        }
    }

    fn tap(&self) -> &'static str {
        match self {
            Vmm::Ringvm => TAP_MQ,
            Vmm::Qemu { .. } => TAP_SQ,
        }
    }

    fn tap_mac(&self) -> [u8; 6] {
        match self {
            Vmm::Ringvm => frames::TAP_MQ_MAC,
            Vmm::Qemu { .. } => frames::TAP_SQ_MAC,
        }
    }

    fn boot_timeout(&self) -> Duration {
        match self {
            Vmm::Ringvm => RINGVM_BOOT_TIMEOUT,
            Vmm::Qemu { .. } => QEMU_BOOT_TIMEOUT,
        }
    }

    fn expected_exit(&self) -> i32 {
        match self {
            Vmm::Ringvm => 0,
            Vmm::Qemu { .. } => QEMU_EXIT_FOR_GUEST_SUCCESS,
        }
    }
}

/// What every session shares.
pub struct Context<'a> {
    pub options: &'a NetOptions,
    pub guest: &'a Path,
    pub dir: &'a Path,
}

/// The guest's command line: every case as one run of `job=net-bench`.
pub fn guest_cmdline(cases: &[Case], runtime_s: u32) -> String {
    let runs: Vec<String> = cases.iter().map(Case::guest_run).collect();
    let peer = frames::peer();
    format!(
        "job=net-bench ip={}/24 peer={}:{} peer_mac={} start=datagram runs={} time={runtime_s} \
         wait={} port={GUEST_PORT}",
        dotted(frames::GUEST_IP),
        dotted(peer.ip),
        peer.port,
        netns::format_mac(peer.mac),
        runs.join(","),
        GUEST_WAIT.as_secs()
    )
}

fn dotted(ip: [u8; 4]) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(ip)
}

pub fn ringvm_net_command(ringvm_net: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(ringvm_net);
    cmd.args(["--tap", TAP_MQ, "--socket"]).arg(socket);
    // The counters line at exit is logged at info.
    cmd.env("RUST_LOG", "info");
    cmd
}

pub fn ringvm_command(ringvm: &Path, guest: &Path, socket: &Path, cmdline: &str) -> Command {
    let mut cmd = Command::new(ringvm);
    cmd.arg("--kernel")
        .arg(guest)
        .args(["--memory", GUEST_MEMORY, "--cpus", "1", "--net"])
        .arg(format!(
            "socket={},mac={}",
            socket.display(),
            netns::format_mac(GUEST_MAC)
        ))
        .args(["--serial", "stdio", "--cmdline", cmdline]);
    cmd
}

/// QEMU with its own virtio-net on the single-queue tap; `vhost` moves its
/// data path into the kernel's vhost-net.
pub fn qemu_command(qemu: &Path, guest: &Path, cmdline: &str, vhost: bool) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "kvm", "-M", "pc", "-m", GUEST_MEMORY, "-smp", "1"])
        // Thread names (`CPU 0/KVM`), to tell the vCPU's CPU time apart.
        .args(["-name", "ringvm-bench,debug-threads=on"])
        .args(["-nographic", "-nodefaults", "-serial", "stdio", "-kernel"])
        .arg(guest)
        .args(["-append", cmdline])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-netdev")
        .arg(format!(
            "tap,id=n0,ifname={TAP_SQ},script=no,downscript=no,vhost={}",
            if vhost { "on" } else { "off" }
        ))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,disable-legacy=on,mac={}",
            netns::format_mac(GUEST_MAC)
        ));
    cmd
}

/// CPU time of a process so far, and of its vCPU threads.
#[derive(Clone, Copy, Debug, Default)]
struct CpuSample {
    total_s: f64,
    vcpu_s: f64,
}

/// Reads `/proc/PID/stat` (the whole process, exited threads included) and
/// its threads' (`vcpuN` in ringvm, `CPU N/KVM` in QEMU).
fn cpu_sample(pid: libc::pid_t) -> Option<CpuSample> {
    // SAFETY: sysconf(3) takes a name and returns a value; no memory.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (_, total) = parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let mut vcpu = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(text) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, ticks)) = parse_stat(&text) {
            if is_vcpu_thread(&comm) {
                vcpu += ticks;
            }
        }
    }
    Some(CpuSample {
        total_s: total as f64 / ticks,
        vcpu_s: vcpu as f64 / ticks,
    })
}

/// `(comm, utime + stime)` of a `/proc/.../stat` line: `pid (comm) state
/// ppid ...`, utime and stime the 14th and 15th fields; comm may hold
/// spaces and parentheses, so the fields are counted from its last `)`.
fn parse_stat(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state).
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn is_vcpu_thread(comm: &str) -> bool {
    comm.starts_with("vcpu") || (comm.starts_with("CPU ") && comm.ends_with("/KVM"))
}

/// The processes of a session whose CPU time a run measures.
struct Watched {
    names: Vec<&'static str>,
    pids: Vec<libc::pid_t>,
}

impl Watched {
    fn sample(&self) -> Vec<CpuSample> {
        self.pids
            .iter()
            .map(|&pid| cpu_sample(pid).unwrap_or_default())
            .collect()
    }

    /// CPU µs per packet of each process between `before` and `after`, the
    /// vCPU threads (all processes) as `vcpu`, and the rest of the
    /// processes (the device path: backend and VMM threads other than the
    /// vCPU's) as `device`.
    fn per_packet(
        &self,
        before: &[CpuSample],
        after: &[CpuSample],
        packets: u64,
    ) -> BTreeMap<String, f64> {
        let mut costs = BTreeMap::new();
        if packets == 0 {
            return costs;
        }
        let per = |seconds: f64| seconds * 1e6 / packets as f64;
        let (mut all, mut vcpu) = (0.0, 0.0);
        for ((name, b), a) in self.names.iter().zip(before).zip(after) {
            let total = (a.total_s - b.total_s).max(0.0);
            all += total;
            vcpu += (a.vcpu_s - b.vcpu_s).max(0.0);
            costs.insert((*name).to_string(), per(total));
        }
        costs.insert("vcpu".to_string(), per(vcpu));
        costs.insert("device".to_string(), per((all - vcpu).max(0.0)));
        costs
    }
}

/// What a session produced: a measurement or failure per case, and its
/// processes.
pub struct Session {
    label: &'static str,
    results: Vec<Slot<Measurement>>,
    device: Option<DeviceLine>,
    processes: Vec<ProcessCost>,
    backend_counters: Option<BTreeMap<String, u64>>,
    error: Option<String>,
}

impl Session {
    pub fn case(&self, index: usize) -> Slot<Measurement> {
        self.results
            .get(index)
            .cloned()
            .unwrap_or_else(|| Slot::Failed("not run".to_string()))
    }

    pub fn summary(&self) -> VmmSummary {
        VmmSummary {
            label: self.label,
            ok: self.error.is_none(),
            error: self.error.clone(),
            device: self.device.clone(),
            processes: self.processes.clone(),
            backend_counters: self.backend_counters.clone(),
        }
    }
}

/// Boots the guest under `vmm` and runs every case.
pub fn run_vmm(context: &Context<'_>, vmm: Vmm<'_>) -> Session {
    let label = vmm.label();
    eprintln!(
        "net: {label}: booting the guest for {} runs",
        context.options.cases.len()
    );
    let mut session = Session {
        label,
        results: Vec::new(),
        device: None,
        processes: Vec::new(),
        backend_counters: None,
        error: None,
    };
    let cmdline = guest_cmdline(&context.options.cases, context.options.runtime_s);
    let socket = context.dir.join("ringvm-net.sock");
    let backend = match vmm {
        Vmm::Ringvm => match start_backend(context, &socket) {
            Ok(backend) => Some(backend),
            Err(why) => {
                session.fail_all(context, why);
                return session;
            }
        },
        Vmm::Qemu { .. } => None,
    };
    let vmm_cmd = match vmm {
        Vmm::Ringvm => ringvm_command(&context.options.ringvm, context.guest, &socket, &cmdline),
        Vmm::Qemu { path, vhost } => qemu_command(path, context.guest, &cmdline, vhost),
    };
    let vmm_process = match Process::spawn(label, vmm_cmd, context.dir) {
        Ok(process) => process,
        Err(err) => {
            session.fail_all(context, format!("could not start {label}: {err}"));
            if let Some(backend) = backend {
                let _ = backend.terminate(BACKEND_EXIT_TIMEOUT);
            }
            return session;
        }
    };
    let mut watched = Watched {
        names: vec![label],
        pids: vec![vmm_process.pid()],
    };
    if let Some(backend) = &backend {
        watched.names.push("ringvm-net");
        watched.pids.push(backend.pid());
    }
    let error = drive(context, &vmm, &vmm_process, &watched, &mut session).err();
    while session.results.len() < context.options.cases.len() {
        session
            .results
            .push(Slot::Failed("not run: an earlier run failed".to_string()));
    }
    // The guest exits after its last run; a failed session is ended here.
    let vmm_done = if error.is_some() {
        vmm_process.terminate(Duration::from_secs(5))
    } else {
        vmm_process.wait(VMM_EXIT_TIMEOUT)
    };
    let backend_done = backend.map(|b| b.wait(BACKEND_EXIT_TIMEOUT));
    let mut problems: Vec<String> = error.into_iter().collect();
    let mut transcripts = String::new();
    match vmm_done {
        Ok(done) => {
            if !done.exited_with(vmm.expected_exit()) {
                problems.push(format!(
                    "{label} {}, expected exit status {}",
                    done.status,
                    vmm.expected_exit()
                ));
            }
            session.processes.push(ProcessCost::of(&done, None));
            transcripts.push_str(&done.transcript());
        }
        Err(err) => problems.push(format!("reaping {label}: {err}")),
    }
    match backend_done {
        Some(Ok(done)) => {
            if !done.exited_with(0) {
                problems.push(format!(
                    "ringvm-net {}, expected exit status 0",
                    done.status
                ));
            }
            session.backend_counters = crate::blk::parse::backend_counters(&done.stderr);
            session.processes.push(ProcessCost::of(&done, None));
            transcripts.push_str(&done.transcript());
        }
        Some(Err(err)) => problems.push(format!("reaping ringvm-net: {err}")),
        None => {}
    }
    if !problems.is_empty() {
        let error = problems.join("; ");
        eprintln!("net: {label} FAILED: {error}");
        eprint!("{transcripts}");
        session.error = Some(error);
    }
    session
}

impl Session {
    fn fail_all(&mut self, context: &Context<'_>, why: String) {
        eprintln!("net: {} FAILED: {why}", self.label);
        self.results = context
            .options
            .cases
            .iter()
            .map(|_| Slot::Failed(why.clone()))
            .collect();
        self.error = Some(why);
    }
}

fn start_backend(context: &Context<'_>, socket: &Path) -> Result<Process, String> {
    let cmd = ringvm_net_command(&context.options.ringvm_net, socket);
    let backend = Process::spawn("ringvm-net", cmd, context.dir)
        .map_err(|err| format!("could not start ringvm-net: {err}"))?;
    match backend.wait_for_socket(socket, BACKEND_START_TIMEOUT) {
        Ok(true) => Ok(backend),
        Ok(false) => {
            let done = backend.terminate(BACKEND_EXIT_TIMEOUT);
            if let Ok(done) = &done {
                eprint!("{}", done.transcript());
            }
            Err(format!("ringvm-net did not listen on {}", socket.display()))
        }
        Err(err) => Err(format!("waiting for {}: {err}", socket.display())),
    }
}

/// Plays the host's side of every run, in order, as the console announces
/// them, into `session` (device line, one result per case). Stops at the
/// first failure, which it returns.
fn drive(
    context: &Context<'_>,
    vmm: &Vmm<'_>,
    process: &Process,
    watched: &Watched,
    session: &mut Session,
) -> Result<(), String> {
    let label = vmm.label();
    let stdout = context.dir.join(format!("{label}.stdout"));
    let mut console = Console::open(&stdout).map_err(|e| e.to_string())?;
    let device = console
        .wait_for(
            "its net-bench device line",
            vmm.boot_timeout(),
            process,
            console::parse_device,
        )
        .map_err(|e| e.to_string())?;
    eprintln!(
        "net: {label}: guest device {} offloads {}",
        device.mac,
        if device.offloads.is_empty() {
            "none"
        } else {
            &device.offloads
        }
    );
    session.device = Some(device);
    let tap = vmm.tap();
    let socket =
        PacketSocket::open(tap).map_err(|err| format!("AF_PACKET socket on {tap}: {err}"))?;
    let mut stats = TapStats::open(tap).map_err(|err| format!("the counters of {tap}: {err}"))?;
    let ledger =
        packet::Ledger::open(&mut stats).map_err(|err| format!("the counters of {tap}: {err}"))?;
    let mut host = Host {
        socket: &socket,
        stats,
        ledger,
        vmm,
        process,
        watched,
        runtime: Duration::from_secs(u64::from(context.options.runtime_s)),
    };
    for (index, case) in context.options.cases.iter().enumerate() {
        match host.run_case(&mut console, index, *case) {
            Ok(measurement) => {
                eprintln!("net: {label} {case}: {}", measurement.headline(case.size));
                session.results.push(Slot::Done(measurement));
            }
            Err(why) => {
                let why = format!("{case}: {why}");
                session.results.push(Slot::Failed(why.clone()));
                return Err(why);
            }
        }
    }
    // The guest waits for a last datagram before it exits, so that its vCPU
    // thread was still there for the last run's CPU reading.
    host.say_bye(&mut console)
}

/// The host's side of a session's runs.
struct Host<'a> {
    socket: &'a PacketSocket,
    stats: TapStats,
    /// Every frame this session sent into the tap.
    ledger: packet::Ledger,
    vmm: &'a Vmm<'a>,
    process: &'a Process,
    watched: &'a Watched,
    runtime: Duration,
}

impl Host<'_> {
    fn run_case(
        &mut self,
        console: &mut Console,
        index: usize,
        case: Case,
    ) -> Result<Measurement, String> {
        let ready = console
            .wait_for(
                &format!("`net-bench ready run={index}`"),
                GUEST_WAIT,
                self.process,
                |line| console::parse_ready(line).filter(|r| r.run == index),
            )
            .map_err(|e| e.to_string())?;
        if ready.dir != case.dir.name() {
            return Err(format!(
                "the guest's run {index} is dir={}, expected {}",
                ready.dir,
                case.dir.name()
            ));
        }
        let tap = self.vmm.tap();
        let cpu_before = self.watched.sample();
        let tap_before = self.read_tap()?;
        let (result, sender) = match case.dir {
            Dir::Tx => {
                self.send_go(ready.port)
                    .map_err(|e| format!("sending the go datagram: {e}"))?;
                (self.wait_result(console, index)?, None)
            }
            Dir::Rx => {
                let mut stream = frames::stream(
                    case.size,
                    frames::host(self.vmm.tap_mac()),
                    frames::guest(ready.port),
                );
                let stop = AtomicBool::new(false);
                let ledger = self.ledger;
                let (result, sender) = std::thread::scope(|scope| {
                    let sender = scope.spawn(|| {
                        packet::send_paced(self.socket, tap, stream.as_mut(), &stop, ledger)
                    });
                    let result = self.wait_result(console, index);
                    stop.store(true, Ordering::Relaxed);
                    (result, sender.join())
                });
                let sender = match sender {
                    Ok(Ok(totals)) => {
                        self.ledger.sent += totals.frames;
                        totals
                    }
                    Ok(Err(err)) => return Err(format!("the host's sender: {err}")),
                    Err(panic) => std::panic::resume_unwind(panic),
                };
                (result?, Some(sender))
            }
        };
        let mut tap_delta = self.read_tap()?.since(&tap_before);
        if case.dir == Dir::Tx {
            // The frames still in the guest's ring when it printed its
            // result (the backend may not have run since) are on their way.
            let deadline = Instant::now() + TX_DRAIN_TIMEOUT;
            while tap_delta.rx_packets < result.packets && Instant::now() < deadline {
                std::thread::sleep(TX_DRAIN_POLL);
                tap_delta = self.read_tap()?.since(&tap_before);
            }
        }
        let cpu_after = self.watched.sample();
        let wrong = mismatches(case, ready.port, &result);
        if !wrong.is_empty() {
            return Err(wrong.join("; "));
        }
        let mut measurement = measure(case, &result, &tap_delta, sender.as_ref());
        let packets = measurement.packets;
        measurement.cpu_us_per_packet = self.watched.per_packet(&cpu_before, &cpu_after, packets);
        if let Some(sender) = &sender {
            if packets > 0 {
                measurement.cpu_us_per_packet.insert(
                    "host_sender".to_string(),
                    sender.cpu_s * 1e6 / packets as f64,
                );
            }
        }
        Ok(measurement)
    }

    fn say_bye(&mut self, console: &mut Console) -> Result<(), String> {
        let port = console
            .wait_for(
                "`net-bench done`",
                GUEST_WAIT,
                self.process,
                console::parse_done,
            )
            .map_err(|e| e.to_string())?;
        self.send_go(port)
            .map_err(|e| format!("sending the last datagram: {e}"))
    }

    /// The datagram that starts a tx run (and ends the job).
    fn send_go(&mut self, port: u16) -> std::io::Result<()> {
        let (header, go) = frames::first_frame(
            GO_FRAME,
            frames::host(self.vmm.tap_mac()),
            frames::guest(port),
        );
        packet::send_one(self.socket, header, &go)?;
        self.ledger.sent += 1;
        Ok(())
    }

    fn read_tap(&mut self) -> Result<TapCounters, String> {
        let tap = self.vmm.tap();
        self.stats.read().map_err(|e| format!("tap {tap}: {e}"))
    }

    fn wait_result(&self, console: &mut Console, index: usize) -> Result<GuestResult, String> {
        console
            .wait_for(
                &format!("the result of run {index}"),
                self.runtime + GUEST_WAIT + RESULT_MARGIN,
                self.process,
                |line| match console::parse_result(line) {
                    Some(Ok(result)) if result.run != index => None,
                    other => other,
                },
            )
            .and_then(|parsed| parsed)
            .map_err(|e: ConsoleError| e.to_string())
    }
}

/// Where the guest's result says it ran something else than the case.
fn mismatches(case: Case, port: u16, result: &GuestResult) -> Vec<String> {
    let proto = match case.size {
        Size::Tso64k => "tcp",
        Size::Min64 | Size::Mtu1500 => "udp",
    };
    let size = match case.dir {
        Dir::Tx => Some(case.size.frame_bytes() as u64),
        Dir::Rx => None,
    };
    let checks = [
        ("dir", result.dir.clone(), case.dir.name().to_string()),
        ("port", result.port.to_string(), port.to_string()),
        ("size", or_null(result.size), or_null(size)),
        (
            "proto",
            or_null(result.proto.as_deref()),
            or_null((result.packets > 0).then_some(proto)),
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, got, wanted)| got != wanted)
        .map(|(what, got, wanted)| format!("the guest ran {what}={got}, expected {wanted}"))
        .collect()
}

fn or_null<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "null".to_string(), |v| v.to_string())
}

/// A run's measurement from what the guest and the tap counted.
pub fn measure(
    case: Case,
    guest: &GuestResult,
    tap: &TapCounters,
    sender: Option<&SenderTotals>,
) -> Measurement {
    let seconds = guest.seconds();
    let (packets, bytes, sent, drops) = match case.dir {
        // What arrived at the tap while the guest sent; the guest sent
        // nothing else (its peer's MAC is given, so no ARP).
        Dir::Tx => (
            tap.rx_packets,
            tap.rx_bytes,
            guest.packets,
            guest.packets.saturating_sub(tap.rx_packets),
        ),
        Dir::Rx => {
            let payload = case.size.frame_bytes() - super::netproto::TCP_FRAME_HEADER_BYTES;
            let lost = guest.lost.unwrap_or(0)
                + guest
                    .lost_bytes
                    .map_or(0, |bytes| bytes.div_ceil(payload as u64));
            (
                guest.packets,
                guest.bytes,
                sender.map_or(0, |s| s.frames),
                lost,
            )
        }
    };
    Measurement {
        seconds,
        packets,
        bytes,
        packets_per_sec: report::per_second(packets, seconds),
        bits_per_sec: report::per_second(bytes.saturating_mul(8), seconds),
        sent,
        drops,
        tap_dropped: match case.dir {
            Dir::Tx => tap.rx_dropped,
            Dir::Rx => tap.tx_dropped,
        },
        offloads: report::offloads_in_effect(case, guest.gso_frames, guest.csum_offloaded),
        gso_frames: guest.gso_frames,
        rx_bad_num_buffers: guest.rx_bad_num_buffers,
        tap: Some(*tap),
        sender: sender.copied(),
        cpu_us_per_packet: BTreeMap::new(),
        guest: Some(guest.raw.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringvm_tests::harness;

    #[test]
    fn guest_cmdline_runs_every_case_with_the_go_datagram() {
        let cmdline = guest_cmdline(&Case::all(), 3);
        assert_eq!(
            cmdline,
            "job=net-bench ip=10.77.0.2/24 peer=10.77.0.1:9999 peer_mac=02:72:76:62:00:fe \
             start=datagram runs=tx:60,rx,tx:1514,rx,tx:65535,rx time=3 wait=30 port=9000"
        );
    }

    #[test]
    fn commands() {
        let socket = Path::new("/d/ringvm-net.sock");
        let cmd = ringvm_command(Path::new("ringvm"), Path::new("/t/g.elf"), socket, "job=x");
        assert_eq!(
            harness::command_line(&cmd),
            "ringvm --kernel /t/g.elf --memory 512M --cpus 1 --net \
             socket=/d/ringvm-net.sock,mac=52:54:00:72:76:01 --serial stdio --cmdline job=x"
        );
        let cmd = ringvm_net_command(Path::new("ringvm-net"), socket);
        assert_eq!(
            harness::command_line(&cmd),
            "ringvm-net --tap rvbench-mq --socket /d/ringvm-net.sock"
        );
        let cmd = qemu_command(Path::new("qemu"), Path::new("/t/g.elf"), "job=x", false);
        let line = harness::command_line(&cmd);
        assert!(
            line.ends_with(
                "-netdev tap,id=n0,ifname=rvbench-sq,script=no,downscript=no,vhost=off \
                 -device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:72:76:01"
            ),
            "{line}"
        );
        assert!(
            line.starts_with(
                "qemu -accel kvm -M pc -m 512M -smp 1 -name ringvm-bench,debug-threads=on "
            ),
            "{line}"
        );
        let cmd = qemu_command(Path::new("qemu"), Path::new("/t/g.elf"), "job=x", true);
        assert!(harness::command_line(&cmd).contains(",vhost=on "));
    }

    #[test]
    fn proc_stat_lines() {
        let line = "4242 (CPU 0/KVM) R 1 4242 4242 0 -1 4194560 1 0 0 0 250 17 0 0 20 0 3 0 \
                    99 0 0 18446744073709551615";
        assert_eq!(parse_stat(line), Some(("CPU 0/KVM".to_string(), 267)));
        let odd = "7 (a) b (c)) S 1 1 1 0 -1 0 0 0 0 0 5 6 0 0";
        assert_eq!(parse_stat(odd), Some(("a) b (c)".to_string(), 11)));
        assert_eq!(parse_stat("7 (x) S 1"), None);
        assert!(is_vcpu_thread("vcpu0") && is_vcpu_thread("CPU 12/KVM"));
        assert!(!is_vcpu_thread("ringvm-net") && !is_vcpu_thread("qemu-system-x86"));
        // This process's own line parses.
        let own = cpu_sample(std::process::id() as libc::pid_t).unwrap();
        assert!(own.total_s >= 0.0 && own.vcpu_s == 0.0);
    }

    #[test]
    fn cpu_per_packet_splits_vcpu_and_device() {
        let watched = Watched {
            names: vec!["ringvm", "ringvm-net"],
            pids: vec![1, 2],
        };
        let before = [CpuSample::default(), CpuSample::default()];
        let after = [
            CpuSample {
                total_s: 3.0,
                vcpu_s: 2.9,
            },
            CpuSample {
                total_s: 2.0,
                vcpu_s: 0.0,
            },
        ];
        let costs = watched.per_packet(&before, &after, 1_000_000);
        assert!((costs["ringvm"] - 3.0).abs() < 1e-9);
        assert!((costs["ringvm-net"] - 2.0).abs() < 1e-9);
        assert!((costs["vcpu"] - 2.9).abs() < 1e-9);
        assert!((costs["device"] - 2.1).abs() < 1e-9);
        assert!(watched.per_packet(&before, &after, 0).is_empty());
    }

    fn guest_result(
        dir: &str,
        packets: u64,
        lost: Option<u64>,
        lost_bytes: Option<u64>,
    ) -> GuestResult {
        GuestResult {
            run: 0,
            dir: dir.to_string(),
            proto: Some("udp".to_string()),
            size: None,
            port: 9000,
            elapsed_cycles: 2_000_000_000,
            packets,
            bytes: packets * 60,
            lost,
            lost_bytes,
            gso_frames: 0,
            csum_offloaded: 0,
            rx_bad_num_buffers: 0,
            tsc_khz: 1_000_000,
            raw: serde_json::Value::Null,
        }
    }

    #[test]
    fn results_must_match_the_case() {
        let tso_rx = Case {
            size: Size::Tso64k,
            dir: Dir::Rx,
        };
        let mut result = guest_result("rx", 10, None, Some(0));
        result.proto = Some("tcp".to_string());
        assert!(mismatches(tso_rx, 9000, &result).is_empty());
        result.proto = Some("udp+tcp".to_string());
        assert_eq!(
            mismatches(tso_rx, 9001, &result),
            [
                "the guest ran port=9000, expected 9001",
                "the guest ran proto=udp+tcp, expected tcp"
            ]
        );
        let tx = Case {
            size: Size::Mtu1500,
            dir: Dir::Tx,
        };
        let mut result = guest_result("tx", 10, None, None);
        result.size = Some(60);
        assert_eq!(
            mismatches(tx, 9000, &result),
            ["the guest ran size=60, expected 1514"]
        );
    }

    #[test]
    fn tx_counts_what_arrived_and_rx_what_the_guest_got() {
        let tx = Case {
            size: Size::Min64,
            dir: Dir::Tx,
        };
        let tap = TapCounters {
            rx_packets: 900,
            rx_bytes: 54_000,
            ..TapCounters::default()
        };
        let m = measure(tx, &guest_result("tx", 1000, None, None), &tap, None);
        assert_eq!((m.packets, m.sent, m.drops), (900, 1000, 100));
        assert!((m.seconds - 2.0).abs() < 1e-9);
        assert!((m.packets_per_sec - 450.0).abs() < 1e-9);
        assert!((m.bits_per_sec - 54_000.0 * 8.0 / 2.0).abs() < 1e-6);

        let rx = Case {
            size: Size::Tso64k,
            dir: Dir::Rx,
        };
        let tap = TapCounters {
            tx_dropped: 4,
            ..TapCounters::default()
        };
        let sender = SenderTotals {
            frames: 1100,
            ..SenderTotals::default()
        };
        let m = measure(
            rx,
            &guest_result("rx", 1000, None, Some(65482 * 2 + 1)),
            &tap,
            Some(&sender),
        );
        assert_eq!(
            (m.packets, m.sent, m.drops, m.tap_dropped),
            (1000, 1100, 3, 4)
        );
    }
}
