//! [`NetVring`]: the vring type of ringvm-net, vhost-user-backend's
//! `VringMutex` plus one thing: it tells its pair's worker when the frontend
//! enables, disables, starts or stops it.
//!
//! # Why (vhost-user-backend 0.24)
//!
//! With multiqueue, the frontend turns pairs on and off with
//! VHOST_USER_SET_VRING_ENABLE (QEMU and ringvm for the guest's
//! VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET), and a pair that is off must give its
//! tap queue back to the kernel at once (IFF_DETACH_QUEUE), or the kernel
//! keeps steering flows to a queue nobody reads. The crate's handler has
//! no backend callback for that request: it sets the vring's flag
//! (`VringT::set_enabled`) and adds or removes the kick eventfd from the
//! worker's epoll, which on a disable leaves the worker asleep. So this
//! type signals an eventfd of the pair's worker whenever the crate calls
//! `set_enabled` or `set_queue_ready` (SET_VRING_KICK starts a ring,
//! GET_VRING_BASE stops it), and the worker follows
//! ([`crate::queue::PairWorker::follow_enable`]).
//!
//! The crate makes vrings itself (`VringT::new(mem, max_queue_size)`), so
//! the eventfd cannot be given at creation: the worker hands it over with
//! [`NetVring::report_changes_to`] before it reads the state, at each of its
//! events. A pair only gets served after such an event, so every change
//! after the pair went live is signalled (see `report_changes_to`).

use std::fs::File;
use std::io;
use std::sync::{Arc, MutexGuard, OnceLock};

use tracing::warn;
use vhost_user_backend::{VringMutex, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::queue::GuestRamAtomic;

#[derive(Clone)]
pub struct NetVring {
    inner: VringMutex<GuestRamAtomic>,
    /// The pair worker's eventfd, once the worker has handed it over.
    changes: Arc<OnceLock<Arc<EventFd>>>,
}

impl NetVring {
    /// From now on, signal `changes` whenever the frontend enables,
    /// disables, starts or stops this ring (the first eventfd given stays).
    ///
    /// Called by the worker before it reads [`NetVring::is_live`]: a change
    /// the frontend makes after that read either is seen by the read (the
    /// vring's mutex orders them) or finds the eventfd here.
    pub fn report_changes_to(&self, changes: &Arc<EventFd>) {
        if self.changes.get().is_none() {
            let _ = self.changes.set(Arc::clone(changes));
        }
    }

    /// Whether the frontend has started the ring (its kick eventfd came, and
    /// no GET_VRING_BASE since) and enabled it.
    pub fn is_live(&self) -> bool {
        is_live(&self.inner.get_ref())
    }

    fn changed(&self) {
        if let Some(changes) = self.changes.get() {
            // A non-blocking eventfd only refuses a write when its counter
            // would overflow, and then the worker has a wakeup pending.
            if let Err(err) = changes.write(1) {
                warn!("cannot wake the pair's worker for a ring state change: {err}");
            }
        }
    }
}

/// [`NetVring::is_live`] of a ring whose lock is held.
pub fn is_live(state: &VringState<GuestRamAtomic>) -> bool {
    state.is_enabled() && state.get_queue().ready()
}

impl<'a> VringStateGuard<'a, GuestRamAtomic> for NetVring {
    type G = MutexGuard<'a, VringState<GuestRamAtomic>>;
}

impl<'a> VringStateMutGuard<'a, GuestRamAtomic> for NetVring {
    type G = MutexGuard<'a, VringState<GuestRamAtomic>>;
}

/// Everything but `set_enabled` and `set_queue_ready` is `VringMutex`'s.
impl VringT<GuestRamAtomic> for NetVring {
    fn new(mem: GuestRamAtomic, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(NetVring {
            inner: VringMutex::new(mem, max_queue_size)?,
            changes: Arc::default(),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, GuestRamAtomic>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, GuestRamAtomic>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        self.changed();
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready);
        self.changed();
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn vring() -> NetVring {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        NetVring::new(mem, 256).unwrap()
    }

    #[test]
    fn enable_and_ready_changes_wake_the_worker_once_it_listens() {
        let vring = vring();
        let changes = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        // Before the worker listens: nothing to wake, the state still moves.
        vring.set_enabled(true);
        vring.set_queue_ready(true);
        assert!(vring.is_live());
        vring.report_changes_to(&changes);
        assert!(changes.read().is_err(), "no wakeup for changes before");

        vring.set_enabled(false);
        assert_eq!(changes.read().unwrap(), 1);
        assert!(!vring.is_live());
        vring.set_enabled(true);
        assert!(vring.is_live());
        // GET_VRING_BASE stops the ring: not live though enabled.
        vring.set_queue_ready(false);
        assert_eq!(changes.read().unwrap(), 2);
        assert!(!vring.is_live());

        // A clone (the worker's copy) shares the eventfd; a second one
        // handed over does not replace it.
        let other = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let clone = vring.clone();
        clone.report_changes_to(&other);
        clone.set_queue_ready(true);
        assert_eq!(changes.read().unwrap(), 1);
        assert!(other.read().is_err());
        assert!(vring.is_live());

        // Other requests change neither state nor wake the worker.
        vring.set_queue_size(128);
        vring.set_queue_next_avail(3);
        assert!(changes.read().is_err());
        assert_eq!(vring.queue_next_avail(), 3);
    }
}
