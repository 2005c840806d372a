//! MSI-X vectors delivered by KVM: each vector has a GSI with an MSI route
//! and an eventfd registered as its irqfd. A backend signals the eventfd and
//! KVM injects the interrupt; ringvm is not involved.
//!
//! Masking unregisters the irqfd, so signals pile up in the eventfd (that is
//! the pending bit); unmasking registers it again and KVM injects at once if
//! the eventfd was signalled meanwhile.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::msix::{MsiController, MsiMessage};
use crate::kvm::{KvmError, KvmVm};

struct Vector {
    gsi: u32,
    eventfd: EventFd,
    /// Whether the irqfd is registered (the vector delivers).
    delivering: Mutex<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum InterruptsError {
    #[error("creating an eventfd for an MSI-X vector failed")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

pub struct MsiVectors {
    vm: Arc<KvmVm>,
    vectors: Vec<Vector>,
}

impl MsiVectors {
    pub fn new(vm: Arc<KvmVm>, count: u16) -> Result<Self, InterruptsError> {
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(InterruptsError::EventFd)?;
            vectors.push(Vector {
                gsi: vm.allocate_gsi()?,
                eventfd,
                delivering: Mutex::new(false),
            });
        }
        Ok(Self { vm, vectors })
    }

    /// The eventfd that raises `vector` (what a backend gets as call fd).
    pub fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.eventfd)
    }

    /// Raises `vector` from ringvm itself (configuration changes).
    pub fn trigger(&self, vector: u16) {
        if let Some(v) = self.vectors.get(usize::from(vector)) {
            if let Err(e) = v.eventfd.write(1) {
                tracing::warn!(vector, "cannot raise MSI-X vector: {e}");
            }
        }
    }
}

impl MsiController for MsiVectors {
    fn configure(&self, vector: u16, msg: Option<MsiMessage>) {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            return;
        };
        let mut delivering = v.delivering.lock().expect("vector lock poisoned");
        let result = match msg {
            Some(msg) => self.vm.set_msi_route(v.gsi, msg).and_then(|()| {
                if *delivering {
                    Ok(())
                } else {
                    self.vm
                        .register_irqfd(&v.eventfd, v.gsi)
                        .map(|()| *delivering = true)
                }
            }),
            None if *delivering => self
                .vm
                .unregister_irqfd(&v.eventfd, v.gsi)
                .map(|()| *delivering = false),
            None => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(vector, gsi = v.gsi, "MSI-X vector update failed: {e}");
        }
    }

    fn pending(&self, vector: u16) -> bool {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd: v.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout; poll only writes `revents`.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 1 && pfd.revents & libc::POLLIN != 0
    }
}
