//! Runs ringvm, its backends and QEMU as child processes, for the integration
//! tests and for `ringvm-bench`.
//!
//! A run is always bounded: [`run_bounded`] kills the child after a timeout and
//! reports what a user would have seen (exit status, stdout, stderr), when the
//! first byte and an optional marker string appeared on stdout, and the child's
//! peak RSS as the kernel accounted it (`ru_maxrss` from `wait4`).

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::GUEST_ELF;

/// Every line the test guest prints on its serial port starts with this, so
/// its first appearance on stdout is the guest's first serial output even when
/// the VMM or its firmware printed something before (QEMU's SeaBIOS does).
pub const GUEST_SERIAL_MARKER: &str = "testguest:";

/// The line the test guest prints for `job=hello`.
pub const GUEST_HELLO_LINE: &str = "testguest: hello";

/// File name that [`export_guest`] writes the test guest to.
pub const GUEST_ELF_FILE_NAME: &str = "testguest.elf";

/// Size of one read from the child's stdout/stderr pipes.
const PIPE_READ_BYTES: usize = 16 * 1024;

/// Locates a binary of this workspace (`ringvm`, `ringvm-blk`, `ringvm-net`,
/// `ringvm-bench`).
///
/// Looks in `$RINGVM_BIN_DIR` when it is set, else in the directory of the
/// current executable and in its parent: test executables live in
/// `target/<profile>/deps/`, binaries in `target/<profile>/`.
///
/// # Panics
///
/// When the binary is not there, with a message that says to run
/// `cargo build --workspace` first.
pub fn binary(name: &str) -> PathBuf {
    try_binary(name).unwrap_or_else(|err| panic!("{err}"))
}

/// Boots the test guest's `job=echo` (up until it reads a line) with
/// `device_args` (`--disk ...` or `--net ...`), calls `kill_backend` once
/// the guest is up, and checks that ringvm survives it: the guest still
/// echoes, and ringvm then exits 0. Returns ringvm's stderr.
pub fn vm_survives_backend_death(device_args: &[&str], kill_backend: impl FnOnce()) -> String {
    use std::io::BufRead;
    let mut vm = Command::new(binary("ringvm"))
        .args([
            "--kernel",
            crate::guest::GUEST_ELF_PATH,
            "--cmdline",
            "job=echo",
        ])
        .args(device_args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ringvm");
    let mut stdout = io::BufReader::new(vm.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the guest's first line");
    assert_eq!(line.trim_end(), "testguest: echo ready");
    kill_backend();
    thread::sleep(Duration::from_millis(300));
    assert!(
        vm.try_wait().expect("polling ringvm").is_none(),
        "ringvm must survive its backend"
    );
    vm.stdin
        .take()
        .expect("piped stdin")
        .write_all(b"still here\n")
        .expect("writing to the guest");
    line.clear();
    stdout.read_line(&mut line).expect("the guest's echo");
    assert_eq!(line.trim_end(), "testguest: echo still here");
    let status = vm.wait().expect("waiting for ringvm");
    let mut stderr = String::new();
    vm.stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("ringvm's stderr");
    assert_eq!(status.code(), Some(0), "{stderr}");
    stderr
}

/// [`binary`] as an error of kind `NotFound` rather than a panic, for
/// `ringvm-bench`.
pub fn try_binary(name: &str) -> io::Result<PathBuf> {
    let bin_dir = std::env::var_os("RINGVM_BIN_DIR").map(PathBuf::from);
    let exe = std::env::current_exe()?;
    locate_binary(name, bin_dir.as_deref(), &exe)
        .map_err(|message| io::Error::new(io::ErrorKind::NotFound, message))
}

fn locate_binary(name: &str, bin_dir: Option<&Path>, exe: &Path) -> Result<PathBuf, String> {
    if let Some(dir) = bin_dir {
        let path = dir.join(name);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{name} not found in RINGVM_BIN_DIR={}: build it there or unset RINGVM_BIN_DIR",
                dir.display()
            ))
        };
    }
    let exe_dir = exe.parent().expect("an executable's path has a directory");
    let candidates: Vec<PathBuf> = [Some(exe_dir), exe_dir.parent()]
        .into_iter()
        .flatten()
        .map(|dir| dir.join(name))
        .collect();
    if let Some(path) = candidates.iter().find(|path| path.is_file()) {
        return Ok(path.clone());
    }
    Err(format!(
        "{name} not found (looked for {}): run `cargo build --workspace` first, \
         or set RINGVM_BIN_DIR to the directory that holds it",
        candidates
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Writes the test guest ELF to `path`.
pub fn write_guest_elf(path: &Path) -> io::Result<()> {
    fs::write(path, GUEST_ELF)
}

/// Writes the test guest ELF to `dir/testguest.elf` and returns that path.
///
/// # Panics
///
/// When the file cannot be written (this is a test helper; `ringvm-bench`
/// uses [`write_guest_elf`]).
pub fn export_guest(dir: &Path) -> PathBuf {
    let path = dir.join(GUEST_ELF_FILE_NAME);
    if let Err(err) = write_guest_elf(&path) {
        panic!("writing the test guest to {}: {err}", path.display());
    }
    path
}

/// `qemu-system-x86_64` from `$PATH`, if there is one.
pub fn qemu_path() -> Option<PathBuf> {
    find_on_path("qemu-system-x86_64")
}

/// QEMU booting the test guest with `append` as its command line, the way
/// the project's QEMU peers run it: `-M pc`, KVM when /dev/kvm can be opened
/// (TCG otherwise), console on stdio, and isa-debug-exit on the guest's
/// exit port (QEMU then exits with `(n << 1) | 1`). Callers add devices.
pub fn qemu_guest_command(qemu: &Path, append: &str) -> Command {
    let accel = if kvm_available() { "kvm" } else { "tcg" };
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", accel, "-M", "pc", "-nographic", "-kernel"])
        .arg(crate::guest::GUEST_ELF_PATH)
        .arg("-append")
        .arg(append)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    cmd
}

/// Waits until `path` exists (a backend's socket), at most `timeout`.
///
/// # Panics
///
/// When it does not appear in time, naming `who` should have created it.
pub fn wait_for_path(path: &Path, timeout: Duration, who: &str) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{who} did not create {} within {timeout:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `/dev/kvm` can be opened read-write, as a VMM needs to.
pub fn kvm_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The first executable file `name` in a directory of `$PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// How a bounded run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    /// The process exited with this status.
    Exited(i32),
    /// The process was killed by this signal (not by the harness).
    Signaled(i32),
    /// The timeout passed; the harness killed the process with SIGKILL.
    TimedOut,
}

impl fmt::Display for ExitOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitOutcome::Exited(code) => write!(f, "exited with status {code}"),
            ExitOutcome::Signaled(signal) => write!(f, "killed by signal {signal}"),
            ExitOutcome::TimedOut => write!(f, "timed out and was killed"),
        }
    }
}

/// What a bounded run produced. Times are measured from just before the
/// process was spawned.
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub status: ExitOutcome,
    pub stdout: String,
    pub stderr: String,
    /// Until the process exited, or until it was killed on timeout.
    pub elapsed: Duration,
    pub first_stdout_byte: Option<Duration>,
    /// When the marker passed to [`run_bounded`] first appeared on stdout.
    pub first_match: Option<Duration>,
    /// `ru_maxrss` of the process as reported by `wait4`.
    pub peak_rss_kib: u64,
}

impl RunOutput {
    /// Whether the process exited (not killed, not timed out) with `code`.
    pub fn exited_with(&self, code: i32) -> bool {
        self.status == ExitOutcome::Exited(code)
    }
}

/// The whole run, for assertion messages: status, timings, stdout and stderr.
impl fmt::Display for RunOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} after {:.3} s",
            self.status,
            self.elapsed.as_secs_f64()
        )?;
        if let Some(at) = self.first_stdout_byte {
            write!(f, ", first stdout byte at {:.3} s", at.as_secs_f64())?;
        }
        if let Some(at) = self.first_match {
            write!(f, ", marker at {:.3} s", at.as_secs_f64())?;
        }
        writeln!(f, ", peak RSS {} KiB", self.peak_rss_kib)?;
        for (name, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            writeln!(f, "--- {name} ({} bytes) ---", text.len())?;
            f.write_str(text)?;
            if !text.is_empty() && !text.ends_with('\n') {
                writeln!(f)?;
            }
        }
        write!(f, "--- end ---")
    }
}

/// Runs `cmd` with stdin from /dev/null and stdout/stderr captured, for at
/// most `timeout`, and records when `marker` first appears on stdout.
///
/// The child gets its own process group; on timeout, and once the child has
/// exited, every process left in that group is killed with SIGKILL, so nothing
/// the child started outlives the run. The child is also killed if the calling
/// thread dies (PR_SET_PDEATHSIG).
pub fn run_bounded(cmd: Command, timeout: Duration, marker: Option<&str>) -> io::Result<RunOutput> {
    run(cmd, timeout, marker, None)
}

/// [`run_bounded`] that also copies the child's stdout to `echo` as it
/// arrives (e.g. to show a guest's serial console live). Errors writing to
/// `echo` stop the copy, not the run.
pub fn run_bounded_echo(
    cmd: Command,
    timeout: Duration,
    marker: Option<&str>,
    echo: &mut (dyn Write + Send),
) -> io::Result<RunOutput> {
    run(cmd, timeout, marker, Some(echo))
}

fn run(
    mut cmd: Command,
    timeout: Duration,
    marker: Option<&str>,
    echo: Option<&mut (dyn Write + Send)>,
) -> io::Result<RunOutput> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe, and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let marker = marker.map(str::as_bytes);

    thread::scope(|scope| {
        let stdout_reader = scope.spawn(move || read_stdout(stdout, start, marker, echo));
        let stderr_reader = scope.spawn(move || read_stderr(stderr));
        // Reaping closes no pipe, but the group kill in wait_bounded ends
        // every writer, so the readers reach end of file.
        let reaped = wait_bounded(&child, start, timeout);
        let stdout = join(stdout_reader);
        let stderr = join(stderr_reader);
        let reaped = reaped?;
        let stdout = stdout?;
        Ok(RunOutput {
            status: reaped.status,
            stdout: String::from_utf8_lossy(&stdout.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&stderr?).into_owned(),
            elapsed: reaped.elapsed,
            // A reader may get the last bytes after the exit was seen; they
            // were written before it.
            first_stdout_byte: stdout.first_byte.map(|at| at.min(reaped.elapsed)),
            first_match: stdout.first_match.map(|at| at.min(reaped.elapsed)),
            peak_rss_kib: reaped.peak_rss_kib,
        })
    })
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

struct StdoutCapture {
    bytes: Vec<u8>,
    first_byte: Option<Duration>,
    first_match: Option<Duration>,
}

fn read_stdout(
    mut pipe: ChildStdout,
    start: Instant,
    marker: Option<&[u8]>,
    mut echo: Option<&mut (dyn Write + Send)>,
) -> io::Result<StdoutCapture> {
    let mut capture = StdoutCapture {
        bytes: Vec::new(),
        first_byte: None,
        first_match: None,
    };
    let mut chunk = vec![0u8; PIPE_READ_BYTES];
    loop {
        let len = match pipe.read(&mut chunk) {
            Ok(0) => return Ok(capture),
            Ok(len) => len,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        let now = start.elapsed();
        capture.first_byte.get_or_insert(now);
        if let Some(sink) = echo.as_mut() {
            if sink
                .write_all(&chunk[..len])
                .and_then(|()| sink.flush())
                .is_err()
            {
                echo = None;
            }
        }
        // The marker may straddle two reads: search from marker.len() - 1
        // bytes before the new data.
        let search_from = capture
            .bytes
            .len()
            .saturating_sub(marker.map_or(0, |m| m.len().saturating_sub(1)));
        capture.bytes.extend_from_slice(&chunk[..len]);
        if let Some(marker) = marker {
            if capture.first_match.is_none() && contains(&capture.bytes[search_from..], marker) {
                capture.first_match = Some(now);
            }
        }
    }
}

fn read_stderr(mut pipe: ChildStderr) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    pipe.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

struct Reaped {
    status: ExitOutcome,
    elapsed: Duration,
    peak_rss_kib: u64,
}

/// Waits until the child exits or `timeout` (from `start`) passes, kills its
/// process group, and reaps it with wait4 for its rusage.
///
/// The child is reaped only after the group kill: until then its pid (which
/// is also the group id) cannot be reused, so the kill cannot hit a stranger.
fn wait_bounded(child: &Child, start: Instant, timeout: Duration) -> io::Result<Reaped> {
    let pid = libc::pid_t::try_from(child.id()).expect("pids fit in pid_t");
    let waited = wait_for_exit(pid, start, timeout);
    // SAFETY: kill(2) only sends a signal. The group id is the child's pid,
    // which stays allocated because the child is not reaped yet.
    // ESRCH (group already empty) is fine, so the result is not checked.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let (status, peak_rss_kib) = reap(pid)?;
    let (exited, elapsed) = waited?;
    let status = if exited {
        status
    } else {
        ExitOutcome::TimedOut
    };
    Ok(Reaped {
        status,
        elapsed,
        peak_rss_kib,
    })
}

/// Whether the child exited before the deadline, and when (or when the
/// deadline passed). Leaves the child unreaped.
fn wait_for_exit(
    pid: libc::pid_t,
    start: Instant,
    timeout: Duration,
) -> io::Result<(bool, Duration)> {
    let pidfd = pidfd_open(pid)?;
    loop {
        let remaining = timeout.saturating_sub(start.elapsed());
        if remaining.is_zero() {
            return Ok((false, start.elapsed()));
        }
        let mut pollfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up so that a sub-millisecond remainder does not spin.
        let remaining_ms =
            libc::c_int::try_from(remaining.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        // SAFETY: pollfd is a valid, initialised pollfd that lives across the
        // call, and the count (1) matches.
        let ready = unsafe { libc::poll(&mut pollfd, 1, remaining_ms) };
        match ready {
            -1 => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            0 => {}
            _ => return Ok((true, start.elapsed())),
        }
    }
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1;
    // it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).expect("file descriptors fit in i32");
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn reap(pid: libc::pid_t) -> io::Result<(ExitOutcome, u64)> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a C struct of integers and timevals, for which all
    // zero bytes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: status and usage are valid, writable locals that outlive the
        // call; pid is our own child, not reaped before.
        let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if ret == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let outcome = if libc::WIFEXITED(status) {
        ExitOutcome::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ExitOutcome::Signaled(libc::WTERMSIG(status))
    } else {
        unreachable!("wait4 without WUNTRACED/WCONTINUED reports only exits, got {status:#x}")
    };
    // ru_maxrss is in KiB on Linux and never negative.
    Ok((outcome, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

/// `program args...` as a shell-like string, for messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn reports_exit_status_and_both_streams() {
        let out = run_bounded(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(10),
            None,
        )
        .unwrap();
        assert_eq!(out.status, ExitOutcome::Exited(3), "{out}");
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert!(out.exited_with(3));
        assert!(out.peak_rss_kib > 0, "{out}");
        assert_eq!(out.first_match, None);
    }

    #[test]
    fn reports_death_by_signal() {
        let out = run_bounded(sh("kill -TERM $$"), Duration::from_secs(10), None).unwrap();
        assert_eq!(out.status, ExitOutcome::Signaled(libc::SIGTERM), "{out}");
    }

    #[test]
    fn kills_the_child_on_timeout() {
        let mut sleep = Command::new("sleep");
        sleep.arg("10");
        let out = run_bounded(sleep, Duration::from_millis(200), None).unwrap();
        assert_eq!(out.status, ExitOutcome::TimedOut, "{out}");
        assert!(out.elapsed >= Duration::from_millis(200), "{out}");
        assert!(out.elapsed < Duration::from_secs(2), "{out}");
    }

    #[test]
    fn timeout_also_kills_grandchildren_that_hold_the_pipes() {
        // sh waits for sleep, which holds stdout open: without the group
        // kill the reader would wait for sleep's 10 s.
        let started = Instant::now();
        let out = run_bounded(sh("sleep 10; echo late"), Duration::from_millis(200), None).unwrap();
        assert_eq!(out.status, ExitOutcome::TimedOut, "{out}");
        assert!(started.elapsed() < Duration::from_secs(2), "{out}");
        assert_eq!(out.stdout, "");
    }

    #[test]
    fn times_first_byte_and_marker() {
        let out = run_bounded(
            sh("echo start; sleep 0.1; echo hi"),
            Duration::from_secs(10),
            Some("hi"),
        )
        .unwrap();
        assert!(out.exited_with(0), "{out}");
        let first_byte = out.first_stdout_byte.expect("stdout had bytes");
        let first_match = out.first_match.expect("marker was printed");
        assert!(first_match >= Duration::from_millis(100), "{out}");
        assert!(
            first_match >= first_byte + Duration::from_millis(50),
            "{out}"
        );
        assert!(first_match <= out.elapsed, "{out}");
    }

    #[test]
    fn finds_a_marker_split_across_reads() {
        let out = run_bounded(
            sh("printf te; sleep 0.1; printf st"),
            Duration::from_secs(10),
            Some("test"),
        )
        .unwrap();
        assert_eq!(out.stdout, "test");
        assert!(
            out.first_match.expect("marker was printed") >= Duration::from_millis(100),
            "{out}"
        );
    }

    #[test]
    fn absent_marker_and_silent_child_have_no_times() {
        let out = run_bounded(sh("echo other"), Duration::from_secs(10), Some("hi")).unwrap();
        assert_eq!(out.first_match, None, "{out}");
        let out = run_bounded(sh("true"), Duration::from_secs(10), Some("hi")).unwrap();
        assert_eq!(out.first_stdout_byte, None, "{out}");
        assert_eq!(out.first_match, None, "{out}");
    }

    #[test]
    fn echo_copies_stdout_as_it_arrives() {
        let mut echoed = Vec::new();
        let out = run_bounded_echo(
            sh("echo one; echo two >&2"),
            Duration::from_secs(10),
            None,
            &mut echoed,
        )
        .unwrap();
        assert_eq!(echoed, b"one\n");
        assert_eq!(out.stdout, "one\n");
    }

    #[test]
    fn spawn_failure_is_an_error() {
        let err = run_bounded(
            Command::new("/nonexistent/ringvm"),
            Duration::from_secs(1),
            None,
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn display_shows_status_and_both_streams() {
        let out = run_bounded(
            sh("echo out; echo err >&2; exit 1"),
            Duration::from_secs(10),
            None,
        )
        .unwrap();
        let text = out.to_string();
        assert!(text.starts_with("exited with status 1 after "), "{text}");
        assert!(text.contains("--- stdout (4 bytes) ---\nout\n"), "{text}");
        assert!(text.contains("--- stderr (4 bytes) ---\nerr\n"), "{text}");
    }

    #[test]
    fn binary_prefers_ringvm_bin_dir() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ringvm"), b"").unwrap();
        let exe = Path::new("/nonexistent/target/debug/deps/harness-0123");
        assert_eq!(
            locate_binary("ringvm", Some(dir.path()), exe),
            Ok(dir.path().join("ringvm"))
        );
        let err = locate_binary("ringvm-blk", Some(dir.path()), exe).unwrap_err();
        assert!(
            err.contains("ringvm-blk not found in RINGVM_BIN_DIR="),
            "{err}"
        );
    }

    #[test]
    fn binary_looks_beside_and_above_the_test_executable() {
        let target = tempfile::tempdir().unwrap();
        let deps = target.path().join("deps");
        fs::create_dir(&deps).unwrap();
        fs::write(target.path().join("ringvm"), b"").unwrap();
        fs::write(deps.join("ringvm-bench"), b"").unwrap();
        let exe = deps.join("harness-0123");
        assert_eq!(
            locate_binary("ringvm", None, &exe),
            Ok(target.path().join("ringvm"))
        );
        assert_eq!(
            locate_binary("ringvm-bench", None, &exe),
            Ok(deps.join("ringvm-bench"))
        );
        let err = locate_binary("ringvm-net", None, &exe).unwrap_err();
        assert!(err.contains("run `cargo build --workspace` first"), "{err}");
    }

    #[test]
    fn export_guest_writes_the_elf() {
        let dir = tempfile::tempdir().unwrap();
        let path = export_guest(dir.path());
        assert_eq!(path, dir.path().join(GUEST_ELF_FILE_NAME));
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes, GUEST_ELF);
        assert_eq!(&bytes[..4], b"\x7fELF");
    }

    #[test]
    fn command_line_joins_program_and_args() {
        let mut cmd = Command::new("ringvm");
        cmd.args(["--kernel", "guest.elf"]);
        assert_eq!(command_line(&cmd), "ringvm --kernel guest.elf");
    }
}
