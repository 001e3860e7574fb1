//! Free TCP ports on 127.0.0.1 for what a test must name its ports to before
//! it binds them (a `kadmq` process, a flag naming a port): each port is
//! handed out once, to one test, in one process, among all processes on
//! the machine that use this module.
//!
//! Why not bind port 0 and pass on the port the kernel chose, as the tests
//! did: the port is free again as soon as that listener is dropped, and the
//! kernel hands ports of its ephemeral range to every later `bind(:0)` and
//! every outgoing connection, in this process or another. Two tests (or a
//! test and a client socket) could get the same port before the process
//! meant to listen on it had started, and fail or talk to the wrong node.
//!
//! So a port here is
//! - taken from a range below the kernel's ephemeral range (read from
//!   `/proc/sys/net/ipv4/ip_local_port_range`; Linux's default is
//!   32768–60999), which the kernel never hands out by itself;
//! - handed out at most once by this process: a cursor walks the range once
//!   (starting at an offset from the pid, so processes start apart);
//! - claimed against other processes (the other test binary, other
//!   checkouts testing at the same time) by an exclusive `flock` on a file of
//!   its own in the temp dir, held until this process exits: the kernel
//!   drops it then, even after a crash, so no claim goes stale;
//! - skipped if something already listens on it (a bind check).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

/// How many ports the range holds: enough for every node of every test of
/// a run (three ports a node).
const SPAN: u16 = 12_000;

struct Ports {
    first: u16,
    /// Ports of the range tried so far, in the order they are tried.
    tried: u16,
    /// The lock files of the ports handed out: closing one would let
    /// another process take its port.
    claims: Vec<File>,
}

static PORTS: Mutex<Option<Ports>> = Mutex::new(None);

/// A port on 127.0.0.1 nobody else has been given and nothing listens on.
/// Panics when the range is used up.
pub fn free_port() -> u16 {
    let mut ports = PORTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let ports = ports.get_or_insert_with(|| Ports { first: range_start(), tried: 0, claims: Vec::new() });
    let offset = (std::process::id() % u32::from(SPAN)) as u16;
    while ports.tried < SPAN {
        let port = ports.first + (offset + ports.tried) % SPAN;
        ports.tried += 1;
        let Some(claim) = claim(port) else { continue };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.claims.push(claim);
            return port;
        }
    }
    panic!("no free port left in {}..{}", ports.first, ports.first + SPAN);
}

/// The first port of the range: the [`SPAN`] ports just below the kernel's
/// ephemeral range (and above the privileged ports).
fn range_start() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    ephemeral_low.saturating_sub(SPAN).max(1_024)
}

/// An exclusive lock on `port`'s file, or None if another process holds it.
fn claim(port: u16) -> Option<File> {
    let dir = std::env::temp_dir().join("kadmq-test-ports");
    std::fs::create_dir_all(&dir).ok()?;
    let path: PathBuf = dir.join(port.to_string());
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(path).ok()?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(file)
}
