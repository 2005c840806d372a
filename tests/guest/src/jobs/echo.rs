//! `job=echo`: reads one line of console input from COM1 and prints it back
//! as `testguest: echo <line>`. It waits for input as long as it takes, so it
//! also serves as a guest that stays up until the VMM is stopped.

use super::{Boot, JobFailed};
use crate::serial::try_read_byte;

/// Longest line kept; the rest of a longer line is dropped.
const LINE_MAX_BYTES: usize = 256;

pub fn run(_boot: &Boot) -> Result<(), JobFailed> {
    println!("echo ready");
    let mut line = [0u8; LINE_MAX_BYTES];
    let mut len = 0;
    loop {
        let Some(b) = try_read_byte() else {
            core::hint::spin_loop();
            continue;
        };
        match b {
            b'\n' | b'\r' => break,
            _ if len < LINE_MAX_BYTES => {
                line[len] = b;
                len += 1;
            }
            _ => {}
        }
    }
    match core::str::from_utf8(&line[..len]) {
        Ok(text) => println!("echo {text}"),
        Err(_) => println!("echo <{len} bytes, not UTF-8>"),
    }
    Ok(())
}
