//! What the three runs print: the test guest's `testguest: result {...}`
//! line (tests/guest/src/jobs/blk_bench.rs), fio's `--output-format=json`,
//! and ringvm-blk's `counters: name=value ...` log line.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

/// The guest's result line starts with this; the JSON object follows.
pub const GUEST_RESULT_MARKER: &str = "testguest: result ";
/// The guest's first error (bad parameter, failed request) starts with this.
pub const GUEST_FAILED_MARKER: &str = "testguest: blk-bench FAILED";
/// What the guest says when it was given `runtime=` but cannot time it.
pub const GUEST_RUNTIME_REFUSED: &str = "runtime= needs the TSC rate";
/// ringvm-blk logs its counters at exit after this.
const COUNTERS_MARKER: &str = "counters: ";
/// fio's key for the 99th percentile in `percentile` maps.
const FIO_P99_KEY: &str = "99.000000";

#[derive(Debug, Error)]
pub enum ParseError {
    #[error("no `{GUEST_RESULT_MARKER}` line in the guest's output")]
    NoGuestResult,
    #[error("the guest's result line is not the expected JSON")]
    GuestJson(#[source] serde_json::Error),
    #[error("no JSON object in fio's output")]
    NoFioJson,
    #[error("fio's output is not the expected JSON")]
    FioJson(#[source] serde_json::Error),
    #[error("fio's JSON has no job")]
    NoFioJob,
    #[error("fio's job reports error {0}")]
    FioJobError(i64),
}

/// Latency summary of one direction, in nanoseconds or cycles.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct GuestLatency {
    pub min: u64,
    pub mean: u64,
    pub p50: u64,
    pub p99: u64,
    #[serde(rename = "p99.9")]
    pub p99_9: u64,
    pub max: u64,
}

/// One direction of the guest's result. Rates and `lat_ns` are null when
/// the guest did not know the TSC rate; then `lat_cycles` is there.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct GuestDirection {
    pub ios: u64,
    pub bytes: u64,
    pub iops: Option<u64>,
    pub bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub lat_ns: Option<GuestLatency>,
    #[serde(default)]
    pub lat_cycles: Option<GuestLatency>,
}

/// The guest's `blk-bench` result (the fields the benchmark uses; the whole
/// object is kept in `raw` for the JSON report).
#[derive(Clone, Debug, Deserialize)]
pub struct GuestResult {
    pub rw: String,
    pub bs: u64,
    pub iodepth: u32,
    pub numjobs: u32,
    /// The region every job worked on, in bytes.
    pub size: u64,
    pub time_based: bool,
    pub elapsed_cycles: u64,
    pub read: GuestDirection,
    pub write: GuestDirection,
    pub errors: u64,
    pub notifies: u64,
    pub interrupts: u64,
    /// Requests the guest kept in flight per queue.
    pub queue_depth: u32,
    pub tsc_khz: Option<u64>,
    pub tsc_source: Option<String>,
    #[serde(skip)]
    pub raw: Value,
}

/// The last result line in `stdout` (the VMM's serial console).
pub fn guest_result(stdout: &str) -> Result<GuestResult, ParseError> {
    let json = stdout
        .lines()
        .rev()
        .find_map(|line| {
            line.find(GUEST_RESULT_MARKER)
                .map(|at| line[at + GUEST_RESULT_MARKER.len()..].trim())
        })
        .ok_or(ParseError::NoGuestResult)?;
    let raw: Value = serde_json::from_str(json).map_err(ParseError::GuestJson)?;
    let mut result: GuestResult =
        serde_json::from_value(raw.clone()).map_err(ParseError::GuestJson)?;
    result.raw = raw;
    Ok(result)
}

/// The guest's first error line, without the `testguest: ` prefix.
pub fn guest_failure(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .find_map(|line| line.find(GUEST_FAILED_MARKER).map(|at| line[at..].trim()))
        .map(|line| line.trim_start_matches("testguest: "))
}

/// fio's latency statistics (`lat_ns` or `clat_ns`), in nanoseconds.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct FioLatency {
    #[serde(default)]
    pub min: u64,
    #[serde(default)]
    pub max: u64,
    #[serde(default)]
    pub mean: f64,
    /// Keys like "99.000000"; only there when fio computed percentiles.
    #[serde(default)]
    pub percentile: BTreeMap<String, u64>,
}

impl FioLatency {
    fn percentile(&self, key: &str) -> Option<u64> {
        self.percentile.get(key).copied()
    }
}

/// One direction of fio's group report.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct FioDirection {
    pub io_bytes: u64,
    pub total_ios: u64,
    /// Milliseconds.
    pub runtime: u64,
    pub iops: f64,
    pub bw_bytes: u64,
    /// Submission to completion (with `--lat_percentiles=1`, percentiles too).
    #[serde(default)]
    pub lat_ns: FioLatency,
    /// Completion latency: the percentiles fio reports by default.
    #[serde(default)]
    pub clat_ns: FioLatency,
}

impl FioDirection {
    /// The 99th percentile of the whole latency (submission to completion,
    /// as the guest measures), else of the completion latency.
    pub fn p99_ns(&self) -> Option<u64> {
        self.lat_ns
            .percentile(FIO_P99_KEY)
            .or_else(|| self.clat_ns.percentile(FIO_P99_KEY))
    }

    pub fn p50_ns(&self) -> Option<u64> {
        self.lat_ns
            .percentile("50.000000")
            .or_else(|| self.clat_ns.percentile("50.000000"))
    }

    pub fn p99_9_ns(&self) -> Option<u64> {
        self.lat_ns
            .percentile("99.900000")
            .or_else(|| self.clat_ns.percentile("99.900000"))
    }
}

#[derive(Clone, Debug, Deserialize)]
struct FioJob {
    #[serde(default)]
    error: i64,
    read: FioDirection,
    write: FioDirection,
}

/// fio's group-reported job (`--group_reporting`): the numbers the table
/// uses, and the job's JSON without the latency histograms for the report.
#[derive(Clone, Debug)]
pub struct FioResult {
    pub read: FioDirection,
    pub write: FioDirection,
    pub raw: Value,
}

/// fio's JSON report in `stdout` (fio may print notes before it).
pub fn fio_result(stdout: &str) -> Result<FioResult, ParseError> {
    let start = stdout
        .match_indices('{')
        .map(|(at, _)| at)
        .find(|&at| at == 0 || stdout.as_bytes()[at - 1] == b'\n')
        .ok_or(ParseError::NoFioJson)?;
    let report: Value = serde_json::from_str(&stdout[start..]).map_err(ParseError::FioJson)?;
    let mut raw = report
        .get("jobs")
        .and_then(|jobs| jobs.get(0))
        .cloned()
        .ok_or(ParseError::NoFioJob)?;
    let job: FioJob = serde_json::from_value(raw.clone()).map_err(ParseError::FioJson)?;
    if job.error != 0 {
        return Err(ParseError::FioJobError(job.error));
    }
    // The per-bucket latency tables are hundreds of lines and say nothing
    // the percentiles do not.
    if let Some(job) = raw.as_object_mut() {
        for key in ["latency_ns", "latency_us", "latency_ms", "iodepth_level"] {
            job.remove(key);
        }
        for direction in ["read", "write", "trim", "sync"] {
            if let Some(dir) = job.get_mut(direction).and_then(Value::as_object_mut) {
                for lat in ["slat_ns", "clat_ns", "lat_ns"] {
                    if let Some(lat) = dir.get_mut(lat).and_then(Value::as_object_mut) {
                        lat.remove("bins");
                    }
                }
            }
        }
    }
    Ok(FioResult {
        read: job.read,
        write: job.write,
        raw,
    })
}

/// ringvm-blk's last `counters: a=1 b=2 ...` line, if it logged one.
pub fn backend_counters(stderr: &str) -> Option<BTreeMap<String, u64>> {
    let line = stderr.lines().rev().find(|l| l.contains(COUNTERS_MARKER))?;
    let list = &line[line.find(COUNTERS_MARKER)? + COUNTERS_MARKER.len()..];
    let counters: BTreeMap<String, u64> = list
        .split_whitespace()
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            // A log line may end in an ANSI reset; keep only the digits.
            let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
            Some((name.to_string(), digits.parse().ok()?))
        })
        .collect();
    (!counters.is_empty()).then_some(counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line as tests/guest/src/jobs/blk_bench.rs prints it (TSC known).
    const GUEST_LINE: &str = "testguest: result {\"rw\":\"randread\",\"bs\":4096,\
        \"iodepth\":32,\"numjobs\":1,\"rwmixread\":100,\"size\":1073741824,\
        \"time_based\":true,\"completion\":\"poll\",\"verify\":0,\"runtime_ms\":10000,\
        \"elapsed_cycles\":24454220000,\"read\":{\"ios\":800000,\"bytes\":3276800000,\
        \"iops\":80000,\"bytes_per_sec\":327680000,\"lat_ns\":{\"min\":50000,\
        \"mean\":400000,\"p50\":350000,\"p99\":1200000,\"p99.9\":3000000,\"max\":9000000}},\
        \"write\":{\"ios\":0,\"bytes\":0,\"iops\":0,\"bytes_per_sec\":0,\"lat_ns\":null},\
        \"verified\":0,\"errors\":0,\"notifies\":25000,\"interrupts\":0,\"queue_size\":128,\
        \"queue_depth\":32,\"indirect\":false,\"event_idx\":true,\"tsc_khz\":2445422,\
        \"tsc_source\":\"cpuid\"}";

    /// The same job when the guest had no TSC rate (seen on PVM hosts).
    const GUEST_LINE_CYCLES: &str = "testguest: result {\"rw\":\"randread\",\"bs\":4096,\
        \"iodepth\":32,\"numjobs\":1,\"rwmixread\":100,\"size\":268435456,\
        \"time_based\":false,\"completion\":\"poll\",\"verify\":0,\"runtime_ms\":null,\
        \"elapsed_cycles\":2090325215,\"read\":{\"ios\":65536,\"bytes\":268435456,\
        \"iops\":null,\"bytes_per_sec\":null,\"lat_cycles\":{\"min\":140704,\
        \"mean\":1016131,\"p50\":520192,\"p99\":12189696,\"p99.9\":39321600,\
        \"max\":49307451}},\"write\":{\"ios\":0,\"bytes\":0,\"iops\":null,\
        \"bytes_per_sec\":null,\"lat_cycles\":null},\"verified\":0,\"errors\":0,\
        \"notifies\":2160,\"interrupts\":0,\"queue_size\":128,\"queue_depth\":32,\
        \"indirect\":false,\"event_idx\":true,\"tsc_khz\":null,\"tsc_source\":null}";

    #[test]
    fn guest_result_with_a_tsc_rate() {
        let stdout = format!("testguest: boot\r\n{GUEST_LINE}\r\n");
        let result = guest_result(&stdout).unwrap();
        assert_eq!(result.rw, "randread");
        assert_eq!((result.bs, result.iodepth, result.numjobs), (4096, 32, 1));
        assert_eq!(result.size, 1 << 30);
        assert!(result.time_based);
        assert_eq!(result.elapsed_cycles, 24_454_220_000);
        assert_eq!(result.read.ios, 800_000);
        assert_eq!(result.read.iops, Some(80_000));
        assert_eq!(result.read.lat_ns.unwrap().p99, 1_200_000);
        assert_eq!(result.read.lat_ns.unwrap().p99_9, 3_000_000);
        assert_eq!(result.write.lat_ns, None);
        assert_eq!(result.tsc_khz, Some(2_445_422));
        assert_eq!(result.tsc_source.as_deref(), Some("cpuid"));
        assert_eq!(result.raw["notifies"], 25000);
        assert_eq!(result.queue_depth, 32);
    }

    #[test]
    fn guest_result_in_cycles() {
        let result = guest_result(GUEST_LINE_CYCLES).unwrap();
        assert_eq!(result.tsc_khz, None);
        assert_eq!(result.read.iops, None);
        assert_eq!(result.read.lat_ns, None);
        assert_eq!(result.read.lat_cycles.unwrap().p99, 12_189_696);
        assert!(!result.time_based);
    }

    #[test]
    fn missing_or_broken_result_line() {
        let err = guest_result("testguest: boot\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no `testguest: result ` line in the guest's output"
        );
        let err = guest_result("testguest: result {\"rw\":").unwrap_err();
        assert!(matches!(err, ParseError::GuestJson(_)), "{err}");
    }

    #[test]
    fn guest_failure_line() {
        let stdout = "testguest: boot\ntestguest: blk-bench FAILED runtime= needs the TSC rate, \
                      which is unknown\n";
        let failure = guest_failure(stdout).unwrap();
        assert_eq!(
            failure,
            "blk-bench FAILED runtime= needs the TSC rate, which is unknown"
        );
        assert!(failure.contains(GUEST_RUNTIME_REFUSED));
        assert_eq!(guest_failure("testguest: hello\n"), None);
    }

    /// Trimmed from `fio --output-format=json --lat_percentiles=1` (3.33).
    const FIO_JSON: &str = r#"{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "host",
      "error" : 0,
      "read" : {
        "io_bytes" : 1368817664, "io_kbytes" : 1336736, "bw_bytes" : 684408643,
        "iops" : 167091.954023, "runtime" : 2000, "total_ios" : 334184,
        "clat_ns" : { "min" : 1, "max" : 9, "mean" : 5.0,
                      "percentile" : { "50.000000" : 120000, "99.000000" : 2800000 } },
        "lat_ns" : { "min" : 2, "max" : 10, "mean" : 6.5,
                     "percentile" : { "50.000000" : 129536, "99.000000" : 2867200,
                                      "99.900000" : 4947968 },
                     "bins" : { "1000" : 3 } }
      },
      "write" : {
        "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0, "total_ios" : 0,
        "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.0 },
        "lat_ns" : { "min" : 0, "max" : 0, "mean" : 0.0 }
      },
      "usr_cpu" : 11.05, "sys_cpu" : 23.5,
      "latency_ns" : { "2" : 0.0 }
    }
  ]
}
"#;

    #[test]
    fn fio_group_report() {
        let stdout = format!("note: a warning fio printed first\n{FIO_JSON}");
        let fio = fio_result(&stdout).unwrap();
        assert_eq!(fio.read.total_ios, 334_184);
        assert_eq!(fio.read.bw_bytes, 684_408_643);
        assert!((fio.read.iops - 167_091.954_023).abs() < 1e-6);
        assert_eq!(fio.read.runtime, 2000);
        assert_eq!(
            fio.read.p99_ns(),
            Some(2_867_200),
            "lat_ns wins over clat_ns"
        );
        assert_eq!(fio.read.p50_ns(), Some(129_536));
        assert_eq!(fio.read.p99_9_ns(), Some(4_947_968));
        assert_eq!(fio.write.total_ios, 0);
        assert_eq!(fio.write.p99_ns(), None);
        assert_eq!(fio.raw["usr_cpu"], 11.05);
        assert!(fio.raw.get("latency_ns").is_none(), "histograms dropped");
        assert!(fio.raw["read"]["lat_ns"].get("bins").is_none());
    }

    #[test]
    fn fio_p99_falls_back_to_completion_latency() {
        let without_lat_percentiles = FIO_JSON.replace(
            r#""percentile" : { "50.000000" : 129536, "99.000000" : 2867200,
                                      "99.900000" : 4947968 },"#,
            "",
        );
        assert_ne!(without_lat_percentiles, FIO_JSON);
        let fio = fio_result(&without_lat_percentiles).unwrap();
        assert_eq!(fio.read.p99_ns(), Some(2_800_000));
    }

    #[test]
    fn fio_errors() {
        assert!(matches!(
            fio_result("fio: no such file"),
            Err(ParseError::NoFioJson)
        ));
        let failed = FIO_JSON.replace("\"error\" : 0", "\"error\" : 5");
        assert_eq!(
            fio_result(&failed).unwrap_err().to_string(),
            "fio's job reports error 5"
        );
        assert!(matches!(
            fio_result("{\"jobs\" : []}"),
            Err(ParseError::NoFioJob)
        ));
    }

    #[test]
    fn counters_from_the_exit_log_line() {
        let stderr = "2026-11-21T20:57:22Z  INFO ringvm_blk::daemon: serving raw image\n\
            2026-11-21T20:57:27Z  INFO ringvm_blk: counters: reads=65536 writes=0 \
            bytes_read=268435456 kicks=2161 notifications=465\u{1b}[0m\n";
        let counters = backend_counters(stderr).unwrap();
        assert_eq!(counters["reads"], 65536);
        assert_eq!(counters["kicks"], 2161);
        assert_eq!(counters["notifications"], 465);
        assert_eq!(counters.len(), 5);
        assert_eq!(backend_counters("no counters here\n"), None);
    }
}
