//! ringvm boots Debian's stock kernel (linux-image-amd64) with an initramfs
//! built from installed packages, to its /init: the guest runs a command and
//! powers off or reboots, and a guest panic ends ringvm with a non-zero
//! status. On a machine whose /dev/kvm cannot run a stock kernel the VMM runs
//! inside an emulated KVM host (see ringvm_tests::linux; force the mode with
//! RINGVM_LINUX_HOST=direct|emulated).
//!
//! `RINGVM_LINUX_SHOW=1` prints every run in full (with `--nocapture`).
//!
//! The tests take one run at a time: in emulated mode each run is an L1
//! QEMU/TCG with 2 vCPUs, and two of them would fight over the machine's
//! cores (and each other's timeouts).

use std::fs;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use ringvm_tests::harness::{self, ExitOutcome};
use ringvm_tests::linux::{
    initramfs, DiskFormat, DiskSpec, EndAction, L2Vmm, LinuxHost, LinuxRun, LinuxSetupError,
    NetSpec, RunSpec,
};
use ringvm_tests::netns::{backend_counters, GUEST_IP, GUEST_MAC, HOST_IP};

/// The guest prints the kernel release and its CPU count.
const UNAME_NPROC: &str = "uname -r; nproc";

/// Set to print every run in full (consoles and all), not only failed ones.
const SHOW_ENV: &str = "RINGVM_LINUX_SHOW";

static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The prepared host, shared by the tests; `None` (after printing
/// `SKIPPED: <reason>`) when a package is missing.
fn host() -> Option<&'static LinuxHost> {
    static HOST: OnceLock<Result<LinuxHost, String>> = OnceLock::new();
    let prepared = HOST.get_or_init(|| match LinuxHost::prepare() {
        Ok(host) => {
            eprintln!("{}", host.choice);
            for initramfs in [Some(&host.l2_initramfs), host.l1_initramfs.as_ref()]
                .into_iter()
                .flatten()
            {
                eprintln!(
                    "initramfs {} ({} MiB, {} in {:.2} s)",
                    initramfs.path.display(),
                    initramfs.len_bytes >> 20,
                    if initramfs.built { "built" } else { "cached" },
                    initramfs.elapsed.as_secs_f64()
                );
            }
            Ok(host)
        }
        Err(LinuxSetupError::Missing(reason)) => Err(reason),
        Err(err) => panic!("preparing the Linux guest: {}", error_chain(&err)),
    });
    match prepared {
        Ok(host) => Some(host),
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            None
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn serial() -> MutexGuard<'static, ()> {
    // A test that failed while holding the lock leaves nothing to clean up.
    ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn boot(host: &LinuxHost, spec: &RunSpec) -> LinuxRun {
    let _one = serial();
    let run = host.run(spec).expect("starting the Linux guest run");
    // Known intermittent failure (seen once in a CI run, not yet explained):
    // in the emulated host, the guest printed nothing at all (the console is
    // quiet until /init) and the run hit its time limit. Such a run is shown
    // in full and retried once; a second one fails the test.
    let run = if run.l2_console.is_empty() && run.vmm_status.is_none() {
        eprintln!("RETRY: the guest printed nothing before the time limit; retrying once. First run:\n{run}");
        host.run(spec).expect("starting the Linux guest run")
    } else {
        run
    };
    if std::env::var_os(SHOW_ENV).is_some() {
        eprintln!("{run}");
    } else {
        eprintln!("{}", run.timings());
    }
    run
}

fn assert_uname_and_nproc(host: &LinuxHost, run: &LinuxRun) {
    assert!(
        run.vmm_exited_with(0),
        "the VMM must exit 0 after the guest ends\n{run}"
    );
    assert_eq!(
        run.result_status(),
        Some(0),
        "the command must succeed\n{run}"
    );
    assert_eq!(
        run.output_lines(),
        Some(vec![host.guest.version.as_str(), "2"]),
        "the guest must print `uname -r` and `nproc`\n{run}"
    );
    assert!(run.to_init.is_some(), "/init was not timed\n{run}");
}

#[test]
fn stock_kernel_boots_runs_a_command_and_powers_off() {
    let Some(host) = host() else { return };
    let run = boot(host, &RunSpec::new(UNAME_NPROC));
    assert_uname_and_nproc(host, &run);
}

#[test]
fn stock_kernel_reboot_ends_ringvm_with_status_zero() {
    let Some(host) = host() else { return };
    let mut spec = RunSpec::new(UNAME_NPROC);
    spec.end = EndAction::Reboot;
    let run = boot(host, &spec);
    assert_uname_and_nproc(host, &run);
}

#[test]
fn guest_panic_ends_ringvm_with_nonzero_status() {
    let Some(host) = host() else { return };
    let mut spec = RunSpec::new("echo unreachable");
    // No /init to run and no root device: the kernel panics, and panic=-1
    // asks it to reboot at once instead of hanging.
    spec.extra_cmdline = "panic=-1 rdinit=/nonexistent init=/nonexistent".to_owned();
    let run = boot(host, &spec);
    assert!(
        matches!(run.vmm_status, Some(ExitOutcome::Exited(code)) if code != 0),
        "a guest panic must end ringvm with a non-zero status (not a timeout)\n{run}"
    );
    assert!(
        run.l2_console.contains("Kernel panic - not syncing"),
        "the panic must be on the console\n{run}"
    );
    assert!(!run.init_seen(), "no /init may have run\n{run}");
    assert_eq!(run.result_status(), None, "{run}");
}

/// The same boot under QEMU, for comparison and for checking the harness
/// without ringvm (`cargo test --test linux_boot -- --ignored`).
#[test]
#[ignore = "comparison run: QEMU as the guest's VMM, about a minute in the emulated host"]
fn qemu_boots_the_same_guest() {
    let Some(host) = host() else { return };
    let mut spec = RunSpec::new(UNAME_NPROC);
    spec.vmm = L2Vmm::Qemu;
    let run = boot(host, &spec);
    assert_uname_and_nproc(host, &run);
}

/// The guest's initramfs holds working fio and iperf3: every shared library
/// they load is in it. Checked by running them chrooted into its unpacked
/// contents (needs root and GNU cpio; skipped otherwise).
#[test]
fn guest_initramfs_runs_fio_and_iperf3() {
    let Some(host) = host() else { return };
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: chroot needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = fs::File::open(&host.l2_initramfs.path).unwrap();
    let Ok(unpack) = Command::new("cpio")
        .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
        .stdin(archive)
        .current_dir(dir.path())
        .output()
    else {
        eprintln!("SKIPPED: no cpio on PATH");
        return;
    };
    assert!(unpack.status.success(), "cpio -i: {unpack:?}");
    let modules = fs::read_to_string(dir.path().join(initramfs::MODULE_LIST_PATH)).unwrap();
    for module in [
        "virtio_pci.ko",
        "virtio_blk.ko",
        "virtio_net.ko",
        "virtio_ring.ko",
    ] {
        assert!(
            modules
                .lines()
                .any(|line| line.ends_with(&format!("/{module}"))),
            "{module} missing from the module list:\n{modules}"
        );
    }
    for (program, expected) in [("fio", "fio-"), ("iperf3", "iperf 3")] {
        let out = Command::new("chroot")
            .arg(dir.path())
            .args([format!("/usr/bin/{program}"), "--version".to_owned()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(expected),
            "{program} --version in the unpacked initramfs: {out:?}"
        );
    }
    let out = Command::new("chroot")
        .arg(dir.path())
        .args(["/bin/sh", "-c", "echo aGk= | base64 -d; nproc >/dev/null"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi", "{out:?}");
}

/// fio's data-integrity run on /dev/vda with one engine: random writes of
/// 4 KiB blocks with crc32c checksums, each read back and checked, with
/// O_DIRECT so the reads come from the disk and not the page cache.
fn fio_verify(engine: &str) -> String {
    format!(
        "fio --name=verify-{engine} --filename=/dev/vda --ioengine={engine} --direct=1 \
         --rw=randwrite --bs=4k --iodepth=8 --size=8M --verify=crc32c --do_verify=1 \
         --verify_fatal=1 --randrepeat=0 --output-format=terse --terse-version=3"
    )
}

/// The disk's PCI function (slot 0 is the host bridge).
const DISK_PCI_ADDRESS: &str = "0000:00:01.0";

#[test]
fn stock_kernel_runs_fio_verify_on_a_ringvm_blk_disk() {
    let Some(host) = host() else { return };
    // Unbinding and binding the virtio-pci driver resets the device after
    // DRIVER_OK and sets it up again: fio then runs on the re-armed rings.
    let rebind = format!(
        "echo {DISK_PCI_ADDRESS} > /sys/bus/pci/drivers/virtio-pci/unbind && \
         echo {DISK_PCI_ADDRESS} > /sys/bus/pci/drivers/virtio-pci/bind && \
         cat /sys/block/vda/size"
    );
    let command = format!(
        "cat /sys/block/vda/size && {rebind} && {} && {} && echo fio-verify-done",
        fio_verify("io_uring"),
        fio_verify("libaio")
    );
    let mut spec = RunSpec::new(&command);
    spec.disk = Some(DiskSpec {
        size_mib: 64,
        queues: 2,
        format: DiskFormat::Raw,
    });
    let run = boot(host, &spec);
    assert!(run.vmm_exited_with(0), "{run}");
    assert_eq!(
        run.result_status(),
        Some(0),
        "fio must succeed on both engines\n{run}"
    );
    let lines = run.output_lines().unwrap_or_default();
    assert_eq!(
        lines.get(..2),
        Some(&["131072", "131072"][..]),
        "/dev/vda is the 64 MiB disk, before and after the device reset\n{run}"
    );
    assert_eq!(lines.last().copied(), Some("fio-verify-done"), "{run}");
    // Terse v3: field 5 is the job's error code; both jobs report 0.
    let errors: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("3;"))
        .map(|l| l.split(';').nth(4).unwrap_or("?"))
        .collect();
    assert_eq!(
        errors,
        ["0", "0"],
        "fio's error fields for io_uring and libaio\n{run}"
    );
    assert_eq!(
        run.backend_status,
        Some(0),
        "ringvm-blk exits 0 after ringvm disconnects\n{run}"
    );
}

/// The thin qcow2 disk's virtual size, and the region fio writes on it.
const QCOW2_DISK_MIB: u32 = 256;
// As much I/O as the raw fio test: under the emulated host (TCG nested
// SVM), 16384 writes at depth 16 twice ended with L1 or L2 triple-faulting.
const QCOW2_FIO_MIB: u64 = 16;

/// Stock fio with --verify on a thin qcow2 disk: every 4 KiB write of the
/// 16 MiB region lands in an unallocated cluster or one an earlier write
/// allocated, is read back with O_DIRECT and its crc32c checked. Afterwards
/// the image must pass `qemu-img check` and hold about the region, not the
/// whole disk.
#[test]
fn stock_kernel_runs_fio_verify_on_a_thin_qcow2_disk() {
    let Some(host) = host() else { return };
    let command = format!(
        "cat /sys/block/vda/size && fio --name=verify --filename=/dev/vda --rw=randwrite \
         --bs=4k --size={QCOW2_FIO_MIB}M --ioengine=libaio --iodepth=8 --direct=1 \
         --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=terse \
         --terse-version=3 && echo fio-verify-done"
    );
    let mut spec = RunSpec::new(&command);
    spec.disk = Some(DiskSpec {
        size_mib: QCOW2_DISK_MIB,
        queues: 2,
        format: DiskFormat::Qcow2,
    });
    // 4096 writes and as many verify reads through the guest's kernel: in a
    // clean-clone CI run beside benchmarks (load 9) the L2 took 70 s to
    // /init and was at 2324 of the 4096 reads when 2x the default ended it.
    spec.timeout = Some(host.default_timeout() * 4);
    let run = boot(host, &spec);
    assert!(run.vmm_exited_with(0), "{run}");
    assert_eq!(
        run.result_status(),
        Some(0),
        "fio must write and verify the region\n{run}"
    );
    let lines = run.output_lines().unwrap_or_default();
    let sectors = (u64::from(QCOW2_DISK_MIB) << 20) / 512;
    assert_eq!(
        lines.first().copied(),
        Some(sectors.to_string().as_str()),
        "/dev/vda is the qcow2's virtual size\n{run}"
    );
    assert_eq!(lines.last().copied(), Some("fio-verify-done"), "{run}");
    // Terse v3: field 5 is the job's error code (a verify failure is EILSEQ
    // with --verify_fatal=1).
    let errors: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("3;"))
        .map(|l| l.split(';').nth(4).unwrap_or("?"))
        .collect();
    assert_eq!(errors, ["0"], "fio's error field\n{run}");
    assert_eq!(
        run.backend_status,
        Some(0),
        "ringvm-blk exits 0 after ringvm disconnects\n{run}"
    );
    let disk = run.disk.as_ref().expect("a run with a disk reports on it");
    assert_eq!(
        disk.check_status,
        Some(0),
        "qemu-img check must find the image clean\n{run}"
    );
    assert!(
        disk.check_output
            .contains("No errors were found on the image."),
        "{run}"
    );
    let allocated = disk.allocated_bytes.expect("the image's allocated bytes");
    let region = QCOW2_FIO_MIB << 20;
    assert!(
        (region..2 * region).contains(&allocated),
        "the image must hold the {region}-byte region fio wrote and stay thin \
         ({allocated} bytes allocated of {} virtual)\n{run}",
        u64::from(QCOW2_DISK_MIB) << 20
    );
}

/// The guest's iperf3 run: seconds and a rate cap, for a small volume
/// (at most about 7 MiB): under the emulated host heavy I/O has ended runs
/// with L1 or L2 triple-faulting, and uncapped runs moved 1 to 40 MiB
/// depending on the machine's load.
const IPERF3_SECS: u32 = 3;
const IPERF3_RATE: &str = "20M";

/// One iperf3 summary line (`sender` or `receiver`) of `iperf3 -f k`: its
/// transfer in bytes and its rate in kbit/s.
fn iperf3_summary(lines: &[&str], side: &str) -> Option<(f64, f64)> {
    let line = lines.iter().rev().find(|l| l.trim_end().ends_with(side))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let sec = words.iter().position(|w| *w == "sec")?;
    let (amount, unit) = (words.get(sec + 1)?, words.get(sec + 2)?);
    let scale = match *unit {
        "Bytes" => 1.0,
        "KBytes" => 1024.0,
        "MBytes" => 1024.0 * 1024.0,
        "GBytes" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = amount.parse::<f64>().ok()? * scale;
    let rate = match (words.get(sec + 3), words.get(sec + 4)) {
        (Some(rate), Some(&"Kbits/sec")) => rate.parse().ok()?,
        _ => return None,
    };
    Some((bytes, rate))
}

/// The stock kernel's virtio_net on ringvm `--net` and ringvm-net: eth0
/// comes up with the MAC ringvm gave it, pings the host through the tap
/// with no loss, and iperf3 moves data to a server on the tap's address.
/// ringvm-net then exits 0 with the frames counted.
#[test]
fn stock_kernel_pings_and_runs_iperf3_over_ringvm_net() {
    let Some(host) = host() else { return };
    if harness::find_on_path("ip").is_none() {
        eprintln!("SKIPPED: no ip on PATH (package iproute2) to make the tap");
        return;
    }
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    if host.mode() == ringvm_tests::linux::HostMode::Direct && unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: a tap in a network namespace needs root");
        return;
    }
    // virtio_net is loaded by /init; eth0 may take a moment to appear.
    let command = format!(
        "n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; \
         echo \"mac $(cat /sys/class/net/eth0/address)\" && \
         ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && \
         ping -c 5 {HOST_IP} && iperf3 -c {HOST_IP} -t {IPERF3_SECS} -b {IPERF3_RATE} -f k && \
         echo net-done"
    );
    let mut spec = RunSpec::new(&command);
    let net = NetSpec {
        mac: GUEST_MAC,
        iperf3_server: true,
    };
    spec.net = Some(net);
    // The boot alone took up to 120 s to /init in the emulated host on a
    // loaded 2-core machine; ping and iperf3 add about 15 s.
    spec.timeout = Some(host.default_timeout() * 3 / 2);
    let run = boot(host, &spec);
    assert!(run.vmm_exited_with(0), "{run}");
    assert_eq!(
        run.result_status(),
        Some(0),
        "eth0 set-up, ping and iperf3 must all succeed\n{run}"
    );
    let lines = run.output_lines().unwrap_or_default();
    assert_eq!(
        lines.first().copied(),
        Some(format!("mac {}", net.mac_text()).as_str()),
        "eth0 has the MAC given with --net mac=\n{run}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("5 packets transmitted, 5 packets received, 0% packet loss")),
        "5 pings, 0% loss\n{run}"
    );
    assert_eq!(lines.last().copied(), Some("net-done"), "{run}");
    assert!(!lines.iter().any(|l| l.contains("iperf3: error")), "{run}");
    let (sent, rate_kbits) =
        iperf3_summary(&lines, "sender").unwrap_or_else(|| panic!("no iperf3 sender line\n{run}"));
    let (received, _) = iperf3_summary(&lines, "receiver")
        .unwrap_or_else(|| panic!("no iperf3 receiver line\n{run}"));
    assert!(sent > 0.0 && received > 0.0, "iperf3 moved no data\n{run}");
    let report = run.net.as_ref().expect("a run with a NIC reports on it");
    assert_eq!(
        report.iperf3_status,
        Some(0),
        "the iperf3 server ends after its one test\n{run}"
    );
    assert_eq!(
        report.backend_status,
        Some(0),
        "ringvm-net exits 0 after ringvm disconnects\n{run}"
    );
    let counters = backend_counters(&report.backend_log)
        .unwrap_or_else(|| panic!("ringvm-net logged no counters\n{run}"));
    // Guest to tap: at least the iperf3 bytes the server received.
    let tx_bytes = counters.get("tx_bytes").copied().unwrap_or(0);
    assert!(
        tx_bytes as f64 >= received,
        "ringvm-net's tx_bytes ({tx_bytes}) must cover the {received} bytes iperf3 received\n{run}"
    );
    assert!(
        counters.get("rx_frames").copied().unwrap_or(0) >= 5,
        "{run}"
    );
    eprintln!(
        "iperf3 guest to host over ringvm-net ({} host, not a performance figure): \
         {:.0} KiB sent, {:.0} KiB received in {IPERF3_SECS} s, {:.0} kbit/s",
        run.mode,
        sent / 1024.0,
        received / 1024.0,
        rate_kbits
    );
}

#[test]
fn iperf3_summary_reads_transfer_and_rate() {
    let output = [
        "[ ID] Interval           Transfer     Bitrate         Retr",
        "[  5]   0.00-3.00   sec   768 KBytes  2097 Kbits/sec    0             sender",
        "[  5]   0.00-3.05   sec  1.50 MBytes  4125 Kbits/sec                  receiver",
        "",
        "iperf Done.",
    ];
    assert_eq!(
        iperf3_summary(&output, "sender"),
        Some((768.0 * 1024.0, 2097.0))
    );
    assert_eq!(
        iperf3_summary(&output, "receiver"),
        Some((1.5 * 1024.0 * 1024.0, 4125.0))
    );
    assert_eq!(iperf3_summary(&output[..1], "sender"), None);
}
