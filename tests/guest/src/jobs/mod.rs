//! Jobs: what the guest does once it is up, chosen with `job=<name>` on the
//! command line. A job prints its findings and returns; `main` then writes the
//! `exit=` code to the debug-exit port.

mod echo;
mod hello;

use crate::bootinfo::{CmdLine, StartInfo};

/// What a job gets to work with.
pub struct Boot {
    pub start_info: StartInfo,
    #[allow(dead_code, reason = "for jobs that take parameters")]
    pub cmdline: CmdLine,
}

/// The job failed; it has printed why.
pub struct JobFailed;

type Job = fn(&Boot) -> Result<(), JobFailed>;

const JOBS: &[(&str, Job)] = &[("hello", hello::run), ("echo", echo::run)];

/// The job called `name`, if there is one.
pub fn find(name: &str) -> Option<Job> {
    JOBS.iter().find(|(n, _)| *n == name).map(|&(_, job)| job)
}
