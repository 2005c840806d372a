//! The command lines of the three runs: ringvm and its backends
//! (ringvm-blk, qemu-storage-daemon), and host fio, with the same case.

use std::path::Path;
use std::process::Command;

use super::{Case, ImageFormat, Work};

/// Guest RAM: the job's buffers (iodepth x jobs x bs, 8 MiB for 1M x 8) and
/// queues fit many times over.
pub const GUEST_MEMORY: &str = "512M";
/// The guest's job runs on one vCPU, round-robin over its queues.
pub const GUEST_CPUS: &str = "1";

/// `ringvm-blk` serving `image` on `socket` with the case's queues; with
/// `format`, told the image's format instead of reading it from the header.
pub fn ringvm_blk(
    ringvm_blk: &Path,
    image: &Path,
    format: Option<ImageFormat>,
    socket: &Path,
    case: &Case,
    direct: bool,
) -> Command {
    let mut cmd = Command::new(ringvm_blk);
    cmd.arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(socket)
        .args(["--queues", &case.queues.to_string()])
        .args(["--queue-size", &case.queue_size().to_string()]);
    if let Some(format) = format {
        cmd.args(["--format", format.name()]);
    }
    if direct {
        cmd.arg("--direct");
    }
    // The counters line at exit is logged at info.
    cmd.env("RUST_LOG", "info");
    cmd
}

/// `ringvm` booting the test guest with `cmdline` and the disk on `socket`.
pub fn ringvm(ringvm: &Path, guest: &Path, socket: &Path, case: &Case, cmdline: &str) -> Command {
    let mut cmd = Command::new(ringvm);
    cmd.arg("--kernel")
        .arg(guest)
        .args(["--memory", GUEST_MEMORY, "--cpus", GUEST_CPUS])
        .arg("--disk")
        .arg(disk_spec(socket, case))
        .args(["--serial", "stdio", "--cmdline", cmdline]);
    cmd
}

pub fn disk_spec(socket: &Path, case: &Case) -> String {
    format!(
        "socket={},num_queues={},queue_size={}",
        socket.display(),
        case.queues,
        case.queue_size()
    )
}

/// QEMU's option syntax doubles a comma inside a value.
fn qemu_escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// qemu-storage-daemon exporting `image` (through its `format` driver) on
/// `socket` as a vhost-user-blk device.
pub fn qsd(
    qsd: &Path,
    image: &Path,
    format: ImageFormat,
    socket: &Path,
    case: &Case,
    direct: bool,
) -> Command {
    let mut cmd = Command::new(qsd);
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},aio=io_uring,cache.direct={}",
            qemu_escape(image),
            if direct { "on" } else { "off" }
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver={},node-name=disk0,file=file0",
            format.name()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={},node-name=disk0,\
             writable=on,num-queues={}",
            qemu_escape(socket),
            case.queues
        ));
    cmd
}

/// `qemu-img create`: a thin qcow2 of `virtual_bytes` (no cluster allocated).
pub fn qemu_img_create(
    qemu_img: &Path,
    image: &Path,
    virtual_bytes: u64,
    cluster_bytes: u64,
) -> Command {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("cluster_size={cluster_bytes}"))
        .arg(image)
        .arg(virtual_bytes.to_string());
    cmd
}

/// `qemu-img convert` of the filled raw image into a qcow2 holding the same
/// data, every cluster allocated (the raw image has no zero block).
pub fn qemu_img_convert(qemu_img: &Path, raw: &Path, qcow2: &Path, cluster_bytes: u64) -> Command {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["convert", "-f", "raw", "-O", "qcow2", "-o"])
        .arg(format!("cluster_size={cluster_bytes}"))
        .arg(raw)
        .arg(qcow2);
    cmd
}

/// `qemu-img check` with its JSON report (allocated clusters, errors).
pub fn qemu_img_check(qemu_img: &Path, image: &Path) -> Command {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["check", "-f", "qcow2", "--output=json"])
        .arg(image);
    cmd
}

pub fn fio(
    fio: &Path,
    image: &Path,
    case: &Case,
    work: Work,
    runtime_s: u32,
    direct: bool,
) -> Command {
    let mut cmd = Command::new(fio);
    cmd.arg("--name=host")
        .arg(format!("--filename={}", image.display()))
        .arg("--ioengine=io_uring")
        .arg(format!("--rw={}", case.rw.name()))
        .arg(format!("--bs={}", case.bs))
        .arg(format!("--iodepth={}", case.iodepth))
        .arg(format!("--numjobs={}", case.queues))
        .arg(format!("--direct={}", u8::from(direct)));
    if let Some(mix) = case.rwmixread {
        cmd.arg(format!("--rwmixread={mix}"));
    }
    // Uniform offsets with repeats, as the guest draws them. Buffers in
    // shared memory, the kind the backends copy into (guest RAM is a shared
    // memfd): from tmpfs into malloc'ed buffers, 1M reads run at a third of
    // the speed here.
    cmd.arg("--norandommap")
        .arg("--iomem=mmapshared")
        .arg(format!("--runtime={}", runtime_s))
        .arg("--time_based");
    if let Work::Size { region_bytes } = work {
        cmd.arg(format!("--size={region_bytes}"));
    }
    // Percentiles of submission-to-completion latency, as the guest measures.
    cmd.args([
        "--lat_percentiles=1",
        "--group_reporting",
        "--output-format=json",
    ]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::Rw;
    use ringvm_tests::harness;

    const RANDREAD: Case = Case {
        rw: Rw::Randread,
        bs: 4096,
        iodepth: 32,
        queues: 1,
        rwmixread: None,
    };

    #[test]
    fn baseline_commands_use_the_same_parameters() {
        let image = Path::new("/dev/shm/d/disk.img");
        let cmd = fio(
            Path::new("fio"),
            image,
            &RANDREAD,
            Work::Runtime { seconds: 10 },
            10,
            false,
        );
        assert_eq!(
            harness::command_line(&cmd),
            "fio --name=host --filename=/dev/shm/d/disk.img --ioengine=io_uring --rw=randread \
             --bs=4096 --iodepth=32 --numjobs=1 --direct=0 --norandommap --iomem=mmapshared \
             --runtime=10 --time_based --lat_percentiles=1 --group_reporting --output-format=json"
        );
        let two = Case {
            queues: 2,
            ..RANDREAD
        };
        let cmd = fio(
            Path::new("fio"),
            image,
            &two,
            Work::Size { region_bytes: 4096 },
            5,
            true,
        );
        let line = harness::command_line(&cmd);
        assert!(line.contains(" --numjobs=2 --direct=1 "), "{line}");
        assert!(
            line.contains(" --runtime=5 --time_based --size=4096 "),
            "{line}"
        );

        let cmd = qsd(
            Path::new("qemu-storage-daemon"),
            Path::new("/d,x/disk.img"),
            ImageFormat::Raw,
            Path::new("/d/qsd.sock"),
            &two,
            false,
        );
        assert_eq!(
            harness::command_line(&cmd),
            "qemu-storage-daemon --blockdev driver=file,node-name=file0,\
             filename=/d,,x/disk.img,aio=io_uring,cache.direct=off --blockdev \
             driver=raw,node-name=disk0,file=file0 --export type=vhost-user-blk,id=exp0,\
             addr.type=unix,addr.path=/d/qsd.sock,node-name=disk0,writable=on,num-queues=2"
        );
        let cmd = qsd(
            Path::new("qemu-storage-daemon"),
            Path::new("/d/cold.qcow2"),
            ImageFormat::Qcow2,
            Path::new("/d/qsd.sock"),
            &RANDREAD,
            true,
        );
        assert_eq!(
            harness::command_line(&cmd),
            "qemu-storage-daemon --blockdev driver=file,node-name=file0,\
             filename=/d/cold.qcow2,aio=io_uring,cache.direct=on --blockdev \
             driver=qcow2,node-name=disk0,file=file0 --export type=vhost-user-blk,id=exp0,\
             addr.type=unix,addr.path=/d/qsd.sock,node-name=disk0,writable=on,num-queues=1"
        );
        let big = Case {
            iodepth: 128,
            ..two
        };
        assert_eq!(
            disk_spec(Path::new("/d/rb.sock"), &big),
            "socket=/d/rb.sock,num_queues=2,queue_size=512"
        );
    }

    #[test]
    fn qemu_img_commands() {
        let qemu_img = Path::new("qemu-img");
        let cmd = qemu_img_create(qemu_img, Path::new("/d/cold.qcow2"), 1 << 40, 65536);
        assert_eq!(
            harness::command_line(&cmd),
            "qemu-img create -q -f qcow2 -o cluster_size=65536 /d/cold.qcow2 1099511627776"
        );
        let cmd = qemu_img_convert(
            qemu_img,
            Path::new("/d/disk.img"),
            Path::new("/d/warm.qcow2"),
            65536,
        );
        assert_eq!(
            harness::command_line(&cmd),
            "qemu-img convert -f raw -O qcow2 -o cluster_size=65536 /d/disk.img /d/warm.qcow2"
        );
        let cmd = qemu_img_check(qemu_img, Path::new("/d/warm.qcow2"));
        assert_eq!(
            harness::command_line(&cmd),
            "qemu-img check -f qcow2 --output=json /d/warm.qcow2"
        );
    }

    #[test]
    fn ringvm_and_ringvm_blk_commands() {
        let case = Case {
            iodepth: 128,
            queues: 2,
            ..RANDREAD
        };
        let socket = Path::new("/d/ringvm-blk.sock");
        let cmd = ringvm_blk(
            Path::new("ringvm-blk"),
            Path::new("/d/disk.img"),
            None,
            socket,
            &case,
            true,
        );
        assert_eq!(
            harness::command_line(&cmd),
            "ringvm-blk --image /d/disk.img --socket /d/ringvm-blk.sock --queues 2 \
             --queue-size 512 --direct"
        );
        let cmd = ringvm_blk(
            Path::new("ringvm-blk"),
            Path::new("/d/warm.qcow2"),
            Some(ImageFormat::Qcow2),
            socket,
            &RANDREAD,
            false,
        );
        assert_eq!(
            harness::command_line(&cmd),
            "ringvm-blk --image /d/warm.qcow2 --socket /d/ringvm-blk.sock --queues 1 \
             --queue-size 256 --format qcow2"
        );
        let cmd = ringvm(
            Path::new("ringvm"),
            Path::new("/t/testguest.elf"),
            socket,
            &case,
            "job=blk-bench rw=randread",
        );
        assert_eq!(
            harness::command_line(&cmd),
            "ringvm --kernel /t/testguest.elf --memory 512M --cpus 1 --disk \
             socket=/d/ringvm-blk.sock,num_queues=2,queue_size=512 --serial stdio --cmdline \
             job=blk-bench rw=randread"
        );
    }
}
