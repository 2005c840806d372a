//! Runs the L2 VMM inside an emulated KVM host: QEMU with TCG and `-cpu EPYC`
//! boots the stock kernel as L1 with `l1_init.sh`, which loads kvm-amd,
//! mounts this machine's root over 9p and runs a job script (written here,
//! into the run's temporary directory) chrooted into it.
//!
//! The job frames what it prints so that one stream, L1's serial console,
//! carries everything:
//!
//! ```text
//! RINGVM-L1: vmm-start <uptime>
//! RINGVM-L2 <uptime>|<a line of the VMM's stdout, the guest console>
//! RINGVM-L1: vmm-exit <status> <uptime>
//! RINGVM-L2ERR <a line of the VMM's stderr>
//! RINGVM-BACKEND <a line of ringvm-blk's log>       (with a disk)
//! RINGVM-NET <a line of ringvm-net's log>           (with a NIC)
//! RINGVM-IPERF3 <a line of the iperf3 server's output>
//! ```
//!
//! Every other line is L1's own console (its init's messages, kernel errors).

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{
    shell_quote, shell_words, DiskReport, DiskSpec, HostMode, L1Report, LinuxHost, LinuxRun,
    NetReport, NetSpec, RunSpec, DISK_SOCKET, INIT_MARKER, L1_BOOT_BUDGET, NET_SOCKET,
};
use crate::harness::{command_line, run_bounded, ExitOutcome};
use crate::netns;

/// vCPUs of L1. TCG runs one host thread per vCPU (`thread=multi`); the CI
/// machines have 2 cores.
const L1_CPUS: u32 = 2;
/// L1 RAM when the guest is small: the guest's RAM, the VMM, page cache of
/// what it reads over 9p.
const L1_MIN_MEMORY_MIB: u32 = 2048;
/// L1 RAM beyond the guest's, for larger guests.
const L1_OVERHEAD_MIB: u32 = 1024;
/// L1's own kernel command line. `loglevel=3` keeps L1's kernel messages
/// (errors only) from interleaving with the framed lines; `panic=-1` with
/// QEMU's `-no-reboot` ends the run at once if L1 panics.
const L1_CMDLINE: &str = "console=ttyS0 loglevel=3 panic=-1";
/// Grace period between SIGTERM and SIGKILL for a VMM past its bound in L1.
const VMM_KILL_GRACE_SECS: u64 = 5;
/// Host environment variables passed on to the VMM in L1.
const PASSED_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE"];

const L1_INIT_MARKER: &str = "RINGVM-L1: init ";
const L1_PREFIX: &str = "RINGVM-L1: ";
const L2_PREFIX: &str = "RINGVM-L2 ";
const L2_STDERR_PREFIX: &str = "RINGVM-L2ERR ";
const BACKEND_PREFIX: &str = "RINGVM-BACKEND ";
const CHECK_PREFIX: &str = "RINGVM-CHECK ";
const NET_PREFIX: &str = "RINGVM-NET ";
const IPERF3_PREFIX: &str = "RINGVM-IPERF3 ";
/// How long ringvm-net may take to exit after the VMM did (it ends when its
/// frontend disconnects), and the iperf3 server (it ends after its one
/// test); then they are killed.
const NET_BACKEND_GRACE_SECS: u32 = 20;
const IPERF3_GRACE_SECS: u32 = 5;
/// A shell function for the job script.
const REAP_WITHIN_SH: &str = r#"# Waits up to $2 seconds for background job $1 to end, else kills it;
# sets $reaped to its exit status, or "killed". A zombie counts as ended (the
# shell reaps it only in wait). Not in a $(...): wait needs this shell.
reap_within() {
    n=0
    while [ $n -lt $(($2 * 10)) ]; do
        state=$(sed -n 's/^.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null)
        [ -z "$state" ] || [ "$state" = Z ] && break
        sleep 0.1
        n=$((n+1))
    done
    if [ $n -ge $(($2 * 10)) ]; then
        kill -9 "$1" 2>/dev/null
        wait "$1"
        reaped=killed
    else
        wait "$1"
        reaped=$?
    fi
}"#;

/// GNU timeout's status when the command timed out.
const TIMEOUT_STATUS: i32 = 124;

pub(super) fn run(
    host: &LinuxHost,
    spec: &RunSpec,
    vmm_argv: &[String],
    run_dir: &Path,
    work: &Path,
    timeout: Duration,
) -> io::Result<LinuxRun> {
    let started = Instant::now();
    let qemu = host.qemu.as_ref().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "qemu-system-x86_64 is not installed",
        )
    })?;
    let l1_initramfs = host.l1_initramfs.as_ref().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "this LinuxHost was prepared for direct mode: it has no L1 initramfs",
        )
    })?;
    let backend = match spec.disk {
        Some(disk) => Some((disk, LinuxHost::backend_argv(disk, work)?)),
        None => None,
    };
    let net = match spec.net {
        Some(net) => Some((net, NetSpec::backend_argv(work)?)),
        None => None,
    };
    let job = run_dir.join("l1-job.sh");
    fs::write(
        &job,
        job_script(work, vmm_argv, backend.as_ref(), net.as_ref(), timeout),
    )?;
    let job = cmdline_path(&job)?;
    let work_str = cmdline_path(work)?;

    let memory_mib = L1_MIN_MEMORY_MIB.max(spec.memory_mib + L1_OVERHEAD_MIB);
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "EPYC", "-smp"])
        .arg(L1_CPUS.to_string())
        .arg("-m")
        .arg(memory_mib.to_string())
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&host.guest.kernel)
        .arg("-initrd")
        .arg(&l1_initramfs.path)
        .arg("-append")
        .arg(format!(
            "{L1_CMDLINE} ringvm.l1job={job} ringvm.l1tmp={work_str}"
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ]);
    let qemu_command = command_line(&cmd);
    let out = run_bounded(cmd, timeout + L1_BOOT_BUDGET, Some(L1_INIT_MARKER))?;
    let framed = parse_console(&out.stdout);
    Ok(LinuxRun {
        mode: HostMode::Emulated,
        vmm: spec.vmm,
        vmm_command: shell_words(vmm_argv),
        vmm_status: framed.vmm_status,
        l2_console: framed.l2_console,
        vmm_stderr: framed.vmm_stderr,
        to_init: framed.to_init,
        to_exit: framed.to_exit,
        l1: Some(L1Report {
            qemu_command,
            qemu_status: out.status,
            console: framed.l1_console,
            qemu_stderr: out.stderr,
            to_init: out.first_match,
            ready_uptime: framed.ready_uptime,
            vmm_start_uptime: framed.vmm_start_uptime,
            errors: framed.errors,
        }),
        backend_status: framed.backend_status,
        backend_log: framed.backend_log,
        disk: spec.disk.map(|_| framed.disk),
        net: spec.net.map(|_| framed.net),
        wall: started.elapsed(),
    })
}

/// `path` as one kernel command line word: L1's init splits the command line
/// on whitespace.
fn cmdline_path(path: &Path) -> io::Result<String> {
    let text = path.to_str().unwrap_or("");
    if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c == '"') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} cannot be passed on L1's kernel command line: use a TMPDIR \
                 without spaces or quotes",
                path.display()
            ),
        ));
    }
    Ok(text.to_owned())
}

/// The script L1 runs in the host root: starts the VMM bounded by `timeout`
/// in the tmpfs work directory and frames its output. With `net`, a tap on
/// L1 with ringvm-net (its argv) on it, and the iperf3 server if asked.
fn job_script(
    work: &Path,
    vmm_argv: &[String],
    backend: Option<&(DiskSpec, Vec<String>)>,
    net: Option<&(NetSpec, Vec<String>)>,
    timeout: Duration,
) -> String {
    let mut script = String::from(
        "#!/bin/sh\n\
         # Written by ringvm-tests' linux harness (tests/src/linux/emulated.rs);\n\
         # run by the emulated host's /init, chrooted into the host root.\n",
    );
    let work_path = work;
    let work = shell_quote(&work.to_string_lossy());
    writeln!(script, "work={work}").expect("writing to a String");
    script.push_str(
        "cd \"$work\" || exit 1\n\
         export TMPDIR=\"$work\" HOME=\"$work\" XDG_RUNTIME_DIR=\"$work\"\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
    );
    for name in PASSED_ENV {
        if let Ok(value) = std::env::var(name) {
            writeln!(script, "export {name}={}", shell_quote(&value)).expect("writing to a String");
        }
    }
    if let Some((disk, argv)) = backend {
        // The disk lives in L1's tmpfs; the backend is up before the VMM.
        write!(
            script,
            r#"{create} || echo "RINGVM-L1: error: creating the disk image failed"
{blk} > "$work/backend.log" 2>&1 &
backend=$!
n=0
while [ ! -S "$work/{DISK_SOCKET}" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
"#,
            create = shell_words(&disk.create_argv(work_path)),
            blk = shell_words(argv),
        )
        .expect("writing to a String");
    }
    if let Some((spec, argv)) = net {
        write!(
            script,
            r#"{REAP_WITHIN_SH}
ip tuntap add dev {tap} mode tap multi_queue && ip addr add {host}/24 dev {tap} &&
    ip link set {tap} up || echo "RINGVM-L1: error: setting up tap {tap} failed"
"#,
            tap = netns::TAP,
            host = netns::HOST_IP,
        )
        .expect("writing to a String");
        if spec.iperf3_server {
            writeln!(
                script,
                "{} > \"$work/iperf3.log\" 2>&1 &\niperf=$!",
                shell_words(&NetSpec::iperf3_server_argv())
            )
            .expect("writing to a String");
        }
        write!(
            script,
            r#"{net} > "$work/net-backend.log" 2>&1 &
net=$!
n=0
while [ ! -S "$work/{NET_SOCKET}" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
"#,
            net = shell_words(argv),
        )
        .expect("writing to a String");
    }
    let secs = timeout.as_secs().max(1);
    let vmm = shell_words(vmm_argv);
    write!(
        script,
        r#"read -r up _ < /proc/uptime
echo "RINGVM-L1: vmm-start $up"
{{
    timeout -k {VMM_KILL_GRACE_SECS} {secs} {vmm} < /dev/null 2> "$work/vmm.stderr"
    status=$?
    read -r up _ < /proc/uptime
    echo "$status $up" > "$work/vmm.exit"
}} | while IFS= read -r line || [ -n "$line" ]; do
    read -r up _ < /proc/uptime
    printf 'RINGVM-L2 %s|%s\n' "$up" "$line"
done
read -r status up < "$work/vmm.exit"
echo "RINGVM-L1: vmm-exit $status $up"
while IFS= read -r line || [ -n "$line" ]; do
    printf 'RINGVM-L2ERR %s\n' "$line"
done < "$work/vmm.stderr"
"#
    )
    .expect("writing to a String");
    if let Some((disk, _)) = backend {
        script.push_str(
            r#"wait $backend
echo "RINGVM-L1: backend-exit $?"
while IFS= read -r line || [ -n "$line" ]; do
    printf 'RINGVM-BACKEND %s\n' "$line"
done < "$work/backend.log"
"#,
        );
        // The image lives in L1's tmpfs, gone with L1: report on it here.
        let image = format!("\"$work/{}\"", disk.image_name());
        writeln!(
            script,
            "blocks=$(stat -c %b {image}) && echo \"RINGVM-L1: disk-allocated $((blocks * 512))\""
        )
        .expect("writing to a String");
        if let Some(argv) = disk.check_argv(work_path) {
            write!(
                script,
                r#"{check} > "$work/check.log" 2>&1
echo "RINGVM-L1: disk-check $?"
while IFS= read -r line || [ -n "$line" ]; do
    printf 'RINGVM-CHECK %s\n' "$line"
done < "$work/check.log"
"#,
                check = shell_words(&argv)
            )
            .expect("writing to a String");
        }
    }
    if let Some((spec, _)) = net {
        write!(
            script,
            r#"reap_within $net {NET_BACKEND_GRACE_SECS}
echo "RINGVM-L1: net-backend-exit $reaped"
while IFS= read -r line || [ -n "$line" ]; do
    printf 'RINGVM-NET %s\n' "$line"
done < "$work/net-backend.log"
"#
        )
        .expect("writing to a String");
        if spec.iperf3_server {
            write!(
                script,
                r#"reap_within $iperf {IPERF3_GRACE_SECS}
echo "RINGVM-L1: iperf3-exit $reaped"
while IFS= read -r line || [ -n "$line" ]; do
    printf 'RINGVM-IPERF3 %s\n' "$line"
done < "$work/iperf3.log"
"#
            )
            .expect("writing to a String");
        }
    }
    script
}

/// L1's console split into its parts.
#[derive(Debug, Default, PartialEq)]
struct Framed {
    l2_console: String,
    vmm_stderr: String,
    l1_console: String,
    backend_log: String,
    backend_status: Option<i32>,
    disk: DiskReport,
    net: NetReport,
    vmm_status: Option<ExitOutcome>,
    to_init: Option<Duration>,
    to_exit: Option<Duration>,
    ready_uptime: Option<Duration>,
    vmm_start_uptime: Option<Duration>,
    errors: Vec<String>,
}

fn parse_console(stdout: &str) -> Framed {
    let mut framed = Framed::default();
    let mut init_uptime = None;
    for line in stdout.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix(L2_PREFIX) {
            let (up, text) = rest.split_once('|').unwrap_or(("", rest));
            let text = text.trim_end_matches('\r');
            framed.l2_console.push_str(text);
            framed.l2_console.push('\n');
            if text == INIT_MARKER && init_uptime.is_none() {
                init_uptime = uptime(up);
            }
            continue;
        }
        if let Some(text) = line.strip_prefix(BACKEND_PREFIX) {
            framed.backend_log.push_str(text);
            framed.backend_log.push('\n');
            continue;
        }
        if let Some(text) = line.strip_prefix(NET_PREFIX) {
            framed.net.backend_log.push_str(text);
            framed.net.backend_log.push('\n');
            continue;
        }
        if let Some(text) = line.strip_prefix(IPERF3_PREFIX) {
            framed.net.iperf3_log.push_str(text);
            framed.net.iperf3_log.push('\n');
            continue;
        }
        if let Some(text) = line.strip_prefix(CHECK_PREFIX) {
            framed.disk.check_output.push_str(text);
            framed.disk.check_output.push('\n');
            continue;
        }
        if let Some(text) = line.strip_prefix(L2_STDERR_PREFIX) {
            framed.vmm_stderr.push_str(text);
            framed.vmm_stderr.push('\n');
            continue;
        }
        framed.l1_console.push_str(line);
        framed.l1_console.push('\n');
        let Some(event) = line.strip_prefix(L1_PREFIX) else {
            continue;
        };
        let words: Vec<&str> = event.split_whitespace().collect();
        match words.as_slice() {
            ["ready", up] => framed.ready_uptime = uptime(up),
            ["vmm-start", up] => framed.vmm_start_uptime = uptime(up),
            ["vmm-exit", status, up] => {
                framed.vmm_status = status.parse().ok().map(exit_outcome);
                framed.to_exit = since(framed.vmm_start_uptime, uptime(up));
            }
            ["backend-exit", status] => framed.backend_status = status.parse().ok(),
            ["net-backend-exit", status] => framed.net.backend_status = status.parse().ok(),
            ["iperf3-exit", status] => framed.net.iperf3_status = status.parse().ok(),
            ["disk-allocated", bytes] => framed.disk.allocated_bytes = bytes.parse().ok(),
            ["disk-check", status] => framed.disk.check_status = status.parse().ok(),
            ["error:", ..] => framed
                .errors
                .push(event["error:".len()..].trim().to_owned()),
            _ => {}
        }
    }
    framed.to_init = since(framed.vmm_start_uptime, init_uptime);
    framed
}

/// A shell's `$?` as an outcome: GNU timeout's 124 is a timeout, 129-192
/// is death by a signal.
fn exit_outcome(status: i32) -> ExitOutcome {
    match status {
        TIMEOUT_STATUS => ExitOutcome::TimedOut,
        129..=192 => ExitOutcome::Signaled(status - 128),
        _ => ExitOutcome::Exited(status),
    }
}

fn uptime(text: &str) -> Option<Duration> {
    text.parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        .map(Duration::from_secs_f64)
}

fn since(start: Option<Duration>, end: Option<Duration>) -> Option<Duration> {
    Some(end?.saturating_sub(start?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_is_split_into_l1_guest_and_vmm_stderr() {
        let stdout = "\
RINGVM-L1: init 3.10\r
[    3.5] some L1 kernel error\r
RINGVM-L1: ready 5.25\r
RINGVM-L1: vmm-start 5.50\r
RINGVM-L2 5.60|[    0.000000] Linux version 6.1.0\r\r
RINGVM-L2 16.00|RINGVM-INIT\r\r
RINGVM-L2 16.50|a|b\r\r
RINGVM-L1: vmm-exit 0 18.25\r
RINGVM-L2ERR ringvm: warning\r
RINGVM-L1: job-status 0\r
";
        let framed = parse_console(stdout);
        assert_eq!(
            framed.l2_console,
            "[    0.000000] Linux version 6.1.0\nRINGVM-INIT\na|b\n"
        );
        assert_eq!(framed.vmm_stderr, "ringvm: warning\n");
        assert_eq!(
            framed.l1_console,
            "RINGVM-L1: init 3.10\n[    3.5] some L1 kernel error\nRINGVM-L1: ready 5.25\n\
             RINGVM-L1: vmm-start 5.50\nRINGVM-L1: vmm-exit 0 18.25\nRINGVM-L1: job-status 0\n"
        );
        assert_eq!(framed.vmm_status, Some(ExitOutcome::Exited(0)));
        assert_eq!(framed.to_init, Some(Duration::from_millis(10_500)));
        assert_eq!(framed.to_exit, Some(Duration::from_millis(12_750)));
        assert_eq!(framed.ready_uptime, Some(Duration::from_millis(5250)));
        assert!(framed.errors.is_empty());
    }

    #[test]
    fn l1_errors_and_missing_vmm_are_reported() {
        let framed = parse_console(
            "RINGVM-L1: init 3.1\nRINGVM-L1: error: no /dev/kvm after loading kvm-amd\n",
        );
        assert_eq!(framed.errors, ["no /dev/kvm after loading kvm-amd"]);
        assert_eq!(framed.vmm_status, None);
        assert_eq!(framed.to_init, None);
        assert_eq!(framed.to_exit, None);
    }

    #[test]
    fn shell_statuses_map_to_outcomes() {
        assert_eq!(exit_outcome(0), ExitOutcome::Exited(0));
        assert_eq!(exit_outcome(1), ExitOutcome::Exited(1));
        assert_eq!(exit_outcome(124), ExitOutcome::TimedOut);
        assert_eq!(exit_outcome(137), ExitOutcome::Signaled(9));
    }

    #[test]
    fn job_script_quotes_the_vmm_command() {
        let argv = vec![
            "/target/ringvm".to_owned(),
            "--cmdline".to_owned(),
            "console=ttyS0 quiet".to_owned(),
        ];
        let script = job_script(
            Path::new("/tmp/ringvm-l1-x/l1-tmp"),
            &argv,
            None,
            None,
            Duration::from_secs(240),
        );
        assert!(!script.contains("backend"), "{script}");
        let blk = (
            DiskSpec {
                size_mib: 64,
                queues: 2,
                format: super::super::DiskFormat::Raw,
            },
            vec![
                "/target/ringvm-blk".to_owned(),
                "--queues".to_owned(),
                "2".to_owned(),
            ],
        );
        let with_disk = job_script(
            Path::new("/tmp/ringvm-l1-x/l1-tmp"),
            &argv,
            Some(&blk),
            None,
            Duration::from_secs(240),
        );
        assert!(
            with_disk.contains("truncate -s 64M /tmp/ringvm-l1-x/l1-tmp/disk.raw"),
            "{with_disk}"
        );
        assert!(
            with_disk.contains("/target/ringvm-blk --queues 2 > \"$work/backend.log\""),
            "{with_disk}"
        );
        assert!(
            with_disk.find("backend=$!").unwrap() < with_disk.find("vmm-start").unwrap(),
            "the backend starts before the VMM\n{with_disk}"
        );
        assert!(with_disk.contains("backend-exit"), "{with_disk}");
        assert!(with_disk.contains("disk-allocated"), "{with_disk}");
        assert!(!with_disk.contains("qemu-img"), "{with_disk}");
        let qcow2 = (
            DiskSpec {
                format: super::super::DiskFormat::Qcow2,
                ..blk.0
            },
            blk.1.clone(),
        );
        let with_qcow2 = job_script(
            Path::new("/tmp/ringvm-l1-x/l1-tmp"),
            &argv,
            Some(&qcow2),
            None,
            Duration::from_secs(240),
        );
        assert!(
            with_qcow2
                .contains("qemu-img create -q -f qcow2 /tmp/ringvm-l1-x/l1-tmp/disk.qcow2 64M"),
            "{with_qcow2}"
        );
        assert!(
            with_qcow2.find("backend-exit").unwrap()
                < with_qcow2
                    .find("qemu-img check -f qcow2 /tmp/ringvm-l1-x/l1-tmp/disk.qcow2")
                    .unwrap(),
            "the image is checked after ringvm-blk exits\n{with_qcow2}"
        );
        let framed = parse_console(
            "RINGVM-L1: backend-exit 0\nRINGVM-L1: disk-allocated 1310720\n\
             RINGVM-L1: disk-check 0\nRINGVM-CHECK No errors were found on the image.\n",
        );
        assert_eq!(
            framed.disk,
            DiskReport {
                allocated_bytes: Some(1_310_720),
                check_status: Some(0),
                check_output: "No errors were found on the image.\n".to_owned(),
            }
        );
        assert!(
            script.contains("work=/tmp/ringvm-l1-x/l1-tmp\n"),
            "{script}"
        );
        assert!(
            script.contains(
                "timeout -k 5 240 /target/ringvm --cmdline 'console=ttyS0 quiet' < /dev/null"
            ),
            "{script}"
        );
    }

    #[test]
    fn job_script_sets_up_the_tap_before_the_vmm_and_reports_after() {
        let argv = vec!["/target/ringvm".to_owned()];
        let net = (
            NetSpec {
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                iperf3_server: true,
            },
            vec![
                "/target/ringvm-net".to_owned(),
                "--tap".to_owned(),
                "rvtap0".to_owned(),
            ],
        );
        let script = job_script(
            Path::new("/tmp/w"),
            &argv,
            None,
            Some(&net),
            Duration::from_secs(240),
        );
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle:?} missing\n{script}"))
        };
        assert!(at("ip tuntap add dev rvtap0 mode tap multi_queue") < at("iperf3 -s -1"));
        assert!(at("ip addr add 10.77.0.1/24 dev rvtap0") < at("iperf3 -s -1"));
        assert!(
            at("iperf3 -s -1 --forceflush -B 10.77.0.1 > \"$work/iperf3.log\"")
                < at("/target/ringvm-net")
        );
        assert!(
            at("/target/ringvm-net --tap rvtap0 > \"$work/net-backend.log\"") < at("vmm-start")
        );
        assert!(at("vmm-exit") < at("reap_within $net 20"));
        assert!(at("net-backend-exit") < at("reap_within $iperf 5"));
        let without_server = job_script(
            Path::new("/tmp/w"),
            &argv,
            None,
            Some(&(
                NetSpec {
                    iperf3_server: false,
                    ..net.0
                },
                net.1.clone(),
            )),
            Duration::from_secs(240),
        );
        assert!(!without_server.contains("iperf3"), "{without_server}");
        assert!(
            without_server.contains("net-backend-exit"),
            "{without_server}"
        );

        let framed = parse_console(
            "RINGVM-L1: vmm-exit 0 30.0\nRINGVM-L1: net-backend-exit 0\n\
             RINGVM-NET INFO counters: tx_frames=3\nRINGVM-L1: iperf3-exit killed\n\
             RINGVM-IPERF3 Server listening on 5201\n",
        );
        assert_eq!(
            framed.net,
            NetReport {
                backend_status: Some(0),
                backend_log: "INFO counters: tx_frames=3\n".to_owned(),
                iperf3_status: None,
                iperf3_log: "Server listening on 5201\n".to_owned(),
            }
        );
        assert!(!framed.l1_console.contains("counters"), "{framed:?}");
    }

    #[test]
    fn reap_within_reports_an_exit_or_kills_after_the_bound() {
        let script = format!(
            "{REAP_WITHIN_SH}\n\
             sh -c 'exit 3' & reap_within $! 5; echo \"quick $reaped\"\n\
             sleep 30 & reap_within $! 1; echo \"slow $reaped\"\n"
        );
        let started = std::time::Instant::now();
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "quick 3\nslow killed\n",
            "{out:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{out:?}");
    }

    #[test]
    fn paths_with_spaces_cannot_go_on_the_command_line() {
        assert_eq!(
            cmdline_path(Path::new("/tmp/a/job.sh")).unwrap(),
            "/tmp/a/job.sh"
        );
        let err = cmdline_path(Path::new("/tmp/my dir/job.sh")).unwrap_err();
        assert!(err.to_string().contains("TMPDIR"), "{err}");
    }
}
