//! COM1: a vm-superio 8250 UART on port 0x3f8, interrupting through an irqfd
//! on GSI 4. Output goes to stdout, a file, or nowhere; input arrives from the
//! event loop (stdin), which stops reading while the guest's receive FIFO is
//! full and resumes when the UART reports it drained.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::PioDevice;

/// Raises the UART's interrupt line by signalling an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the event loop the guest emptied the receive FIFO, so it can feed
/// more console input.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::warn!("cannot signal serial input drained: {e}");
        }
    }
}

pub type SerialOut = Box<dyn Write + Send>;

/// The banner Linux prints when it panics.
const LINUX_PANIC_BANNER: &str = "Kernel panic - not syncing";
/// Longest console line kept for the panic check.
const LINE_MAX_BYTES: usize = 512;

/// Passes console output through and reports a Linux panic banner to the
/// ExitSignal, so that the reboot the panic triggers (`panic=N`) ends ringvm
/// with the guest-panic status rather than as an orderly reset.
pub struct PanicWatch<W: Write> {
    out: W,
    line: Vec<u8>,
    exit: std::sync::Arc<super::ExitSignal>,
}

impl<W: Write> PanicWatch<W> {
    pub fn new(out: W, exit: std::sync::Arc<super::ExitSignal>) -> Self {
        Self {
            out,
            line: Vec::with_capacity(LINE_MAX_BYTES),
            exit,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if let Some(at) = line.find(LINUX_PANIC_BANNER) {
                    self.exit
                        .note_console_panic(line[at..].trim_end().to_owned());
                }
                self.line.clear();
            } else if self.line.len() < LINE_MAX_BYTES {
                self.line.push(b);
            }
        }
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scan(buf);
        // The guest's bytes are seen whether or not the output takes them.
        self.out.write(buf).or(Ok(buf.len()))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

pub struct SerialConsole {
    uart: Serial<IrqTrigger, InputDrained, SerialOut>,
    /// Set after the first failed write, so a closed stdout logs once.
    output_failed: bool,
}

impl SerialConsole {
    pub fn new(irq: EventFd, drained: EventFd, out: SerialOut) -> Self {
        Self {
            uart: Serial::with_events(IrqTrigger(irq), InputDrained(drained), out),
            output_failed: false,
        }
    }

    /// Queues console input for the guest; returns how many bytes fit in
    /// the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                room
            }
        }
    }

    #[cfg(test)]
    fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl PioDevice for SerialConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // The 8250 has byte registers; a wider access reads the first one.
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(off, value) {
            if !self.output_failed {
                self.output_failed = true;
                tracing::warn!("serial output failed (further failures not logged): {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, SharedBuf, EventFd, EventFd) {
        let buf = SharedBuf::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let c = SerialConsole::new(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(buf.clone()),
        );
        (c, buf, irq, drained)
    }

    #[test]
    fn panic_banner_is_noticed() {
        let exit = super::super::ExitSignal::new().unwrap();
        let buf = SharedBuf::default();
        let mut w = PanicWatch::new(buf.clone(), exit.clone());
        w.write_all(b"[    1.0] Run /init as init process\n[    1.2] Kernel pa")
            .unwrap();
        w.write_all(b"nic - not syncing: No working init found.\n")
            .unwrap();
        exit.request(super::super::ExitReason::Reset);
        assert_eq!(
            exit.reason(),
            Some(super::super::ExitReason::GuestPanic(
                "Kernel panic - not syncing: No working init found.".into()
            ))
        );
        assert!(String::from_utf8_lossy(&buf.0.lock().unwrap()).contains("Run /init"));
    }

    #[test]
    fn thr_writes_reach_the_output() {
        let (mut c, buf, _, _) = console();
        for b in b"hi\n" {
            c.write(0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_read_back_and_drain_is_signalled() {
        let (mut c, _, irq, drained) = console();
        c.write(1, &[0x01]); // IER: received-data interrupt
        assert_eq!(c.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut d = [0u8];
        c.read(0, &mut d);
        assert_eq!(d, [b'a']);
        c.read(0, &mut d);
        assert_eq!(d, [b'b']);
        assert!(drained.read().unwrap() >= 1);
    }

    #[test]
    fn full_fifo_takes_no_more() {
        let (mut c, _, _, _) = console();
        let big = vec![b'x'; 4096];
        let n = c.enqueue_input(&big);
        assert!(n > 0 && n < big.len());
        assert_eq!(c.enqueue_input(b"y"), 0);
        assert_eq!(c.input_room(), 0);
    }
}
