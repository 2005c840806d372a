//! A writer of uncompressed `newc` cpio archives, the format the Linux kernel
//! unpacks as an initramfs (Documentation/driver-api/early-userspace/
//! buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex
//! fields), the NUL-terminated name padded to a multiple of 4 bytes, then the
//! data padded the same way. The archive ends with an entry named
//! `TRAILER!!!`. Every entry is owned by root with mtime 0, so the same inputs
//! give the same bytes.

use std::io::{self, Read, Write};

/// Magic of the `newc` format (no checksums).
const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Name of the entry that ends an archive.
const TRAILER_NAME: &str = "TRAILER!!!";
/// Headers, names and data are each padded to this alignment.
const ALIGN_BYTES: u64 = 4;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a `newc` archive entry by entry; [`CpioWriter::finish`] writes the
/// trailer. Names are relative paths without a leading `/` (the kernel accepts
/// both; this is what `cpio -o` writes).
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written_bytes: u64,
}

/// One entry's header fields that vary between entries.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    len_bytes: u64,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written_bytes: 0,
        }
    }

    /// A directory with permission bits `perm` (e.g. 0o755).
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(&Header {
            name,
            mode: S_IFDIR | perm,
            nlink: 2,
            len_bytes: 0,
            rdev: (0, 0),
        })
    }

    /// A regular file holding `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.file_from(name, perm, data.len() as u64, &mut &data[..])
    }

    /// A regular file of `len_bytes` bytes read from `data`, which must yield
    /// exactly that many (a file that changed size while being archived is an
    /// error of kind `UnexpectedEof` or `InvalidData`).
    pub fn file_from(
        &mut self,
        name: &str,
        perm: u32,
        len_bytes: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        self.header(&Header {
            name,
            mode: S_IFREG | perm,
            nlink: 1,
            len_bytes,
            rdev: (0, 0),
        })?;
        let copied = io::copy(&mut data.take(len_bytes), &mut self.out)?;
        if copied != len_bytes {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {len_bytes} bytes, read {copied}"),
            ));
        }
        let mut probe = [0u8; 1];
        if data.read(&mut probe)? != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name}: longer than the announced {len_bytes} bytes"),
            ));
        }
        self.written_bytes += len_bytes;
        self.pad()
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(&Header {
            name,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            len_bytes: target.len() as u64,
            rdev: (0, 0),
        })?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    /// A character device node (e.g. `dev/console`, 5:1).
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(&Header {
            name,
            mode: S_IFCHR | perm,
            nlink: 1,
            len_bytes: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.header(&Header {
            name: TRAILER_NAME,
            mode: 0,
            nlink: 1,
            len_bytes: 0,
            rdev: (0, 0),
        })?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, h: &Header<'_>) -> io::Result<()> {
        if h.name.is_empty() || h.name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry name {:?} is empty or holds a NUL", h.name),
            ));
        }
        let len_bytes = u32::try_from(h.len_bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {} bytes do not fit newc's 32-bit size",
                    h.name, h.len_bytes
                ),
            )
        })?;
        let name_len = u32::try_from(h.name.len() + 1).expect("paths are far shorter than 4 GiB");
        let ino = self.next_ino;
        self.next_ino += 1;
        // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check.
        let fields = [
            ino, h.mode, 0, 0, h.nlink, 0, len_bytes, 0, 0, h.rdev.0, h.rdev.1, name_len, 0,
        ];
        let mut header = Vec::with_capacity(110 + h.name.len() + 4);
        header.extend_from_slice(NEWC_MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        header.extend_from_slice(h.name.as_bytes());
        header.push(0);
        self.write(&header)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written_bytes += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let len = (ALIGN_BYTES - self.written_bytes % ALIGN_BYTES) % ALIGN_BYTES;
        self.write(&[0u8; ALIGN_BYTES as usize][..len as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.dir("bin", 0o755).unwrap();
        cpio.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        cpio.symlink("bin/sh", "busybox").unwrap();
        cpio.char_dev("console", 0o600, 5, 1).unwrap();
        cpio.finish().unwrap()
    }

    #[test]
    fn first_header_is_the_documented_layout() {
        let bytes = sample();
        let expected = concat!(
            "070701", "00000001", // ino
            "000041ED", // mode: directory, 0755
            "00000000", // uid
            "00000000", // gid
            "00000002", // nlink
            "00000000", // mtime
            "00000000", // filesize
            "00000000", // devmajor
            "00000000", // devminor
            "00000000", // rdevmajor
            "00000000", // rdevminor
            "00000004", // namesize: "bin\0"
            "00000000", // check
            "bin\0",
        );
        assert_eq!(&bytes[..expected.len()], expected.as_bytes());
        // 110 + 4 = 114 bytes, padded to 116 before the next header.
        assert_eq!(&bytes[114..116], b"\0\0");
        assert_eq!(&bytes[116..122], NEWC_MAGIC);
        assert_eq!(bytes.len() % 4, 0);
        let tail = String::from_utf8_lossy(&bytes[bytes.len() - 16..]);
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
    }

    #[test]
    fn a_short_reader_is_an_error() {
        let mut cpio = CpioWriter::new(Vec::new());
        let err = cpio
            .file_from("x", 0o644, 10, &mut &b"abc"[..])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = cpio.file_from("y", 0o644, 2, &mut &b"abc"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// GNU cpio (when installed) is the oracle: it must list and extract the
    /// archive with the same names, modes, contents and link targets.
    #[test]
    fn gnu_cpio_extracts_what_was_written() {
        let Ok(status) = Command::new("cpio")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
        else {
            eprintln!("SKIPPED: no cpio on PATH");
            return;
        };
        assert!(status.success());
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        fs::write(&archive, sample()).unwrap();
        let out_dir = dir.path().join("out");
        fs::create_dir(&out_dir).unwrap();
        // Device nodes need privileges to extract; list them instead.
        let listing = Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(listing.status.success(), "{listing:?}");
        let listing = String::from_utf8(listing.stdout).unwrap();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("-rwxr-xr-x") && lines[1].ends_with(" bin/hello"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with(" bin/sh -> busybox"),
            "{listing}"
        );
        assert!(
            lines[3].starts_with("crw-------")
                && lines[3].contains("5,")
                && lines[3].ends_with(" console"),
            "{listing}"
        );

        let extract = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .args(["bin", "bin/hello", "bin/sh"])
            .current_dir(&out_dir)
            .output()
            .unwrap();
        assert!(extract.status.success(), "{extract:?}");
        assert_eq!(
            fs::read(out_dir.join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            fs::read_link(out_dir.join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
    }
}
