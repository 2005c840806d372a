//! Child processes that run beside each other (a storage backend, the VMM,
//! fio): output to files, bounded waits, and the CPU time and peak RSS each
//! one used, from wait4(2).
//!
//! `harness::run_bounded` runs one process to its end; a benchmark run needs
//! two at once (the backend serves while the VMM runs) and each one's CPU
//! time, so this module spawns without waiting and reaps with rusage.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringvm_tests::harness::{self, ExitOutcome};
use serde::Serialize;

/// How often [`Process::wait_for_socket`] looks for the socket file.
const SOCKET_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// After the socket file appears: bind(2) creates it and listen(2) follows at
/// once, so a connect in between would be refused. This covers that gap.
const SOCKET_LISTEN_GRACE: Duration = Duration::from_millis(20);

/// A child process that has been spawned and not yet reaped. Dropping it
/// kills its process group and reaps it.
pub struct Process {
    name: String,
    command: String,
    pid: libc::pid_t,
    pidfd: OwnedFd,
    start: Instant,
    stdout: PathBuf,
    stderr: PathBuf,
    reaped: bool,
}

/// User and system CPU time of a process (its threads and its reaped
/// children included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CpuTime {
    pub user_s: f64,
    pub system_s: f64,
}

impl CpuTime {
    pub fn total_s(&self) -> f64 {
        self.user_s + self.system_s
    }
}

/// How a process ended and what it used.
#[derive(Clone, Debug)]
pub struct Finished {
    pub name: String,
    pub command: String,
    pub status: ExitOutcome,
    /// From spawn to exit (or to the kill on timeout).
    pub elapsed: Duration,
    pub cpu: CpuTime,
    pub peak_rss_kib: u64,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn exited_with(&self, code: i32) -> bool {
        self.status == ExitOutcome::Exited(code)
    }

    /// Status, command and both streams, for a failure report.
    pub fn transcript(&self) -> String {
        let mut out = format!(
            "--- {} {} after {:.1} s\n$ {}\n",
            self.name,
            self.status,
            self.elapsed.as_secs_f64(),
            self.command
        );
        for (stream, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            out.push_str(&format!("--- {} {stream} ---\n{text}", self.name));
            if !text.is_empty() && !text.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }
}

impl Process {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr to
    /// `dir/<name>.stdout` and `dir/<name>.stderr`, in its own process group,
    /// killed if this thread dies.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> io::Result<Process> {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe and touches no memory of
        // the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let command = harness::command_line(&cmd);
        let start = Instant::now();
        let child = cmd.spawn()?;
        let pid = libc::pid_t::try_from(child.id()).expect("pids fit in pid_t");
        // std's Child neither kills nor reaps on drop; this struct does both.
        drop(child);
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(err) => {
                let _ = kill_group_and_reap(pid);
                return Err(err);
            }
        };
        Ok(Process {
            name: name.to_string(),
            command,
            pid,
            pidfd,
            start,
            stdout,
            stderr,
            reaped: false,
        })
    }

    /// The process id (the process stays unreaped until [`wait`](Self::wait)
    /// or [`terminate`](Self::terminate), so it names this process).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Whether the process has exited (it stays unreaped).
    pub fn has_exited(&self) -> io::Result<bool> {
        self.poll_exit(Duration::ZERO)
    }

    /// Waits until `socket` exists (the backend is listening) or `timeout`
    /// passes; `Ok(false)` when it did not appear or the process exited.
    pub fn wait_for_socket(&self, socket: &Path, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if socket.exists() {
                std::thread::sleep(SOCKET_LISTEN_GRACE);
                return Ok(!self.has_exited()?);
            }
            if self.has_exited()? || Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(SOCKET_POLL_INTERVAL);
        }
    }

    /// Waits for the process to exit, for at most `timeout`, then kills what
    /// is left of its process group and reaps it.
    pub fn wait(mut self, timeout: Duration) -> io::Result<Finished> {
        let exited = self.poll_exit(timeout)?;
        self.finish(exited)
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit.
    pub fn terminate(mut self, grace: Duration) -> io::Result<Finished> {
        // SAFETY: kill(2) only sends a signal; the pid is our unreaped child,
        // so it cannot belong to another process.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let exited = self.poll_exit(grace)?;
        self.finish(exited)
    }

    fn poll_exit(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let mut pollfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Round up so that a sub-millisecond remainder does not spin.
            let remaining_ms = libc::c_int::try_from(remaining.as_micros().div_ceil(1000))
                .unwrap_or(libc::c_int::MAX);
            // SAFETY: pollfd is a valid, initialised pollfd that lives across
            // the call, and the count (1) matches.
            match unsafe { libc::poll(&mut pollfd, 1, remaining_ms) } {
                -1 => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
                0 if remaining.is_zero() => return Ok(false),
                0 => {}
                _ => return Ok(true),
            }
        }
    }

    fn finish(&mut self, exited: bool) -> io::Result<Finished> {
        let elapsed = self.start.elapsed();
        let (status, usage) = kill_group_and_reap(self.pid);
        self.reaped = true;
        let status = status?;
        let read = |path: &Path| {
            fs::read(path)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_else(|err| format!("(cannot read {}: {err})", path.display()))
        };
        Ok(Finished {
            name: self.name.clone(),
            command: self.command.clone(),
            status: if exited {
                status
            } else {
                ExitOutcome::TimedOut
            },
            elapsed,
            cpu: CpuTime {
                user_s: seconds(usage.ru_utime),
                system_s: seconds(usage.ru_stime),
            },
            // ru_maxrss is in KiB on Linux and never negative.
            peak_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            stdout: read(&self.stdout),
            stderr: read(&self.stderr),
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = kill_group_and_reap(self.pid);
        }
    }
}

fn seconds(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
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

/// Kills the process group `pid` leads (anything the child left running, or
/// the child itself on timeout) and reaps the child with its rusage.
fn kill_group_and_reap(pid: libc::pid_t) -> (io::Result<ExitOutcome>, libc::rusage) {
    // SAFETY: kill(2) only sends a signal. The group id is the child's pid,
    // which stays allocated because the child is not reaped yet. ESRCH (the
    // group is already empty) is fine, so the result is not checked.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a C struct of integers and timevals, for which all
    // zero bytes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: status and usage are valid, writable locals that outlive
        // the call; pid is our own child, not reaped before.
        let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if ret == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return (Err(err), usage);
        }
    }
    let outcome = if libc::WIFEXITED(status) {
        ExitOutcome::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ExitOutcome::Signaled(libc::WTERMSIG(status))
    } else {
        unreachable!("wait4 without WUNTRACED/WCONTINUED reports only exits, got {status:#x}")
    };
    (Ok(outcome), usage)
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
    fn output_status_and_cpu_time() {
        let dir = tempfile::tempdir().unwrap();
        let busy =
            "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo out; echo err >&2; exit 3";
        let process = Process::spawn("busy", sh(busy), dir.path()).unwrap();
        let done = process.wait(Duration::from_secs(60)).unwrap();
        assert_eq!(done.status, ExitOutcome::Exited(3), "{}", done.transcript());
        assert_eq!(done.stdout, "out\n");
        assert_eq!(done.stderr, "err\n");
        assert!(done.cpu.total_s() > 0.01, "{:?}", done.cpu);
        assert!(done.cpu.total_s() <= done.elapsed.as_secs_f64() + 0.01);
        assert!(done.peak_rss_kib > 0);
        assert!(done.transcript().contains("--- busy stdout ---\nout\n"));
    }

    #[test]
    fn timeout_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let process = Process::spawn("sleeper", sh("sleep 30; echo late"), dir.path()).unwrap();
        assert!(!process.has_exited().unwrap());
        let started = Instant::now();
        let done = process.wait(Duration::from_millis(100)).unwrap();
        assert_eq!(done.status, ExitOutcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(done.stdout, "");
    }

    #[test]
    fn terminate_sends_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let script = "trap 'echo bye; exit 7' TERM; while :; do sleep 0.01; done";
        let process = Process::spawn("trapper", sh(script), dir.path()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let done = process.terminate(Duration::from_secs(10)).unwrap();
        assert_eq!(done.status, ExitOutcome::Exited(7), "{}", done.transcript());
        assert_eq!(done.stdout, "bye\n");
    }

    #[test]
    fn socket_wait_sees_the_file_or_the_exit() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let script = format!("sleep 0.05; touch {}; sleep 30", socket.display());
        let process = Process::spawn("listener", sh(&script), dir.path()).unwrap();
        assert!(process
            .wait_for_socket(&socket, Duration::from_secs(10))
            .unwrap());
        drop(process);

        let process = Process::spawn("quitter", sh("exit 1"), dir.path()).unwrap();
        let missing = dir.path().join("never");
        assert!(!process
            .wait_for_socket(&missing, Duration::from_secs(10))
            .unwrap());
        assert!(process.wait(Duration::from_secs(1)).unwrap().exited_with(1));
    }
}
