//! The shadow model of the virtual disk: what each sector of the watched
//! clusters (those the operations touch, their neighbours, and a few
//! more) must read as.

use std::collections::{BTreeMap, HashSet};

use ringvm_blk::image::qcow2::meta::BadClusters;

use super::ops::{fill_pattern, SECTOR};

const SECTOR_BYTES: usize = SECTOR as usize;

/// What a sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// What the first read of the image returned.
    Initial,
    Zero,
    /// Written by the request with this id.
    Pattern(u8),
    /// What a later read returned (index into [`Model::seen`]).
    Seen(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sector {
    /// Could not be read (or a write to it failed): a read may fail, and
    /// returns anything.
    Unknown,
    /// Must read, whatever it holds (two requests of a batch wrote it).
    Readable,
    Is(Content),
}

struct Watched {
    sectors: Vec<Sector>,
    initial: Vec<u8>,
}

pub struct Model {
    pub cluster_bits: u32,
    capacity: u64,
    watched: BTreeMap<u64, Watched>,
    seen: Vec<[u8; SECTOR_BYTES]>,
    pub bad: BadClusters,
    /// A request touched a poisoned cluster (the owner then sets the
    /// header's corrupt bit).
    pub touched_bad: bool,
}

impl Model {
    pub fn new(capacity: u64, cluster_bits: u32, bad: BadClusters) -> Model {
        Model {
            cluster_bits,
            capacity,
            watched: BTreeMap::new(),
            seen: Vec::new(),
            bad,
            touched_bad: false,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn cluster_bytes(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest clusters of the disk (the last may be partial).
    pub fn clusters(&self) -> u64 {
        self.capacity.div_ceil(self.cluster_bytes())
    }

    /// The clusters `len` bytes at `offset` touch: (first, count).
    fn cluster_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset >> self.cluster_bits;
        let end = (offset + len).div_ceil(self.cluster_bytes());
        (first, end - first)
    }

    /// Watches `cluster` (inside the disk), its sectors not known yet.
    pub fn watch(&mut self, cluster: u64) {
        let start = cluster << self.cluster_bits;
        let len = (self.capacity - start).min(self.cluster_bytes());
        self.watched.entry(cluster).or_insert_with(|| Watched {
            sectors: vec![Sector::Unknown; (len / SECTOR) as usize],
            initial: vec![0; len as usize],
        });
    }

    /// The watched clusters, in order: (offset, length).
    pub fn watched(&self) -> Vec<(u64, u64)> {
        self.watched
            .iter()
            .map(|(&c, w)| (c << self.cluster_bits, w.initial.len() as u64))
            .collect()
    }

    fn at(&self, sector: u64) -> (u64, usize) {
        let offset = sector * SECTOR;
        let cluster = offset >> self.cluster_bits;
        let index = ((offset - (cluster << self.cluster_bits)) / SECTOR) as usize;
        (cluster, index)
    }

    pub fn sector(&self, sector: u64) -> Sector {
        let (cluster, index) = self.at(sector);
        self.watched
            .get(&cluster)
            .unwrap_or_else(|| panic!("the target reads sector {sector}, which it does not watch"))
            .sectors[index]
    }

    pub fn set(&mut self, sector: u64, state: Sector) {
        let (cluster, index) = self.at(sector);
        self.watched
            .get_mut(&cluster)
            .unwrap_or_else(|| panic!("the target writes sector {sector}, which it does not watch"))
            .sectors[index] = state;
    }

    /// What the first read returned at `offset`: the model's start.
    pub fn set_initial(&mut self, offset: u64, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks_exact(SECTOR_BYTES).enumerate() {
            let (cluster, index) = self.at(offset / SECTOR + i as u64);
            let watched = self.watched.get_mut(&cluster).expect("a watched cluster");
            watched.sectors[index] = Sector::Is(Content::Initial);
            let at = index * SECTOR_BYTES;
            watched.initial[at..at + SECTOR_BYTES].copy_from_slice(chunk);
        }
    }

    pub fn poisoned(&self, offset: u64, len: u64) -> bool {
        let (first, count) = self.cluster_span(offset, len);
        self.bad.any_in(first, count)
    }

    /// Whether a cluster the range touches has a sector that may not read.
    pub fn touches_unknown(&self, offset: u64, len: u64) -> bool {
        let (first, count) = self.cluster_span(offset, len);
        (first..first + count).any(|cluster| {
            self.watched
                .get(&cluster)
                .is_some_and(|w| w.sectors.contains(&Sector::Unknown))
        })
    }

    fn expected(&self, content: Content, sector: u64, out: &mut [u8; SECTOR_BYTES]) {
        match content {
            Content::Initial => {
                let (cluster, index) = self.at(sector);
                let at = index * SECTOR_BYTES;
                out.copy_from_slice(&self.watched[&cluster].initial[at..at + SECTOR_BYTES]);
            }
            Content::Zero => out.fill(0),
            Content::Pattern(op) => fill_pattern(op, sector * SECTOR, out),
            Content::Seen(i) => out.copy_from_slice(&self.seen[i as usize]),
        }
    }

    /// Checks a successful read of `bytes` at `offset`; sectors in `skip`
    /// (written by a request of the same batch) are not checked. What a
    /// sector without a known content returned becomes its content.
    pub fn check_read(&mut self, offset: u64, bytes: &[u8], skip: &HashSet<u64>, what: &str) {
        let mut want = [0u8; SECTOR_BYTES];
        for (i, got) in bytes.chunks_exact(SECTOR_BYTES).enumerate() {
            let sector = offset / SECTOR + i as u64;
            if skip.contains(&sector) {
                continue;
            }
            match self.sector(sector) {
                Sector::Unknown | Sector::Readable => {
                    self.seen.push(got.try_into().expect("a sector"));
                    let seen = Content::Seen(self.seen.len() as u32 - 1);
                    self.set(sector, Sector::Is(seen));
                }
                Sector::Is(content) => {
                    self.expected(content, sector, &mut want);
                    if got != want {
                        let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                        let end = (at + 16).min(SECTOR_BYTES);
                        panic!(
                            "{what}: guest byte {:#x} reads {:02x?}, but holds {content:?}: {:02x?}",
                            sector * SECTOR + at as u64,
                            &got[at..end],
                            &want[at..end],
                        );
                    }
                }
            }
        }
    }
}
