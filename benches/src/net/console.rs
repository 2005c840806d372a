//! The guest's console while it runs: the VMM's stdout file, followed as it
//! grows, and the `net-bench` job's lines in it (tests/guest/src/jobs/
//! net_bench.rs): `net-bench device ...`, `net-bench ready run=I ...`,
//! `result {...}` and `net-bench FAILED ...`.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use crate::process::Process;

const PREFIX: &str = "testguest: ";
const DEVICE_MARKER: &str = "testguest: net-bench device ";
const READY_MARKER: &str = "testguest: net-bench ready ";
const DONE_MARKER: &str = "testguest: net-bench done ";
const RESULT_MARKER: &str = "testguest: result ";
const FAILED_MARKER: &str = "testguest: net-bench FAILED";
/// How often the file is read for new output.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("reading the guest's console {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the guest says `{0}`")]
    GuestFailed(String),
    #[error("the VMM exited before the guest printed {0}")]
    Exited(String),
    #[error("no {what} from the guest within {seconds} s")]
    Timeout { what: String, seconds: u64 },
    #[error("the guest's result line is not the expected JSON: {0}")]
    BadResult(#[source] serde_json::Error),
}

/// `net-bench device mac=MAC features=0xF offloads=LIST queue_size=N`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceLine {
    pub mac: String,
    pub features: String,
    /// Comma-separated; empty when no offload was negotiated.
    pub offloads: String,
    pub queue_size: u32,
}

/// `net-bench ready run=I dir=tx|rx port=P`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyLine {
    pub run: usize,
    pub dir: String,
    pub port: u16,
}

/// One run's result (the fields the benchmark uses; the whole object is in
/// `raw`).
#[derive(Clone, Debug, Deserialize)]
pub struct GuestResult {
    pub run: usize,
    pub dir: String,
    pub proto: Option<String>,
    pub size: Option<u64>,
    pub port: u16,
    pub elapsed_cycles: u64,
    pub packets: u64,
    pub bytes: u64,
    pub lost: Option<u64>,
    pub lost_bytes: Option<u64>,
    pub gso_frames: u64,
    pub csum_offloaded: u64,
    pub rx_bad_num_buffers: u64,
    pub tsc_khz: u64,
    #[serde(skip)]
    pub raw: Value,
}

impl GuestResult {
    pub fn seconds(&self) -> f64 {
        self.elapsed_cycles as f64 / (self.tsc_khz.max(1) as f64 * 1000.0)
    }
}

fn fields(rest: &str) -> impl Iterator<Item = (&str, &str)> {
    rest.split_whitespace().filter_map(|kv| kv.split_once('='))
}

fn field<'a>(rest: &'a str, key: &str) -> Option<&'a str> {
    fields(rest).find(|(k, _)| *k == key).map(|(_, v)| v)
}

pub fn parse_device(line: &str) -> Option<DeviceLine> {
    let rest = &line[line.find(DEVICE_MARKER)? + DEVICE_MARKER.len()..];
    Some(DeviceLine {
        mac: field(rest, "mac")?.to_string(),
        features: field(rest, "features")?.to_string(),
        offloads: field(rest, "offloads")?.to_string(),
        queue_size: field(rest, "queue_size")?.parse().ok()?,
    })
}

pub fn parse_ready(line: &str) -> Option<ReadyLine> {
    let rest = &line[line.find(READY_MARKER)? + READY_MARKER.len()..];
    Some(ReadyLine {
        run: field(rest, "run")?.parse().ok()?,
        dir: field(rest, "dir")?.to_string(),
        port: field(rest, "port")?.parse().ok()?,
    })
}

/// `net-bench done port=P`: the port of the datagram that ends the job.
pub fn parse_done(line: &str) -> Option<u16> {
    let rest = &line[line.find(DONE_MARKER)? + DONE_MARKER.len()..];
    field(rest, "port")?.parse().ok()
}

pub fn parse_result(line: &str) -> Option<Result<GuestResult, ConsoleError>> {
    let json = line[line.find(RESULT_MARKER)? + RESULT_MARKER.len()..].trim();
    let parsed = serde_json::from_str::<Value>(json).and_then(|raw| {
        let mut result: GuestResult = serde_json::from_value(raw.clone())?;
        result.raw = raw;
        Ok(result)
    });
    Some(parsed.map_err(ConsoleError::BadResult))
}

/// The console file of a running VMM, read as it grows.
pub struct Console {
    file: File,
    path: String,
    pending: Vec<u8>,
    /// Every complete line so far, without the line end.
    pub lines: Vec<String>,
    /// Lines already looked at by [`next_line`](Self::next_line).
    seen: usize,
}

impl Console {
    pub fn open(path: &Path) -> Result<Console, ConsoleError> {
        let file = File::open(path).map_err(|source| ConsoleError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Console {
            file,
            path: path.display().to_string(),
            pending: Vec::new(),
            lines: Vec::new(),
            seen: 0,
        })
    }

    fn read_more(&mut self) -> Result<(), ConsoleError> {
        let mut chunk = [0u8; 4096];
        loop {
            let n = self
                .file
                .read(&mut chunk)
                .map_err(|source| ConsoleError::Read {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Ok(());
            }
            self.pending.extend_from_slice(&chunk[..n]);
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                self.lines
                    .push(text.trim_end_matches(['\r', '\n']).to_string());
            }
        }
    }

    /// The next line of the guest's (`testguest: `) that `wanted` picks,
    /// waiting until `timeout` passes or `vmm` exits. A failure line of the
    /// job ends the wait with its text.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        vmm: &Process,
        mut wanted: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, ConsoleError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.read_more()?;
            while self.seen < self.lines.len() {
                let line = &self.lines[self.seen];
                self.seen += 1;
                let Some(at) = line.find(PREFIX) else {
                    continue;
                };
                let line = &line[at..];
                if line.starts_with(FAILED_MARKER) {
                    return Err(ConsoleError::GuestFailed(
                        line.trim_start_matches(PREFIX).to_string(),
                    ));
                }
                if let Some(found) = wanted(line) {
                    return Ok(found);
                }
            }
            let exited = vmm.has_exited().unwrap_or(true);
            if exited {
                // What it printed before exiting has been read above, unless
                // it came in between: one more pass.
                self.read_more()?;
                if self.seen == self.lines.len() {
                    return Err(ConsoleError::Exited(what.to_string()));
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(ConsoleError::Timeout {
                    what: what.to_string(),
                    seconds: timeout.as_secs(),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    /// A line as tests/guest/src/jobs/net_bench.rs prints it.
    pub const RESULT_LINE: &str = "testguest: result {\"job\":\"net-bench\",\"run\":2,\
        \"dir\":\"rx\",\"proto\":\"tcp\",\"size\":null,\"payload\":null,\"port\":9002,\
        \"time_ms\":3000,\"elapsed_ms\":3000,\"elapsed_cycles\":7336266000,\"packets\":90000,\
        \"bytes\":5898240000,\"packets_per_sec\":30000,\"bits_per_sec\":15728640000,\
        \"lost\":null,\"lost_bytes\":65482,\"gso_frames\":90000,\"csum_offloaded\":90000,\
        \"dropped\":3,\"rx_bad_num_buffers\":1,\"tx_ring_full\":0,\"notifies\":12,\"queue_size\":256,\
        \"mrg_rxbuf\":true,\"event_idx\":true,\"features\":\"0x1200188a3\",\
        \"offloads\":\"csum,guest_csum,host_tso4,guest_tso4\",\"tsc_khz\":2445422}\r";

    #[test]
    fn job_lines_parse() {
        let device = parse_device(
            "testguest: net-bench device mac=52:54:00:72:76:01 features=0x1200188a3 \
             offloads=csum,guest_csum queue_size=256",
        )
        .unwrap();
        assert_eq!(device.mac, "52:54:00:72:76:01");
        assert_eq!(device.features, "0x1200188a3");
        assert_eq!(device.offloads, "csum,guest_csum");
        assert_eq!(device.queue_size, 256);
        assert_eq!(
            parse_device("testguest: net-bench device mac=x offloads= queue_size=256"),
            None
        );
        assert_eq!(
            parse_ready("testguest: net-bench ready run=3 dir=rx port=9003"),
            Some(ReadyLine {
                run: 3,
                dir: "rx".to_string(),
                port: 9003
            })
        );
        assert_eq!(
            parse_ready("testguest: net-bench ready run=x dir=rx port=9003"),
            None
        );
        let result = parse_result(RESULT_LINE).unwrap().unwrap();
        assert_eq!((result.run, result.port, result.packets), (2, 9002, 90_000));
        assert_eq!(result.proto.as_deref(), Some("tcp"));
        assert_eq!(result.size, None);
        assert_eq!(result.lost, None);
        assert_eq!(result.lost_bytes, Some(65_482));
        assert_eq!(result.rx_bad_num_buffers, 1);
        assert!((result.seconds() - 3.0).abs() < 1e-6);
        assert_eq!(result.raw["notifies"], 12);
        assert!(matches!(
            parse_result("testguest: result {\"run\":"),
            Some(Err(ConsoleError::BadResult(_)))
        ));
        assert!(parse_result("testguest: hello").is_none());
        assert_eq!(
            parse_done("testguest: net-bench done port=9006"),
            Some(9006)
        );
        assert_eq!(parse_done("testguest: net-bench done port=x"), None);
    }

    #[test]
    fn console_follows_a_growing_file_and_stops_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.stdout");
        let mut file = File::create(&path).unwrap();
        // A process that stays up while the test writes its "output".
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let vmm = Process::spawn("vmm", sleep, dir.path()).unwrap();
        let mut console = Console::open(&path).unwrap();
        write!(
            file,
            "noise\ntestguest: net-bench ready run=0 dir=tx port=9000\r\ntestguest: net-bench re"
        )
        .unwrap();
        let ready = console
            .wait_for("ready", Duration::from_secs(5), &vmm, parse_ready)
            .unwrap();
        assert_eq!(ready.port, 9000);
        let err = console
            .wait_for("run 1", Duration::from_millis(50), &vmm, parse_ready)
            .unwrap_err();
        assert!(matches!(err, ConsoleError::Timeout { .. }), "{err}");
        writeln!(file, "ady run=1 dir=rx port=9001").unwrap();
        let ready = console
            .wait_for("ready", Duration::from_secs(5), &vmm, parse_ready)
            .unwrap();
        assert_eq!(ready.run, 1);
        writeln!(file, "testguest: net-bench FAILED no go datagram").unwrap();
        let err = console
            .wait_for("ready", Duration::from_secs(5), &vmm, parse_ready)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the guest says `net-bench FAILED no go datagram`"
        );
        drop(vmm);

        let quitter = Process::spawn("quit", Command::new("true"), dir.path()).unwrap();
        let err = console
            .wait_for(
                "the result of run 1",
                Duration::from_secs(5),
                &quitter,
                parse_result,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the VMM exited before the guest printed the result of run 1"
        );
    }
}
