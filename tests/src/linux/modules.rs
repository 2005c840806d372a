//! Kernel modules of an installed kernel: which `.ko` files a set of modules
//! needs, in the order `insmod` must load them, from the `modules.dep` and
//! `modules.builtin` files that depmod wrote into `/lib/modules/<version>`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Errors of [`ModuleIndex`].
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: expected `path.ko: dependencies...`, got {text:?}")]
    Parse {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("module {name} is neither in modules.dep nor built into the kernel ({dir})")]
    Unknown { name: String, dir: PathBuf },
    #[error("module file {path} is compressed; only uncompressed .ko files can be loaded with busybox insmod")]
    Compressed { path: String },
}

/// `modules.dep` and `modules.builtin` of one kernel.
#[derive(Debug)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// Module name (with `-` written as `_`) to its path relative to `dir`
    /// and the paths of its dependencies.
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    /// Reads the index of the modules in `dir` (`/lib/modules/<version>`).
    pub fn load(dir: &Path) -> Result<Self, ModulesError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| ModulesError::Read { path, source })
        };
        let dep_text = read("modules.dep")?;
        // Older or stripped-down module trees may lack modules.builtin.
        let builtin_text = read("modules.builtin").unwrap_or_default();
        Self::parse(dir, &dep_text, &builtin_text)
    }

    fn parse(dir: &Path, dep_text: &str, builtin_text: &str) -> Result<Self, ModulesError> {
        let mut deps = HashMap::new();
        for (index, line) in dep_text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, rest)) = line.split_once(':') else {
                return Err(ModulesError::Parse {
                    path: dir.join("modules.dep"),
                    line: index + 1,
                    text: line.to_owned(),
                });
            };
            let path = path.trim().to_owned();
            let needs = rest.split_whitespace().map(str::to_owned).collect();
            deps.insert(module_name(&path), (path, needs));
        }
        let builtin = builtin_text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| module_name(line.trim()))
            .collect();
        Ok(ModuleIndex {
            dir: dir.to_owned(),
            deps,
            builtin,
        })
    }

    /// The directory the index was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Paths (relative to [`ModuleIndex::dir`]) of the modules `names` and
    /// everything they depend on, each once, every module after its
    /// dependencies. Modules built into the kernel are left out.
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<String>, ModulesError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            let name = module_name(name);
            if self.deps.contains_key(&name) {
                self.visit(&name, &mut seen, &mut order)?;
            } else if !self.builtin.contains(&name) {
                return Err(ModulesError::Unknown {
                    name,
                    dir: self.dir.clone(),
                });
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let Some((path, needs)) = self.deps.get(name) else {
            return Err(ModulesError::Unknown {
                name: name.to_owned(),
                dir: self.dir.clone(),
            });
        };
        for need in needs {
            self.visit(&module_name(need), seen, order)?;
        }
        if !path.ends_with(".ko") {
            return Err(ModulesError::Compressed { path: path.clone() });
        }
        order.push(path.clone());
        Ok(())
    }
}

/// `kernel/arch/x86/kvm/kvm-amd.ko` -> `kvm_amd`: the kernel treats `-` and
/// `_` in module names alike.
fn module_name(path_or_name: &str) -> String {
    let file = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/drivers/crypto/ccp/ccp.ko:
kernel/virt/lib/irqbypass.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/zstd.ko.zst:
";
    const BUILTIN: &str = "kernel/drivers/tty/serial/8250/8250.ko\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(Path::new("/lib/modules/test"), DEP, BUILTIN).unwrap()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let order = index()
            .load_order(&["virtio_blk", "virtio-net", "kvm_amd"])
            .unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
                "kernel/drivers/crypto/ccp/ccp.ko",
                "kernel/virt/lib/irqbypass.ko",
                "kernel/arch/x86/kvm/kvm.ko",
                "kernel/arch/x86/kvm/kvm-amd.ko",
            ]
        );
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_named() {
        let index = index();
        assert_eq!(index.load_order(&["8250"]).unwrap(), Vec::<String>::new());
        let err = index.load_order(&["virtio_pci"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "module virtio_pci is neither in modules.dep nor built into the kernel (/lib/modules/test)"
        );
        let err = index.load_order(&["zstd"]).unwrap_err();
        assert!(err.to_string().contains("compressed"), "{err}");
    }

    #[test]
    fn a_line_without_colon_is_a_parse_error() {
        let err = ModuleIndex::parse(Path::new("/m"), "kernel/a.ko\n", "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/m/modules.dep:1: expected `path.ko: dependencies...`, got \"kernel/a.ko\""
        );
    }
}
