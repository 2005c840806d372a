//! JSON reports.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Writes `report` as pretty JSON through a temporary file beside `path`, so
/// that a reader never sees half a report.
pub fn write_atomic<T: Serialize>(path: &Path, report: &T) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(report).map_err(io::Error::other)?;
    json.push(b'\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, &json).and_then(|()| fs::rename(&tmp, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pretty_json_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        write_atomic(&path, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\n  \"a\": 1\n}\n");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = write_atomic(&dir.path().join("no/such/dir.json"), &1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
