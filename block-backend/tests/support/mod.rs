//! A VMM's side of the vhost-user connection, for the backend tests: the
//! `ringvm-blk` binary on a real unix socket, and the guest of
//! `ringvm-backend`'s test frontend (the vhost crate's frontend, guest
//! memory in a memfd that both processes map, split-queue rings laid out by
//! hand, and kick/call eventfds) with virtio-blk requests on top
//! ([`BlkRequests`]).

#![allow(dead_code)]

pub mod qcow2;

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::Command;

use ringvm_backend::test_support::BackendProcess;
pub use ringvm_backend::test_support::{Desc, Guest};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

pub const IMAGE_BYTES: u64 = 4 << 20;
pub const HDR: u64 = 0x10_0000;
pub const STATUS: u64 = 0x18_0000;
pub const DATA: u64 = 0x20_0000;

/// The byte the test images hold at `offset`.
pub fn pattern(offset: u64) -> u8 {
    (offset / 512 * 7 + offset % 251) as u8
}

pub fn patterned(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern).collect()
}

/// A running `ringvm-blk` and the files it serves. Dereferences to the
/// process (stderr, signals, exit, counters).
pub struct Backend {
    // First: dropped (the process killed) before `dir` is removed.
    process: BackendProcess,
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
}

impl Backend {
    /// A patterned raw image of IMAGE_BYTES, served with `args`.
    pub fn start(args: &[&str]) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::write(&image, patterned(0, IMAGE_BYTES as usize)).unwrap();
        Self::start_with(dir, image, args)
    }

    pub fn start_with(dir: tempfile::TempDir, image: PathBuf, args: &[&str]) -> Backend {
        let socket = dir.path().join("blk.sock");
        let mut backend = Self::spawn(dir, image, socket, args);
        backend.process.wait_for_socket(&backend.socket);
        backend
    }

    /// Spawns without waiting for the socket.
    pub fn spawn(
        dir: tempfile::TempDir,
        image: PathBuf,
        socket: PathBuf,
        args: &[&str],
    ) -> Backend {
        let process = BackendProcess::spawn(
            "ringvm-blk",
            Command::new(env!("CARGO_BIN_EXE_ringvm-blk"))
                .arg("--image")
                .arg(&image)
                .arg("--socket")
                .arg(&socket)
                .args(args),
        );
        Backend {
            process,
            dir,
            image,
            socket,
        }
    }

    pub fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let bytes = std::fs::read(&self.image).unwrap();
        bytes[offset as usize..offset as usize + len].to_vec()
    }
}

impl Deref for Backend {
    type Target = BackendProcess;

    fn deref(&self) -> &BackendProcess {
        &self.process
    }
}

impl DerefMut for Backend {
    fn deref_mut(&mut self) -> &mut BackendProcess {
        &mut self.process
    }
}

/// virtio-blk requests on the test guest: header at HDR, data at DATA, the
/// status byte at STATUS.
pub trait BlkRequests {
    /// Serves one chain on queue `q`: returns (status byte, used length).
    fn request(&mut self, q: usize, descs: &[Desc]) -> (u8, u32);

    /// WRITE of `data` at `sector` on queue 0, from DATA; the status byte.
    fn write_at(&mut self, sector: u64, data: &[u8]) -> u8;

    /// READ of `len` bytes at `sector` on queue 0, into DATA: the status
    /// byte and the bytes (what DATA holds after the request).
    fn read_at(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>);

    /// FLUSH on queue 0: the status byte.
    fn flush(&mut self) -> u8;

    /// DISCARD or WRITE_ZEROES (`request_type`) of one segment on queue 0:
    /// the status byte.
    fn segment_request(
        &mut self,
        request_type: u32,
        sector: u64,
        num_sectors: u32,
        flags: u32,
    ) -> u8;

    fn header(&self, at: u64, request_type: u32, sector: u64);

    fn segment(&self, at: u64, sector: u64, num_sectors: u32, flags: u32);
}

impl BlkRequests for Guest {
    fn request(&mut self, q: usize, descs: &[Desc]) -> (u8, u32) {
        let status_at = descs.iter().rev().find_map(|d| match *d {
            Desc::W(addr, len) if len > 0 => Some(addr + u64::from(len) - 1),
            _ => None,
        });
        if let Some(at) = status_at {
            // Not there when the test puts the status outside memory.
            let _ = self.mem.write_obj(0xeeu8, GuestAddress(at));
        }
        let before = self.used_idx(q);
        let head = self.submit(q, descs);
        self.kick(q);
        self.wait_used(q, before.wrapping_add(1));
        let (id, len) = self.used(q, before);
        assert_eq!(id, u32::from(head));
        let status = status_at
            .and_then(|at| self.mem.read_obj(GuestAddress(at)).ok())
            .unwrap_or(0xee);
        (status, len)
    }

    fn write_at(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.header(HDR, VIRTIO_BLK_T_OUT, sector);
        self.write_mem(DATA, data);
        let len = u32::try_from(data.len()).unwrap();
        self.request(
            0,
            &[Desc::R(HDR, 16), Desc::R(DATA, len), Desc::W(STATUS, 1)],
        )
        .0
    }

    fn read_at(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.header(HDR, VIRTIO_BLK_T_IN, sector);
        self.fill(DATA, len, 0xee);
        let len_u32 = u32::try_from(len).unwrap();
        let (status, _) = self.request(
            0,
            &[Desc::R(HDR, 16), Desc::W(DATA, len_u32), Desc::W(STATUS, 1)],
        );
        (status, self.read(DATA, len))
    }

    fn flush(&mut self) -> u8 {
        self.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
        self.request(0, &[Desc::R(HDR, 16), Desc::W(STATUS, 1)]).0
    }

    fn segment_request(
        &mut self,
        request_type: u32,
        sector: u64,
        num_sectors: u32,
        flags: u32,
    ) -> u8 {
        self.header(HDR, request_type, 0);
        self.segment(HDR + 16, sector, num_sectors, flags);
        self.request(0, &[Desc::R(HDR, 32), Desc::W(STATUS, 1)]).0
    }

    fn header(&self, at: u64, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(at)).unwrap();
    }

    fn segment(&self, at: u64, sector: u64, num_sectors: u32, flags: u32) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }
}
