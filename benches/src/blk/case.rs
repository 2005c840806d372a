//! What one benchmark case runs: fio's workload names and parameters, the
//! cases of the report, and the test guest's command line for them.

use serde::Serialize;

/// The smallest queue the backends are asked for; ringvm's default.
const MIN_QUEUE_SIZE: u32 = 256;
/// Descriptors per request without indirect tables: header, data, status.
const DESCRIPTORS_PER_REQUEST: u32 = 3;

/// fio's `rw=` workloads that the guest job also runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Rw {
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
        }
    }

    pub fn is_mixed(self) -> bool {
        self == Rw::Randrw
    }
}

/// How the guest learns of completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Completion {
    /// Polls the used rings (interrupts suppressed): the guest's fast path.
    Poll,
    /// Waits for MSI-X interrupts.
    Irq,
}

impl Completion {
    pub fn name(self) -> &'static str {
        match self {
            Completion::Poll => "poll",
            Completion::Irq => "irq",
        }
    }
}

/// The image format a run serves (`ringvm-bench blk --format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name ringvm-blk's `--format` and QEMU's block drivers use.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// One workload: the same for the guest and for host fio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Case {
    pub rw: Rw,
    pub bs: u64,
    pub iodepth: u32,
    /// Guest jobs = virtqueues = backend queues = fio jobs.
    pub queues: u32,
    /// Percent of reads, for `randrw` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rwmixread: Option<u32>,
}

impl Case {
    /// The cases of the report: 4k randread and randwrite at iodepth 1, 32
    /// and 128 with 1 and 2 queues, then 1M sequential read and write at
    /// iodepth 8 with 1 queue.
    pub fn matrix() -> Vec<Case> {
        let mut cases = Vec::new();
        for rw in [Rw::Randread, Rw::Randwrite] {
            for queues in [1, 2] {
                for iodepth in [1, 32, 128] {
                    cases.push(Case {
                        rw,
                        bs: 4096,
                        iodepth,
                        queues,
                        rwmixread: None,
                    });
                }
            }
        }
        for rw in [Rw::Read, Rw::Write] {
            cases.push(Case {
                rw,
                bs: 1 << 20,
                iodepth: 8,
                queues: 1,
                rwmixread: None,
            });
        }
        cases
    }

    /// `4k randread iodepth=32 queues=1` (and `rwmixread=N` when mixed).
    pub fn label(&self) -> String {
        let mut label = format!(
            "{} {} iodepth={} queues={}",
            size_label(self.bs),
            self.rw.name(),
            self.iodepth,
            self.queues
        );
        if let Some(mix) = self.rwmixread {
            label.push_str(&format!(" rwmixread={mix}"));
        }
        label
    }

    /// The virtqueue size both backends are asked for: room for every
    /// request in flight as three descriptors, so that neither backend has
    /// to follow indirect tables.
    pub fn queue_size(&self) -> u32 {
        (self.iodepth * DESCRIPTORS_PER_REQUEST)
            .next_power_of_two()
            .max(MIN_QUEUE_SIZE)
    }

    pub fn guest_cmdline(&self, work: Work, completion: Completion) -> String {
        let mut cmdline = format!(
            "job=blk-bench rw={} bs={} iodepth={} numjobs={} completion={}",
            self.rw.name(),
            self.bs,
            self.iodepth,
            self.queues,
            completion.name()
        );
        if let Some(mix) = self.rwmixread {
            cmdline.push_str(&format!(" rwmixread={mix}"));
        }
        match work {
            Work::Runtime { seconds } => cmdline.push_str(&format!(" runtime={seconds}")),
            Work::Size { region_bytes } => cmdline.push_str(&format!(" size={region_bytes}")),
        }
        cmdline
    }
}

/// `4k`, `1M`, `1G`, or bytes.
pub fn size_label(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "k")];
    UNITS
        .iter()
        .find(|&&(unit, _)| bytes >= unit && bytes % unit == 0)
        .map_or(bytes.to_string(), |&(unit, suffix)| {
            format!("{}{suffix}", bytes / unit)
        })
}

/// What bounds a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// Time-based over the whole image (fio's `--runtime --time_based`,
    /// the guest's `runtime=`).
    Runtime { seconds: u32 },
    /// The guest transfers the region `[0, region_bytes)` once per job
    /// (`size=`); fio stays time-based on the same region (`--size`).
    Size { region_bytes: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANDREAD: Case = Case {
        rw: Rw::Randread,
        bs: 4096,
        iodepth: 32,
        queues: 1,
        rwmixread: None,
    };

    #[test]
    fn matrix_is_the_reports_table() {
        let cases = Case::matrix();
        let labels: Vec<String> = cases.iter().map(Case::label).collect();
        assert_eq!(cases.len(), 14);
        assert_eq!(labels[0], "4k randread iodepth=1 queues=1");
        assert_eq!(labels[5], "4k randread iodepth=128 queues=2");
        assert_eq!(labels[11], "4k randwrite iodepth=128 queues=2");
        assert_eq!(labels[12], "1M read iodepth=8 queues=1");
        assert_eq!(labels[13], "1M write iodepth=8 queues=1");
    }

    #[test]
    fn queue_fits_every_request_without_indirect_tables() {
        let depth = |iodepth| {
            Case {
                iodepth,
                ..RANDREAD
            }
            .queue_size()
        };
        assert_eq!(depth(1), 256);
        assert_eq!(depth(32), 256);
        assert_eq!(depth(85), 256);
        assert_eq!(depth(86), 512);
        assert_eq!(depth(128), 512);
        assert_eq!(depth(1024), 4096);
    }

    #[test]
    fn guest_cmdline_has_fios_names() {
        assert_eq!(
            RANDREAD.guest_cmdline(Work::Runtime { seconds: 10 }, Completion::Poll),
            "job=blk-bench rw=randread bs=4096 iodepth=32 numjobs=1 completion=poll runtime=10"
        );
        let mixed = Case {
            rw: Rw::Randrw,
            queues: 2,
            rwmixread: Some(70),
            ..RANDREAD
        };
        assert_eq!(
            mixed.guest_cmdline(
                Work::Size {
                    region_bytes: 1 << 26
                },
                Completion::Irq
            ),
            "job=blk-bench rw=randrw bs=4096 iodepth=32 numjobs=2 completion=irq rwmixread=70 \
             size=67108864"
        );
        assert_eq!(mixed.label(), "4k randrw iodepth=32 queues=2 rwmixread=70");
    }

    #[test]
    fn size_labels() {
        assert_eq!(size_label(4096), "4k");
        assert_eq!(size_label(1 << 20), "1M");
        assert_eq!(size_label(3 << 30), "3G");
        assert_eq!(size_label(1536), "1536");
        assert_eq!(size_label(512), "512");
    }
}
