//! Admission: whether this node takes MQTT clients yet.
//!
//! A node started with a bootstrap list (`cluster.bootstrap`) that took
//! clients at once would, alone for a moment, own every route shard and
//! route their publishes to nobody else. So it admits no client until it
//! has *joined*: at least one other member is up and the membership view
//! has not changed for a settle (the server gives the cluster's
//! `CLAIM_SETTLE`, see [`Door::new`]), or `cluster.join_timeout_ms` has
//! passed (then one WARN line says so). A node alone by configuration (no
//! bootstrap list, or a join timeout of 0) is admitted at once. Once
//! admitted, a node stays admitted: losing its peers later does not close
//! the door.
//!
//! Job: the door's decision ([`Door`], sans-IO: it is handed the time and
//! the routing core's view), the shared flag every listener and
//! `/health/ready` read ([`Admission`]), the count of refused connections
//! and the one log line about them. Boundary: the server closes the door
//! before its listeners start and drives [`Door::look`] from the cluster
//! (`crate::server`); the listeners answer CONNACK 0x88 Server unavailable
//! (3.1.1: return code 3) while it is closed; nothing here touches a socket
//! or reads a clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Whether clients are let in, and how many were refused before.
pub struct Admission {
    admitted: AtomicBool,
    refused: AtomicU64,
    refusal_logged: AtomicBool,
}

impl Default for Admission {
    /// Admitted: a broker takes clients unless its server says otherwise.
    fn default() -> Admission {
        Admission {
            admitted: AtomicBool::new(true),
            refused: AtomicU64::new(0),
            refusal_logged: AtomicBool::new(false),
        }
    }
}

impl Admission {
    pub fn is_admitted(&self) -> bool {
        self.admitted.load(Ordering::Acquire)
    }

    /// Closes the door until [`Admission::admit`]: the server calls this
    /// once, before its listeners start, when the node must join first.
    pub fn wait_to_join(&self, timeout: Duration) {
        self.admitted.store(false, Ordering::Release);
        tracing::info!(
            join_timeout_ms = timeout.as_millis() as u64,
            "waiting to join the fleet before taking MQTT clients (/health/ready answers 503 until then)"
        );
    }

    /// Opens the door for good, saying why.
    pub fn admit(&self, opened: Opened) {
        if self.admitted.swap(true, Ordering::AcqRel) {
            return;
        }
        let refused = self.refused();
        match opened {
            Opened::Joined { members, after } => tracing::info!(
                members,
                after_ms = after.as_millis() as u64,
                refused,
                "joined the fleet: taking MQTT clients"
            ),
            Opened::TimedOut { members, after } if members <= 1 => tracing::warn!(
                after_ms = after.as_millis() as u64,
                refused,
                "joined no other member within the join timeout (cluster.join_timeout_ms): taking MQTT clients alone"
            ),
            Opened::TimedOut { members, after } => tracing::warn!(
                members,
                after_ms = after.as_millis() as u64,
                refused,
                "membership still changing at the join timeout (cluster.join_timeout_ms): taking MQTT clients"
            ),
        }
    }

    /// Counts a connection refused because the door is closed; the first
    /// one of this run is logged, the others only counted.
    pub fn count_refusal(&self, peer: SocketAddr) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if !self.refusal_logged.swap(true, Ordering::Relaxed) {
            tracing::info!(
                %peer,
                "MQTT connection refused: this node has not joined its fleet yet (CONNACK 0x88 Server \
                 unavailable, 3.1.1: return code 3); further refusals are only counted \
                 (kadmq_connections_refused_not_ready_total)"
            );
        }
    }

    /// Connections refused before admission, this run.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Why the door opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// Another member is up and the view held for the settle; `members`
    /// counts this node too.
    Joined { members: usize, after: Duration },
    /// The join timeout passed first.
    TimedOut { members: usize, after: Duration },
}

/// The decision of a joining node, from what it is shown: when it looks,
/// the members of the routing core's view (itself included) and the view's
/// version. Time is any monotonic reading, as long as it is always the same
/// clock.
#[derive(Debug)]
pub struct Door {
    started: Duration,
    timeout: Duration,
    settle: Duration,
    /// The view's version last seen, and when it was first seen.
    view: Option<(u64, Duration)>,
}

impl Door {
    /// A door closed at `now` that opens once a view with another member
    /// held for `settle`, at the latest `timeout` later. The server gives
    /// the cluster's `CLAIM_SETTLE` as the settle: directory owners defer
    /// claims that long after a node joined (a CONNECT admitted earlier
    /// would find its claim deferred), and the other members' node records
    /// arrive within a heartbeat (1 s), so a view that held that long has
    /// heard of the fleet.
    pub fn new(now: Duration, timeout: Duration, settle: Duration) -> Door {
        Door { started: now, timeout, settle, view: None }
    }

    /// Whether the door opens now. A view is taken as unchanged from the
    /// first look that saw its version, so looks should come often (the
    /// server looks every 100 ms).
    pub fn look(&mut self, now: Duration, members: usize, version: u64) -> Option<Opened> {
        let since = match self.view {
            Some((seen, since)) if seen == version => since,
            _ => {
                self.view = Some((version, now));
                now
            }
        };
        let after = now.saturating_sub(self.started);
        if members >= 2 && now.saturating_sub(since) >= self.settle {
            return Some(Opened::Joined { members, after });
        }
        (after >= self.timeout).then_some(Opened::TimedOut { members, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const TIMEOUT: Duration = Duration::from_secs(30);
    const SETTLE: Duration = Duration::from_millis(1500);

    #[test]
    fn alone_the_door_stays_closed_until_the_timeout() {
        let mut door = Door::new(Duration::ZERO, TIMEOUT, SETTLE);
        for t in (0..30_000).step_by(100) {
            assert_eq!(door.look(t * MS, 1, 1), None, "at {t} ms");
        }
        assert_eq!(door.look(TIMEOUT, 1, 1), Some(Opened::TimedOut { members: 1, after: TIMEOUT }));
    }

    #[test]
    fn a_member_up_opens_the_door_once_the_view_settled() {
        let start = Duration::from_secs(5);
        let mut door = Door::new(start, TIMEOUT, SETTLE);
        assert_eq!(door.look(start, 1, 1), None);
        // Another member: view 2, first seen at +1 s.
        assert_eq!(door.look(start + 1000 * MS, 2, 2), None);
        assert_eq!(door.look(start + 1000 * MS + SETTLE - MS, 2, 2), None, "not settled yet");
        let at = start + 1000 * MS + SETTLE;
        assert_eq!(door.look(at, 2, 2), Some(Opened::Joined { members: 2, after: 1000 * MS + SETTLE }));
    }

    #[test]
    fn each_change_of_the_view_starts_the_settle_again() {
        let mut door = Door::new(Duration::ZERO, TIMEOUT, SETTLE);
        assert_eq!(door.look(100 * MS, 2, 2), None);
        assert_eq!(door.look(1000 * MS, 3, 3), None, "a third member");
        assert_eq!(door.look(1000 * MS + SETTLE - MS, 3, 3), None, "the settle counts from the last change");
        // A member lost counts as a change too.
        assert_eq!(door.look(2000 * MS, 2, 4), None);
        assert_eq!(door.look(2000 * MS + SETTLE, 2, 4), Some(Opened::Joined { members: 2, after: 2000 * MS + SETTLE }));
    }

    #[test]
    fn a_settled_view_of_this_node_alone_does_not_open_the_door() {
        let mut door = Door::new(Duration::ZERO, TIMEOUT, SETTLE);
        // A member came and went: the view is stable, but alone.
        assert_eq!(door.look(100 * MS, 2, 2), None);
        assert_eq!(door.look(200 * MS, 1, 3), None);
        assert_eq!(door.look(200 * MS + SETTLE * 4, 1, 3), None);
    }

    #[test]
    fn a_view_still_changing_at_the_timeout_opens_it_with_the_members_seen() {
        let mut door = Door::new(Duration::ZERO, TIMEOUT, SETTLE);
        let mut version = 1;
        let mut opened = None;
        for t in (0..=30_000u32).step_by(500) {
            version += 1;
            opened = door.look(t * MS, 3, version);
            if opened.is_some() {
                break;
            }
        }
        assert_eq!(opened, Some(Opened::TimedOut { members: 3, after: TIMEOUT }));
    }

    #[test]
    fn admitted_stays_admitted_and_refusals_are_counted() {
        let admission = Admission::default();
        assert!(admission.is_admitted(), "a broker takes clients unless told to wait");
        admission.wait_to_join(TIMEOUT);
        assert!(!admission.is_admitted());
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        admission.count_refusal(peer);
        admission.count_refusal(peer);
        assert_eq!(admission.refused(), 2);
        admission.admit(Opened::Joined { members: 2, after: SETTLE });
        assert!(admission.is_admitted());
        // A second reason to open changes nothing (and logs nothing).
        admission.admit(Opened::TimedOut { members: 1, after: TIMEOUT });
        assert!(admission.is_admitted());
    }
}
