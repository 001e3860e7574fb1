//! Waiting, always bounded, for a condition to hold: on a plain thread
//! ([`wait_until`]) or in a task ([`wait_until_async`]). A check answers
//! `bool` or `Result<(), String>` (the `Err` says what it saw, and the last
//! one is in the panic message).

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is polled on a thread unless the caller says
/// otherwise (checks there usually ask processes over HTTP).
pub const POLL: Duration = Duration::from_millis(200);
/// How often a condition is polled in a task (checks there read the state
/// of a broker in this process, which costs next to nothing).
pub const POLL_ASYNC: Duration = Duration::from_millis(20);

/// What a check answers: whether the condition holds, and if not, why.
pub trait Verdict {
    fn verdict(self) -> Result<(), String>;
}

impl Verdict for bool {
    fn verdict(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err(String::new())
        }
    }
}

impl Verdict for Result<(), String> {
    fn verdict(self) -> Result<(), String> {
        self
    }
}

/// Polls `check` every [`POLL`] until it holds; panics after `within` with
/// `what` and the check's last complaint.
pub fn wait_until<V: Verdict>(within: Duration, what: &str, check: impl FnMut() -> V) {
    wait_until_every(POLL, within, what, check);
}

/// [`wait_until`], polling every `every` (for checks that cost the nodes work).
pub fn wait_until_every<V: Verdict>(every: Duration, within: Duration, what: &str, check: impl FnMut() -> V) {
    if let Err(last) = try_wait_until_every(every, within, what, check) {
        panic!("timed out after {within:?} waiting for {what}{}", said(&last));
    }
}

/// [`wait_until`], returning the last complaint instead of panicking (for a
/// test that checks more before it fails).
pub fn try_wait_until<V: Verdict>(within: Duration, what: &str, check: impl FnMut() -> V) -> Result<(), String> {
    try_wait_until_every(POLL, within, what, check)
}

/// The one polling loop. Long waits print how they go (a test's output is
/// shown when it fails, and a slow wait is often the first sign): every 5 s,
/// and at the end how long it took.
pub fn try_wait_until_every<V: Verdict>(
    every: Duration,
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> V,
) -> Result<(), String> {
    let start = Instant::now();
    let mut last = String::new();
    let mut next_note = Duration::from_secs(5);
    loop {
        match check().verdict() {
            Ok(()) => {
                if start.elapsed() >= Duration::from_secs(1) {
                    println!("  (waited {:.1} s for {what}{})", start.elapsed().as_secs_f64(), said(&last));
                }
                return Ok(());
            }
            Err(why) => last = why,
        }
        if start.elapsed() >= within {
            println!("  (gave up after {within:?} waiting for {what}{})", said(&last));
            return Err(last);
        }
        if start.elapsed() >= next_note {
            println!("  ... still waiting after {:.1} s for {what}{}", start.elapsed().as_secs_f64(), said(&last));
            next_note += Duration::from_secs(5);
        }
        std::thread::sleep(every);
    }
}

/// [`wait_until`] for a check that runs in a task (it awaits, so the broker
/// in the same runtime goes on); the clock is tokio's.
pub async fn wait_until_async<V: Verdict, F: Future<Output = V>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = match check().await.verdict() {
            Ok(()) => return,
            Err(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}{}", said(&last));
        }
        tokio::time::sleep(POLL_ASYNC).await;
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, within: Duration) {
    wait_until_every(Duration::from_millis(25), within, &format!("a listener on 127.0.0.1:{port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

fn said(last: &str) -> String {
    if last.is_empty() {
        String::new()
    } else {
        format!(": {last}")
    }
}
