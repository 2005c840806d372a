//! Which host runs the Linux guest's VMM: this machine (its /dev/kvm runs a
//! stock kernel) or an emulated KVM host (QEMU/TCG with kvm-amd in an L1
//! Linux), chosen from the module that provides /dev/kvm, or forced with
//! `RINGVM_LINUX_HOST=direct|emulated`.

use std::fmt;
use std::path::Path;

use crate::harness::kvm_available;

/// Forces the host mode: `direct` or `emulated`.
pub const HOST_ENV: &str = "RINGVM_LINUX_HOST";

/// Where the L2 VMM (ringvm, or QEMU for comparison) runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostMode {
    /// On this machine, with its /dev/kvm (hardware VT-x or AMD-V).
    Direct,
    /// Inside an L1 Linux booted by QEMU with TCG and `-cpu EPYC`, whose
    /// kvm-amd runs on the SVM that TCG emulates.
    Emulated,
}

impl fmt::Display for HostMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostMode::Direct => "direct",
            HostMode::Emulated => "emulated",
        })
    }
}

/// A host mode and the reason it was chosen, for the line the tests print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostChoice {
    pub mode: HostMode,
    pub why: String,
}

impl fmt::Display for HostChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "linux guest host: {} ({})", self.mode, self.why)
    }
}

impl HostMode {
    /// The mode `RINGVM_LINUX_HOST` forces, else the one this machine's KVM
    /// allows. An unknown value of the variable is an error that names it.
    pub fn choose() -> Result<HostChoice, String> {
        let forced = std::env::var(HOST_ENV).ok();
        choose_from(forced.as_deref(), kvm_available(), &|module| {
            Path::new("/sys/module").join(module).exists()
        })
    }
}

fn choose_from(
    forced: Option<&str>,
    kvm_usable: bool,
    module_loaded: &dyn Fn(&str) -> bool,
) -> Result<HostChoice, String> {
    let choice = |mode, why: String| Ok(HostChoice { mode, why });
    match forced.map(str::trim) {
        Some("direct") => return choice(HostMode::Direct, format!("forced by {HOST_ENV}=direct")),
        Some("emulated") => {
            return choice(HostMode::Emulated, format!("forced by {HOST_ENV}=emulated"))
        }
        Some("") | None => {}
        Some(other) => {
            return Err(format!(
                "{HOST_ENV}={other:?} is not a host mode: use direct or emulated, or unset it"
            ))
        }
    }
    if !kvm_usable {
        return choice(
            HostMode::Emulated,
            "/dev/kvm cannot be opened read-write".to_owned(),
        );
    }
    if module_loaded("kvm_pvm") {
        return choice(
            HostMode::Emulated,
            "/dev/kvm is kvm_pvm, which cannot run a stock kernel's CPL0 code".to_owned(),
        );
    }
    for (module, what) in [("kvm_intel", "VT-x"), ("kvm_amd", "AMD-V")] {
        if module_loaded(module) {
            return choice(
                HostMode::Direct,
                format!("/dev/kvm is {module} (hardware {what})"),
            );
        }
    }
    choice(
        HostMode::Emulated,
        "neither kvm_intel nor kvm_amd provides /dev/kvm".to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(modules: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |name| modules.contains(&name)
    }

    #[test]
    fn hardware_kvm_runs_directly() {
        let choice = choose_from(None, true, &loaded(&["kvm", "kvm_intel"])).unwrap();
        assert_eq!(choice.mode, HostMode::Direct);
        assert_eq!(
            choice.to_string(),
            "linux guest host: direct (/dev/kvm is kvm_intel (hardware VT-x))"
        );
        let choice = choose_from(None, true, &loaded(&["kvm", "kvm_amd"])).unwrap();
        assert_eq!(choice.mode, HostMode::Direct);
    }

    #[test]
    fn pvm_or_no_kvm_means_emulated() {
        let choice = choose_from(None, true, &loaded(&["kvm", "kvm_pvm"])).unwrap();
        assert_eq!(choice.mode, HostMode::Emulated);
        assert!(choice.why.contains("kvm_pvm"), "{choice}");
        let choice = choose_from(None, false, &loaded(&["kvm_intel"])).unwrap();
        assert_eq!(choice.mode, HostMode::Emulated);
        assert!(choice.why.contains("/dev/kvm cannot be opened"), "{choice}");
    }

    #[test]
    fn the_variable_forces_either_way() {
        let choice = choose_from(Some("direct"), false, &loaded(&[])).unwrap();
        assert_eq!(choice.mode, HostMode::Direct);
        assert_eq!(choice.why, "forced by RINGVM_LINUX_HOST=direct");
        let choice = choose_from(Some("emulated"), true, &loaded(&["kvm_intel"])).unwrap();
        assert_eq!(choice.mode, HostMode::Emulated);
        let err = choose_from(Some("nested"), true, &loaded(&[])).unwrap_err();
        assert_eq!(
            err,
            "RINGVM_LINUX_HOST=\"nested\" is not a host mode: use direct or emulated, or unset it"
        );
    }
}
