//! A backend binary under test: spawned with its stderr collected, signalled,
//! waited for, and its `counters:` lines read back.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::TIMEOUT;

/// A running backend process (`ringvm-blk`, `ringvm-net`); killed on drop if
/// it still runs.
pub struct BackendProcess {
    /// The binary's name, for messages.
    name: &'static str,
    child: Child,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
}

impl BackendProcess {
    /// Spawns `command` with RUST_LOG=info, no stdin or stdout, and stderr
    /// collected; `name` names the backend in messages.
    pub fn spawn(name: &'static str, command: &mut Command) -> BackendProcess {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        BackendProcess {
            name,
            child,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// Waits until `socket` exists; panics with the stderr if the backend
    /// exits first or takes longer than the timeout.
    pub fn wait_for_socket(&mut self, socket: &Path) {
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited with {status}: {}", self.name, self.stderr());
            }
            assert!(Instant::now() < deadline, "no socket: {}", self.stderr());
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of our own child, which has not been
        // reaped yet (wait_exit reaps it), so the pid is still its.
        let ret = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(ret, 0);
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the exit and for the whole of stderr.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.stderr_reader.take() {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit: {}",
                self.name,
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, then waits for the exit: the process gets no chance to write
    /// anything out, as in a crash (the page cache keeps what it wrote).
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit()
    }

    /// The counters of the last `counters:` line on stderr.
    pub fn counters(&self) -> HashMap<String, u64> {
        let stderr = self.stderr();
        let line = stderr
            .lines()
            .rev()
            .find_map(|line| line.split_once("counters: ").map(|(_, c)| c.to_string()))
            .unwrap_or_else(|| panic!("no counters in: {stderr}"));
        line.split_whitespace()
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap();
                (name.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    /// Asks for a counter dump (SIGUSR1) and returns it once it is on stderr.
    pub fn dump_counters(&self) -> HashMap<String, u64> {
        let dumps = |stderr: &str| stderr.matches("counters: ").count();
        let before = dumps(&self.stderr());
        self.signal(libc::SIGUSR1);
        let deadline = Instant::now() + TIMEOUT;
        while dumps(&self.stderr()) == before {
            assert!(
                Instant::now() < deadline,
                "no counter dump after SIGUSR1: {}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
        self.counters()
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
