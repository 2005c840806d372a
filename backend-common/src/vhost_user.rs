//! What the two `VhostUserBackend` impls answer alike: the vhost-user
//! protocol features, config space reads, the check of a new memory table,
//! and the workers' exit events.

use std::io;
use std::sync::PoisonError;

use tracing::warn;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The protocol features both backends offer: a config space, several
/// queues, REPLY_ACK (the frontend can wait for a memory table change to be
/// applied), and memory slots added one at a time.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Bytes `offset..offset + size` of the config space `config`; beyond the
/// fields the device has, zeroes (the reply must be `size` bytes long).
pub fn config_window(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = offset as usize;
    (start..start + size as usize)
        .map(|i| config.get(i).copied().unwrap_or(0))
        .collect()
}

/// A worker thread's exit event: non-blocking, closed on exec.
pub fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
}

/// Every region mapped from a regular file (memfd, tmpfs, hugetlbfs) must
/// lie within it: vhost-user-backend and vm-memory map a region past the end
/// of its file without complaint, and the first access to it then kills the
/// backend with SIGBUS. A table that breaks this is refused (the frontend
/// gets an error reply) and the backend is left with no guest memory.
pub fn check_memory_table(mem: &GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
    let Err(err) = regions_within_their_files(&mem.memory()) else {
        return Ok(());
    };
    mem.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .replace(GuestMemoryMmap::new());
    warn!("refused the frontend's memory table: {err}");
    Err(err)
}

fn regions_within_their_files(mem: &GuestMemoryMmap<()>) -> io::Result<()> {
    for region in mem.iter() {
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        let meta = file_offset.file().metadata()?;
        if !meta.is_file() {
            continue;
        }
        let end = file_offset.start().checked_add(region.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the region at guest address {:#x} maps {} bytes from offset {} of a file of {} bytes",
                    region.start_addr().0,
                    region.len(),
                    file_offset.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_table_past_the_end_of_a_file_is_refused_and_dropped() {
        use vm_memory::{FileOffset, GuestAddress};
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 << 10).unwrap();
        let ram = |len: usize, offset: u64| {
            let ranges = [(
                GuestAddress(0x10_0000),
                len,
                Some(FileOffset::new(file.try_clone().unwrap(), offset)),
            )];
            GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges_with_files(ranges).unwrap())
        };
        let fits = ram(32 << 10, 32 << 10);
        check_memory_table(&fits).unwrap();
        assert_eq!(fits.memory().num_regions(), 1);
        let past = ram(64 << 10, 4096);
        let err = check_memory_table(&past).unwrap_err();
        assert!(
            err.to_string().contains("of a file of 65536 bytes"),
            "{err}"
        );
        assert_eq!(past.memory().num_regions(), 0, "no memory left to fault on");
    }

    #[test]
    fn config_window_pads_with_zeroes() {
        let config = [1, 2, 3, 4];
        assert_eq!(config_window(&config, 1, 2), [2, 3]);
        assert_eq!(config_window(&config, 2, 4), [3, 4, 0, 0]);
        assert_eq!(config_window(&config, 8, 2), [0, 0]);
        assert!(config_window(&config, 0, 0).is_empty());
    }

    #[test]
    fn exit_events_are_made() {
        assert!(exit_event().is_some());
    }
}
