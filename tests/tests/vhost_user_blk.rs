//! ringvm as a vhost-user-blk frontend: against qemu-storage-daemon (a
//! backend nobody here wrote) running the test guest's blk-verify, and the
//! error paths a user meets: no socket, a peer that is not a vhost-user
//! backend, a backend that dies while the guest runs. And ringvm-blk
//! serving qcow2 images (several cluster sizes, and its own `create`): the
//! same job leaves them identical to a raw image, as qemu-img sees them.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringvm_tests::blk_pattern::{check_image, parse_verify_ok};
use ringvm_tests::guest::GUEST_ELF_PATH;
use ringvm_tests::harness::{
    binary, find_on_path, run_bounded, vm_survives_backend_death, wait_for_path, RunOutput,
};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const SOCKET_WAIT: Duration = Duration::from_secs(20);

/// A qemu-storage-daemon exporting a raw image as vhost-user-blk; killed on drop.
struct Qsd {
    child: Child,
    socket: PathBuf,
}

impl Qsd {
    fn start(image: &Path, socket: &Path, queues: u16) -> Option<Self> {
        let Some(qsd) = find_on_path("qemu-storage-daemon") else {
            println!("SKIPPED: qemu-storage-daemon is not installed (package qemu-system-x86)");
            return None;
        };
        let child = Command::new(qsd)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},aio=io_uring,cache.direct=off",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={},node-name=disk0,writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning qemu-storage-daemon");
        wait_for_path(socket, SOCKET_WAIT, "qemu-storage-daemon");
        Some(Self {
            child,
            socket: socket.to_owned(),
        })
    }

    fn disk_arg(&self, extra: &str) -> String {
        format!("socket={}{extra}", self.socket.display())
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ringvm(args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(binary("ringvm"));
    cmd.args(args);
    run_bounded(cmd, RUN_TIMEOUT, Some("testguest:")).expect("spawning ringvm")
}

fn image(dir: &Path, bytes: u64) -> PathBuf {
    let p = dir.join("disk.raw");
    std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p
}

fn blk_verify_through_qsd(queues: u16) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64 << 20);
    let Some(qsd) = Qsd::start(&img, &dir.path().join("qsd.sock"), queues) else {
        return;
    };
    let out = ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--cmdline",
        "job=blk-verify",
        "--disk",
        &qsd.disk_arg(&format!(",num_queues={queues}")),
    ]);
    assert!(out.exited_with(0), "{out}");
    let ok = format!("queues={queues} ");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("testguest: blk-verify ok") && l.contains(&ok)),
        "{out}"
    );
}

/// A ringvm-blk serving `image`; killed on drop if still running.
struct RingvmBlk {
    child: Child,
    socket: PathBuf,
}

impl RingvmBlk {
    fn start(image: &Path, socket: &Path, extra: &[&str]) -> Self {
        let child = Command::new(binary("ringvm-blk"))
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning ringvm-blk");
        let mut blk = Self {
            child,
            socket: socket.to_owned(),
        };
        // Not wait_for_path: a ringvm-blk that refuses the image exits at
        // once, and says why on the inherited stderr.
        let deadline = Instant::now() + SOCKET_WAIT;
        while !socket.exists() {
            if let Some(status) = blk.child.try_wait().unwrap() {
                panic!("ringvm-blk exited with {status} before listening (its stderr is above)");
            }
            assert!(
                Instant::now() < deadline,
                "ringvm-blk did not create {} within {SOCKET_WAIT:?}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        blk
    }

    /// Waits for ringvm-blk to exit (it does when its frontend disconnects).
    fn wait_exit(mut self) -> Option<i32> {
        let deadline = Instant::now() + SOCKET_WAIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RingvmBlk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn blk_verify_through_ringvm_blk(queues: u16) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 32 << 20);
    let blk = RingvmBlk::start(
        &img,
        &dir.path().join("blk.sock"),
        &["--queues", "4", "--serial", "ringvm-e2e"],
    );
    let disk = format!("socket={},num_queues={queues}", blk.socket.display());
    let out = ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--cmdline",
        "job=blk-verify serial=ringvm-e2e seed=0x1234",
        "--disk",
        &disk,
    ]);
    assert!(out.exited_with(0), "{out}");
    let report =
        parse_verify_ok(&out.stdout).unwrap_or_else(|| panic!("no blk-verify ok line\n{out}"));
    assert_eq!(report.queues, u32::from(queues), "{out}");
    assert_eq!(report.seed, 0x1234);
    assert_eq!(
        report.sectors,
        (32 << 20) / 512,
        "the whole 32 MiB disk was covered"
    );
    assert_eq!(
        blk.wait_exit(),
        Some(0),
        "ringvm-blk exits 0 when ringvm disconnects"
    );
    check_image(&img, &report).unwrap();
}

#[test]
fn blk_verify_through_ringvm_blk_one_queue() {
    blk_verify_through_ringvm_blk(1);
}

#[test]
fn blk_verify_through_ringvm_blk_four_queues() {
    blk_verify_through_ringvm_blk(4);
}

/// The disk of the qcow2 runs below, and of their raw reference. blk-verify
/// discards 8 MiB + 4 MiB of it and zeroes 16 MiB + 4 MiB: whole clusters
/// for every cluster size, so that the guest picks the same ranges whatever
/// discard alignment the image asks for.
const QCOW2_DISK_BYTES: u64 = 32 << 20;
/// One job for every image: same seed, and discarded sectors must read as
/// zeroes, so that every run leaves the same disk contents.
const QCOW2_JOB: &str = "job=blk-verify seed=0x9c0 discard_zeroes=1";

fn qemu_img(args: &[&str]) -> std::process::Output {
    let tool = find_on_path("qemu-img")
        .unwrap_or_else(|| panic!("the qcow2 tests need qemu-img (package qemu-utils)"));
    Command::new(tool)
        .args(args)
        .output()
        .expect("running qemu-img")
}

fn qemu_img_text(out: &std::process::Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// blk-verify (QCOW2_JOB, two queues) through ringvm-blk serving `img`;
/// the guest's report.
fn blk_verify_image(img: &Path) -> ringvm_tests::blk_pattern::VerifyReport {
    let mut socket = img.as_os_str().to_owned();
    socket.push(".sock");
    let socket = PathBuf::from(socket);
    let blk = RingvmBlk::start(img, &socket, &["--queues", "2"]);
    let disk = format!("socket={},num_queues=2", blk.socket.display());
    let out = ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--cmdline",
        QCOW2_JOB,
        "--disk",
        &disk,
    ]);
    assert!(out.exited_with(0), "{}: {out}", img.display());
    let report = parse_verify_ok(&out.stdout)
        .unwrap_or_else(|| panic!("{}: no blk-verify ok line\n{out}", img.display()));
    assert_eq!(report.sectors, QCOW2_DISK_BYTES / 512, "{out}");
    assert_eq!(
        blk.wait_exit(),
        Some(0),
        "ringvm-blk exits 0 when ringvm disconnects"
    );
    report
}

/// blk-verify on a raw image, then on the qcow2 image `create` makes: the
/// guest sees the same disk, `qemu-img check` finds nothing wrong, and
/// `qemu-img compare` finds the qcow2 image identical to the raw one.
fn qcow2_blk_verify_matches_raw(create: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let raw = image(dir.path(), QCOW2_DISK_BYTES);
    let raw_report = blk_verify_image(&raw);
    assert_eq!(raw_report.discard_result, "zeroes");
    check_image(&raw, &raw_report).unwrap();

    let qcow2 = dir.path().join("disk.qcow2");
    create(&qcow2);
    let report = blk_verify_image(&qcow2);
    assert_eq!(report, raw_report, "the qcow2 run saw another disk");

    let out = qemu_img(&["check", qcow2.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check: {}",
        qemu_img_text(&out)
    );
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        qcow2.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare: {}",
        qemu_img_text(&out)
    );
}

fn qemu_img_create_qcow2(cluster_size: &'static str) -> impl FnOnce(&Path) {
    move |path| {
        let out = qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster_size}"),
            path.to_str().unwrap(),
            &QCOW2_DISK_BYTES.to_string(),
        ]);
        assert!(
            out.status.success(),
            "qemu-img create: {}",
            qemu_img_text(&out)
        );
    }
}

#[test]
fn blk_verify_on_qcow2_with_4k_clusters() {
    qcow2_blk_verify_matches_raw(qemu_img_create_qcow2("4K"));
}

#[test]
fn blk_verify_on_qcow2_with_64k_clusters() {
    qcow2_blk_verify_matches_raw(qemu_img_create_qcow2("64K"));
}

#[test]
fn blk_verify_on_qcow2_with_2m_clusters() {
    qcow2_blk_verify_matches_raw(qemu_img_create_qcow2("2M"));
}

#[test]
fn blk_verify_on_qcow2_made_by_ringvm_blk_create() {
    qcow2_blk_verify_matches_raw(|path| {
        let out = Command::new(binary("ringvm-blk"))
            .arg("create")
            .arg(path)
            .args(["--size", &QCOW2_DISK_BYTES.to_string()])
            .output()
            .expect("spawning ringvm-blk create");
        assert!(
            out.status.success(),
            "ringvm-blk create: {}",
            qemu_img_text(&out)
        );
    });
}

#[test]
fn qemu_as_the_frontend_of_ringvm_blk() {
    let Some(qemu) = ringvm_tests::harness::qemu_path() else {
        println!("SKIPPED: qemu-system-x86_64 is not installed, so QEMU as a frontend of ringvm-blk was not checked");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 16 << 20);
    let blk = RingvmBlk::start(
        &img,
        &dir.path().join("blk.sock"),
        &["--queues", "2", "--serial", "from-qemu"],
    );
    let mut cmd =
        ringvm_tests::harness::qemu_guest_command(&qemu, "job=blk-verify serial=from-qemu exit=3");
    cmd.args(["-m", "256M", "-nodefaults", "-serial", "stdio"])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=blk0,path={}", blk.socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2"]);
    let out =
        run_bounded(cmd, Duration::from_secs(240), Some("testguest:")).expect("spawning qemu");
    assert_eq!(
        out.status,
        ringvm_tests::harness::ExitOutcome::Exited((3 << 1) | 1),
        "{out}"
    );
    let report =
        parse_verify_ok(&out.stdout).unwrap_or_else(|| panic!("no blk-verify ok line\n{out}"));
    assert_eq!(report.queues, 2);
    assert_eq!(blk.wait_exit(), Some(0));
    check_image(&img, &report).unwrap();
}

#[test]
fn blk_verify_through_qemu_storage_daemon_one_queue() {
    blk_verify_through_qsd(1);
}

#[test]
fn blk_verify_through_qemu_storage_daemon_four_queues() {
    blk_verify_through_qsd(4);
}

#[test]
fn more_queues_than_the_backend_serves_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let Some(qsd) = Qsd::start(&img, &dir.path().join("qsd.sock"), 2) else {
        return;
    };
    let out = ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--cmdline",
        "job=hello",
        "--disk",
        &qsd.disk_arg(",num_queues=4"),
    ]);
    assert!(out.exited_with(2), "{out}");
    assert!(
        out.stderr.contains("num_queues=4") && out.stderr.contains("serves 2"),
        "{out}"
    );
}

#[test]
fn missing_socket_is_named_before_the_guest_starts() {
    let out = ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--cmdline",
        "job=hello",
        "--disk",
        "socket=/nonexistent/blk.sock",
    ]);
    assert!(out.exited_with(2), "{out}");
    assert!(out.stderr.contains("/nonexistent/blk.sock"), "{out}");
    assert!(
        !out.stdout.contains("testguest:"),
        "the guest must not start\n{out}"
    );
}

#[test]
fn peer_that_is_not_vhost_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let mut buf = [0u8; 256];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nnot vhost-user at all");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let spec = format!("socket={}", sock.display());
    let out = ringvm(&[
        "--kernel",
        GUEST_ELF_PATH,
        "--cmdline",
        "job=hello",
        "--disk",
        &spec,
    ]);
    assert!(out.exited_with(2), "{out}");
    assert!(out.stderr.contains(sock.to_str().unwrap()), "{out}");
    assert!(out.stderr.contains("vhost-user"), "{out}");
    server.join().unwrap();
}

#[test]
fn backend_death_leaves_the_vm_running() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let Some(mut qsd) = Qsd::start(&img, &dir.path().join("qsd.sock"), 1) else {
        return;
    };
    let disk_arg = qsd.disk_arg("");
    let stderr = vm_survives_backend_death(&["--disk", &disk_arg], || {
        qsd.child.kill().unwrap();
        qsd.child.wait().unwrap();
    });
    assert!(
        stderr.contains("backend disconnected"),
        "the loss is logged: {stderr}"
    );
}
