//! How the owner serves each request: [`serve`] and the methods of
//! [`State`] it calls. The defects of qcow2-rs handled here are listed in
//! the module documentation of [`super`].

use std::rc::Rc;
use std::sync::atomic::Ordering;

use qcow2_rs::error::Qcow2Result;
use qcow2_rs::meta::MappingSource;
use tracing::{error, warn};

use super::super::engine::VirtualOp;
use super::super::meta::{self, UnmapMode};
use super::{open_dev, Dev, State, BLOCK_BYTES, ZERO_CHUNK_BYTES};
use crate::engine::IoVec;

pub(super) async fn serve(state: &Rc<State>, op: VirtualOp) -> i32 {
    if state.failed.get() {
        return -libc::EIO;
    }
    match op {
        VirtualOp::Nop => 0,
        VirtualOp::Read { offset, iovecs } => state.read(offset, &iovecs).await,
        VirtualOp::Write { offset, iovecs } => state.write(offset, &iovecs).await,
        // Boxed: rare, and their futures (reopening the image) are large;
        // unboxed they would size every read and write task.
        VirtualOp::Flush => Box::pin(state.flush()).await,
        VirtualOp::Zero {
            offset,
            len_bytes,
            unmap,
        } => Box::pin(state.zero(offset, len_bytes, unmap)).await,
    }
}

/// A read of `want` bytes by qcow2-rs, which answers a read spanning
/// clusters with the bytes before the first cluster it could not read (a
/// corrupt compressed cluster) instead of an error; the rest of the buffer
/// is left as it was, and must not reach the guest as data.
fn read_whole(read: Qcow2Result<usize>, want: usize) -> Qcow2Result<()> {
    match read? {
        n if n == want => Ok(()),
        n => Err(std::io::Error::other(format!("qcow2-rs read {n} of {want} bytes")).into()),
    }
}

fn total_len(iovecs: &[IoVec]) -> u64 {
    iovecs.iter().map(|iov| iov.len_bytes() as u64).sum()
}

impl State {
    fn dev(&self) -> Option<Rc<Dev>> {
        self.dev.borrow().clone()
    }

    fn cluster_bytes(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// IOERR for requests touching an entry that failed validation; the
    /// first one marks the image corrupt on disk.
    fn touches_bad_entry(&self, offset: u64, len_bytes: u64) -> bool {
        if self.bad.is_empty() || len_bytes == 0 {
            return false;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len_bytes - 1) >> self.cluster_bits;
        if !self.bad.any_in(first, last - first + 1) {
            return false;
        }
        self.core
            .counters()
            .corrupt_entry_requests
            .fetch_add(1, Ordering::Relaxed);
        if !self.bad_logged.get() {
            self.bad_logged.set(true);
            let what = (first..=last)
                .find_map(|c| self.bad.describe(c))
                .unwrap_or_default();
            error!(
                "{}: bytes {offset}..+{len_bytes} use a corrupt table entry ({what}); \
                 refusing them and marking the image corrupt",
                self.chain[0].path.display()
            );
        }
        if !self.readonly && !self.core.corrupt_marked() {
            self.core.set_corrupt_marked();
            if let Err(err) = meta::mark_corrupt(&self.chain[0].file) {
                error!("cannot set the corrupt bit: {err}");
            }
        }
        true
    }

    async fn read(&self, offset: u64, iovecs: &[IoVec]) -> i32 {
        let len = total_len(iovecs);
        if self.touches_bad_entry(offset, len) {
            return -libc::EIO;
        }
        let Some(dev) = self.dev() else {
            return -libc::EIO;
        };
        let result = if self.backing_ends.iter().any(|&end| end < offset + len)
            || self.touches_compressed(offset, len)
        {
            self.read_through_zeroes(&dev, offset, len, iovecs).await
        } else if iovecs.iter().all(|iov| iov.len_bytes() % BLOCK_BYTES == 0) {
            let mut reads = Vec::with_capacity(iovecs.len());
            let mut at = offset;
            for iov in iovecs {
                // SAFETY: the iovec points into guest memory that the queue
                // worker keeps mapped until this request completes. qcow2-rs
                // hands the slice to the kernel (allocated clusters) or fills
                // it (zero, backing and compressed clusters); the guest may
                // touch the same bytes meanwhile, as it may with any device.
                let buf = unsafe { std::slice::from_raw_parts_mut(iov.base(), iov.len_bytes()) };
                let (ptr, len) = (buf.as_ptr(), buf.len());
                reads.push(self.core.with_data(ptr, len, false, dev.read_at(buf, at)));
                at += iov.len_bytes() as u64;
            }
            futures::future::join_all(reads)
                .await
                .into_iter()
                .zip(iovecs)
                .try_for_each(|(read, iov)| read_whole(read, iov.len_bytes()))
        } else {
            // Buffers that are not whole sectors: through a bounce buffer.
            let mut bounce = vec![0u8; len as usize];
            let (ptr, len) = (bounce.as_ptr(), bounce.len());
            let result = self
                .core
                .with_data(ptr, len, true, dev.read_at(&mut bounce, offset))
                .await;
            let result = read_whole(result, len);
            if result.is_ok() {
                let mut done = 0;
                for iov in iovecs {
                    // SAFETY: as above.
                    let buf =
                        unsafe { std::slice::from_raw_parts_mut(iov.base(), iov.len_bytes()) };
                    buf.copy_from_slice(&bounce[done..done + iov.len_bytes()]);
                    done += iov.len_bytes();
                }
            }
            result
        };
        match result {
            Ok(()) => len as i32,
            Err(err) => {
                warn!("qcow2: read at {offset:#x} failed: {err:?}");
                -libc::EIO
            }
        }
    }

    /// A read reaching past the end of a backing file (one smaller than
    /// the image above it), or into compressed clusters (qcow2-rs leaves
    /// what a short compressed stream does not fill as it was), through a
    /// bounce buffer of zeroes ([`Self::read_split`]).
    async fn read_through_zeroes(
        &self,
        dev: &Dev,
        offset: u64,
        len: u64,
        iovecs: &[IoVec],
    ) -> Qcow2Result<()> {
        let mut bounce = vec![0u8; len as usize];
        self.read_split(dev, offset, &mut bounce).await?;
        let mut done = 0;
        for iov in iovecs {
            // SAFETY: as in `read`.
            let buf = unsafe { std::slice::from_raw_parts_mut(iov.base(), iov.len_bytes()) };
            buf.copy_from_slice(&bounce[done..done + iov.len_bytes()]);
            done += iov.len_bytes();
        }
        Ok(())
    }

    /// Reads into `buf`, which holds zeroes, at `offset`. qcow2-rs answers
    /// the part of a backing file's read past its end without filling it,
    /// and reads one that straddles its end wrongly: the read goes in
    /// pieces that end where a backing file does, and what is past the end
    /// of every backing file keeps its zeroes.
    async fn read_split(&self, dev: &Dev, offset: u64, buf: &mut [u8]) -> Qcow2Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let piece_end = self
                .backing_ends
                .iter()
                .copied()
                .find(|&e| e > at && e < end)
                .unwrap_or(end);
            let piece = &mut buf[(at - offset) as usize..(piece_end - offset) as usize];
            let (ptr, n) = (piece.as_ptr(), piece.len());
            let read = self
                .core
                .with_data(ptr, n, true, dev.read_at(piece, at))
                .await;
            read_whole(read, n)?;
            at = piece_end;
        }
        Ok(())
    }

    /// Whether `len` bytes at `offset` touch a cluster that was compressed
    /// at open.
    fn touches_compressed(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        self.compressed.any_in(first, last - first + 1)
    }

    /// Whether a write of `len` bytes at `offset` must go through
    /// [`Self::write_whole_clusters`]: it writes part of a cluster that
    /// reaches past the end of a backing file, or of a compressed one.
    fn needs_whole_clusters(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let cluster = self.cluster_bytes();
        let end = offset + len;
        let disk_end = self.chain[0].layout.virtual_size;
        let partial = offset % cluster != 0 || (end % cluster != 0 && end < disk_end);
        let past_backing_end = self
            .copy_unsafe_from
            .is_some_and(|first| (end - 1) >> self.cluster_bits >= first);
        partial && (past_backing_end || self.touches_compressed(offset, len))
    }

    /// Whether `op` rewrites whole clusters: it runs alone.
    pub(super) fn rewrites_clusters(&self, op: &VirtualOp) -> bool {
        match op {
            VirtualOp::Write { offset, iovecs } => {
                self.needs_whole_clusters(*offset, total_len(iovecs))
            }
            VirtualOp::Zero {
                offset, len_bytes, ..
            } => self.needs_whole_clusters(*offset, *len_bytes),
            _ => false,
        }
    }

    /// Writes `data` at `offset`, part of clusters that reach past the end
    /// of a backing file or are compressed. Before a partial write, qcow2-rs
    /// copies such a cluster into a buffer of uninitialised memory, with a
    /// backing file read straddling or past its end, or with a compressed
    /// stream that may be short, which leave part of it unfilled. So the
    /// whole clusters are read here ([`Self::read_split`]), merged with
    /// `data` and written whole: nothing qcow2-rs copies is kept. The
    /// request runs alone: no other write can fall between the read and
    /// the write.
    async fn write_whole_clusters(&self, dev: &Dev, offset: u64, data: &[u8]) -> Qcow2Result<()> {
        let cluster = self.cluster_bytes();
        let disk_end = self.chain[0].layout.virtual_size / BLOCK_BYTES as u64 * BLOCK_BYTES as u64;
        let start = offset & !(cluster - 1);
        let end = (offset + data.len() as u64)
            .next_multiple_of(cluster)
            .min(disk_end);
        let mut whole = vec![0u8; (end - start) as usize];
        self.read_split(dev, start, &mut whole).await?;
        let at = (offset - start) as usize;
        whole[at..at + data.len()].copy_from_slice(data);
        self.core
            .with_data(
                whole.as_ptr(),
                whole.len(),
                true,
                dev.write_at(&whole, start),
            )
            .await
    }

    /// After a metadata write failed, only writes that need no allocation
    /// are served.
    async fn all_allocated(&self, dev: &Dev, offset: u64, len: u64) -> bool {
        let cluster = self.cluster_bytes();
        let mut at = offset & !(cluster - 1);
        while at < offset + len {
            match dev.get_mapping(at).await {
                Ok(m) if m.source == MappingSource::DataFile && m.cluster_offset.is_some() => {}
                _ => return false,
            }
            at += cluster;
        }
        true
    }

    async fn write(&self, offset: u64, iovecs: &[IoVec]) -> i32 {
        let len = total_len(iovecs);
        if self.readonly || self.touches_bad_entry(offset, len) {
            return -libc::EIO;
        }
        let Some(dev) = self.dev() else {
            return -libc::EIO;
        };
        if self.metadata_failed.get() && !self.all_allocated(&dev, offset, len).await {
            return -libc::ENOSPC;
        }
        let whole_clusters = self.needs_whole_clusters(offset, len);
        let result =
            if !whole_clusters && iovecs.iter().all(|iov| iov.len_bytes() % BLOCK_BYTES == 0) {
                let mut writes = Vec::with_capacity(iovecs.len());
                let mut at = offset;
                for iov in iovecs {
                    // SAFETY: as in `read`; qcow2-rs only reads these bytes.
                    let buf = unsafe { std::slice::from_raw_parts(iov.base(), iov.len_bytes()) };
                    writes.push(self.core.with_data(
                        buf.as_ptr(),
                        buf.len(),
                        false,
                        dev.write_at(buf, at),
                    ));
                    at += iov.len_bytes() as u64;
                }
                futures::future::join_all(writes)
                    .await
                    .into_iter()
                    .collect::<Qcow2Result<Vec<()>>>()
                    .map(|_| ())
            } else {
                let mut bounce = Vec::with_capacity(len as usize);
                for iov in iovecs {
                    // SAFETY: as in `read`.
                    let buf = unsafe { std::slice::from_raw_parts(iov.base(), iov.len_bytes()) };
                    bounce.extend_from_slice(buf);
                }
                if whole_clusters {
                    self.write_whole_clusters(&dev, offset, &bounce).await
                } else {
                    self.core
                        .with_data(
                            bounce.as_ptr(),
                            bounce.len(),
                            true,
                            dev.write_at(&bounce, offset),
                        )
                        .await
                }
            };
        match result {
            Ok(()) => len as i32,
            Err(err) => {
                warn!("qcow2: write at {offset:#x} failed: {err:?}");
                -libc::EIO
            }
        }
    }

    /// FLUSH: qcow2-rs writes refcounts, syncs, then L2 and L1 tables (a
    /// table never points at a cluster whose refcount is not durable); then
    /// the file is synced, which makes the data and the last tables durable.
    async fn flush(&self) -> i32 {
        if self.readonly {
            return 0;
        }
        if self.metadata_failed.get() {
            return -libc::EIO;
        }
        let Some(dev) = self.dev() else {
            return -libc::EIO;
        };
        if let Err(err) = dev.flush_meta().await {
            error!("qcow2: cannot write metadata: {err:?}; FLUSH fails from now on");
            self.metadata_failed.set(true);
            return -libc::EIO;
        }
        if let Err(err) = dev.fsync_range(0, usize::MAX).await {
            // After a failed fsync the page cache may have dropped the
            // data: nothing written since can be promised either.
            error!("qcow2: fdatasync failed: {err:?}; FLUSH fails from now on");
            self.metadata_failed.set(true);
            return -libc::EIO;
        }
        0
    }

    async fn write_zeroes(&self, dev: &Dev, offset: u64, len: u64) -> Qcow2Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK_BYTES.min(len as usize)];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64);
            let chunk = &zeroes[..n as usize];
            if self.needs_whole_clusters(at, n) {
                self.write_whole_clusters(dev, at, chunk).await?;
            } else {
                self.core
                    .with_data(chunk.as_ptr(), chunk.len(), true, dev.write_at(chunk, at))
                    .await?;
            }
            at += n;
        }
        Ok(())
    }

    async fn zero(&self, offset: u64, len: u64, unmap: bool) -> i32 {
        if self.readonly || self.touches_bad_entry(offset, len) {
            return -libc::EIO;
        }
        let cluster = self.cluster_bytes();
        let end = offset + len;
        let first_whole = offset.div_ceil(cluster);
        let end_whole = end / cluster;
        let mut to_write: Vec<(u64, u64)> = Vec::new();
        if !unmap || first_whole >= end_whole {
            to_write.push((offset, len));
        } else {
            if offset < first_whole * cluster {
                to_write.push((offset, first_whole * cluster - offset));
            }
            match self.unmap(first_whole, end_whole - first_whole).await {
                Ok(unhandled) => to_write.extend(
                    unhandled
                        .into_iter()
                        .map(|(c, n)| (c * cluster, n * cluster)),
                ),
                Err(errno) => return errno,
            }
            if end_whole * cluster < end {
                to_write.push((end_whole * cluster, end - end_whole * cluster));
            }
        }
        let Some(dev) = self.dev() else {
            return -libc::EIO;
        };
        for (at, n) in to_write {
            if self.metadata_failed.get() && !self.all_allocated(&dev, at, n).await {
                return -libc::ENOSPC;
            }
            if let Err(err) = self.write_zeroes(&dev, at, n).await {
                warn!("qcow2: writing zeroes at {at:#x} failed: {err:?}");
                return -libc::EIO;
            }
        }
        0
    }

    /// Frees whole clusters (the barrier described in the module
    /// documentation). Returns the runs that must be zeroed by writing.
    async fn unmap(&self, first: u64, count: u64) -> Result<Vec<(u64, u64)>, i32> {
        if self.metadata_failed.get() {
            return Ok(vec![(first, count)]);
        }
        let Some(dev) = self.dev.borrow_mut().take() else {
            return Err(-libc::EIO);
        };
        if let Err(err) = dev.flush_meta().await {
            error!("qcow2: cannot write metadata before a discard: {err:?}");
            self.metadata_failed.set(true);
            *self.dev.borrow_mut() = Some(dev);
            return Ok(vec![(first, count)]);
        }
        // Nothing else runs during a barrier, so this is the last reference.
        drop(dev);
        let image = &self.chain[0];
        let outcome = meta::unmap(&image.file, &image.layout, first, count, UnmapMode::Discard);
        let reopened = open_dev(&self.core, &self.chain, self.readonly).await;
        match reopened {
            Ok(dev) => *self.dev.borrow_mut() = Some(Rc::new(dev)),
            Err(message) => {
                error!(
                    "{}: cannot open the image again after a discard: {message}; \
                     every request fails from now on",
                    image.path.display()
                );
                self.failed.set(true);
                return Err(-libc::EIO);
            }
        }
        match outcome {
            Ok(outcome) => {
                self.core
                    .counters()
                    .clusters_freed
                    .fetch_add(outcome.freed_clusters, Ordering::Relaxed);
                Ok(outcome.unhandled)
            }
            Err(err) => {
                error!("{}: discard failed: {err}", image.path.display());
                Err(-libc::EIO)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::qcow2::Qcow2Image;
    use std::os::unix::fs::FileExt;

    /// One operation through a queue engine, waited for.
    fn serve_one(engine: &mut dyn crate::engine::Engine, op: crate::engine::EngineOp<'_>) -> i32 {
        // SAFETY: the callers' buffers outlive this call, which returns
        // only after the completion is reaped.
        unsafe { engine.push(op, 7) }.unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            engine.wait().unwrap();
            engine.reap(&mut done);
        }
        assert_eq!(done[0].tag, 7);
        done[0].result
    }

    fn read(engine: &mut dyn crate::engine::Engine, offset: u64, buf: &mut [u8]) -> i32 {
        let iovecs = [IoVec::new(buf.as_mut_ptr(), buf.len())];
        let op = crate::engine::EngineOp::Readv {
            file: 0,
            offset,
            iovecs: &iovecs,
        };
        serve_one(engine, op)
    }

    fn write(engine: &mut dyn crate::engine::Engine, offset: u64, buf: &mut [u8]) -> i32 {
        let iovecs = [IoVec::new(buf.as_mut_ptr(), buf.len())];
        let op = crate::engine::EngineOp::Writev {
            file: 0,
            offset,
            iovecs: &iovecs,
        };
        serve_one(engine, op)
    }

    /// Found by the qcow2_image fuzz target: after a request touched a bad
    /// L2 entry (and the corrupt bit was set), the next discard opened the
    /// image again through qcow2-rs, which refused the corrupt bit, and the
    /// whole disk failed every request from then on.
    #[test]
    fn a_discard_after_a_bad_entry_keeps_the_rest_of_the_image_served() {
        use crate::engine::{EngineOp, FallocateMode};
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, CLUSTER).unwrap();
        {
            let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x5a; 8 * CLUSTER as usize];
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        // Guest cluster 3's L2 entry gets a reserved bit.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_u64 = |at: u64| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, at).unwrap();
            u64::from_be_bytes(word)
        };
        let l2 = read_u64(read_u64(40)) & 0x00ff_ffff_ffff_fe00;
        let entry = read_u64(l2 + 3 * 8) | 2;
        file.write_all_at(&entry.to_be_bytes(), l2 + 3 * 8).unwrap();

        let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut buf = vec![0u8; CLUSTER as usize];
        assert_eq!(read(&mut *engine, 3 * CLUSTER, &mut buf), -libc::EIO);
        let discard = EngineOp::Fallocate {
            file: 0,
            offset: CLUSTER,
            len_bytes: CLUSTER,
            mode: FallocateMode::PunchHole,
        };
        assert_eq!(serve_one(&mut *engine, discard), 0, "the discard");
        assert_eq!(read(&mut *engine, 0, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0x5a), "cluster 0 kept its data");
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0), "cluster 1 was discarded");
        buf.fill(0xa5);
        assert_eq!(write(&mut *engine, 2 * CLUSTER, &mut buf), CLUSTER as i32);
        assert_eq!(read(&mut *engine, 3 * CLUSTER, &mut buf), -libc::EIO);
        let counters = image.counters().unwrap();
        drop(engine);
        drop(image);
        assert_eq!(counters.panics.load(Ordering::Relaxed), 0);
        // The bit stays for `qemu-img check -r` to see.
        let err = meta::read_layout(&file, &path).unwrap_err();
        assert!(err.to_string().contains("corrupt bit"), "{err}");
    }

    /// Found by the qcow2_image fuzz target: an L1 entry pointing past the
    /// end of the file was refused only while the file was shorter; the
    /// session's writes grew the file over its target, and the next open
    /// took the data cluster allocated there for that entry's L2 table.
    #[test]
    fn entries_past_the_end_of_the_file_mark_the_image_corrupt_at_open() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        const COPIED: u64 = 1 << 63;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        // 8 MiB: four L1 entries of 2 MiB.
        meta::create(&path, 8 << 20, CLUSTER).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, 40).unwrap();
        let l1 = u64::from_be_bytes(word);
        let len = file.metadata().unwrap().len();
        let target = len.next_multiple_of(CLUSTER) + 2 * CLUSTER;
        file.write_all_at(&(COPIED | target).to_be_bytes(), l1 + 8)
            .unwrap();
        let corrupt_bit = || {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, 79).unwrap();
            byte[0] & 2 != 0
        };

        let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        assert!(corrupt_bit(), "marked at open, before any request");
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut data = vec![0x5a; 4 * CLUSTER as usize];
        assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        let mut buf = vec![0u8; CLUSTER as usize];
        assert_eq!(read(&mut *engine, 2 << 20, &mut buf), -libc::EIO);
        let discard = crate::engine::EngineOp::Fallocate {
            file: 0,
            offset: 0,
            len_bytes: CLUSTER,
            mode: crate::engine::FallocateMode::PunchHole,
        };
        assert_eq!(serve_one(&mut *engine, discard), 0, "served after the mark");
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0x5a));
        drop(engine);
        drop(image);
        assert!(
            file.metadata().unwrap().len() > target,
            "the file grew over the entry's target"
        );
        let err = meta::read_layout(&file, &path).unwrap_err();
        assert!(err.to_string().contains("corrupt bit"), "{err}");
    }

    /// Found by the qcow2_image fuzz target: a read spanning clusters, one
    /// of which holds compressed data that does not inflate, was answered
    /// OK, with the bytes of that cluster and those after it never written.
    #[test]
    fn a_read_of_a_cluster_that_does_not_decompress_fails_whole() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, CLUSTER).unwrap();
        {
            let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x5a; 3 * CLUSTER as usize];
            // 0xff opens a deflate block of the reserved type 3.
            data[CLUSTER as usize..2 * CLUSTER as usize].fill(0xff);
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        // Guest cluster 1 becomes one compressed sector, at its own cluster.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_u64 = |at: u64| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, at).unwrap();
            u64::from_be_bytes(word)
        };
        let l2 = read_u64(read_u64(40)) & 0x00ff_ffff_ffff_fe00;
        let host = read_u64(l2 + 8) & 0x00ff_ffff_ffff_fe00;
        let compressed = 1u64 << 62 | host;
        file.write_all_at(&compressed.to_be_bytes(), l2 + 8)
            .unwrap();

        let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut buf = vec![0u8; CLUSTER as usize];
        assert_eq!(read(&mut *engine, 2 * CLUSTER, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0x5a));
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), -libc::EIO);
        let mut three = vec![0u8; 3 * CLUSTER as usize];
        assert_eq!(read(&mut *engine, 0, &mut three), -libc::EIO, "one iovec");
        // Unaligned iovecs go through the owner's bounce buffer.
        let (a, b) = three.split_at_mut(1000);
        let iovecs = [
            IoVec::new(a.as_mut_ptr(), a.len()),
            IoVec::new(b.as_mut_ptr(), b.len()),
        ];
        let op = crate::engine::EngineOp::Readv {
            file: 0,
            offset: 0,
            iovecs: &iovecs,
        };
        assert_eq!(serve_one(&mut *engine, op), -libc::EIO, "two iovecs");
    }

    /// Found by the qcow2_image fuzz target: a header with a backing file
    /// offset but a name length of 0 (no backing file, for QEMU and for
    /// read_layout) made every write to an unallocated cluster fail.
    #[test]
    fn a_backing_file_offset_without_a_name_is_no_backing_file() {
        use crate::image::{ImageFormat, OpenOptions};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, 4096).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&0x100u64.to_be_bytes(), 8).unwrap();
        let layout = meta::read_layout(&file, &path).unwrap();
        assert_eq!(layout.backing, None);

        let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut data = vec![0x5a; 6144];
        assert_eq!(write(&mut *engine, 2048, &mut data), data.len() as i32);
        let mut back = vec![0u8; 8192];
        assert_eq!(read(&mut *engine, 0, &mut back), back.len() as i32);
        assert!(back[..2048].iter().all(|&b| b == 0));
        assert!(back[2048..].iter().all(|&b| b == 0x5a));
    }

    /// Found by the qcow2_image fuzz target: a write to part of a data
    /// cluster whose L2 entry lacks the COPIED flag went to a new cluster,
    /// and the rest of the cluster read as zeroes. Such entries are
    /// poisoned by the scan: the write gets IOERR and loses nothing.
    #[test]
    fn a_data_cluster_without_the_copied_flag_is_not_written() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, CLUSTER).unwrap();
        {
            let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x5a; 2 * CLUSTER as usize];
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_u64 = |at: u64| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, at).unwrap();
            u64::from_be_bytes(word)
        };
        let l2 = read_u64(read_u64(40)) & 0x00ff_ffff_ffff_fe00;
        let entry = read_u64(l2) & !meta::entry::COPIED;
        file.write_all_at(&entry.to_be_bytes(), l2).unwrap();

        let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut part = vec![0xa5; 1024];
        assert_eq!(write(&mut *engine, 512, &mut part), -libc::EIO);
        let mut buf = vec![0u8; CLUSTER as usize];
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert!(buf.iter().all(|&b| b == 0x5a), "cluster 1 is served");
        drop(engine);
        drop(image);
        // Read by another implementation: cluster 0 kept all its data.
        let mut back = vec![0u8; CLUSTER as usize];
        file.read_exact_at(&mut back, entry & 0x00ff_ffff_ffff_fe00)
            .unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
    }

    /// A backing file of 1 MiB - 2 KiB (4 KiB clusters) full of 0x3c, and a
    /// 2 MiB image on it with `cluster` byte clusters.
    fn smaller_backing_file(dir: &std::path::Path, cluster: u64) -> std::path::PathBuf {
        use crate::image::{ImageFormat, OpenOptions};
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        meta::create(&base, SMALL_BASE_BYTES, 4096).unwrap();
        {
            let image = Qcow2Image::open(&base, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x3c; SMALL_BASE_BYTES as usize];
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .args(["-o", &format!("cluster_size={cluster}")])
            .args(["-b", "base.qcow2", "-F", "qcow2"])
            .arg(&top)
            .arg("2M")
            .output()
            .expect("qemu-img (qemu-utils)");
        assert!(out.status.success(), "{out:?}");
        top
    }

    const SMALL_BASE_BYTES: u64 = (1 << 20) - 2048;

    /// Found by the qcow2_image fuzz target: the part of a read past the
    /// end of a backing file smaller than the image came back unfilled
    /// (the guest saw its own buffer's old bytes), and a read straddling
    /// the backing file's end was read wrongly.
    #[test]
    fn past_the_end_of_a_smaller_backing_file_reads_zeroes() {
        use crate::image::{ImageFormat, OpenOptions};
        let dir = tempfile::tempdir().unwrap();
        let top = smaller_backing_file(dir.path(), 4096);
        let image = Qcow2Image::open(&top, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        // The top image's cluster at 1 MiB - 4 KiB straddles the end of
        // the backing file; 1 MiB on is past it.
        let start = (1 << 20) - 8192;
        let mut buf = vec![0xee; 16384];
        assert_eq!(read(&mut *engine, start, &mut buf), buf.len() as i32);
        let split = (SMALL_BASE_BYTES - start) as usize;
        assert!(
            buf[..split].iter().all(|&b| b == 0x3c),
            "the backing file's data"
        );
        assert!(buf[split..].iter().all(|&b| b == 0), "zeroes past its end");
        let mut past = vec![0xee; 8192];
        assert_eq!(read(&mut *engine, 3 << 19, &mut past), past.len() as i32);
        assert!(past.iter().all(|&b| b == 0), "zeroes far past its end");
    }

    /// Found by the qcow2_image fuzz target: a write to part of a cluster
    /// straddling the end of a smaller backing file (here 64 KiB, over 4
    /// KiB clusters) copied the cluster from the backing file with that
    /// straddling read, and the backing file's last bytes read as zeroes;
    /// past its end, the copy was uninitialised memory.
    #[test]
    fn clusters_reaching_past_the_end_of_a_backing_file_are_copied_right() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let top = smaller_backing_file(dir.path(), CLUSTER);
        let image = Qcow2Image::open(&top, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut data = vec![0xa5; 512];
        assert_eq!(write(&mut *engine, (1 << 20) - 512, &mut data), 512);
        let mut zeroes = crate::engine::EngineOp::Fallocate {
            file: 0,
            offset: (1 << 20) - 1024,
            len_bytes: 512,
            mode: crate::engine::FallocateMode::ZeroRange,
        };
        assert_eq!(serve_one(&mut *engine, zeroes), 0);
        let start = (1 << 20) - CLUSTER;
        let mut buf = vec![0xee; CLUSTER as usize];
        assert_eq!(read(&mut *engine, start, &mut buf), buf.len() as i32);
        let base_end = (SMALL_BASE_BYTES - start) as usize;
        assert!(
            buf[..base_end].iter().all(|&b| b == 0x3c),
            "the backing file's data"
        );
        assert!(buf[base_end..CLUSTER as usize - 512]
            .iter()
            .all(|&b| b == 0));
        assert!(buf[CLUSTER as usize - 512..].iter().all(|&b| b == 0xa5));
        // The next cluster, past the backing file's end: zeroes written.
        zeroes = crate::engine::EngineOp::Fallocate {
            file: 0,
            offset: 1 << 20,
            len_bytes: 512,
            mode: crate::engine::FallocateMode::ZeroRange,
        };
        assert_eq!(serve_one(&mut *engine, zeroes), 0);
        assert_eq!(read(&mut *engine, 1 << 20, &mut buf), buf.len() as i32);
        assert!(buf.iter().all(|&b| b == 0));
    }

    /// Found by the qcow2_image fuzz target: a compressed cluster whose
    /// stream inflates to less than a cluster was read with OK, the rest of
    /// the guest's buffer left as it was (and copied on write from
    /// uninitialised memory).
    #[test]
    fn a_short_compressed_cluster_reads_zeroes_after_its_data() {
        use crate::image::{ImageFormat, OpenOptions};
        const CLUSTER: u64 = 4096;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        meta::create(&path, 1 << 20, CLUSTER).unwrap();
        {
            let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
            let mut engine = image.queue_engine().unwrap().unwrap();
            let mut data = vec![0x5a; 2 * CLUSTER as usize];
            assert_eq!(write(&mut *engine, 0, &mut data), data.len() as i32);
        }
        // Guest cluster 1: one compressed sector at its own cluster, a
        // final stored deflate block of 10 bytes.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let read_u64 = |at: u64| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, at).unwrap();
            u64::from_be_bytes(word)
        };
        let l2 = read_u64(read_u64(40)) & 0x00ff_ffff_ffff_fe00;
        let host = read_u64(l2 + 8) & 0x00ff_ffff_ffff_fe00;
        let mut stream = vec![0x01, 10, 0, !10, 0xff];
        stream.extend_from_slice(b"0123456789");
        file.write_all_at(&stream, host).unwrap();
        file.write_all_at(&(1u64 << 62 | host).to_be_bytes(), l2 + 8)
            .unwrap();

        let image = Qcow2Image::open(&path, OpenOptions::default()).unwrap();
        let mut engine = image.queue_engine().unwrap().unwrap();
        let mut buf = vec![0xee; CLUSTER as usize];
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert_eq!(&buf[..10], b"0123456789");
        assert!(
            buf[10..].iter().all(|&b| b == 0),
            "zeroes, not the buffer's bytes"
        );
        let mut part = vec![0xa5; 512];
        assert_eq!(write(&mut *engine, CLUSTER + 1024, &mut part), 512);
        buf.fill(0xee);
        assert_eq!(read(&mut *engine, CLUSTER, &mut buf), CLUSTER as i32);
        assert_eq!(&buf[..10], b"0123456789");
        assert!(buf[10..1024].iter().all(|&b| b == 0));
        assert!(buf[1024..1536].iter().all(|&b| b == 0xa5));
        assert!(
            buf[1536..].iter().all(|&b| b == 0),
            "no uninitialised memory"
        );
    }
}
