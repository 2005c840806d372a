//! Builds an initramfs from what is installed on this host: busybox and its
//! applet links, programs with every shared library `ldd` says they load (and
//! the dynamic loader), kernel modules with their dependencies, and an /init
//! script.
//!
//! The archive is an uncompressed `newc` cpio: the kernel that unpacks it may
//! run at emulated speed, where gunzip would cost seconds. It is cached: the
//! file name holds the kernel version and a hash of every input (paths, sizes
//! and mtimes of the copied files, the init script, the module list), so a
//! second build with the same inputs returns the existing file. Builds write
//! to a temporary name and rename, so concurrent builders never see a partial
//! archive.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::{self, BufWriter};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::cpio::CpioWriter;
use super::modules::{ModuleIndex, ModulesError};

/// Bump when the archive layout changes without any input changing.
const LAYOUT_VERSION: u32 = 1;
/// Where the init script finds the modules to load, one absolute path a line,
/// dependencies first.
pub const MODULE_LIST_PATH: &str = "etc/ringvm/modules";

/// Errors of [`Initramfs::build`].
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("running {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed: {output}")]
    Tool { command: String, output: String },
    #[error("{binary} needs {library}, which ldd cannot find")]
    MissingLibrary { binary: PathBuf, library: String },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an absolute path of valid UTF-8")]
    BadPath { path: PathBuf },
    #[error(transparent)]
    Modules(#[from] ModulesError),
}

/// What goes into an initramfs besides the skeleton (`/dev/console`, empty
/// `/proc`, `/sys`, `/dev`, `/tmp`).
#[derive(Debug)]
pub struct InitramfsSpec<'a> {
    /// Part of the cached file's name (`l2`, `l1`).
    pub name: &'a str,
    /// Contents of `/init` (a busybox `sh` script).
    pub init_script: &'a str,
    /// A busybox binary; it goes to `/bin/busybox` with a link per applet.
    pub busybox: &'a Path,
    /// Programs copied to the same path, with their shared libraries.
    pub programs: &'a [PathBuf],
    /// Modules to load at boot (their dependencies are added), listed in
    /// [`MODULE_LIST_PATH`].
    pub modules: &'a [&'a str],
}

/// A built (or cached) initramfs.
#[derive(Clone, Debug)]
pub struct Initramfs {
    pub path: PathBuf,
    pub len_bytes: u64,
    /// Whether this call wrote it (false: it was already in the cache).
    pub built: bool,
    /// Time spent resolving inputs and, when built, writing it.
    pub elapsed: Duration,
}

#[derive(Debug)]
enum Entry {
    Dir,
    File { source: PathBuf },
    Bytes { data: Vec<u8>, perm: u32 },
    Symlink { target: String },
    Console,
}

impl Initramfs {
    /// Builds the initramfs of `spec` for the kernel whose modules are in
    /// `modules`, into `cache_dir`, unless an identical one is already there.
    pub fn build(
        spec: &InitramfsSpec<'_>,
        modules: &ModuleIndex,
        kernel_version: &str,
        cache_dir: &Path,
    ) -> Result<Initramfs, InitramfsError> {
        let started = Instant::now();
        let entries = collect(spec, modules)?;
        let key = cache_key(kernel_version, &entries)?;
        let path = cache_dir.join(format!(
            "{}-initramfs-{kernel_version}-{key:016x}.cpio",
            spec.name
        ));
        let built = if path.is_file() {
            false
        } else {
            write_atomically(&path, &entries)?;
            true
        };
        let len_bytes = fs::metadata(&path)
            .map_err(|source| InitramfsError::Read {
                path: path.clone(),
                source,
            })?
            .len();
        Ok(Initramfs {
            path,
            len_bytes,
            built,
            elapsed: started.elapsed(),
        })
    }
}

/// Every entry of the archive by its name (no leading `/`). A BTreeMap keeps
/// a directory before what it holds.
fn collect(
    spec: &InitramfsSpec<'_>,
    modules: &ModuleIndex,
) -> Result<BTreeMap<String, Entry>, InitramfsError> {
    let mut entries = BTreeMap::new();
    for dir in ["dev", "proc", "sys", "tmp", "root", "etc/ringvm"] {
        add_with_parents(&mut entries, dir, Entry::Dir);
    }
    entries.insert("dev/console".to_owned(), Entry::Console);
    entries.insert(
        "init".to_owned(),
        Entry::Bytes {
            data: spec.init_script.as_bytes().to_vec(),
            perm: 0o755,
        },
    );

    for applet in busybox_applets(spec.busybox)? {
        add_with_parents(
            &mut entries,
            &applet,
            Entry::Symlink {
                target: "/bin/busybox".to_owned(),
            },
        );
    }
    let mut binaries = vec![(PathBuf::from("/bin/busybox"), spec.busybox.to_owned())];
    binaries.extend(spec.programs.iter().map(|p| (p.clone(), p.clone())));
    for (dest, source) in binaries {
        for library in shared_libraries(&source)? {
            add_with_parents(
                &mut entries,
                relative(&library)?,
                Entry::File {
                    source: library.clone(),
                },
            );
        }
        add_with_parents(&mut entries, relative(&dest)?, Entry::File { source });
    }

    let module_dir = modules.dir();
    let in_archive_dir = relative(module_dir)?.to_owned();
    let mut list = String::new();
    for module in modules.load_order(spec.modules)? {
        let name = format!("{in_archive_dir}/{module}");
        list.push_str(&format!("/{name}\n"));
        add_with_parents(
            &mut entries,
            &name,
            Entry::File {
                source: module_dir.join(&module),
            },
        );
    }
    entries.insert(
        MODULE_LIST_PATH.to_owned(),
        Entry::Bytes {
            data: list.into_bytes(),
            perm: 0o644,
        },
    );
    Ok(entries)
}

/// Inserts `entry` at `name` (replacing what was there: a copied program wins
/// over a busybox applet link) and a directory at each missing parent.
fn add_with_parents(entries: &mut BTreeMap<String, Entry>, name: &str, entry: Entry) {
    let mut parent = Path::new(name).parent();
    while let Some(dir) = parent.filter(|dir| !dir.as_os_str().is_empty()) {
        let dir = dir.to_str().expect("built from a str");
        entries.entry(dir.to_owned()).or_insert(Entry::Dir);
        parent = Path::new(dir).parent();
    }
    entries.insert(name.to_owned(), entry);
}

fn relative(path: &Path) -> Result<&str, InitramfsError> {
    path.to_str()
        .and_then(|p| p.strip_prefix('/'))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| InitramfsError::BadPath {
            path: path.to_owned(),
        })
}

/// `busybox --list-full`: applet paths such as `usr/bin/base64`, `sbin/insmod`.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, InitramfsError> {
    let mut cmd = Command::new(busybox);
    cmd.arg("--list-full");
    let stdout = run_tool(cmd)?;
    Ok(stdout
        .lines()
        .map(|line| line.trim().trim_start_matches('/').to_owned())
        .filter(|line| !line.is_empty() && line != "bin/busybox")
        .collect())
}

/// The shared libraries `binary` loads and its dynamic loader, as absolute
/// paths (empty for a static binary).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, InitramfsError> {
    let mut cmd = Command::new("ldd");
    cmd.arg(binary).env("LC_ALL", "C");
    let command = format!("ldd {}", binary.display());
    let out = cmd.output().map_err(|source| InitramfsError::Spawn {
        command: command.clone(),
        source,
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(InitramfsError::Tool {
            command,
            output: text,
        });
    }
    parse_ldd(binary, &text)
}

/// Parses `ldd` output: `name => /path (0x...)`, `/lib64/ld-linux... (0x...)`,
/// `linux-vdso.so.1 (0x...)` (no file, skipped), `name => not found`.
fn parse_ldd(binary: &Path, text: &str) -> Result<Vec<PathBuf>, InitramfsError> {
    let mut libraries = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(InitramfsError::MissingLibrary {
                        binary: binary.to_owned(),
                        library: name.trim().to_owned(),
                    });
                }
                rest
            }
            None => line,
        };
        let path = target.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

fn run_tool(mut cmd: Command) -> Result<String, InitramfsError> {
    let command = crate::harness::command_line(&cmd);
    let out = cmd.output().map_err(|source| InitramfsError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(InitramfsError::Tool {
            command,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Hash of the kernel version and every entry: names, kinds, contents of
/// generated files, and path, size and mtime of copied ones.
fn cache_key(
    kernel_version: &str,
    entries: &BTreeMap<String, Entry>,
) -> Result<u64, InitramfsError> {
    let mut hasher = DefaultHasher::new();
    LAYOUT_VERSION.hash(&mut hasher);
    kernel_version.hash(&mut hasher);
    for (name, entry) in entries {
        name.hash(&mut hasher);
        match entry {
            Entry::Dir => 0u8.hash(&mut hasher),
            Entry::Console => 1u8.hash(&mut hasher),
            Entry::Symlink { target } => {
                2u8.hash(&mut hasher);
                target.hash(&mut hasher);
            }
            Entry::Bytes { data, perm } => {
                3u8.hash(&mut hasher);
                data.hash(&mut hasher);
                perm.hash(&mut hasher);
            }
            Entry::File { source } => {
                4u8.hash(&mut hasher);
                source.hash(&mut hasher);
                let meta = fs::metadata(source).map_err(|err| InitramfsError::Read {
                    path: source.clone(),
                    source: err,
                })?;
                meta.len().hash(&mut hasher);
                meta.mtime().hash(&mut hasher);
                meta.mtime_nsec().hash(&mut hasher);
                meta.mode().hash(&mut hasher);
            }
        }
    }
    Ok(hasher.finish())
}

fn write_atomically(path: &Path, entries: &BTreeMap<String, Entry>) -> Result<(), InitramfsError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let temp = path.with_extension(format!("tmp.{}.{nanos}", std::process::id()));
    let write_err = |source| InitramfsError::Write {
        path: temp.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(write_err)?;
    }
    let result = write_archive(&temp, entries).and_then(|()| {
        fs::rename(&temp, path).map_err(|source| InitramfsError::Write {
            path: path.to_owned(),
            source,
        })
    });
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_archive(temp: &Path, entries: &BTreeMap<String, Entry>) -> Result<(), InitramfsError> {
    let write_err = |source| InitramfsError::Write {
        path: temp.to_owned(),
        source,
    };
    let file = File::create(temp).map_err(write_err)?;
    let mut cpio = CpioWriter::new(BufWriter::with_capacity(1 << 20, file));
    for (name, entry) in entries {
        match entry {
            Entry::Dir => cpio.dir(name, 0o755).map_err(write_err)?,
            Entry::Console => cpio.char_dev(name, 0o600, 5, 1).map_err(write_err)?,
            Entry::Symlink { target } => cpio.symlink(name, target).map_err(write_err)?,
            Entry::Bytes { data, perm } => cpio.file(name, *perm, data).map_err(write_err)?,
            Entry::File { source } => {
                let read_err = |err| InitramfsError::Read {
                    path: source.clone(),
                    source: err,
                };
                let mut input = File::open(source).map_err(read_err)?;
                let meta = input.metadata().map_err(read_err)?;
                let perm = meta.permissions().mode() & 0o7777;
                cpio.file_from(name, perm, meta.len(), &mut input)
                    .map_err(write_err)?;
            }
        }
    }
    let out = cpio.finish().map_err(write_err)?;
    let file = out
        .into_inner()
        .map_err(|err| write_err(err.into_error()))?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_loader() {
        let text = "\
\tlinux-vdso.so.1 (0x00007ffd1d5e2000)
\tlibiperf.so.0 => /lib/x86_64-linux-gnu/libiperf.so.0 (0x00007f5b2aab4000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f5b2a8d2000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f5b2ab00000)
";
        let libs = parse_ldd(Path::new("/usr/bin/iperf3"), text).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libiperf.so.0"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn ldd_not_found_names_binary_and_library() {
        let text = "\tlibgone.so.2 => not found\n";
        let err = parse_ldd(Path::new("/usr/bin/fio"), text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/usr/bin/fio needs libgone.so.2, which ldd cannot find"
        );
    }

    #[test]
    fn parents_are_added_before_their_contents() {
        let mut entries = BTreeMap::new();
        add_with_parents(&mut entries, "lib/x86_64-linux-gnu/libc.so.6", Entry::Dir);
        add_with_parents(&mut entries, "lib64/ld.so", Entry::Dir);
        let names: Vec<&str> = entries.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib64",
                "lib64/ld.so"
            ]
        );
    }
}
