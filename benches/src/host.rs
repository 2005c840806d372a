//! What a benchmark ran on, for its report.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ringvm_tests::harness::{self, ExitOutcome};
use serde::Serialize;

/// Bound on `qemu-system-x86_64 -version`, which does not start a VM.
const QEMU_VERSION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Serialize)]
pub struct HostInfo {
    /// The KVM modules loaded (e.g. `kvm_intel`, `kvm_pvm`), or why /dev/kvm
    /// cannot be used.
    pub kvm: String,
    /// The host kernel release.
    pub kernel: String,
    /// First line of `qemu-system-x86_64 -version`, when QEMU was run.
    pub qemu_version: Option<String>,
}

impl HostInfo {
    pub fn probe(qemu: Option<&Path>) -> HostInfo {
        HostInfo {
            kvm: kvm_description(),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|release| release.trim().to_string())
                .unwrap_or_else(|err| format!("unknown ({err})")),
            qemu_version: qemu.and_then(qemu_version),
        }
    }
}

fn kvm_description() -> String {
    if !harness::kvm_available() {
        return "unavailable: /dev/kvm cannot be opened read-write".to_string();
    }
    // The vendor module says which KVM this is; "kvm" alone is the core.
    let mut modules: Vec<String> = fs::read_dir("/sys/module")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.starts_with("kvm_"))
        .collect();
    modules.sort();
    if modules.is_empty() {
        "kvm (no vendor module listed in /sys/module)".to_string()
    } else {
        modules.join(",")
    }
}

fn qemu_version(qemu: &Path) -> Option<String> {
    let mut cmd = Command::new(qemu);
    cmd.arg("-version");
    let out = harness::run_bounded(cmd, QEMU_VERSION_TIMEOUT, None).ok()?;
    if out.status != ExitOutcome::Exited(0) {
        return None;
    }
    out.stdout.lines().next().map(str::to_string)
}
