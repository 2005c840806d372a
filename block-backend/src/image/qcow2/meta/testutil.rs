//! qemu-img and qemu-io as the oracle of the tests of this module.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `program args`, returns stdout; panics with stderr on failure.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs qemu-io commands on a qcow2 image; panics when a command fails
/// (qemu-io prints "Pattern verification failed" and exits 0 for a read
/// that does not match, so that is checked too).
pub fn qemu_io(path: &Path, commands: &[&str]) -> String {
    let mut args = vec!["-f", "qcow2"];
    for command in commands {
        args.extend(["-c", command]);
    }
    let path = path.to_str().unwrap();
    args.push(path);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {commands:?} on {path}: {out}"
    );
    out
}

/// A qcow2 image made by `qemu-img create -f qcow2 -o <options>`.
pub fn qcow2(dir: &Path, name: &str, size: &str, options: &str) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path.to_str().unwrap(), size]);
    qemu_img(&args);
    path
}

/// `qemu-img check` output, asserting it reports no errors and no leaks.
pub fn assert_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        path.display()
    );
    assert!(!text.contains("leaked"), "{text}");
}

pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

pub fn read_u64(path: &Path, offset: u64) -> u64 {
    let mut word = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut word, offset)
        .unwrap();
    u64::from_be_bytes(word)
}

pub fn write_u64(path: &Path, offset: u64, value: u64) {
    open_rw(path)
        .write_all_at(&value.to_be_bytes(), offset)
        .unwrap();
}

pub fn write_u32(path: &Path, offset: u64, value: u32) {
    open_rw(path)
        .write_all_at(&value.to_be_bytes(), offset)
        .unwrap();
}

/// A fixed-seed xorshift64 generator for the property tests.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}
