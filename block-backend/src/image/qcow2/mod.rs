//! Thin-provisioned qcow2 images, through qcow2-rs 0.1.6.
//!
//! - [`meta`]: our own parser of qcow2 metadata. It validates the header and
//!   every table entry before qcow2-rs sees the image, refuses what qcow2-rs
//!   would damage, creates images, and gives clusters back on discard.
//! - [`owner`]: the thread that owns qcow2-rs's state and serves every
//!   request of the image.
//! - [`io`]: qcow2-rs's I/O trait on the owner's io_uring.
//! - [`engine`]: what a queue worker sees: an engine over the virtual disk
//!   whose operations go to the owner.
//!
//! As an [`ImageFormat`] a qcow2 image maps guest offsets to themselves on
//! the virtual disk; translation to clusters happens in the owner.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;

use super::{identity_map, Access, Extent, HostFile, ImageError, ImageFormat, OpenOptions};
use crate::engine::{Engine, EngineError};
use crate::request::SECTOR_SHIFT;

pub mod engine;
pub mod io;
pub mod meta;
pub mod owner;

pub use io::ImageCounters;

/// Backing files followed at most this deep (QEMU allows more, but a chain
/// this long is a mistake or a loop).
const MAX_CHAIN: usize = 16;

#[derive(Debug)]
pub struct Qcow2Image {
    files: [HostFile; 1],
    capacity_sectors: u64,
    cluster_bytes: u64,
    counters: Arc<ImageCounters>,
    owner: owner::Owner,
}

fn open_file(path: &Path, readonly: bool) -> Result<File, ImageError> {
    FsOpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| ImageError::Open {
            path: path.to_owned(),
            source,
        })
}

impl Qcow2Image {
    pub fn open(path: &Path, options: OpenOptions) -> Result<Self, ImageError> {
        if options.direct {
            return Err(ImageError::Qcow2 {
                path: path.to_owned(),
                message: "--direct is not supported with qcow2 images yet".into(),
            });
        }
        let file = open_file(path, options.readonly)?;
        let layout = meta::read_layout(&file, path)?;
        let report = meta::scan(&file, path, &layout)?;
        let cluster_bits = layout.cluster_bits;
        let capacity_sectors = layout.virtual_size >> SECTOR_SHIFT;
        let mut chain = vec![owner::ChainImage {
            path: path.to_owned(),
            file: file.try_clone().map_err(|source| ImageError::Open {
                path: path.to_owned(),
                source,
            })?,
            layout,
        }];
        let mut seen = vec![identity(&file, path)?];
        while let Some(backing) = chain.last().and_then(|image| image.layout.backing.clone()) {
            let backing_path: PathBuf = backing.path;
            if chain.len() >= MAX_CHAIN {
                return Err(ImageError::Qcow2 {
                    path: path.to_owned(),
                    message: format!("its backing chain is longer than {MAX_CHAIN} images"),
                });
            }
            let backing_file = open_file(&backing_path, true)?;
            let id = identity(&backing_file, &backing_path)?;
            if seen.contains(&id) {
                return Err(ImageError::Qcow2 {
                    path: path.to_owned(),
                    message: format!("its backing chain loops back to {}", backing_path.display()),
                });
            }
            seen.push(id);
            let backing_layout = meta::read_layout(&backing_file, &backing_path)?;
            let backing_report = meta::scan(&backing_file, &backing_path, &backing_layout)?;
            if !backing_report.bad.is_empty() {
                return Err(ImageError::Qcow2 {
                    path: backing_path,
                    message: "the backing file has corrupt table entries (qemu-img check)".into(),
                });
            }
            chain.push(owner::ChainImage {
                path: backing_path,
                file: backing_file,
                layout: backing_layout,
            });
        }
        if !options.readonly {
            meta::clear_autoclear(&file, &chain[0].layout).map_err(|source| ImageError::Open {
                path: path.to_owned(),
                source,
            })?;
        }
        info!(
            "{}: qcow2, {} byte clusters, {} backing file(s)",
            path.display(),
            1u64 << cluster_bits,
            chain.len() - 1
        );
        let counters = Arc::new(ImageCounters::default());
        let owner = owner::Owner::start(owner::OwnerConfig {
            chain,
            bad: report.bad,
            bad_past_end: report.bad_past_end,
            compressed: report.compressed,
            readonly: options.readonly,
            counters: Arc::clone(&counters),
        })?;
        Ok(Qcow2Image {
            files: [HostFile {
                file,
                buffered: None,
                dio: None,
            }],
            capacity_sectors,
            cluster_bytes: 1 << cluster_bits,
            counters,
            owner,
        })
    }
}

/// (device, inode): to find loops in backing chains.
fn identity(file: &File, path: &Path) -> Result<(u64, u64), ImageError> {
    let meta = file.metadata().map_err(|source| ImageError::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok((meta.dev(), meta.ino()))
}

impl ImageFormat for Qcow2Image {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn files(&self) -> &[HostFile] {
        &self.files
    }

    /// The queue engine's file is the virtual disk: offsets map to
    /// themselves.
    fn map(
        &self,
        _access: Access,
        offset: u64,
        len_bytes: u64,
        extents: &mut Vec<Extent>,
    ) -> Result<(), ImageError> {
        identity_map(self.capacity_sectors, offset, len_bytes, extents)
    }

    fn discard_granularity_bytes(&self) -> u64 {
        self.cluster_bytes
    }

    fn queue_engine(&self) -> Option<Result<Box<dyn Engine>, EngineError>> {
        Some(
            engine::QueueEngine::new(self.owner.inbox())
                .map(|engine| Box::new(engine) as Box<dyn Engine>),
        )
    }

    fn counters(&self) -> Option<Arc<ImageCounters>> {
        Some(Arc::clone(&self.counters))
    }
}
