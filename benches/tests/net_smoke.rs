//! `ringvm-bench net` end to end, short: one guest-to-host case and the
//! host-to-guest TSO case through ringvm + ringvm-net and the tap's ceiling
//! (QEMU left out: its boot takes longer than the runs). Checks that the run
//! succeeds and that its report says what a user relies on: frames arrived
//! and were counted, the TSO frames went through whole, the table has its
//! rows. It never checks speed.
//!
//! Needs root, /dev/net/tun and /dev/kvm, and ringvm and ringvm-net built
//! (`cargo build --workspace`); prints `SKIPPED: ...` otherwise.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ringvm_tests::harness;

/// Two runs of 1 s in one boot, two ceiling runs, and margin for a slow
/// machine.
const TIMEOUT: Duration = Duration::from_secs(240);

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        return Some("needs root and /dev/net/tun for a network namespace with taps".to_string());
    }
    if !harness::kvm_available() {
        return Some("needs /dev/kvm (read-write)".to_string());
    }
    for name in ["ringvm", "ringvm-net"] {
        if let Err(err) = harness::try_binary(name) {
            return Some(err.to_string());
        }
    }
    None
}

#[test]
fn net_bench_measures_a_tx_case_and_tso_rx() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("net.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringvm-bench"));
    cmd.args([
        "net",
        "--runtime",
        "1",
        "--cases",
        "tso-rx,64-tx",
        "--no-qemu",
        "--json",
    ])
    .arg(&json);
    let out = harness::run_bounded(cmd, TIMEOUT, None).unwrap();
    assert!(out.exited_with(0), "{out}");
    for row in ["64 B       tx", "64 KiB TSO rx"] {
        assert!(
            out.stdout.lines().any(|line| line.starts_with(row)),
            "no `{row}` row\n{out}"
        );
    }
    assert!(
        out.stdout.contains("qemu        skipped: --no-qemu"),
        "{out}"
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let cases = report["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["case"].as_str().unwrap()).collect();
    assert_eq!(names, ["64-tx", "tso-rx"], "in run order");
    let (tx, rx) = (&cases[0], &cases[1]);

    // Guest to host: what the guest sent arrived at the tap, every frame.
    let ringvm = &tx["ringvm"];
    assert!(ringvm["packets"].as_u64().unwrap() > 0, "{ringvm}");
    assert_eq!(ringvm["packets"], ringvm["sent"], "{ringvm}");
    assert_eq!(ringvm["drops"], 0, "{ringvm}");
    assert_eq!(ringvm["tap"]["rx_packets"], ringvm["packets"], "{ringvm}");
    assert_eq!(ringvm["guest"]["size"], 60, "{ringvm}");
    assert!(tx["ceiling"]["packets_per_sec"].as_f64().unwrap() > 0.0);
    assert!(tx["ratios"]["ringvm_over_ceiling"].as_f64().unwrap() > 0.0);
    assert!(tx["ratios"]["ringvm_over_qemu"].is_null());

    // Host to guest, TSO: the guest received whole 64 KiB frames.
    let ringvm = &rx["ringvm"];
    let packets = ringvm["packets"].as_u64().unwrap();
    assert!(packets > 0, "{ringvm}");
    assert_eq!(ringvm["gso_frames"], packets, "{ringvm}");
    assert_eq!(ringvm["offloads"], "tso4+csum", "{ringvm}");
    assert_eq!(ringvm["guest"]["proto"], "tcp", "{ringvm}");
    assert_eq!(
        ringvm["bytes"].as_u64().unwrap(),
        packets * 65535,
        "{ringvm}"
    );
    assert!(ringvm["bits_per_sec"].as_f64().unwrap() > 0.0, "{ringvm}");
    assert_eq!(rx["ceiling"]["offloads"], "tso4+csum", "{}", rx["ceiling"]);
    assert_eq!(report["qemu"]["skipped"], "--no-qemu");
    assert!(
        report["ringvm"]["ok"].as_bool().unwrap(),
        "{}",
        report["ringvm"]
    );
    let offloads = report["ringvm"]["device"]["offloads"].as_str().unwrap();
    assert!(offloads.contains("guest_tso4"), "{offloads}");
}
