//! Builds the test guest (tests/guest, a `#![no_std]` PVH program) with a
//! nested `cargo build` and exports the path of its ELF as
//! `RINGVM_TEST_GUEST_ELF` (see src/guest.rs).
//!
//! The guest is compiled for the host's x86_64-unknown-linux-gnu target with
//! its own flags, so nothing of the outer build may leak into the nested one:
//! RUSTFLAGS of a cargo-fuzz build (sanitizers), clippy's
//! RUSTC_WORKSPACE_WRAPPER, the outer target directory (its lock is held by
//! the outer cargo), profile overrides from CARGO_* variables.

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

/// The target the guest is built for: the only one installed, whose
/// precompiled `core` the guest links (see tests/guest/build.rs for the link
/// flags).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Codegen flags of the guest; the same list is in tests/guest/.cargo/config.toml
/// for building it by hand. Static relocation model: a non-PIE image linked at
/// 1 MiB, run with paging identity-mapped and no loader relocations. No
/// unwind tables: panic=abort, and the linker script drops .eh_frame anyway.
const GUEST_RUSTFLAGS: &[&str] = &["-Crelocation-model=static", "-Cforce-unwind-tables=no"];
/// The guest binary's name (tests/guest/Cargo.toml).
const GUEST_BIN: &str = "ringvm-testguest";
/// Variables not named CARGO_* that change what a nested cargo does.
const LEAKY_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_LINKER",
    "MAKEFLAGS",
    "MFLAGS",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    let target_dir = out_dir.join("guest-target");

    println!("cargo:rerun-if-changed=build.rs");
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        "src",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--offline")
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(name) = key.to_str() else { continue };
        if (name.starts_with("CARGO_") && name != "CARGO_HOME") || LEAKY_VARS.contains(&name) {
            cmd.env_remove(&key);
        }
    }
    // CARGO_ENCODED_RUSTFLAGS wins over every other source of rustflags (user
    // or project config files included): separator 0x1f.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\x1f"));

    let output = match cmd.output() {
        Ok(output) => output,
        Err(e) => panic!(
            "cannot run cargo to build the test guest in {}: {e}",
            guest_dir.display()
        ),
    };
    if !output.status.success() {
        eprintln!("--- nested cargo build of the test guest: stdout");
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("--- stderr");
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building the test guest ({}) failed with {}; its cargo output is above",
            guest_dir.display(),
            output.status
        );
    }

    let elf = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN);
    assert!(
        elf.is_file(),
        "the test guest build succeeded but {} is missing",
        elf.display()
    );
    println!("cargo:rustc-env=RINGVM_TEST_GUEST_ELF={}", elf.display());
}
