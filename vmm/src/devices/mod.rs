//! Emulated platform devices and the port-I/O bus the vCPU threads dispatch to.

pub mod acpi_pm;
pub mod debug_exit;
pub mod i8042;
pub mod pci;
pub mod pvpanic;
pub mod rtc;
pub mod serial;
pub mod virtio;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stops. The first request wins; later ones are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote `code` to the debug-exit port.
    DebugExit(u8),
    /// The guest reset the machine (i8042, ACPI reset register, triple fault).
    Reset,
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// A vCPU hit something ringvm cannot continue from.
    Fault(String),
    /// The guest kernel panicked (pvpanic, or a panic banner on the console
    /// followed by a reset).
    GuestPanic(String),
    /// The user asked ringvm to stop (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
}

impl ExitReason {
    /// The process exit status this reason maps to.
    pub fn exit_status(&self) -> i32 {
        match self {
            ExitReason::DebugExit(code) => i32::from(*code),
            ExitReason::Reset | ExitReason::PowerOff => 0,
            ExitReason::Fault(_) | ExitReason::GuestPanic(_) => 1,
            ExitReason::Signal(sig) => 128 + sig,
        }
    }
}

/// Shared by the devices and vCPU threads that can end the VM and the event
/// loop that acts on it: a slot for the first reason and an eventfd to wake
/// the loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    /// A panic seen on the guest console: a reset that follows it is the
    /// panic's reboot (Linux `panic=N`), not an orderly one.
    console_panic: Mutex<Option<String>>,
    /// Mirrors `reason.is_some()` so vCPU threads can check it on every exit without a lock.
    requested: AtomicBool,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            reason: Mutex::new(None),
            console_panic: Mutex::new(None),
            requested: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        }))
    }

    /// The guest console showed a kernel panic (`line`).
    pub fn note_console_panic(&self, line: String) {
        let mut p = self
            .console_panic
            .lock()
            .expect("console panic lock poisoned");
        if p.is_none() {
            tracing::warn!("guest kernel panic on the console: {line}");
            *p = Some(line);
        }
    }

    /// Records `reason` unless another one came first, and wakes the event loop.
    pub fn request(&self, reason: ExitReason) {
        let reason = match reason {
            ExitReason::Reset => match self
                .console_panic
                .lock()
                .expect("console panic lock poisoned")
                .clone()
            {
                Some(line) => ExitReason::GuestPanic(line),
                None => ExitReason::Reset,
            },
            other => other,
        };
        let mut slot = self.reason.lock().expect("exit reason lock poisoned");
        if slot.is_none() {
            tracing::debug!(?reason, "VM exit requested");
            *slot = Some(reason);
            self.requested.store(true, Ordering::Release);
        }
        drop(slot);
        if let Err(e) = self.event.write(1) {
            tracing::error!("cannot wake the event loop for VM exit: {e}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .expect("exit reason lock poisoned")
            .clone()
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.event
    }
}

/// A device on the port-I/O bus. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct PioRange {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("port range {base:#x}+{len:#x} overlaps one already on the bus")]
    Overlap { base: u16, len: u16 },
    #[error("port range {base:#x}+{len:#x} is empty or wraps past 0xffff")]
    BadRange { base: u16, len: u16 },
}

/// Port-I/O bus: sorted, non-overlapping ranges. Built before the vCPUs
/// start and read-only afterwards, so lookups need no lock on the bus.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<PioRange>,
}

impl PioBus {
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(BusError::BadRange { base, len });
        }
        if self.ranges.iter().any(|r| {
            u32::from(r.base) < end && u32::from(base) < u32::from(r.base) + u32::from(r.len)
        }) {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, PioRange { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&PioRange, u16)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= port)
            .checked_sub(1)?;
        let r = &self.ranges[idx];
        let offset = port - r.base;
        (offset < r.len).then_some((r, offset))
    }

    /// Dispatches an IN. Returns false (and fills `data` with 0xff, as an
    /// empty ISA bus reads) when no device claims the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((r, offset)) => {
                r.device
                    .lock()
                    .expect("device lock poisoned")
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches an OUT. Returns false when no device claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((r, offset)) => {
                r.device
                    .lock()
                    .expect("device lock poisoned")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Little-endian value of an access of 1, 2 or 4 bytes.
pub fn le_value(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u16, Vec<u8>)>);
    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset_and_rejects_overlap() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = PioBus::default();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        bus.insert(0x60, 1, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x3fc, 8, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xfffe, 4, dev.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus.write(0x3fb, &[7]));
        assert!(!bus.write(0x400, &[7]));
        assert!(!bus.write(0x3f7, &[7]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(!bus.read(0x61, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(dev.lock().unwrap().0, vec![(3, vec![7])]);
    }

    #[test]
    fn reset_after_a_console_panic_is_a_panic() {
        let s = ExitSignal::new().unwrap();
        s.note_console_panic("Kernel panic - not syncing: No working init found.".into());
        s.request(ExitReason::Reset);
        let r = s.reason().unwrap();
        assert!(
            matches!(&r, ExitReason::GuestPanic(l) if l.contains("No working init")),
            "{r:?}"
        );
        assert_eq!(r.exit_status(), 1);
    }

    #[test]
    fn first_exit_reason_wins() {
        let s = ExitSignal::new().unwrap();
        s.request(ExitReason::DebugExit(7));
        s.request(ExitReason::Reset);
        assert_eq!(s.reason(), Some(ExitReason::DebugExit(7)));
        assert_eq!(s.reason().unwrap().exit_status(), 7);
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }
}
