//! `ringvm-bench net`: the network benchmark. In a network namespace of its
//! own, with its own taps, it measures the same cases three ways in one run:
//!
//! 1. ringvm + ringvm-net: the test guest's `job=net-bench` (tests/guest/src/
//!    jobs/net_bench.rs) on a virtio-net device that ringvm-net serves from a
//!    multi-queue tap;
//! 2. QEMU's in-process virtio-net (`-netdev tap,vhost=off`) on a second
//!    tap, with the same guest and job (and `vhost=on` too when
//!    /dev/vhost-net is there);
//! 3. the ceiling: this process writing the same frames into the tap, or
//!    reading them from it, as fast as it can, with ringvm-net's own tap code
//!    and nothing behind the tap but the kernel.
//!
//! Cases: 64 B (60-byte frames, the Ethernet minimum without FCS: packets
//! per second), 1500 B (1514-byte frames, a 1500-byte MTU: Gbit/s) and
//! 64 KiB TSO (65535-byte TCP/IPv4 frames cut at an MSS of 1460: Gbit/s),
//! each guest to host (tx) and host to guest (rx).
//!
//! - tx: the guest sends to a MAC no tap has (frames::PEER_MAC); the tap
//!   counts every frame that arrives (its rx counters) and the host's IP
//!   layer drops it right away. The rate is what arrived over the guest's
//!   send time, and the drops are what the guest sent less what arrived.
//!   The guest starts each run when a go datagram comes, after the
//!   benchmark has read the counters.
//! - rx: the host injects the frames into the tap with an AF_PACKET socket
//!   (packet.rs: PACKET_VNET_HDR, so TSO frames stay whole when the reader
//!   enabled TSO4), paced by the tap's counters; the guest counts what
//!   arrives and what is missing from the sequence.
//!
//! Each VMM boots once and runs every case (`runs=` of the job), so QEMU's
//! slow firmware start (DESIGN.md, Environment) is paid once.

mod ceiling;
mod console;
mod frames;
mod netns;
#[path = "../../../tests/guest/src/netproto.rs"]
#[allow(dead_code)]
mod netproto;
mod packet;
mod report;
mod session;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

use crate::guest::ExportedGuest;
use crate::host::HostInfo;
pub use netns::check_privileges;
pub use report::NetReport;
use report::{CaseReport, Slot};
use session::Vmm;

/// The multi-queue tap (ringvm-net, the ceiling) and the single-queue one
/// (QEMU).
const TAP_MQ: &str = "rvbench-mq";
const TAP_SQ: &str = "rvbench-sq";

#[derive(Debug, Error)]
pub enum NetError {
    #[error("setting up the network namespace")]
    Netns(#[from] netns::NetnsError),
    #[error("writing the test guest to a temporary directory")]
    ExportGuest(#[source] io::Error),
    #[error("creating a working directory")]
    WorkDir(#[source] io::Error),
    #[error("writing the JSON report to {path}")]
    WriteJson {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Frame sizes of the cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Size {
    /// 60-byte frames: 64 bytes on the wire with the FCS.
    #[serde(rename = "64")]
    Min64,
    /// 1514-byte frames: a 1500-byte IPv4 packet.
    #[serde(rename = "1500")]
    Mtu1500,
    /// 65535-byte TCP/IPv4 TSO frames: the largest the host's stack sends
    /// without cutting them first (a GSO packet must stay below its
    /// gso_max_size of 65536 bytes: a 65536-byte one injected into the tap
    /// is dropped on the way, ENOBUFS and the tap's tx_dropped).
    #[serde(rename = "tso")]
    Tso64k,
}

impl Size {
    pub const ALL: [Size; 3] = [Size::Min64, Size::Mtu1500, Size::Tso64k];

    /// Ethernet frame bytes without FCS, headers included.
    pub fn frame_bytes(self) -> usize {
        match self {
            Size::Min64 => 60,
            Size::Mtu1500 => 1514,
            Size::Tso64k => 65535,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Size::Min64 => "64",
            Size::Mtu1500 => "1500",
            Size::Tso64k => "tso",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Size::Min64 => "64 B",
            Size::Mtu1500 => "1500 B",
            Size::Tso64k => "64 KiB TSO",
        }
    }

    /// Whether the case's headline number is packets per second (else
    /// Gbit/s).
    pub fn in_packets(self) -> bool {
        self == Size::Min64
    }
}

/// Which way the frames go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// Guest to host.
    Tx,
    /// Host to guest.
    Rx,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::Tx => "tx",
            Dir::Rx => "rx",
        }
    }
}

/// One case: a frame size and a direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub size: Size,
    pub dir: Dir,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.size.name(), self.dir.name())
    }
}

impl Case {
    /// Every case, in the order they run.
    pub fn all() -> Vec<Case> {
        Size::ALL
            .iter()
            .flat_map(|&size| [Dir::Tx, Dir::Rx].map(|dir| Case { size, dir }))
            .collect()
    }

    /// The guest job's item for this case in `runs=`.
    pub fn guest_run(&self) -> String {
        match self.dir {
            Dir::Tx => format!("tx:{}", self.size.frame_bytes()),
            Dir::Rx => "rx".to_string(),
        }
    }
}

/// `--cases`: comma-separated `SIZE` or `SIZE-DIR` items, SIZE one of 64,
/// 1500, tso and DIR tx or rx (SIZE alone: both directions), in the order of
/// [`Case::all`] and without repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseList(pub Vec<Case>);

impl FromStr for CaseList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut wanted = Vec::new();
        for item in text.split(',') {
            let (size, dirs) = match item.split_once('-') {
                Some((size, "tx")) => (size, &[Dir::Tx][..]),
                Some((size, "rx")) => (size, &[Dir::Rx][..]),
                Some(_) => return Err(bad_cases(text, item)),
                None => (item, &[Dir::Tx, Dir::Rx][..]),
            };
            let Some(size) = Size::ALL.into_iter().find(|s| s.name() == size) else {
                return Err(bad_cases(text, item));
            };
            wanted.extend(dirs.iter().map(|&dir| Case { size, dir }));
        }
        Ok(CaseList(
            Case::all()
                .into_iter()
                .filter(|case| wanted.contains(case))
                .collect(),
        ))
    }
}

fn bad_cases(text: &str, item: &str) -> String {
    format!(
        "`{item}` in `{text}`: expected comma-separated SIZE or SIZE-DIR items, SIZE one of 64, \
         1500, tso and DIR tx (guest to host) or rx (host to guest), e.g. 64,tso-rx"
    )
}

/// Whether and how to run QEMU.
#[derive(Clone, Debug)]
pub enum QemuPlan {
    Run(PathBuf),
    Skip(String),
}

#[derive(Clone, Debug)]
pub struct NetOptions {
    pub cases: Vec<Case>,
    pub runtime_s: u32,
    pub json: PathBuf,
    pub ringvm: PathBuf,
    pub ringvm_net: PathBuf,
    pub qemu: QemuPlan,
    pub ceiling: bool,
}

/// Whether QEMU's vhost-net can be used here, or why not.
fn vhost_net() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-net")
    {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err("/dev/vhost-net does not exist (module vhost_net not loaded)".to_string())
        }
        Err(err) => Err(format!("/dev/vhost-net cannot be opened: {err}")),
    }
}

pub fn run(options: &NetOptions) -> Result<NetReport, NetError> {
    let load_start = crate::blk::load_average();
    let guest = ExportedGuest::new().map_err(NetError::ExportGuest)?;
    let workdir = tempfile::Builder::new()
        .prefix("ringvm-bench-net-")
        .tempdir()
        .map_err(NetError::WorkDir)?;
    netns::Netns::enter_new(&[
        netns::TapSpec {
            name: TAP_MQ,
            mac: frames::TAP_MQ_MAC,
            multi_queue: true,
        },
        netns::TapSpec {
            name: TAP_SQ,
            mac: frames::TAP_SQ_MAC,
            multi_queue: false,
        },
    ])?;
    let vhost = vhost_net();
    println!(
        "net: cases {}; {} s per run; taps {TAP_MQ} (ringvm-net, ceiling) and {TAP_SQ} (QEMU) \
         in a network namespace of their own; load average {load_start}",
        options
            .cases
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        options.runtime_s
    );
    match &vhost {
        Ok(()) => println!("net: vhost-net available: QEMU also runs with vhost=on"),
        Err(why) => println!("net: vhost-net unavailable: {why}; no QEMU vhost=on run"),
    }
    let context = session::Context {
        options,
        guest: &guest.path,
        dir: workdir.path(),
    };
    let ringvm = session::run_vmm(&context, Vmm::Ringvm);
    let (qemu, qemu_vhost) = match &options.qemu {
        QemuPlan::Run(path) => {
            let qemu = session::run_vmm(&context, Vmm::Qemu { path, vhost: false });
            let vhost = match &vhost {
                Ok(()) => Slot::Done(session::run_vmm(&context, Vmm::Qemu { path, vhost: true })),
                Err(why) => Slot::Skipped(format!("vhost-net unavailable: {why}")),
            };
            (Slot::Done(qemu), vhost)
        }
        QemuPlan::Skip(why) => (Slot::Skipped(why.clone()), Slot::Skipped(why.clone())),
    };
    let ceilings: Vec<Slot<report::Measurement>> = options
        .cases
        .iter()
        .map(|case| {
            if !options.ceiling {
                return Slot::Skipped("--no-ceiling".to_string());
            }
            eprintln!("net: ceiling {case}");
            match ceiling::run(*case, options.runtime_s) {
                Ok(m) => Slot::Done(m),
                Err(err) => {
                    eprintln!("net: ceiling {case} FAILED: {err:#}");
                    Slot::Failed(format!("{err:#}"))
                }
            }
        })
        .collect();
    let cases = options
        .cases
        .iter()
        .zip(ceilings)
        .enumerate()
        .map(|(index, (case, ceiling))| {
            CaseReport::new(
                *case,
                ringvm.case(index),
                qemu.as_ref().and_then(|s| s.case(index)),
                qemu_vhost.as_ref().and_then(|s| s.case(index)),
                ceiling,
            )
        })
        .collect();
    let qemu_path = match &options.qemu {
        QemuPlan::Run(path) => Some(path.as_path()),
        QemuPlan::Skip(_) => None,
    };
    let report = NetReport {
        runtime_s: options.runtime_s,
        frames: report::FrameInfo::describe(),
        vhost_net: match vhost {
            Ok(()) => "available".to_string(),
            Err(why) => format!("unavailable: {why}"),
        },
        host: HostInfo::probe(qemu_path),
        load_average_start: load_start,
        load_average_end: crate::blk::load_average(),
        cases,
        ringvm: ringvm.summary(),
        qemu: qemu.map_done(|s| s.summary()),
        qemu_vhost: qemu_vhost.map_done(|s| s.summary()),
    };
    println!();
    print!("{}", report.table());
    write_json(&options.json, &report)?;
    println!("JSON report: {}", options.json.display());
    Ok(report)
}

fn write_json(path: &Path, report: &NetReport) -> Result<(), NetError> {
    crate::json::write_atomic(path, report).map_err(|source| NetError::WriteJson {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_lists_parse_in_run_order() {
        let all: CaseList = "64,1500,tso".parse().unwrap();
        assert_eq!(all.0, Case::all());
        assert_eq!(
            all.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["64-tx", "64-rx", "1500-tx", "1500-rx", "tso-tx", "tso-rx"]
        );
        let some: CaseList = "tso-rx,64-tx,64".parse().unwrap();
        assert_eq!(
            some.0,
            [
                Case {
                    size: Size::Min64,
                    dir: Dir::Tx
                },
                Case {
                    size: Size::Min64,
                    dir: Dir::Rx
                },
                Case {
                    size: Size::Tso64k,
                    dir: Dir::Rx
                },
            ]
        );
        for bad in ["", "65", "64-up", "tso-", "1500,", "64-tx-rx"] {
            let err = bad.parse::<CaseList>().unwrap_err();
            assert!(
                err.contains("expected comma-separated SIZE"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn guest_runs_name_the_frame_sizes() {
        let runs: Vec<String> = Case::all().iter().map(Case::guest_run).collect();
        assert_eq!(runs, ["tx:60", "rx", "tx:1514", "rx", "tx:65535", "rx"]);
    }
}
