//! The test guest, written to a temporary file for a VMM to boot.

use std::io;
use std::path::PathBuf;

use ringvm_tests::harness;
use tempfile::TempDir;

/// The test guest ELF in a temporary directory that lives as long as this.
pub struct ExportedGuest {
    _dir: TempDir,
    pub path: PathBuf,
    pub len_bytes: u64,
}

impl ExportedGuest {
    pub fn new() -> io::Result<ExportedGuest> {
        let dir = tempfile::Builder::new().prefix("ringvm-bench-").tempdir()?;
        let path = dir.path().join(harness::GUEST_ELF_FILE_NAME);
        harness::write_guest_elf(&path)?;
        let len_bytes = path.metadata()?.len();
        Ok(ExportedGuest {
            _dir: dir,
            path,
            len_bytes,
        })
    }
}
