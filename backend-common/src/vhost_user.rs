//! What the two `VhostUserBackend` impls answer alike: the vhost-user
//! protocol features, config space reads, and the workers' exit events.

use vhost::vhost_user::message::VhostUserProtocolFeatures;
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

#[cfg(test)]
mod tests {
    use super::*;

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
