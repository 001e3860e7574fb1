//! Who is in the fleet: node records and the failure detector.
//!
//! Job: the gossiped [`NodeRecord`] wire format (MessagePack, versioned), and
//! the [`FailureDetector`] that turns records and the passing of time into
//! `Up` / `Suspect` / `Dead` changes. Boundary: no I/O and no clock of its
//! own: the event loop feeds it records it received over gossipsub and the
//! current `Instant`, and forwards the changes as [`super::Event`]s. That
//! keeps the failure detector unit-testable without sockets.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// Version of the [`NodeRecord`] encoding. A node ignores records of a
/// version it does not know (and logs them).
pub const RECORD_VERSION: u8 = 1;

/// What a node announces about itself on the membership topic: once at
/// start and then as its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub version: u8,
    /// The announcing node's peer id (bytes form). Must match the signed
    /// gossipsub source, so a node cannot speak for another.
    pub peer_id: Vec<u8>,
    pub name: String,
    /// The node's libp2p listen addresses, as multiaddr strings.
    pub listen_addrs: Vec<String>,
    /// The node's MQTT listeners, opaque to the driver.
    pub mqtt_listeners: Vec<String>,
    /// Grows across restarts of the same peer id.
    pub incarnation: u64,
    /// Caller-supplied load figures.
    #[serde(default)]
    pub load: Load,
    /// Heartbeat counter within one incarnation: a record that is not newer
    /// than the last one seen (a late gossip retransmission) is not a sign
    /// of life.
    pub seq: u64,
    /// The node is shutting down cleanly: mark it dead at once.
    pub leaving: bool,
    /// The fleet settings this node runs with; a node whose settings differ
    /// from ours is not admitted. Absent (all 0) in records of nodes older
    /// than these fields: not compared.
    #[serde(default)]
    pub fleet: FleetSettings,
}

/// What every node of a fleet must agree on, announced in its record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetSettings {
    /// Owners per route shard.
    pub replication: u32,
    /// Topic levels that name a shard.
    pub shard_depth: u32,
    /// Version of what the driver's user puts in frames (opaque here).
    pub frame_version: u32,
}

impl FleetSettings {
    /// Not announced (a record of an older node).
    pub fn is_unknown(&self) -> bool {
        *self == FleetSettings::default()
    }

    /// Why a node announcing `theirs` cannot join a fleet running `self`;
    /// `None` if it can.
    pub fn refusal(&self, peer: &PeerId, theirs: &FleetSettings) -> Option<String> {
        if theirs.is_unknown() || theirs == self {
            return None;
        }
        Some(format!(
            "peer {peer} has replication {}, shard_depth {}, frame version {}; this fleet runs replication {}, \
             shard_depth {}, frame version {}: refused (give every node the same cluster.replication and \
             cluster.shard_depth, and run the same kadmq)",
            theirs.replication,
            theirs.shard_depth,
            theirs.frame_version,
            self.replication,
            self.shard_depth,
            self.frame_version
        ))
    }
}

impl NodeRecord {
    /// MessagePack encoding (named fields, so fields can be added later).
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a node record always encodes")
    }

    /// Decodes a record; `None` if it is malformed or of an unknown version.
    pub fn decode(bytes: &[u8]) -> Option<NodeRecord> {
        let record: NodeRecord = rmp_serde::from_slice(bytes).ok()?;
        (record.version == RECORD_VERSION).then_some(record)
    }

    /// The record as a [`Member`] in the given state; `None` if its peer id
    /// does not parse.
    pub fn to_member(&self, state: MemberState) -> Option<Member> {
        Some(Member {
            peer_id: PeerId::from_bytes(&self.peer_id).ok()?,
            name: self.name.clone(),
            listen_addrs: self.listen_addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            mqtt_listeners: self.mqtt_listeners.clone(),
            incarnation: self.incarnation,
            load: self.load,
            state,
        })
    }
}

/// What a node reports about its load in its heartbeats (opaque to the
/// driver; the broker fills it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Load {
    /// Connected MQTT clients.
    pub connections: u64,
    /// Route shards this node owns.
    pub shards: u64,
    /// Route entries in the shards this node owns.
    pub entries: u64,
}

/// Liveness of a member as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Heartbeats arrive.
    Alive,
    /// No heartbeat for the suspect timeout.
    Suspect,
    /// No heartbeat for the dead timeout, or it announced it was leaving.
    Dead,
}

/// One node of the fleet, as known from its latest record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub peer_id: PeerId,
    pub name: String,
    pub listen_addrs: Vec<Multiaddr>,
    pub mqtt_listeners: Vec<String>,
    pub incarnation: u64,
    pub load: Load,
    pub state: MemberState,
}

/// A change of membership for the event loop to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new member, a new incarnation of a known one, or a suspect or dead
    /// member heard from again.
    Up(Member),
    Suspect(PeerId),
    Dead(PeerId),
}

struct Entry {
    member: Member,
    seq: u64,
    last_heard: Instant,
}

/// The failure detector of one node: the table of remote members, each with
/// the last heartbeat heard, that times them out to suspect and then dead.
///
/// Remote members only: the local node is added by the caller when it
/// lists members, since it never times out.
pub struct FailureDetector {
    local: PeerId,
    suspect_timeout: Duration,
    dead_timeout: Duration,
    members: HashMap<PeerId, Entry>,
}

impl FailureDetector {
    pub fn new(local: PeerId, suspect_timeout: Duration, dead_timeout: Duration) -> Self {
        Self { local, suspect_timeout, dead_timeout, members: HashMap::new() }
    }

    /// Takes in a record heard at `now`; returns the change it makes, if any.
    pub fn observe(&mut self, record: &NodeRecord, now: Instant) -> Option<Change> {
        let member = record.to_member(MemberState::Alive)?;
        let peer = member.peer_id;
        if peer == self.local {
            return None;
        }
        if record.leaving {
            return self.observe_leave(peer, record.incarnation, now);
        }
        match self.members.get_mut(&peer) {
            None => {
                self.members.insert(peer, Entry { member: member.clone(), seq: record.seq, last_heard: now });
                Some(Change::Up(member))
            }
            Some(entry) if record.incarnation < entry.member.incarnation => None,
            Some(entry) if record.incarnation > entry.member.incarnation => {
                // A restart: the old incarnation's state is gone, so this is
                // a new member as far as the routing core is concerned.
                *entry = Entry { member: member.clone(), seq: record.seq, last_heard: now };
                Some(Change::Up(member))
            }
            Some(entry) => {
                if record.seq <= entry.seq {
                    return None;
                }
                entry.seq = record.seq;
                entry.last_heard = now;
                let was = entry.member.state;
                entry.member = member.clone();
                (was != MemberState::Alive).then_some(Change::Up(member))
            }
        }
    }

    fn observe_leave(&mut self, peer: PeerId, incarnation: u64, now: Instant) -> Option<Change> {
        let entry = self.members.get_mut(&peer)?;
        if incarnation < entry.member.incarnation || entry.member.state == MemberState::Dead {
            return None;
        }
        entry.member.incarnation = incarnation;
        entry.member.state = MemberState::Dead;
        entry.last_heard = now;
        Some(Change::Dead(peer))
    }

    /// Advances the failure detector to `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        // Dead members are kept for a while so a late record of theirs
        // cannot resurrect them; after that they are forgotten.
        let forget_after = self.dead_timeout * 10;
        self.members.retain(|_, e| {
            e.member.state != MemberState::Dead || now.saturating_duration_since(e.last_heard) < forget_after
        });
        for (peer, entry) in &mut self.members {
            let silent = now.saturating_duration_since(entry.last_heard);
            match entry.member.state {
                MemberState::Dead => {}
                _ if silent >= self.dead_timeout => {
                    if entry.member.state == MemberState::Alive {
                        changes.push(Change::Suspect(*peer));
                    }
                    entry.member.state = MemberState::Dead;
                    changes.push(Change::Dead(*peer));
                }
                MemberState::Alive if silent >= self.suspect_timeout => {
                    entry.member.state = MemberState::Suspect;
                    changes.push(Change::Suspect(*peer));
                }
                _ => {}
            }
        }
        changes
    }

    /// The member with this peer id, in whatever state.
    pub fn get(&self, peer: &PeerId) -> Option<&Member> {
        self.members.get(peer).map(|e| &e.member)
    }

    /// When a fresh record of this member was last heard.
    pub fn last_heard(&self, peer: &PeerId) -> Option<Instant> {
        self.members.get(peer).map(|e| e.last_heard)
    }

    /// All remote members, in any state.
    pub fn iter(&self) -> impl Iterator<Item = &Member> {
        self.members.values().map(|e| &e.member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(peer: PeerId, incarnation: u64, seq: u64) -> NodeRecord {
        NodeRecord {
            version: RECORD_VERSION,
            peer_id: peer.to_bytes(),
            name: "n".into(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            mqtt_listeners: vec!["tcp://127.0.0.1:1883".into()],
            incarnation,
            load: Load::default(),
            seq,
            leaving: false,
            fleet: FleetSettings { replication: 3, shard_depth: 2, frame_version: 1 },
        }
    }

    fn table() -> FailureDetector {
        FailureDetector::new(PeerId::random(), Duration::from_secs(5), Duration::from_secs(15))
    }

    #[test]
    fn record_round_trips() {
        let r = record(PeerId::random(), 3, 4);
        assert_eq!(NodeRecord::decode(&r.encode()), Some(r));
        assert_eq!(NodeRecord::decode(b"junk"), None);
    }

    #[test]
    fn silence_makes_suspect_then_dead_and_a_heartbeat_revives() {
        let mut m = table();
        let peer = PeerId::random();
        let t0 = Instant::now();
        assert!(matches!(m.observe(&record(peer, 1, 1), t0), Some(Change::Up(_))));
        assert_eq!(m.observe(&record(peer, 1, 2), t0), None);
        assert!(m.tick(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(m.tick(t0 + Duration::from_secs(6)), vec![Change::Suspect(peer)]);
        assert!(m.tick(t0 + Duration::from_secs(7)).is_empty());
        assert_eq!(m.tick(t0 + Duration::from_secs(16)), vec![Change::Dead(peer)]);
        // A late retransmission of an old heartbeat is no sign of life.
        assert_eq!(m.observe(&record(peer, 1, 2), t0 + Duration::from_secs(17)), None);
        let up = m.observe(&record(peer, 1, 3), t0 + Duration::from_secs(17));
        assert!(matches!(up, Some(Change::Up(_))));
        assert_eq!(m.get(&peer).unwrap().state, MemberState::Alive);
    }

    #[test]
    fn higher_incarnation_replaces_and_lower_is_ignored() {
        let mut m = table();
        let peer = PeerId::random();
        let t0 = Instant::now();
        m.observe(&record(peer, 5, 100), t0);
        assert_eq!(m.observe(&record(peer, 4, 200), t0), None);
        let up = m.observe(&record(peer, 6, 1), t0);
        match up {
            Some(Change::Up(member)) => assert_eq!(member.incarnation, 6),
            other => panic!("expected Up, got {other:?}"),
        }
    }

    #[test]
    fn leaving_marks_dead_at_once() {
        let mut m = table();
        let peer = PeerId::random();
        let t0 = Instant::now();
        m.observe(&record(peer, 1, 1), t0);
        let mut leave = record(peer, 1, 2);
        leave.leaving = true;
        assert_eq!(m.observe(&leave, t0), Some(Change::Dead(peer)));
        assert!(m.tick(t0 + Duration::from_secs(100)).is_empty());
    }

    #[test]
    fn fleet_settings_travel_in_the_record_and_old_records_decode() {
        let r = record(PeerId::random(), 1, 1);
        assert_eq!(NodeRecord::decode(&r.encode()).unwrap().fleet, r.fleet);
        // A record without the field (an older node): settings unknown.
        #[derive(Serialize)]
        struct Old<'a> {
            version: u8,
            peer_id: &'a [u8],
            name: &'a str,
            listen_addrs: Vec<String>,
            mqtt_listeners: Vec<String>,
            incarnation: u64,
            seq: u64,
            leaving: bool,
        }
        let peer = PeerId::random().to_bytes();
        let old = Old {
            version: RECORD_VERSION,
            peer_id: &peer,
            name: "old",
            listen_addrs: vec![],
            mqtt_listeners: vec![],
            incarnation: 1,
            seq: 1,
            leaving: false,
        };
        let decoded = NodeRecord::decode(&rmp_serde::to_vec_named(&old).unwrap()).unwrap();
        assert!(decoded.fleet.is_unknown());
    }

    #[test]
    fn differing_fleet_settings_are_refused_with_both_sides_named() {
        let ours = FleetSettings { replication: 3, shard_depth: 2, frame_version: 1 };
        let peer = PeerId::random();
        assert_eq!(ours.refusal(&peer, &ours), None);
        assert_eq!(ours.refusal(&peer, &FleetSettings::default()), None, "unknown: not compared");
        let theirs = FleetSettings { replication: 2, ..ours };
        let why = ours.refusal(&peer, &theirs).unwrap();
        assert!(why.contains("has replication 2, shard_depth 2, frame version 1"), "{why}");
        assert!(why.contains("this fleet runs replication 3"), "{why}");
        assert!(ours.refusal(&peer, &FleetSettings { frame_version: 2, ..ours }).is_some());
        assert!(ours.refusal(&peer, &FleetSettings { shard_depth: 1, ..ours }).is_some());
    }

    #[test]
    fn own_records_are_ignored() {
        let local = PeerId::random();
        let mut m = FailureDetector::new(local, Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(m.observe(&record(local, 1, 1), Instant::now()), None);
    }
}
