//! What the two backends' command lines share: the `--socket` and
//! `--queue-size` value parsers, and the log subscriber.

use std::io::IsTerminal;
use std::os::unix::net::SocketAddr;
use std::path::PathBuf;

/// "The maximum Queue Size value is 32768" (virtio 1.2, 2.7 Split Virtqueues).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// `--socket`: a unix socket path must fit in `sockaddr_un.sun_path`.
pub fn parse_socket_path(value: &str) -> Result<PathBuf, String> {
    SocketAddr::from_pathname(value)
        .map(|_| PathBuf::from(value))
        .map_err(|err| format!("not usable as a unix socket path: {err}"))
}

/// `--queue-size`: a power of two up to [`MAX_QUEUE_SIZE`].
pub fn parse_queue_size(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(size) if size.is_power_of_two() && size <= MAX_QUEUE_SIZE => Ok(size),
        _ => Err(format!(
            "expected a power of two from 1 to {MAX_QUEUE_SIZE}"
        )),
    }
}

/// Installs the tracing subscriber: RUST_LOG's filter, else
/// `default_filter`, to stderr, with colours only on a terminal.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_size_is_a_power_of_two_up_to_32768() {
        assert_eq!(parse_queue_size("1"), Ok(1));
        assert_eq!(parse_queue_size("32768"), Ok(32768));
        for bad in ["0", "3", "65536", "-2", "many"] {
            assert_eq!(
                parse_queue_size(bad),
                Err("expected a power of two from 1 to 32768".to_string()),
                "{bad}"
            );
        }
    }

    #[test]
    fn socket_path_must_fit_sockaddr_un() {
        assert_eq!(
            parse_socket_path("/run/blk.sock"),
            Ok(PathBuf::from("/run/blk.sock"))
        );
        let long = format!("/tmp/{}.sock", "x".repeat(200));
        let err = parse_socket_path(&long).unwrap_err();
        assert!(
            err.starts_with("not usable as a unix socket path: "),
            "{err}"
        );
    }
}
