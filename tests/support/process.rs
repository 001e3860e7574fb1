//! `kadmq` child processes a test starts, and the signals a test sends
//! them: only to a process it started, by that process's own pid (never by
//! name: other tests and other checkouts run `kadmq` too).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `kadmq` binary cargo built for these tests, without the `KADMQ_*`
/// variables of the environment the tests run in (they would change what
/// the binary reads as its configuration).
pub fn kadmq() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kadmq"));
    for (key, _) in std::env::vars() {
        if key.starts_with("KADMQ_") {
            command.env_remove(key);
        }
    }
    command
}

/// A `kadmq` process this test started; SIGKILLed when dropped.
pub struct Process {
    child: Child,
}

impl Process {
    /// Starts `command` (stdin closed).
    pub fn spawn(mut command: Command) -> Process {
        let child = command.stdin(Stdio::null()).spawn().expect("spawn kadmq");
        Process { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and wait: no shutdown code runs.
    pub fn kill(mut self) {
        self.kill_now();
    }

    /// SIGTERM, then wait up to `grace` for a clean exit (SIGKILL after
    /// that). Returns how the process ended, None if it had to be killed.
    pub fn stop(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_now();
        None
    }

    /// SIGSTOP: the process stops answering anything (its sockets stay open).
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    /// Whether the process has exited (and how), without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait on the child")
    }

    /// Sends `signal` to the child, unless it has exited: once it is reaped
    /// its pid may belong to another process.
    fn signal(&mut self, signal: libc::c_int) {
        let pid = self.child.id();
        assert!(self.exited().is_none(), "signal {signal} to {pid}: it has exited");
        // SAFETY: kill(2) on the pid of our own child, which has not been
        // reaped (try_wait just found it running), so the pid is still ours.
        let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(sent, 0, "signal {signal} to {pid}: {}", std::io::Error::last_os_error());
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_now();
    }
}
