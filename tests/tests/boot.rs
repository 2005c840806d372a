//! ringvm boots the test guest: the hello job, memory and vCPU counts as the
//! guest sees them, exit status propagation, serial modes, and every kind of
//! bad input with its message and status. The same ELF also boots under QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ringvm::boot::testimage;
use ringvm_tests::guest::GUEST_ELF_PATH;
use ringvm_tests::harness::{binary, qemu_path, run_bounded, ExitOutcome, RunOutput};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// QEMU's firmware runs emulated on hosts whose KVM cannot run CPL0 code natively.
const QEMU_TIMEOUT: Duration = Duration::from_secs(240);

fn ringvm(args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(binary("ringvm"));
    cmd.args(args);
    run_bounded(cmd, BOOT_TIMEOUT, Some("testguest:")).expect("spawning ringvm")
}

fn boot_guest(extra: &[&str], cmdline: &str) -> RunOutput {
    let mut args = vec!["--kernel", GUEST_ELF_PATH, "--cmdline", cmdline];
    args.extend_from_slice(extra);
    ringvm(&args)
}

fn assert_line(out: &RunOutput, line: &str) {
    assert!(
        out.stdout.lines().any(|l| l == line),
        "expected the line {line:?} on the serial console\n{out}"
    );
}

fn assert_bad_input(out: &RunOutput, needles: &[&str]) {
    assert!(
        out.exited_with(2),
        "bad input must exit with status 2\n{out}"
    );
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "the error should mention {n:?}\n{out}"
        );
    }
    assert!(
        !out.stderr.contains("panicked"),
        "bad input must not panic\n{out}"
    );
}

#[test]
fn hello_reports_default_memory_and_exits_zero() {
    let out = boot_guest(&[], "job=hello");
    assert!(out.exited_with(0), "{out}");
    assert_line(&out, "testguest: hello mem=512");
    assert_line(&out, "testguest: cpus=1");
    assert!(
        out.stderr.is_empty(),
        "a clean boot logs nothing at the default level\n{out}"
    );
}

#[test]
fn memory_size_is_what_the_guest_sees() {
    let out = boot_guest(&["--memory", "256M"], "job=hello");
    assert!(out.exited_with(0), "{out}");
    assert_line(&out, "testguest: hello mem=256");
}

#[test]
fn memory_above_the_mmio_hole_is_all_there() {
    // 4 GiB is split into 3 GiB below the hole and 1 GiB above 4 GiB.
    let out = boot_guest(&["--memory", "4G"], "job=hello");
    assert!(out.exited_with(0), "{out}");
    assert_line(&out, "testguest: hello mem=4096");
}

#[test]
fn debug_exit_value_is_the_exit_status() {
    let out = boot_guest(&[], "job=hello exit=7");
    assert!(out.exited_with(7), "{out}");
    assert_line(&out, "testguest: hello mem=512");
}

#[test]
fn four_vcpus_are_announced_to_the_guest() {
    let out = boot_guest(&["--cpus", "4"], "job=hello");
    assert!(out.exited_with(0), "{out}");
    assert_line(&out, "testguest: cpus=4");
}

#[test]
fn sixty_four_vcpus_boot() {
    let out = boot_guest(&["--cpus", "64", "--memory", "1G"], "job=hello exit=3");
    assert!(out.exited_with(3), "{out}");
    assert_line(&out, "testguest: cpus=64");
}

#[test]
fn serial_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let spec = format!("file={}", log.display());
    let out = boot_guest(&["--serial", &spec], "job=hello exit=5");
    assert!(out.exited_with(5), "{out}");
    assert!(
        out.stdout.is_empty(),
        "serial output went to the file, not stdout\n{out}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l == "testguest: hello mem=512"),
        "{text}"
    );
}

#[test]
fn serial_off_still_exits_with_the_guest_status() {
    let out = boot_guest(&["--serial", "off"], "job=hello exit=9");
    assert!(out.exited_with(9), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}

#[test]
fn guest_error_status_passes_through() {
    let out = boot_guest(&[], "job=no-such-job");
    assert!(out.exited_with(125), "{out}");
    assert_line(&out, "testguest: unknown job 'no-such-job'");
}

#[test]
fn missing_kernel_is_named() {
    let out = ringvm(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_bad_input(&out, &["/nonexistent/vmlinuz", "cannot open kernel"]);
}

#[test]
fn directory_as_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = ringvm(&["--kernel", dir.path().to_str().unwrap()]);
    assert_bad_input(&out, &["cannot read kernel", dir.path().to_str().unwrap()]);
}

#[test]
fn file_that_is_not_a_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "just some text, not a kernel\n".repeat(100)).unwrap();
    let out = ringvm(&["--kernel", path.to_str().unwrap()]);
    assert_bad_input(
        &out,
        &[
            "notes.txt",
            "neither an ELF with a PVH entry note nor a Linux bzImage",
        ],
    );
}

fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn memory_too_small_for_the_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let elf = write_temp(
        dir.path(),
        "high.elf",
        &testimage::elf(0x400_0000, Some(0x400_0000)),
    );
    let out = ringvm(&["--kernel", elf.to_str().unwrap(), "--memory", "32M"]);
    assert_bad_input(&out, &["high.elf", "raise --memory"]);
}

#[test]
fn bzimage_larger_than_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The kernel asks for 64 MiB to decompress itself (init_size).
    let image = write_temp(
        dir.path(),
        "big.bzImage",
        &testimage::bzimage(0x1000, 64 << 20),
    );
    let out = ringvm(&["--kernel", image.to_str().unwrap(), "--memory", "32M"]);
    assert_bad_input(&out, &["big.bzImage", "raise --memory"]);
}

#[test]
fn elf_without_pvh_note_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let elf = write_temp(dir.path(), "plain.elf", &testimage::elf(0x10_0000, None));
    let out = ringvm(&["--kernel", elf.to_str().unwrap()]);
    assert_bad_input(&out, &["plain.elf", "without a PVH entry note"]);
}

#[test]
fn truncated_elf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = testimage::elf(0x10_0000, Some(0x10_0000));
    bytes.truncate(100);
    let elf = write_temp(dir.path(), "cut.elf", &bytes);
    let out = ringvm(&["--kernel", elf.to_str().unwrap()]);
    assert_bad_input(&out, &["cut.elf", "malformed ELF"]);
}

#[test]
fn zero_cpus_is_refused() {
    let out = ringvm(&["--kernel", GUEST_ELF_PATH, "--cpus", "0"]);
    assert_bad_input(&out, &["--cpus", "1..=64"]);
}

#[test]
fn too_many_cpus_is_refused() {
    let out = ringvm(&["--kernel", GUEST_ELF_PATH, "--cpus", "65"]);
    assert_bad_input(&out, &["--cpus", "65"]);
}

#[test]
fn unknown_flag_is_refused() {
    let out = ringvm(&["--kernel", GUEST_ELF_PATH, "--turbo"]);
    assert_bad_input(&out, &["--turbo"]);
}

#[test]
fn bad_memory_sizes_are_refused() {
    let out = ringvm(&["--kernel", GUEST_ELF_PATH, "--memory", "12T"]);
    assert_bad_input(&out, &["--memory", "12T", "K, M or G"]);
    let out = ringvm(&["--kernel", GUEST_ELF_PATH, "--memory", "1M"]);
    assert_bad_input(&out, &["--memory", "below the minimum"]);
}

#[test]
fn bad_serial_mode_is_refused() {
    let out = ringvm(&["--kernel", GUEST_ELF_PATH, "--serial", "tcp:1234"]);
    assert_bad_input(&out, &["--serial", "stdio, off or file=PATH"]);
    let out = ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--serial",
        "file=/nonexistent/dir/log",
    ]);
    assert_bad_input(&out, &["/nonexistent/dir/log", "serial output file"]);
}

#[test]
fn missing_initramfs_is_named() {
    let out = ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--initramfs",
        "/nonexistent/initrd.img",
    ]);
    assert_bad_input(&out, &["/nonexistent/initrd.img", "initramfs"]);
}

#[test]
fn the_same_elf_boots_under_qemu() {
    let Some(qemu) = qemu_path() else {
        println!("SKIPPED: qemu-system-x86_64 is not installed, so the QEMU boot of the test guest was not checked");
        return;
    };
    let cmd = ringvm_tests::harness::qemu_guest_command(&qemu, "job=hello exit=7");
    let out = run_bounded(cmd, QEMU_TIMEOUT, Some("testguest:")).expect("spawning qemu");
    // isa-debug-exit makes QEMU exit with (n << 1) | 1.
    assert_eq!(out.status, ExitOutcome::Exited((7 << 1) | 1), "{out}");
    // SeaBIOS prints "Booting from ROM.." without a newline before the guest
    // starts, and its memory map gives the guest a little less than -m.
    assert!(out.stdout.contains("testguest: hello mem="), "{out}");
    assert_line(&out, "testguest: cpus=1");
}

/// A ringvm whose stdin the test writes to, with its stdout read line by line.
struct Interactive {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Interactive {
    fn start(cmdline: &str) -> Self {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = Command::new(binary("ringvm"))
            .args(["--kernel", GUEST_ELF_PATH, "--cmdline", cmdline])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ringvm");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for `line` on the console; panics with what was seen after `timeout`.
    fn expect_line(&mut self, line: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l == line => return,
                Ok(l) => self.seen.push(l),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!(
            "no line {line:?} within {timeout:?}; console so far: {:?}",
            self.seen
        );
    }

    /// Waits for the process to end; kills it and panics after `timeout`.
    fn wait(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ringvm did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn stdin_reaches_the_guest_console() {
    use std::io::Write;
    let mut vm = Interactive::start("job=echo exit=4");
    vm.expect_line("testguest: echo ready", BOOT_TIMEOUT);
    let mut stdin = vm.child.stdin.take().unwrap();
    stdin.write_all(b"hello from stdin\n").unwrap();
    drop(stdin);
    vm.expect_line("testguest: echo hello from stdin", BOOT_TIMEOUT);
    assert_eq!(vm.wait(BOOT_TIMEOUT).code(), Some(4));
}

#[test]
fn long_input_is_not_lost_when_the_fifo_fills() {
    use std::io::Write;
    // More than the UART's 64-byte FIFO: ringvm must hold the rest back
    // until the guest drains it.
    let text: String = (0..200)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut vm = Interactive::start("job=echo");
    vm.expect_line("testguest: echo ready", BOOT_TIMEOUT);
    let mut stdin = vm.child.stdin.take().unwrap();
    stdin.write_all(format!("{text}\n").as_bytes()).unwrap();
    vm.expect_line(&format!("testguest: echo {text}"), BOOT_TIMEOUT);
    drop(stdin);
    assert_eq!(vm.wait(BOOT_TIMEOUT).code(), Some(0));
}

#[test]
fn sigterm_stops_a_running_guest() {
    use std::os::unix::process::ExitStatusExt;
    let mut vm = Interactive::start("job=echo");
    vm.expect_line("testguest: echo ready", BOOT_TIMEOUT);
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let rc = unsafe { libc::kill(vm.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = vm.wait(BOOT_TIMEOUT);
    assert_eq!(status.signal(), None, "ringvm handles SIGTERM itself");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}
