//! `ringvm-bench quickstart`: boots the test guest once under ringvm with
//! `job=hello`, shows its serial console as it arrives and reports how the
//! run went (exit status, wall time, peak RSS).

use std::io::{self, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ringvm_tests::harness::{self, ExitOutcome, RunOutput, GUEST_HELLO_LINE, GUEST_SERIAL_MARKER};
use thiserror::Error;

use crate::guest::ExportedGuest;

/// Bounds the whole run; the hello job itself takes well under a second.
const QUICKSTART_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum QuickstartError {
    #[error("writing the test guest to a temporary directory")]
    ExportGuest(#[source] io::Error),
    #[error("starting `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("ringvm {status}, expected exit status 0")]
    RingvmFailed { status: ExitOutcome },
    #[error("ringvm exited 0 but the guest did not print `{GUEST_HELLO_LINE}`")]
    NoHello,
}

fn ringvm_command(ringvm: &Path, guest: &Path) -> Command {
    let mut cmd = Command::new(ringvm);
    cmd.arg("--kernel")
        .arg(guest)
        .args(["--cmdline", "job=hello"])
        .args(["--memory", "512M"])
        .args(["--cpus", "2"]);
    cmd
}

pub fn run(ringvm: &Path) -> Result<(), QuickstartError> {
    let guest = ExportedGuest::new().map_err(QuickstartError::ExportGuest)?;
    let cmd = ringvm_command(ringvm, &guest.path);
    let command = harness::command_line(&cmd);
    println!("quickstart: {command}");
    println!("--- guest serial console (ringvm stdout) ---");
    let out = harness::run_bounded_echo(
        cmd,
        QUICKSTART_TIMEOUT,
        Some(GUEST_SERIAL_MARKER),
        &mut io::stdout(),
    )
    .map_err(|source| QuickstartError::Spawn { command, source })?;
    if !out.stdout.is_empty() && !out.stdout.ends_with('\n') {
        println!();
    }
    println!("--- end of serial console ---");
    if !out.stderr.is_empty() {
        eprint!("--- ringvm stderr ---\n{}", out.stderr);
        if !out.stderr.ends_with('\n') {
            eprintln!();
        }
        eprintln!("--- end of ringvm stderr ---");
    }
    println!("{}", summary(&out));
    let _ = io::stdout().flush();
    check(&out)
}

fn summary(out: &RunOutput) -> String {
    let first_serial = out.first_match.map_or("none".to_string(), |at| {
        format!("{:.1} ms", at.as_secs_f64() * 1000.0)
    });
    format!(
        "ringvm {}; wall time {:.1} ms; first guest serial output ({GUEST_SERIAL_MARKER}) at {first_serial}; \
         peak RSS {} KiB",
        out.status,
        out.elapsed.as_secs_f64() * 1000.0,
        out.peak_rss_kib
    )
}

fn check(out: &RunOutput) -> Result<(), QuickstartError> {
    if !out.exited_with(0) {
        return Err(QuickstartError::RingvmFailed { status: out.status });
    }
    if !out.stdout.contains(GUEST_HELLO_LINE) {
        return Err(QuickstartError::NoHello);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(status: ExitOutcome, stdout: &str) -> RunOutput {
        RunOutput {
            status,
            stdout: stdout.to_string(),
            stderr: String::new(),
            elapsed: Duration::from_millis(30),
            first_stdout_byte: Some(Duration::from_millis(10)),
            first_match: Some(Duration::from_millis(10)),
            peak_rss_kib: 1024,
        }
    }

    #[test]
    fn needs_exit_zero_and_the_hello_line() {
        assert!(check(&output(ExitOutcome::Exited(0), "testguest: hello\n")).is_ok());
        let err = check(&output(ExitOutcome::Exited(1), "testguest: hello\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ringvm exited with status 1, expected exit status 0"
        );
        let err = check(&output(ExitOutcome::TimedOut, "")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ringvm timed out and was killed, expected exit status 0"
        );
        let err = check(&output(ExitOutcome::Exited(0), "testguest: boot\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ringvm exited 0 but the guest did not print `testguest: hello`"
        );
    }

    #[test]
    fn summary_names_status_times_and_rss() {
        assert_eq!(
            summary(&output(ExitOutcome::Exited(0), "")),
            "ringvm exited with status 0; wall time 30.0 ms; first guest serial output \
             (testguest:) at 10.0 ms; peak RSS 1024 KiB"
        );
    }

    #[test]
    fn command_is_the_documented_invocation() {
        let cmd = ringvm_command(Path::new("ringvm"), Path::new("/tmp/g.elf"));
        assert_eq!(
            harness::command_line(&cmd),
            "ringvm --kernel /tmp/g.elf --cmdline job=hello --memory 512M --cpus 2"
        );
    }
}
