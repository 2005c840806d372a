//! The network benchmark's numbers: one [`Measurement`] per case and way of
//! running it, the ratios, the table and the JSON report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::console::DeviceLine;
use super::netns::TapCounters;
use super::packet::SenderTotals;
use super::{Case, Dir, Size};
use crate::blk::report::ProcessCost;
use crate::host::HostInfo;

/// A measurement, or why there is none.
#[derive(Clone, Debug)]
pub enum Slot<T> {
    Done(T),
    Failed(String),
    Skipped(String),
}

impl<T> Slot<T> {
    pub fn as_ref(&self) -> Slot<&T> {
        match self {
            Slot::Done(t) => Slot::Done(t),
            Slot::Failed(why) => Slot::Failed(why.clone()),
            Slot::Skipped(why) => Slot::Skipped(why.clone()),
        }
    }

    pub fn map_done<U>(self, f: impl FnOnce(T) -> U) -> Slot<U> {
        match self {
            Slot::Done(t) => Slot::Done(f(t)),
            Slot::Failed(why) => Slot::Failed(why),
            Slot::Skipped(why) => Slot::Skipped(why),
        }
    }

    pub fn and_then<U>(self, f: impl FnOnce(T) -> Slot<U>) -> Slot<U> {
        match self {
            Slot::Done(t) => f(t),
            Slot::Failed(why) => Slot::Failed(why),
            Slot::Skipped(why) => Slot::Skipped(why),
        }
    }

    fn done(&self) -> Option<&T> {
        match self {
            Slot::Done(t) => Some(t),
            _ => None,
        }
    }

    fn failed(&self) -> bool {
        matches!(self, Slot::Failed(_))
    }
}

/// A slot in JSON: what it holds when done, else `{"failed": why}` or
/// `{"skipped": why}`.
#[derive(Serialize)]
#[serde(untagged)]
enum SlotJson<'a, T: Serialize> {
    Done(&'a T),
    Failed { failed: &'a str },
    Skipped { skipped: &'a str },
}

fn slot_json<T: Serialize>(slot: &Slot<T>) -> SlotJson<'_, T> {
    match slot {
        Slot::Done(t) => SlotJson::Done(t),
        Slot::Failed(why) => SlotJson::Failed { failed: why },
        Slot::Skipped(why) => SlotJson::Skipped { skipped: why },
    }
}

fn serialize_slot<T: Serialize, S: serde::Serializer>(
    slot: &Slot<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    slot_json(slot).serialize(serializer)
}

pub fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// The offloads a run's frames used: `tso4` when frames went through as GSO
/// frames, `csum` when checksums were left to the other side or trusted;
/// `none`, and for a TSO case without GSO frames `none (segmented)`: the
/// host cut them before the reader saw them.
pub fn offloads_in_effect(case: Case, gso_frames: u64, csum_offloaded: u64) -> String {
    let mut used = Vec::new();
    if gso_frames > 0 {
        used.push("tso4");
    }
    if csum_offloaded > 0 {
        used.push("csum");
    }
    match (used.is_empty(), case.size) {
        (true, Size::Tso64k) => "none (segmented)".to_string(),
        (true, _) => "none".to_string(),
        (false, _) => used.join("+"),
    }
}

/// One case run one way.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// The measured time: the guest's send or receive time, the ceiling's
    /// write time or read time from its first frame.
    pub seconds: f64,
    /// Frames that arrived (tx: at the tap; rx: in the guest or the
    /// ceiling's reader), and their bytes without the virtio header and FCS.
    pub packets: u64,
    pub bytes: u64,
    pub packets_per_sec: f64,
    pub bits_per_sec: f64,
    /// Frames sent: by the guest (tx) or the host's sender (rx; frames still
    /// in flight when the run ended are not drops).
    pub sent: u64,
    /// tx: sent less arrived; rx: what the guest found missing from the
    /// sequence (datagrams, or TCP bytes in frames); the ceiling's rx: the
    /// tap's drops.
    pub drops: u64,
    /// The tap's own drop counter over the run (rx_dropped for tx,
    /// tx_dropped, a full queue towards the reader, for rx).
    pub tap_dropped: u64,
    pub offloads: String,
    pub gso_frames: u64,
    /// Guest runs: packets the guest's driver dropped because the device
    /// returned fewer of their buffers than `num_buffers` says (see the
    /// net-bench job).
    pub rx_bad_num_buffers: u64,
    /// The tap's counters over the run.
    pub tap: Option<TapCounters>,
    /// rx: the host's sender.
    pub sender: Option<SenderTotals>,
    /// CPU time per packet by process (`ringvm`, `ringvm-net`, `qemu`...),
    /// `vcpu` (the vCPU threads), `device` (all the rest of the VMM and
    /// backend: the device path), `host_sender`, `writer`, `reader`.
    pub cpu_us_per_packet: BTreeMap<String, f64>,
    /// The guest's result line.
    pub guest: Option<Value>,
}

impl Measurement {
    pub fn new(case: Case, seconds: f64, packets: u64, bytes: u64) -> Measurement {
        Measurement {
            seconds,
            packets,
            bytes,
            packets_per_sec: per_second(packets, seconds),
            bits_per_sec: per_second(bytes.saturating_mul(8), seconds),
            sent: 0,
            drops: 0,
            tap_dropped: 0,
            offloads: offloads_in_effect(case, 0, 0),
            gso_frames: 0,
            rx_bad_num_buffers: 0,
            tap: None,
            sender: None,
            cpu_us_per_packet: BTreeMap::new(),
            guest: None,
        }
    }

    /// The case's headline number: packets per second for 64 B, bits per
    /// second otherwise.
    pub fn value(&self, size: Size) -> f64 {
        if size.in_packets() {
            self.packets_per_sec
        } else {
            self.bits_per_sec
        }
    }

    pub fn headline(&self, size: Size) -> String {
        format!(
            "{} ({} frames, {} dropped, offloads {})",
            format_value(self.value(size), size),
            self.packets,
            self.drops,
            self.offloads
        )
    }
}

fn format_value(value: f64, size: Size) -> String {
    if size.in_packets() {
        format!("{:.3} Mpps", value / 1e6)
    } else {
        format!("{:.2} Gbit/s", value / 1e9)
    }
}

/// Ratios of the headline numbers; absent when a side is missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Ratios {
    pub ringvm_over_qemu: Option<f64>,
    pub ringvm_over_qemu_vhost: Option<f64>,
    pub ringvm_over_ceiling: Option<f64>,
    pub qemu_over_ceiling: Option<f64>,
}

/// One case, all the ways it ran.
#[derive(Clone, Debug, Serialize)]
pub struct CaseReport {
    /// `64-tx` ... `tso-rx` (the `--cases` spelling).
    pub case: String,
    pub size: Size,
    pub frame_bytes: usize,
    pub dir: Dir,
    /// `packets_per_sec` or `bits_per_sec`: what the ratios compare.
    pub metric: &'static str,
    #[serde(serialize_with = "serialize_slot")]
    pub ringvm: Slot<Measurement>,
    #[serde(serialize_with = "serialize_slot")]
    pub qemu: Slot<Measurement>,
    #[serde(serialize_with = "serialize_slot")]
    pub qemu_vhost: Slot<Measurement>,
    #[serde(serialize_with = "serialize_slot")]
    pub ceiling: Slot<Measurement>,
    pub ratios: Ratios,
}

impl CaseReport {
    pub fn new(
        case: Case,
        ringvm: Slot<Measurement>,
        qemu: Slot<Measurement>,
        qemu_vhost: Slot<Measurement>,
        ceiling: Slot<Measurement>,
    ) -> CaseReport {
        let value = |slot: &Slot<Measurement>| slot.done().map(|m| m.value(case.size));
        let ratio = |a: &Slot<Measurement>, b: &Slot<Measurement>| {
            let (a, b) = (value(a)?, value(b)?);
            (b > 0.0).then(|| a / b)
        };
        CaseReport {
            case: case.to_string(),
            size: case.size,
            frame_bytes: case.size.frame_bytes(),
            dir: case.dir,
            metric: if case.size.in_packets() {
                "packets_per_sec"
            } else {
                "bits_per_sec"
            },
            ratios: Ratios {
                ringvm_over_qemu: ratio(&ringvm, &qemu),
                ringvm_over_qemu_vhost: ratio(&ringvm, &qemu_vhost),
                ringvm_over_ceiling: ratio(&ringvm, &ceiling),
                qemu_over_ceiling: ratio(&qemu, &ceiling),
            },
            ringvm,
            qemu,
            qemu_vhost,
            ceiling,
        }
    }

    fn all_ok(&self) -> bool {
        ![&self.ringvm, &self.qemu, &self.qemu_vhost, &self.ceiling]
            .iter()
            .any(|slot| slot.failed())
    }
}

/// A VMM session: the guest's device, the processes, the backend's
/// counters over every run.
#[derive(Clone, Debug, Serialize)]
pub struct VmmSummary {
    pub label: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The guest's `net-bench device` line: MAC, negotiated features and
    /// offloads, queue size.
    pub device: Option<DeviceLine>,
    pub processes: Vec<ProcessCost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_counters: Option<BTreeMap<String, u64>>,
}

/// What the frames of each case are, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct FrameInfo {
    pub min64: &'static str,
    pub mtu1500: &'static str,
    pub tso: &'static str,
    pub bytes: &'static str,
}

impl FrameInfo {
    pub fn describe() -> FrameInfo {
        FrameInfo {
            min64: "60-byte Ethernet frames (64 bytes on the wire with the FCS): IPv4/UDP, 18 \
                    bytes of payload",
            mtu1500: "1514-byte Ethernet frames: IPv4/UDP, 1500-byte IP packets (MTU 1500)",
            tso: "65535-byte TCP/IPv4 frames sent as one GSO frame (GSO_TCPV4, MSS 1460, \
                  checksum offload), 45 segments of at most 1514 bytes once cut",
            bytes: "Ethernet frame bytes without virtio header, FCS, preamble or gap; a TSO \
                    frame counts its 65535 bytes once",
        }
    }
}

/// Everything one `ringvm-bench net` measured; serialised as its JSON
/// report.
#[derive(Clone, Debug, Serialize)]
pub struct NetReport {
    pub runtime_s: u32,
    pub frames: FrameInfo,
    pub vhost_net: String,
    pub host: HostInfo,
    pub load_average_start: String,
    pub load_average_end: String,
    pub cases: Vec<CaseReport>,
    pub ringvm: VmmSummary,
    #[serde(serialize_with = "serialize_slot")]
    pub qemu: Slot<VmmSummary>,
    #[serde(serialize_with = "serialize_slot")]
    pub qemu_vhost: Slot<VmmSummary>,
}

fn fmt_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.2}"))
}

impl NetReport {
    pub fn all_ok(&self) -> bool {
        self.ringvm.ok
            && !matches!(&self.qemu, Slot::Done(s) if !s.ok)
            && !matches!(&self.qemu_vhost, Slot::Done(s) if !s.ok)
            && !self.qemu.failed()
            && self.cases.iter().all(CaseReport::all_ok)
    }

    fn with_vhost(&self) -> bool {
        matches!(self.qemu_vhost, Slot::Done(_))
    }

    /// The table: one row per case.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let vhost = self.with_vhost();
        for (label, summary) in [
            ("ringvm", Slot::Done(&self.ringvm)),
            ("qemu", self.qemu.as_ref()),
            ("qemu-vhost", self.qemu_vhost.as_ref()),
        ] {
            let line = match summary {
                Slot::Done(s) => match &s.device {
                    Some(d) => format!(
                        "features {}, offloads {}",
                        d.features,
                        if d.offloads.is_empty() {
                            "none"
                        } else {
                            &d.offloads
                        }
                    ),
                    None => format!("FAILED: {}", s.error.as_deref().unwrap_or("")),
                },
                Slot::Failed(why) => format!("FAILED: {why}"),
                Slot::Skipped(why) => format!("skipped: {why}"),
            };
            let _ = writeln!(out, "{label:<11} {line}");
        }
        let _ = writeln!(
            out,
            "(tx: guest to host, counted at the tap; rx: host to guest, counted by the guest; \
             {} s per run; load average {} -> {})",
            self.runtime_s, self.load_average_start, self.load_average_end
        );
        let mut header = format!("{:<11}{:<4}{:>14}{:>14}", "case", "dir", "ringvm", "qemu");
        if vhost {
            let _ = write!(header, "{:>14}", "qemu-vhost");
        }
        let _ = write!(
            header,
            "{:>14}{:>8}{:>9}  {:<18}{:<20}offloads ringvm | qemu",
            "ceiling", "r/qemu", "r/ceil", "drops r/q/c", "dev CPU µs/pkt r/q"
        );
        let _ = writeln!(out, "{header}");
        for case in &self.cases {
            let size = case.size;
            let cell = |slot: &Slot<Measurement>| match slot {
                Slot::Done(m) => format_value(m.value(size), size),
                Slot::Failed(_) => "FAILED".to_string(),
                Slot::Skipped(_) => "-".to_string(),
            };
            let drops = |slot: &Slot<Measurement>| {
                slot.done()
                    .map_or_else(|| "-".to_string(), |m| m.drops.to_string())
            };
            let cpu = |slot: &Slot<Measurement>| {
                slot.done()
                    .and_then(|m| m.cpu_us_per_packet.get("device"))
                    .map_or_else(|| "-".to_string(), |c| format!("{c:.2}"))
            };
            let offloads = |slot: &Slot<Measurement>| {
                slot.done()
                    .map_or_else(|| "-".to_string(), |m| m.offloads.clone())
            };
            let mut row = format!(
                "{:<11}{:<4}{:>14}{:>14}",
                size.label(),
                case.dir.name(),
                cell(&case.ringvm),
                cell(&case.qemu)
            );
            if vhost {
                let _ = write!(row, "{:>14}", cell(&case.qemu_vhost));
            }
            let _ = write!(
                row,
                "{:>14}{:>8}{:>9}  {:<18}{:<20}{} | {}",
                cell(&case.ceiling),
                fmt_ratio(case.ratios.ringvm_over_qemu),
                fmt_ratio(case.ratios.ringvm_over_ceiling),
                format!(
                    "{}/{}/{}",
                    drops(&case.ringvm),
                    drops(&case.qemu),
                    drops(&case.ceiling)
                ),
                format!("{}/{}", cpu(&case.ringvm), cpu(&case.qemu)),
                offloads(&case.ringvm),
                offloads(&case.qemu)
            );
            let _ = writeln!(out, "{}", row.trim_end());
        }
        for case in &self.cases {
            for (label, slot) in [
                ("ringvm", &case.ringvm),
                ("qemu", &case.qemu),
                ("qemu-vhost", &case.qemu_vhost),
                ("ceiling", &case.ceiling),
            ] {
                match slot {
                    Slot::Failed(why) => {
                        let _ = writeln!(out, "{} {label} FAILED: {why}", case.case);
                    }
                    Slot::Done(m) if m.rx_bad_num_buffers > 0 => {
                        let _ = writeln!(
                            out,
                            "{} {label}: the guest dropped {} packets whose receive buffers \
                             the device returned piecemeal (fewer than num_buffers; virtio 1.2 \
                             5.1.6.4.2)",
                            case.case, m.rx_bad_num_buffers
                        );
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(case: Case, packets: u64, drops: u64) -> Measurement {
        let mut m = Measurement::new(case, 2.0, packets, packets * case.size.frame_bytes() as u64);
        m.drops = drops;
        m.offloads = offloads_in_effect(case, 0, 0);
        m.cpu_us_per_packet.insert("device".to_string(), 1.5);
        m
    }

    fn summary(label: &'static str) -> VmmSummary {
        VmmSummary {
            label,
            ok: true,
            error: None,
            device: Some(DeviceLine {
                mac: "52:54:00:72:76:01".to_string(),
                features: "0x1200188a3".to_string(),
                offloads: "csum,guest_csum,host_tso4,guest_tso4".to_string(),
                queue_size: 256,
            }),
            processes: Vec::new(),
            backend_counters: None,
        }
    }

    fn report(cases: Vec<CaseReport>) -> NetReport {
        NetReport {
            runtime_s: 2,
            frames: FrameInfo::describe(),
            vhost_net: "unavailable: test".to_string(),
            host: HostInfo {
                kvm: "kvm_pvm".to_string(),
                kernel: "6.1".to_string(),
                qemu_version: None,
            },
            load_average_start: "1.00 1.00 1.00".to_string(),
            load_average_end: "2.00 1.00 1.00".to_string(),
            cases,
            ringvm: summary("ringvm"),
            qemu: Slot::Done(summary("qemu")),
            qemu_vhost: Slot::Skipped("vhost-net unavailable".to_string()),
        }
    }

    const MIN_TX: Case = Case {
        size: Size::Min64,
        dir: Dir::Tx,
    };
    const TSO_RX: Case = Case {
        size: Size::Tso64k,
        dir: Dir::Rx,
    };

    #[test]
    fn ratios_use_packets_for_64_bytes_and_bits_otherwise() {
        let case = CaseReport::new(
            MIN_TX,
            Slot::Done(measurement(MIN_TX, 2_000_000, 0)),
            Slot::Done(measurement(MIN_TX, 1_000_000, 5)),
            Slot::Skipped("x".to_string()),
            Slot::Done(measurement(MIN_TX, 8_000_000, 0)),
        );
        assert_eq!(case.metric, "packets_per_sec");
        assert_eq!(case.ratios.ringvm_over_qemu, Some(2.0));
        assert_eq!(case.ratios.ringvm_over_ceiling, Some(0.25));
        assert_eq!(case.ratios.qemu_over_ceiling, Some(0.125));
        assert_eq!(case.ratios.ringvm_over_qemu_vhost, None);

        let mut slow = measurement(TSO_RX, 100, 0);
        // Same packets, twice the bytes: bits decide for TSO.
        slow.bits_per_sec *= 2.0;
        let case = CaseReport::new(
            TSO_RX,
            Slot::Done(slow),
            Slot::Done(measurement(TSO_RX, 100, 0)),
            Slot::Skipped("x".to_string()),
            Slot::Failed("no frames".to_string()),
        );
        assert_eq!(case.metric, "bits_per_sec");
        assert_eq!(case.ratios.ringvm_over_qemu, Some(2.0));
        assert_eq!(case.ratios.ringvm_over_ceiling, None);
        assert!(!case.all_ok());
    }

    #[test]
    fn table_and_json() {
        let ok = CaseReport::new(
            MIN_TX,
            Slot::Done(measurement(MIN_TX, 2_000_000, 0)),
            Slot::Done(measurement(MIN_TX, 1_000_000, 5)),
            Slot::Skipped("vhost-net unavailable".to_string()),
            Slot::Done(measurement(MIN_TX, 8_000_000, 0)),
        );
        let mut piecemeal = measurement(TSO_RX, 60_000, 0);
        piecemeal.rx_bad_num_buffers = 3;
        let failed = CaseReport::new(
            TSO_RX,
            Slot::Failed("the guest says `net-bench FAILED x`".to_string()),
            Slot::Done(piecemeal),
            Slot::Skipped("vhost-net unavailable".to_string()),
            Slot::Done(measurement(TSO_RX, 120_000, 0)),
        );
        let report = report(vec![ok, failed]);
        assert!(!report.all_ok());
        let table = report.table();
        let row = table
            .lines()
            .find(|l| l.starts_with("64 B"))
            .unwrap_or_else(|| panic!("{table}"));
        assert_eq!(
            row,
            "64 B       tx      1.000 Mpps    0.500 Mpps    4.000 Mpps    2.00     0.25  \
             0/5/0             1.50/1.50           none | none"
        );
        let tso = table.lines().find(|l| l.starts_with("64 KiB TSO")).unwrap();
        assert!(tso.contains("FAILED"), "{tso}");
        assert!(tso.contains("15.73 Gbit/s"), "{tso}");
        assert!(
            table.contains("tso-rx ringvm FAILED: the guest says"),
            "{table}"
        );
        assert!(
            table.contains("tso-rx qemu: the guest dropped 3 packets whose receive buffers"),
            "{table}"
        );
        assert!(
            table.contains("qemu-vhost  skipped: vhost-net unavailable"),
            "{table}"
        );
        assert!(
            !table.contains("qemu-vhost    "),
            "no vhost column: {table}"
        );

        let json = serde_json::to_value(&report).unwrap();
        let case = &json["cases"][0];
        assert_eq!(case["case"], "64-tx");
        assert_eq!(case["size"], "64");
        assert_eq!(case["dir"], "tx");
        assert_eq!(case["frame_bytes"], 60);
        assert_eq!(case["ringvm"]["packets"], 2_000_000);
        assert_eq!(case["qemu"]["drops"], 5);
        assert_eq!(case["qemu_vhost"]["skipped"], "vhost-net unavailable");
        assert_eq!(case["ratios"]["ringvm_over_qemu"], 2.0);
        assert_eq!(
            json["cases"][1]["ringvm"]["failed"],
            "the guest says `net-bench FAILED x`"
        );
        assert_eq!(json["qemu_vhost"]["skipped"], "vhost-net unavailable");
        assert_eq!(json["ringvm"]["device"]["queue_size"], 256);
    }

    #[test]
    fn offloads_name_what_the_frames_used() {
        assert_eq!(offloads_in_effect(MIN_TX, 0, 0), "none");
        assert_eq!(offloads_in_effect(TSO_RX, 0, 0), "none (segmented)");
        assert_eq!(offloads_in_effect(TSO_RX, 10, 10), "tso4+csum");
        assert_eq!(offloads_in_effect(MIN_TX, 0, 3), "csum");
    }
}
