//! Jobs: what the guest does once it is up, chosen with `job=<name>` on the
//! command line. A job prints its findings and returns; `main` then writes the
//! `exit=` code to the debug-exit port.

mod blk_bench;
mod blk_verify;
mod echo;
mod hello;
mod net_bench;
mod net_echo;
mod params;

use crate::bootinfo::{CmdLine, StartInfo};

/// What a job gets to work with.
pub struct Boot {
    pub start_info: StartInfo,
    pub cmdline: CmdLine,
}

/// The job failed; it has printed why.
pub struct JobFailed;

type Job = fn(&Boot) -> Result<(), JobFailed>;

const JOBS: &[(&str, Job)] = &[
    ("hello", hello::run),
    ("echo", echo::run),
    ("blk-verify", blk_verify::run),
    ("blk-bench", blk_bench::run),
    ("net-echo", net_echo::run),
    ("net-bench", net_bench::run),
];

/// The job called `name`, if there is one.
pub fn find(name: &str) -> Option<Job> {
    JOBS.iter().find(|(n, _)| *n == name).map(|&(_, job)| job)
}
