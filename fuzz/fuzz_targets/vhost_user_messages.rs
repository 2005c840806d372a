//! Arbitrary vhost-user message streams from a frontend, with and without
//! file descriptors (memfds for guest memory, eventfds, signalled eventfds
//! that kick a queue at once, pipes), fed over a connected socket to the
//! request handler each backend serves with: vhost-user-backend's handler
//! (`VhostUserDaemon`) around ringvm-blk's `BlkBackend` or ringvm-net's
//! `NetBackend`, set up as each `daemon.rs` sets up a connection (a new
//! backend; blk: the io_uring completion eventfds registered with the
//! worker threads; net: each pair's ring-state eventfd registered with its
//! worker thread, and its tap queue put into and taken out of the worker's
//! epoll by the worker). ringvm-net's tap is a double
//! (`NetTapDouble`, socketpairs), with frames waiting in it if the input
//! says so, which the RX queues take as soon as they have buffers.
//!
//! Invariants:
//! - nothing panics, in the handler thread or the queue worker threads;
//! - the handler stops at the end of the stream (or at the first message
//!   it refuses) and the connection ends; the backend then stops (blk: with
//!   the I/O in flight answered; the input's end is EOF: libFuzzer's
//!   -timeout catches a handler that never returns).
//!
//! Input: a flags byte (bit 7 clear: ringvm-blk, bit 0: read-only disk,
//! bit 1: two queues; bit 7 set: ringvm-net, bit 0: a MAC address, bit 1:
//! two queue pairs, bit 2: frames wait in the tap); guest RAM contents (a
//! little-endian u16 length and that many bytes, copied to the start of
//! every memfd sent); then sends: a control byte (bits 0-1: number of
//! descriptors, bits 2-7: their kinds, two bits each: memfd, eventfd,
//! signalled eventfd, pipe), a little-endian u16 length and that many bytes
//! (fewer at the end); a send of no bytes is a pause instead ([`PAUSE`]).

#![no_main]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::{Arc, Mutex, Once, OnceLock};

use libfuzzer_sys::fuzz_target;
use ringvm_blk::backend::{BlkBackend, BlkOptions, Token as BlkToken};
use ringvm_blk::counters::Counters as BlkCounters;
use ringvm_blk::queue::{GuestRam, GuestRamAtomic};
use ringvm_fuzz::{tracing, Bytes, MemImage, NetTapDouble, SERIAL};
use ringvm_net::backend::{NetBackend, NetOptions, Token as NetToken};
use ringvm_net::counters::Counters as NetCounters;
use ringvm_net::tap::IoVec;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserShMemConfig, VhostUserSharedMsg,
};
use vhost::vhost_user::{Backend, GpuBackend, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const QUEUE_SIZE: u16 = 64;
/// A send of no bytes is a pause this long (at most [`MAX_PAUSES`] per
/// input): enough for a worker thread woken by a kick to serve its queue
/// on a loaded machine, short enough to keep many runs a second.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(2);
const MAX_PAUSES: u32 = 4;
/// Guest RAM a memfd descriptor carries.
const MEMFD_BYTES: u64 = 1 << 20;

/// A backend (`BlkBackend` or `NetBackend`), plus the exit-event consumers
/// vhost-user-backend 0.24 leaks: `VringEpollHandler::new` turns each into
/// a raw descriptor that nothing closes (one per worker thread and
/// connection, see backend-common's daemon.rs). The target closes them once
/// the connection is over, or a long run would run out of descriptors.
/// Every other method is the backend's own.
struct Tracked<B> {
    inner: Arc<B>,
    leaked: Arc<Mutex<Vec<RawFd>>>,
}

impl<B> Clone for Tracked<B> {
    fn clone(&self) -> Self {
        Tracked {
            inner: Arc::clone(&self.inner),
            leaked: Arc::clone(&self.leaked),
        }
    }
}

impl<B: VhostUserBackend> VhostUserBackend for Tracked<B> {
    type Bitmap = B::Bitmap;
    type Vring = B::Vring;

    fn num_queues(&self) -> usize {
        self.inner.num_queues()
    }
    fn max_queue_size(&self) -> usize {
        self.inner.max_queue_size()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn acked_features(&self, features: u64) {
        self.inner.acked_features(features)
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.inner.protocol_features()
    }
    fn reset_device(&self) {
        self.inner.reset_device()
    }
    fn set_event_idx(&self, enabled: bool) {
        self.inner.set_event_idx(enabled)
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.inner.get_config(offset, size)
    }
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.inner.set_config(offset, buf)
    }
    fn update_memory(
        &self,
        mem: vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap<B::Bitmap>>,
    ) -> io::Result<()> {
        self.inner.update_memory(mem)
    }
    fn set_backend_req_fd(&self, backend: Backend) {
        self.inner.set_backend_req_fd(backend)
    }
    fn get_shared_object(&self, uuid: VhostUserSharedMsg) -> io::Result<File> {
        self.inner.get_shared_object(uuid)
    }
    fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> io::Result<()> {
        self.inner.set_gpu_socket(gpu_backend)
    }
    fn queues_per_thread(&self) -> Vec<u64> {
        self.inner.queues_per_thread()
    }
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.inner.exit_event(thread_index)?;
        self.leaked.lock().unwrap().push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.inner.stop_vring(queue_index)
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[B::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        self.inner
            .handle_event(device_event, evset, vrings, thread_id)
    }
    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        self.inner.set_device_state_fd(direction, phase, file)
    }
    fn check_device_state(&self) -> io::Result<()> {
        self.inner.check_device_state()
    }
    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        self.inner.get_shmem_config()
    }
}

/// The listening socket, in the abstract namespace (nothing to clean up).
fn listener() -> &'static Mutex<(Listener, SocketAddr)> {
    static LISTENER: OnceLock<Mutex<(Listener, SocketAddr)>> = OnceLock::new();
    LISTENER.get_or_init(|| {
        let name = format!("ringvm-fuzz-vhost-user-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name).expect("abstract socket name");
        let listener = UnixListener::bind_addr(&addr).expect("listen");
        Mutex::new((Listener::from(listener), addr))
    })
}

fn memfd(contents: &[u8]) -> OwnedFd {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns
    // a new descriptor that nothing else owns, or -1.
    let fd = unsafe { libc::memfd_create(c"ringvm-fuzz-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is new and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEMFD_BYTES).expect("size the memfd");
    (&file).write_all(contents).expect("fill the memfd");
    file.into()
}

fn eventfd(signalled: bool) -> OwnedFd {
    // SAFETY: eventfd takes an initial value and flags and returns a new
    // descriptor that nothing else owns, or -1.
    let fd = unsafe { libc::eventfd(u32::from(signalled), libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: `fd` is new and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn pipe_reader() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array it is given.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nobody else; the write
    // end is closed at once.
    unsafe {
        drop(OwnedFd::from_raw_fd(fds[1]));
        OwnedFd::from_raw_fd(fds[0])
    }
}

/// Replies the handler has sent so far (the socket must not fill up).
fn drain(client: &mut UnixStream, replies: &mut usize) {
    let mut buf = [0u8; 4096];
    loop {
        match client.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => *replies += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The handler closed the connection (ECONNRESET).
            Err(_) => return,
        }
    }
}

/// What a connection's backend needs besides the daemon.
struct Device<B: VhostUserBackend> {
    backend: Tracked<B>,
    /// The guest memory the backend was made with, which the daemon fills
    /// from the memory table.
    mem: GuestRamAtomic,
    /// Registers the device's own event sources with the worker epolls.
    attach: Attach<B>,
    /// Stops the backend once its workers were told to exit.
    stop: Box<dyn FnOnce()>,
    counters: Box<dyn Fn() -> String>,
}

/// The worker epoll handlers of a connection's daemon.
type Handlers<B> = [Arc<VringEpollHandler<Tracked<B>>>];
type Attach<B> = Box<dyn FnOnce(&Handlers<B>)>;

fn blk(flags: u8) -> Device<BlkBackend> {
    let options = BlkOptions {
        num_queues: 1 + u16::from(flags & 2 != 0),
        queue_size: QUEUE_SIZE,
        readonly: flags & 1 != 0,
        serial: Some(SERIAL.to_string()),
    };
    MemImage::get().reset();
    let image = Arc::clone(&MemImage::get().image);
    let counters = Arc::new(BlkCounters::new(usize::from(options.num_queues)));
    let mem = GuestRamAtomic::new(GuestRam::new());
    let inner =
        Arc::new(BlkBackend::new(image, &options, mem.clone(), &counters).expect("backend"));
    let num_queues = usize::from(options.num_queues);
    let attach_backend = Arc::clone(&inner);
    let stop_backend = Arc::clone(&inner);
    Device {
        backend: Tracked {
            inner,
            leaked: Arc::default(),
        },
        mem,
        attach: Box::new(move |handlers| {
            for (queue, handler) in handlers.iter().enumerate() {
                if let Some(fd) = attach_backend.completion_fd(queue) {
                    let data = BlkToken::Completion.device_event(num_queues);
                    handler
                        .register_listener(fd, EventSet::IN, data)
                        .expect("completion listener");
                }
            }
        }),
        stop: Box::new(move || {
            stop_backend.stop();
        }),
        counters: Box::new(move || counters.snapshot().to_string()),
    }
}

/// Frames that wait in each tap queue of the double when the input asks:
/// a small one, a full Ethernet frame and a 64 KiB TSO frame, each after a
/// virtio-net header.
const WAITING_FRAMES: [usize; 3] = [12 + 60, 12 + 1514, 12 + 65535];

fn net(flags: u8) -> Device<NetBackend> {
    let options = NetOptions {
        queue_pairs: 1 + u16::from(flags & 2 != 0),
        queue_size: QUEUE_SIZE,
        mac: (flags & 1 != 0).then_some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
    };
    let tap = NetTapDouble::new(options.queue_pairs);
    if flags & 4 != 0 {
        for peer in &tap.peers {
            for len in WAITING_FRAMES {
                let mut frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
                frame[..12].fill(0);
                let _ = peer.write_frame(&[IoVec::from_mut(&mut frame)]);
            }
        }
    }
    let counters = Arc::new(NetCounters::new(usize::from(options.queue_pairs)));
    let mem = GuestRamAtomic::new(GuestRam::new());
    let inner = Arc::new(
        NetBackend::new(Arc::clone(&tap.tap), &options, mem.clone(), &counters).expect("backend"),
    );
    let num_queues = 2 * usize::from(options.queue_pairs);
    let attach_backend = Arc::clone(&inner);
    let stop_backend = Arc::clone(&inner);
    let tap_queues = Arc::clone(&tap.tap);
    Device {
        backend: Tracked {
            inner,
            leaked: Arc::default(),
        },
        mem,
        // As ringvm-net's daemon.rs attaches a connection.
        attach: Box::new(move |handlers| {
            for (pair, handler) in handlers.iter().enumerate() {
                if let Some(event) = attach_backend.ring_state_event(pair) {
                    let data = NetToken::RingState.device_event(num_queues);
                    handler
                        .register_listener(event.as_raw_fd(), EventSet::IN, data)
                        .expect("ring state listener");
                }
                let handler = Arc::downgrade(handler);
                let fd = tap_queues.queues[pair].as_raw_fd();
                let data = NetToken::Tap.device_event(num_queues);
                attach_backend.set_tap_watch(
                    pair,
                    Box::new(move |on| {
                        let Some(handler) = handler.upgrade() else {
                            return Ok(());
                        };
                        if on {
                            handler.register_listener(fd, EventSet::IN, data)
                        } else {
                            handler.unregister_listener(fd, EventSet::IN, data)
                        }
                    }),
                );
            }
        }),
        stop: Box::new(move || {
            stop_backend.stop();
            // The network side stays open until the backend has stopped.
            drop(tap);
        }),
        counters: Box::new(move || counters.snapshot().to_string()),
    }
}

/// Serves one connection of `device` with the input's stream.
fn serve<B>(device: Device<B>, input: &mut Bytes<'_>, ram_contents: &[u8])
where
    B: VhostUserBackend<Bitmap = ()> + 'static,
    B::Vring: Clone + Send + Sync,
{
    let Device {
        backend,
        mem,
        attach,
        stop,
        counters,
    } = device;
    let mut daemon =
        VhostUserDaemon::new("ringvm-fuzz".to_string(), backend.clone(), mem).expect("daemon");
    let handlers = daemon.get_epoll_handlers();
    attach(&handlers);

    let mut client = {
        let mut guard = listener().lock().unwrap();
        let (listener, addr) = &mut *guard;
        let client = UnixStream::connect_addr(addr).expect("connect");
        daemon.start(listener).expect("accept the connection");
        client
    };
    client.set_nonblocking(true).unwrap();

    let mut sends = 0;
    let mut replies = 0;
    let mut pauses = 0;
    while !input.is_empty() {
        let control = input.u8();
        let len = usize::from(input.u16());
        let bytes = input.take(len).to_vec();
        if bytes.is_empty() {
            // A pause, in which the worker threads serve what they were
            // kicked for before the next message (say, one that stops
            // the queue) can get in first.
            if pauses < MAX_PAUSES {
                pauses += 1;
                std::thread::sleep(PAUSE);
            }
            continue;
        }
        let fds: Vec<OwnedFd> = (0..control & 3)
            .map(|i| match (control >> (2 + 2 * i)) & 3 {
                0 => memfd(ram_contents),
                1 => eventfd(false),
                2 => eventfd(true),
                _ => pipe_reader(),
            })
            .collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        while sent < bytes.len() {
            let result = if sent == 0 {
                client
                    .send_with_fds(&[&bytes[..]], &raw)
                    .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            } else {
                client.write(&bytes[sent..])
            };
            match result {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drain(&mut client, &mut replies);
                    std::thread::yield_now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The handler refused a message and closed the connection.
                Err(_) => break,
            }
        }
        sends += 1;
        drain(&mut client, &mut replies);
    }
    // End of stream: the handler sees EOF and returns; read what it sent
    // until it closes its end.
    let _ = client.shutdown(std::net::Shutdown::Write);
    client.set_nonblocking(false).unwrap();
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    replies += rest.len();
    let result = daemon.wait();
    if tracing() {
        eprintln!(
            "{sends} sends, {pauses} pauses, {replies} reply bytes; the handler ended with {result:?}"
        );
    }
    // As the daemon loop ends a connection.
    for handler in &handlers {
        handler.send_exit_event();
    }
    stop();
    if tracing() {
        eprintln!("counters: {}", counters());
    }
    drop(daemon);
    drop(handlers);
    for fd in backend.leaked.lock().unwrap().drain(..) {
        // SAFETY: vhost-user-backend made this descriptor raw and never
        // closes it (see `Tracked`); the worker thread whose epoll holds it
        // has been told to exit, which it learns from the notifier's end.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

fuzz_target!(|data: &[u8]| {
    // As in the backends' own processes (Rust's runtime does it there): a
    // worker still writing to the tap double once its peer is gone gets
    // EPIPE, not a signal.
    static IGNORE_SIGPIPE: Once = Once::new();
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN installs no handler
    // code; it is done once, before any thread of this target writes.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let mut input = Bytes(data);
    let flags = input.u8();
    let ram_len = usize::from(input.u16());
    let ram_contents = input.take(ram_len).to_vec();
    if flags & 0x80 != 0 {
        serve(net(flags), &mut input, &ram_contents);
    } else {
        serve(blk(flags), &mut input, &ram_contents);
    }
});
