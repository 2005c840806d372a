//! The vhost-user frontend side shared by every device: connecting to a
//! backend's socket, the handshake (owner, features, protocol features),
//! the memory table (the guest RAM memfd), and starting and stopping rings.
//!
//! Messages are sent from the thread that runs the device model (a vCPU
//! thread on DRIVER_OK or reset) and, for virtio-net, from its control-queue
//! thread (SET_VRING_ENABLE, net_ctrl.rs). Both use clones of one
//! [`Frontend`], which holds the socket behind a mutex for a whole request
//! and its reply, so two threads never interleave on the socket. The socket
//! has a timeout, so a backend that hangs cannot hang the guest forever.

pub mod blk;
pub mod net;
pub mod net_ctrl;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{ActivateError, ActiveQueue, VirtioDevice};
use crate::memory::GuestRam;

/// How long one message to the backend may take before ringvm gives up on it.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most queues ringvm lets a frontend ask for.
pub const MAX_QUEUES: u64 = 64;
/// Protocol features ringvm uses when the backend has them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect to the vhost-user socket {socket}: is the backend running?")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "vhost-user socket {socket}: the peer did not answer {step} as a vhost-user backend does"
    )]
    Handshake {
        socket: PathBuf,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user socket {socket}: the backend does not offer {what}, which ringvm needs")]
    MissingFeature { socket: PathBuf, what: &'static str },
    #[error("vhost-user socket {socket}: {reason}")]
    BadDevice { socket: PathBuf, reason: String },
}

/// A connected, set-up vhost-user backend.
pub struct VhostUserConnection {
    socket: PathBuf,
    frontend: Frontend,
    /// Virtio feature bits the backend offers (without PROTOCOL_FEATURES).
    virtio_features: u64,
    /// GET_QUEUE_NUM's answer; None without the MQ protocol feature.
    queue_num: Option<u64>,
    memory: GuestMemoryMmap,
    started: Vec<usize>,
}

impl VhostUserConnection {
    /// Connects and sets the backend up up to (not including) the rings.
    pub fn connect(socket: &Path, ram: &GuestRam) -> Result<Self, VhostUserError> {
        let stream = UnixStream::connect(socket).map_err(|source| VhostUserError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
        for r in [
            stream.set_read_timeout(Some(MESSAGE_TIMEOUT)),
            stream.set_write_timeout(Some(MESSAGE_TIMEOUT)),
        ] {
            r.map_err(|source| VhostUserError::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        }
        let mut frontend = Frontend::from_stream(stream, MAX_QUEUES);
        let step = |step: &'static str| {
            let socket = socket.to_owned();
            move |source| VhostUserError::Handshake {
                socket,
                step,
                source,
            }
        };
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & protocol_bit == 0 {
            return Err(VhostUserError::MissingFeature {
                socket: socket.to_owned(),
                what: "VHOST_USER_F_PROTOCOL_FEATURES",
            });
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::MissingFeature {
                socket: socket.to_owned(),
                what: "VIRTIO_F_VERSION_1",
            });
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::MissingFeature {
                socket: socket.to_owned(),
                what: "the CONFIG protocol feature (its device configuration space)",
            });
        }
        let protocol = offered & wanted_protocol_features();
        frontend
            .set_protocol_features(protocol)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            Some(frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?)
        } else {
            None
        };
        let memory = ram.memory().clone();
        let regions = memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(step("SET_MEM_TABLE (describing guest RAM)"))?;
        frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;
        Ok(Self {
            socket: socket.to_owned(),
            frontend,
            virtio_features: features & !protocol_bit,
            queue_num,
            memory,
            started: Vec::new(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn virtio_features(&self) -> u64 {
        self.virtio_features
    }

    /// Queues the backend says it serves (GET_QUEUE_NUM), or None when it
    /// has no MQ protocol feature (it serves the device's minimum then).
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }

    /// The error for a backend that serves another kind of device.
    pub fn bad_device(&self, reason: String) -> VhostUserError {
        VhostUserError::BadDevice {
            socket: self.socket.clone(),
            reason,
        }
    }

    /// The socket, for the event loop to notice the backend going away.
    pub fn raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// Reads `len` bytes of the device configuration space of a `kind`
    /// backend ("vhost-user-blk"); a refusal is reported as a backend of
    /// another kind.
    pub fn get_config(&mut self, len: usize, kind: &str) -> Result<Vec<u8>, VhostUserError> {
        let buf = vec![0u8; len];
        let (_, payload) = self
            .frontend
            .get_config(0, len as u32, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|source| {
                self.bad_device(format!(
                    "it did not return a {len}-byte configuration space ({source}); is it a {kind} backend?"
                ))
            })?;
        if payload.len() != len {
            return Err(self.bad_device(format!(
                "its configuration space is {} bytes, not {len}; is it a {kind} backend?",
                payload.len()
            )));
        }
        Ok(payload)
    }

    /// A handle on the same connection, for another thread (requests from
    /// all clones are serialized on the one socket).
    pub fn frontend(&self) -> Frontend {
        self.frontend.clone()
    }

    /// Guest RAM as the backend was given it.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Our address of `len` bytes of guest RAM at `addr`, if it is all RAM.
    fn host_address(&self, addr: GuestAddress, len: usize) -> Option<u64> {
        if !self.memory.check_range(addr, len) {
            return None;
        }
        self.memory.get_host_address(addr).ok().map(|p| p as u64)
    }

    /// Hands the rings to the backend: sizes, addresses, bases, eventfds,
    /// then SET_VRING_ENABLE with `enable(queue index)`.
    pub fn start(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
        enable: impl Fn(usize) -> bool,
    ) -> Result<(), ActivateError> {
        // The backend only hears of the features it offered: a frontend
        // may show the guest more (virtio-net's MAC, from ringvm).
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features((features & self.virtio_features) | protocol_bit)
            .map_err(ActivateError::Backend)?;
        for q in queues {
            let n = usize::from(q.config.size);
            let ring = |addr, len| {
                self.host_address(addr, len)
                    .ok_or(ActivateError::RingOutsideMemory { index: q.index })
            };
            let vring = VringConfigData {
                queue_max_size: q.config.size,
                queue_size: q.config.size,
                flags: 0,
                desc_table_addr: ring(q.config.desc, 16 * n)?,
                used_ring_addr: ring(q.config.used, 6 + 8 * n)?,
                avail_ring_addr: ring(q.config.avail, 6 + 2 * n)?,
                log_addr: None,
            };
            let f = &mut self.frontend;
            f.set_vring_num(q.index, q.config.size)
                .and_then(|()| f.set_vring_addr(q.index, &vring))
                .and_then(|()| f.set_vring_base(q.index, 0))
                .and_then(|()| f.set_vring_call(q.index, q.call))
                .and_then(|()| f.set_vring_kick(q.index, q.kick))
                .and_then(|()| f.set_vring_enable(q.index, enable(q.index)))
                .map_err(ActivateError::Backend)?;
            self.started.push(q.index);
        }
        Ok(())
    }

    /// Stops every started ring (GET_VRING_BASE stops a ring).
    pub fn stop(&mut self) {
        for q in std::mem::take(&mut self.started) {
            let r = self
                .frontend
                .set_vring_enable(q, false)
                .and_then(|()| self.frontend.get_vring_base(q).map(|_| ()));
            if let Err(e) = r {
                tracing::warn!(socket = %self.socket.display(), queue = q, "stopping the ring failed: {e}");
            }
        }
    }
}

/// A virtio device whose queues a vhost-user backend serves: what blk.rs or
/// net.rs settled when it connected (offered features, configuration space,
/// queue count), and the connection that starts and stops the rings. ringvm
/// only negotiates; it never sees a request.
pub struct VhostUserDevice {
    pub(super) conn: VhostUserConnection,
    /// VIRTIO_ID_* of the device.
    pub(super) device_type: u32,
    /// What the guest is offered, and the configuration space it reads.
    pub(super) features: u64,
    pub(super) config: Vec<u8>,
    pub(super) num_queues: usize,
    pub(super) queue_size: u16,
}

impl VhostUserDevice {
    pub fn raw_fd(&self) -> RawFd {
        self.conn.raw_fd()
    }

    pub fn socket(&self) -> &Path {
        self.conn.socket()
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_len(&self) -> usize {
        self.config.len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio-net's space is read-only for a modern driver; in
        // virtio-blk's only the writeback flag is writable, and ringvm does
        // not offer CONFIG_WCE.
        tracing::debug!(
            device_type = self.device_type,
            offset,
            len = data.len(),
            "device configuration write ignored"
        );
    }

    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), ActivateError> {
        let started = self.conn.start(features, queues, |_| true);
        if started.is_err() {
            // The transport does not reset a device that failed to start:
            // stop the rings that did start.
            self.conn.stop();
        }
        started
    }

    fn reset(&mut self) {
        self.conn.stop();
    }
}

/// A device configuration space read: bytes outside `config` read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let bytes = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..start.checked_add(data.len())?));
    match bytes {
        Some(src) => data.copy_from_slice(src),
        None => data.fill(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_inside_and_outside_the_space() {
        let config = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 2];
        read_config_bytes(&config, 1, &mut d);
        assert_eq!(d, [2, 3]);
        read_config_bytes(&config, 3, &mut d);
        assert_eq!(d, [0, 0], "a read past the end reads zeroes");
        read_config_bytes(&config, u64::MAX, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
