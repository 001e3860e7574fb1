//! Sessions that follow their client across the fleet: the home side.
//!
//! Job: a CONNECT anywhere finds the client's session wherever it is.
//! Every CONNECT claims its client id at the id's primary directory owner
//! (the first of the R owners of `"client:" + id`, see [`directory`]),
//! which orders the CONNECTs of one id fleet-wide and answers with the
//! record as it was. If another node holds the session, this one sets it up
//! offline with the record's subscriptions (so what is published meanwhile
//! queues here), waits `ROUTE_SETTLE` (300 ms) for the routes to spread, and asks
//! the holder to hand it over: the holder closes its connection (5.0:
//! DISCONNECT 0x8E) and sends the session whole — subscriptions, inflight
//! messages with their packet ids and QoS 2 state, queue — which is merged
//! ahead of what queued here (less the copies, known by their fleet id).
//! With clean start the holder discards it instead (its will published as
//! one node would).
//!
//! The home tells the directory owners what they keep (presence and will,
//! the session's record) and copies every delivery of a persistent session
//! to its *standby*, the first owner that is not the home. When a node is
//! declared dead, the new primary owner of each of its clients adopts the
//! session (from its copy, with the will due after its delay) or, for a
//! session that ended with its connection, publishes the will at once. A
//! node that leaves (SIGTERM) closes its connections (0x8B) and has each
//! session's successor take it over the same way a CONNECT would.
//!
//! Boundary: the owner side's data is [`Directory`]; sessions
//! themselves are the broker's ([`Broker::export_session`],
//! [`Broker::prepare_arrival`], [`Broker::absorb`]); frames leave through
//! the cluster's send queues.
//!
//! [`directory`]: super::directory

use super::directory::{Directory, Record};
use super::links::{self, Class};
use super::wire;
use super::Cluster;
use crate::broker::message::{FleetId, Message};
use crate::broker::session::MovedSession;
use crate::broker::{Broker, ClaimGuard, Presence};
use crate::metrics::Figure;
use crate::protocol::DisconnectReason;
use crate::storage::{Mirrored, StoredDelivery, StoredSession};
use kadmq_dht::core::{Membership, NodeId, Owners, Ownership};
use kadmq_dht::ShardKey;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// How long after a node joined (as it sees the fleet) a directory owner
/// defers claims: the sessions' homes tell new owners their records within
/// a tick (1 s) of the change.
pub const CLAIM_SETTLE: Duration = Duration::from_millis(1500);
/// How long a node waits for a directory owner to answer a claim.
const CLAIM_WAIT: Duration = Duration::from_secs(2);
/// How long a node waits for a session to be handed over (the holder
/// waits up to 2 s for its own claim of the id under way, then up to 5 s
/// for its connection to close).
const HANDOVER_WAIT: Duration = Duration::from_secs(8);
/// Between announcing an arriving session's subscriptions and asking for
/// the session: time for the new routes to reach the publishers, so that
/// nothing published during the move is routed to neither node.
const ROUTE_SETTLE: Duration = Duration::from_millis(300);
/// How long a leaving node waits for its sessions to be taken over.
const LEAVE_WAIT: Duration = Duration::from_secs(10);
/// Messages held for a node not yet declared dead here, at most.
const ORPHANS_WAITING: usize = 100_000;
/// How long a node remembers which sessions it adopted from a dead node.
const ADOPTED_KEPT: Duration = Duration::from_secs(600);
/// Deliveries per hand-over frame part, at most (in bytes of topic + payload).
const PART_BYTES: usize = 4 << 20;

/// What nodes say to each other about sessions (one wire kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SessionFrame {
    /// To a client's primary directory owner: make the sender its home
    /// (`clean_start`: the session is discarded).
    Claim { req: u64, client: String, clean_start: bool },
    /// The claim's version and the record as it was before.
    Claimed { req: u64, version: u64, previous: Option<Record> },
    /// The owner's view of the fleet changed just now: ask another.
    ClaimDeferred { req: u64 },
    /// To the node holding a session: close its connection and hand the
    /// session over (`clean_start`: discard it instead).
    TakeOver { req: u64, client: String, version: u64, clean_start: bool },
    /// The answer to `TakeOver`, in parts when large; `last` ends it.
    Handover { req: u64, part: Part, last: bool },
    /// From a session's home to the client's directory owners.
    Directory { client: String, version: u64, update: Update },
    /// From a leaving node to a session's successor: take it from me.
    Take { client: String },
    /// To the node holding a session, before `TakeOver`: remember what
    /// the session is given from now on (the sender gets copies too).
    Moving { client: String },
}

/// One part of a hand-over. (A frame lives briefly, one at a time: the
/// size of its largest variant costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Part {
    /// The session, with its first deliveries.
    Session(MovedSession),
    /// More of its deliveries, in order.
    More(Vec<StoredDelivery>),
    /// Nothing to hand over (no session; or discarded, for a clean start).
    Nothing,
    /// A newer claim of the same client id is under way at the holder.
    Superseded,
}

/// A change to a client's directory record (or, for its standby, to the
/// copy of its deliveries). Short-lived, as [`Part`].
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Update {
    Presence {
        connected: bool,
        will: Option<(Message, u32)>,
        pending_will: Option<(u64, Message)>,
    },
    Session(StoredSession),
    Delivery {
        seq: u64,
        delivery: StoredDelivery,
    },
    DeliveryDone {
        seq: u64,
    },
    /// The home's whole copy (a new standby; `whole`: the home took the
    /// session in, and other homes' copies are void).
    Copy {
        deliveries: Vec<(u64, StoredDelivery)>,
        whole: bool,
    },
    /// No longer a persistent session (its record and copies go).
    SessionGone,
    Ended,
}

impl Update {
    /// For the logs.
    pub fn name(&self) -> &'static str {
        match self {
            Update::Presence { connected: true, .. } => "connected",
            Update::Presence { connected: false, .. } => "disconnected",
            Update::Session(_) => "session",
            Update::Delivery { .. } => "delivery",
            Update::DeliveryDone { .. } => "delivery done",
            Update::Copy { .. } => "copy",
            Update::SessionGone => "session gone",
            Update::Ended => "ended",
        }
    }
}

/// A change the home has to tell: from storage (persistent sessions) or
/// the broker (presence).
pub(super) enum Told {
    Stored(Mirrored),
    Presence(Arc<str>, Presence),
    /// The session was taken in here whole: the standby's copy is replaced.
    TakenIn(Arc<str>),
    /// The session went to another node: nothing more to tell of it.
    HandedOver(Arc<str>),
}

/// The home side's state (in [`Cluster::sessions`]).
pub(super) struct Sessions {
    pub directory: Mutex<Directory>,
    /// The claim version of each session this node is home of.
    homed: Mutex<HashMap<Arc<str>, u64>>,
    /// Claims under way here: client id → version (0 until answered).
    claiming: Mutex<HashMap<Arc<str>, u64>>,
    requests: Mutex<HashMap<u64, mpsc::UnboundedSender<SessionFrame>>>,
    next_request: AtomicU64,
    told: mpsc::UnboundedSender<Told>,
    /// Hand-overs and takes under way (each bounded in time).
    tasks: Mutex<JoinSet<()>>,
    /// Per dead node, since when and the clients whose sessions this node
    /// adopted from it: what others held for it goes to them.
    adopted: Mutex<HashMap<NodeId, Adopted>>,
    /// Messages held for a node not (yet) dead here, for when it is.
    orphans_waiting: Mutex<HashMap<NodeId, Vec<Arc<Message>>>>,
    /// Claims are answered from then on (see [`Sessions::membership_changed`]).
    settled_at: Mutex<Instant>,
    pub stats: SessionStats,
}

#[derive(Default)]
pub struct SessionStats {
    /// Sessions brought here from another node (taken over, handed over, adopted).
    pub moved_in: AtomicU64,
    /// Sessions handed to another node.
    pub moved_out: AtomicU64,
    /// Sessions of dead nodes adopted here.
    pub adopted: AtomicU64,
    /// Wills of dead nodes' clients published here.
    pub wills_of_dead: AtomicU64,
    /// Claims no directory owner answered in time (the CONNECT went on locally).
    pub claims_unanswered: AtomicU64,
    /// Hand-overs not answered in time (the session started from its record).
    pub handovers_unanswered: AtomicU64,
    /// Messages held for a dead node, given here to sessions adopted from it.
    pub orphans_delivered: AtomicU64,
}

impl Sessions {
    pub fn new(directory: Directory) -> (Sessions, mpsc::UnboundedReceiver<Told>) {
        let (told, changes) = mpsc::unbounded_channel();
        let sessions = Sessions {
            directory: Mutex::new(directory),
            homed: Mutex::new(HashMap::new()),
            claiming: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            told,
            tasks: Mutex::new(JoinSet::new()),
            adopted: Mutex::new(HashMap::new()),
            orphans_waiting: Mutex::new(HashMap::new()),
            settled_at: Mutex::new(Instant::now()),
            stats: SessionStats::default(),
        };
        (sessions, changes)
    }

    /// A sender of storage's writes to persistent sessions, for
    /// [`crate::storage::Storage::set_mirror`].
    pub fn mirror(&self) -> Box<dyn Fn(Mirrored) + Send + Sync> {
        let told = self.told.clone();
        Box::new(move |write| {
            let _ = told.send(Told::Stored(write));
        })
    }

    pub fn tell(&self, client_id: &str, presence: Presence) {
        let _ = self.told.send(Told::Presence(client_id.into(), presence));
    }

    /// The sessions' Prometheus figures.
    pub fn figures(&self) -> Vec<Figure> {
        let s = &self.stats;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        vec![
            Figure::new(
                "kadmq_cluster_directory_records",
                "gauge",
                "Session directory records this node keeps as one of their clients' owners.",
                self.directory.lock().len() as u64,
            ),
            Figure::new(
                "kadmq_cluster_sessions_moved_in_total",
                "counter",
                "Sessions brought here from another node (a CONNECT here, a node leaving, a standby's copy).",
                get(&s.moved_in),
            ),
            Figure::new(
                "kadmq_cluster_sessions_moved_out_total",
                "counter",
                "Sessions handed to another node.",
                get(&s.moved_out),
            ),
            Figure::new(
                "kadmq_cluster_sessions_adopted_total",
                "counter",
                "Persistent sessions of dead nodes adopted here (this node was their primary directory owner).",
                get(&s.adopted),
            ),
            Figure::new(
                "kadmq_cluster_wills_of_dead_total",
                "counter",
                "Wills of dead nodes' clients published here.",
                get(&s.wills_of_dead),
            ),
            Figure::new(
                "kadmq_cluster_orphans_delivered_total",
                "counter",
                "Messages other nodes held for a dead node, queued here for the sessions adopted from it.",
                get(&s.orphans_delivered),
            ),
            Figure::new(
                "kadmq_cluster_claims_unanswered_total",
                "counter",
                "CONNECTs whose claim no directory owner answered in time (the session started here as if new).",
                get(&s.claims_unanswered),
            ),
            Figure::new(
                "kadmq_cluster_handovers_unanswered_total",
                "counter",
                "Sessions the holding node did not hand over in time (taken from the standby's copy, or from the directory's record).",
                get(&s.handovers_unanswered),
            ),
        ]
    }

    /// A node joined, as this node sees the fleet: the homes tell the new
    /// owners their records within a tick; claims wait [`CLAIM_SETTLE`].
    pub fn membership_changed(&self) {
        *self.settled_at.lock() = Instant::now() + CLAIM_SETTLE;
    }

    /// Whether this node answers claims (its records had time to be repaired).
    fn settled(&self) -> bool {
        Instant::now() >= *self.settled_at.lock()
    }

    fn version_of(&self, client_id: &str) -> u64 {
        self.homed.lock().get(client_id).copied().unwrap_or(0)
    }
}

/// Since when, and which clients' sessions, a node adopted from a dead one.
type Adopted = (Instant, Vec<Arc<str>>);

/// Releases a claim under way when the claimed session is attached.
struct Claiming {
    cluster: Arc<Cluster>,
    client: Arc<str>,
}

impl Drop for Claiming {
    fn drop(&mut self) {
        self.cluster.sessions.claiming.lock().remove(&self.client);
    }
}

/// The owners of a client's directory key in `view`, closest first.
fn owners_of(view: &Membership, replication: usize, client_id: &str) -> Owners {
    view.placement().owners(&ShardKey::of_client(client_id), replication)
}

impl Cluster {
    fn this(&self) -> Option<Arc<Cluster>> {
        self.this.get().and_then(|weak| weak.upgrade())
    }

    fn view(&self) -> Arc<Membership> {
        self.state.lock().node.membership().clone()
    }

    fn is_live(&self, node: NodeId) -> bool {
        self.state.lock().live.contains(&node)
    }

    /// Sends a session frame to `to` (a frame to this node is a bug: callers
    /// handle their own part directly).
    fn send_session(&self, to: NodeId, frame: &SessionFrame) {
        let bytes = wire::encode_session(frame);
        let st = self.state.lock();
        self.send_to(&st, to, Class::Control, links::copy_of(&bytes));
    }

    /// Sends `frame` (built with a fresh request id) and returns the
    /// channel its answers arrive on.
    fn ask(&self, to: NodeId, frame: impl FnOnce(u64) -> SessionFrame) -> (u64, mpsc::UnboundedReceiver<SessionFrame>) {
        let req = self.sessions.next_request.fetch_add(1, Ordering::Relaxed);
        let (answers, answered) = mpsc::unbounded_channel();
        self.sessions.requests.lock().insert(req, answers);
        self.send_session(to, &frame(req));
        (req, answered)
    }

    fn forget_request(&self, req: u64) {
        self.sessions.requests.lock().remove(&req);
    }

    // ----- claiming: a client connects here --------------------------------

    /// [`crate::broker::Fleet::claim`]: see the module docs.
    pub(super) async fn claim_session(&self, client_id: &str, clean_start: bool) -> ClaimGuard {
        let Some(this) = self.this() else { return Box::new(()) };
        let client: Arc<str> = client_id.into();
        this.sessions.claiming.lock().insert(client.clone(), 0);
        let guard = Claiming { cluster: this.clone(), client: client.clone() };
        let Some(broker) = self.broker.upgrade() else { return Box::new(guard) };
        let Some((version, previous)) = self.claim_at_owners(&broker, client_id, clean_start).await else {
            bump(&self.sessions.stats.claims_unanswered);
            return Box::new(guard);
        };
        self.sessions.homed.lock().insert(client.clone(), version);
        self.sessions.claiming.lock().insert(client.clone(), version);
        tracing::debug!(client_id, version, previous = ?previous.as_ref().map(|r| (r.home, r.version)), "session claimed");
        let Some(previous) = previous else { return Box::new(guard) };
        let home = NodeId(previous.home);
        if home == self.me {
            return Box::new(guard);
        }
        // The holder: the home, or when it is dead the node that adopted
        // its sessions (the client key's primary owner now).
        let source = if self.is_live(home) {
            home
        } else {
            match owners_of(&self.view(), self.replication, client_id).first() {
                Some(node) => *node,
                None => return Box::new(guard),
            }
        };
        if source == self.me {
            // This node keeps the dead home's copy: adopt it, unless the
            // session is to be discarded.
            match clean_start {
                true => self.sessions.directory.lock().forget(&broker.storage, client_id),
                false => {
                    if let Some(moved) = self.copy_of(&broker, client_id, &previous) {
                        self.take_in(&broker, client_id, moved);
                        self.note_adopted(home, client);
                    }
                }
            }
            return Box::new(guard);
        }
        if !clean_start {
            if let Some(record) = previous.session.clone() {
                self.send_session(source, &SessionFrame::Moving { client: client_id.to_string() });
                broker.prepare_arrival(client_id, record);
                tokio::time::sleep(ROUTE_SETTLE).await;
            }
        }
        let mut pulled = self.pull(source, client_id, version, clean_start).await;
        tracing::debug!(client_id, source = source.0, answered = pulled.is_some(), "session pulled");
        if pulled.is_none() {
            // The holder does not answer (dying, or paused): its standby
            // keeps a copy of the session.
            bump(&self.sessions.stats.handovers_unanswered);
            let standby = owners_of(&self.view(), self.replication, client_id).into_iter().find(|o| *o != source);
            pulled = match standby {
                Some(standby) if standby == self.me => {
                    Some((!clean_start).then(|| self.copy_of(&broker, client_id, &previous)).flatten())
                }
                Some(standby) => self.pull(standby, client_id, version, clean_start).await,
                None => None,
            };
        }
        if let Some(Some(moved)) = pulled {
            tracing::debug!(client_id, deliveries = moved.deliveries.len(), "session taken in");
            self.take_in(&broker, client_id, moved);
        }
        if source != home || !self.is_live(home) {
            // Taken from a dead home's standby: what others held for that
            // home comes here, as for a session adopted.
            self.note_adopted(home, client);
        }
        Box::new(guard)
    }

    /// Claims `client_id` at its first directory owner that answers (this
    /// node itself, when it is one in turn). An owner whose view of the
    /// fleet changed just now defers (its records may not be repaired yet):
    /// the next one is asked, and if all defer, all again a moment later.
    /// `None` if none answers.
    async fn claim_at_owners(
        &self,
        broker: &Broker,
        client_id: &str,
        clean_start: bool,
    ) -> Option<(u64, Option<Record>)> {
        let deadline = Instant::now() + CLAIM_SETTLE * 2;
        loop {
            let mut deferred = false;
            let view = self.view();
            for owner in owners_of(&view, self.replication, client_id) {
                if owner == self.me {
                    // Alone, there is nobody to learn records from.
                    if self.sessions.settled() || view.len() == 1 {
                        let mut directory = self.sessions.directory.lock();
                        return Some(directory.claim(&broker.storage, client_id, self.me, clean_start));
                    }
                    deferred = true;
                    continue;
                }
                let client = client_id.to_string();
                let (req, mut answers) = self.ask(owner, |req| SessionFrame::Claim { req, client, clean_start });
                let answer = tokio::time::timeout(CLAIM_WAIT, answers.recv()).await;
                self.forget_request(req);
                match answer {
                    Ok(Some(SessionFrame::Claimed { version, previous, .. })) => return Some((version, previous)),
                    Ok(Some(SessionFrame::ClaimDeferred { .. })) => deferred = true,
                    _ => {}
                }
            }
            if !deferred || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Asks `source` for `client_id`'s session. `Some(None)`: nothing to
    /// take (none there, discarded, or a newer claim is under way);
    /// `None`: no answer in time.
    async fn pull(
        &self,
        source: NodeId,
        client_id: &str,
        version: u64,
        clean_start: bool,
    ) -> Option<Option<MovedSession>> {
        let client = client_id.to_string();
        let (req, mut answers) = self.ask(source, |req| SessionFrame::TakeOver { req, client, version, clean_start });
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        let mut moved: Option<MovedSession> = None;
        let result = loop {
            // A holder declared dead meanwhile will not answer: stop waiting.
            let slice = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
            let frame = match tokio::time::timeout_at(slice, answers.recv()).await {
                Ok(frame) => frame,
                Err(_) if tokio::time::Instant::now() < deadline && self.is_live(source) => continue,
                Err(_) => None,
            };
            let Some(SessionFrame::Handover { part, last, .. }) = frame else {
                break None;
            };
            match part {
                Part::Session(session) => moved = Some(session),
                Part::More(more) => {
                    if let Some(moved) = &mut moved {
                        moved.deliveries.extend(more);
                    }
                }
                Part::Nothing | Part::Superseded => {}
            }
            if last {
                break Some(moved.take());
            }
        };
        self.forget_request(req);
        result
    }

    /// The copy this node keeps of a dead home's session (its standby),
    /// taken out of the directory's keeping: the record, its deliveries in
    /// order, and the will due after its delay if a client was connected.
    fn copy_of(&self, broker: &Broker, client_id: &str, record: &Record) -> Option<MovedSession> {
        let now = broker.now_ms();
        let mut session = record.session.clone()?;
        let ended = session.disconnected_at_ms.is_some_and(|at| {
            session.expiry_interval != u32::MAX && at.saturating_add(session.expiry_interval as u64 * 1000) <= now
        });
        if ended {
            return None;
        }
        let pending_will = match (&record.will, record.connected) {
            (Some((will, delay)), true) => {
                Some((now.saturating_add(u64::from((*delay).min(session.expiry_interval)) * 1000), will.clone()))
            }
            _ => record.pending_will.clone(),
        };
        if record.connected || session.disconnected_at_ms.is_none() {
            session.disconnected_at_ms = Some(now);
        }
        tracing::debug!(client_id, "session copy taken");
        let mut deliveries = match broker.storage.replicas(client_id) {
            Ok(copies) => copies,
            Err(err) => {
                tracing::error!(cause = %err, client_id, "cannot read a session's copy; it resumes without its messages");
                Vec::new()
            }
        };
        // The copies of two homes (a move under way) may name one message twice.
        let mut kept = std::collections::HashSet::new();
        deliveries.retain(|d| d.message.fleet_id.is_none_or(|id| kept.insert(id)));
        if let Err(err) = broker.storage.replace_replicas(client_id, None, &[]) {
            tracing::error!(cause = %err, client_id, "cannot drop a session's copy");
        }
        Some(MovedSession { session, deliveries, pending_will, seen: Vec::new() })
    }

    // ----- handing over: another node claimed a session held here ---------

    /// A `TakeOver` from `to`: waits for a claim of the same id under way
    /// here to finish (or answers `Superseded` when it is the newer one),
    /// then hands the session over in parts.
    async fn hand_over(self: Arc<Self>, to: NodeId, req: u64, client: String, version: u64, clean_start: bool) {
        let Some(broker) = self.broker.upgrade() else { return };
        // Within what the claimer waits (HANDOVER_WAIT): this, then up to
        // 5 s for the old connection to close.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let under_way = self.sessions.claiming.lock().get(client.as_str()).copied();
            match under_way {
                Some(mine) if mine > version => {
                    let frame = SessionFrame::Handover { req, part: Part::Superseded, last: true };
                    return self.send_session(to, &frame);
                }
                Some(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => break,
            }
        }
        let mut moved = broker.export_session(&client, clean_start).await;
        if moved.is_none() {
            // No session here: the copy this node keeps as the session's
            // standby, if any (its home is dead or does not answer), goes
            // to the claim that asks (the newest: the directory ordered it).
            let record = self.sessions.directory.lock().get(&client).cloned();
            if let Some(record) = record.filter(|r| r.version <= version) {
                match clean_start {
                    true => self.sessions.directory.lock().forget(&broker.storage, &client),
                    false => moved = self.copy_of(&broker, &client, &record),
                }
            }
        }
        {
            let mut homed = self.sessions.homed.lock();
            if homed.get(client.as_str()).is_some_and(|mine| *mine < version) {
                homed.remove(client.as_str());
            }
        }
        if moved.is_some() {
            bump(&self.sessions.stats.moved_out);
            let _ = self.sessions.told.send(Told::HandedOver(client.as_str().into()));
        }
        self.send_handover(to, req, moved);
    }

    fn send_handover(&self, to: NodeId, req: u64, moved: Option<MovedSession>) {
        let Some(mut moved) = moved else {
            return self.send_session(to, &SessionFrame::Handover { req, part: Part::Nothing, last: true });
        };
        let mut parts: Vec<Vec<StoredDelivery>> = vec![Vec::new()];
        let mut bytes = 0;
        for delivery in std::mem::take(&mut moved.deliveries) {
            let size = delivery.message.topic.len() + delivery.message.payload.len() + 256;
            if bytes + size > PART_BYTES && !parts.last().is_some_and(Vec::is_empty) {
                parts.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            parts.last_mut().expect("one part at least").push(delivery);
        }
        let count = parts.len();
        for (i, deliveries) in parts.into_iter().enumerate() {
            let part = match i {
                0 => Part::Session(MovedSession { deliveries, ..moved.clone() }),
                _ => Part::More(deliveries),
            };
            self.send_session(to, &SessionFrame::Handover { req, part, last: i + 1 == count });
        }
    }

    // ----- frames from other nodes -----------------------------------------

    /// A session frame from member `from` (under the batch's state lock:
    /// what takes time runs in a task of its own).
    pub(super) fn on_session_frame(
        &self,
        st: &super::state::State,
        broker: &Broker,
        from: NodeId,
        frame: SessionFrame,
    ) {
        match frame {
            SessionFrame::Claim { req, client, clean_start } => {
                let answer = match self.sessions.settled() {
                    true => {
                        let (version, previous) =
                            self.sessions.directory.lock().claim(&broker.storage, &client, from, clean_start);
                        SessionFrame::Claimed { req, version, previous }
                    }
                    false => SessionFrame::ClaimDeferred { req },
                };
                let bytes = wire::encode_session(&answer);
                self.send_to(st, from, Class::Control, links::copy_of(&bytes));
            }
            SessionFrame::Claimed { req, .. }
            | SessionFrame::ClaimDeferred { req }
            | SessionFrame::Handover { req, .. } => {
                if let Some(answers) = self.sessions.requests.lock().get(&req) {
                    let _ = answers.send(frame);
                }
            }
            SessionFrame::TakeOver { req, client, version, clean_start } => {
                if let Some(this) = self.this() {
                    self.spawn(this.hand_over(from, req, client, version, clean_start));
                }
            }
            SessionFrame::Directory { client, version, update } => {
                self.sessions.directory.lock().apply(&broker.storage, &client, from, version, update);
            }
            SessionFrame::Moving { client } => broker.watch_move(&client),
            SessionFrame::Take { client } => {
                // Only a session still homed at the node that leaves: its
                // client may have reconnected elsewhere meanwhile.
                let home = self.sessions.directory.lock().get(&client).map(|r| r.home);
                if home.is_some_and(|home| home != from.0) {
                    return;
                }
                if let Some(this) = self.this() {
                    self.spawn(async move {
                        let _claimed = this.claim_session(&client, false).await;
                        this.tell_offline(&client);
                    });
                }
            }
        }
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.sessions.tasks.lock();
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Tells the directory that a session taken in without its client is
    /// offline here, with the will it brought.
    fn tell_offline(&self, client_id: &str) {
        let Some(broker) = self.broker.upgrade() else { return };
        if let Some(pending_will) = broker.pending_will_of(client_id) {
            self.sessions.tell(client_id, Presence::Disconnected { pending_will });
        }
    }

    // ----- a node declared dead --------------------------------------------

    /// The records of `dead`'s clients this node now acts for (it is their
    /// primary owner in the view without `dead`).
    pub(super) fn orphaned_by(&self, st: &super::state::State, dead: NodeId) -> Vec<(Arc<str>, Record)> {
        let view = st.node.membership();
        let mut records = self.sessions.directory.lock().homed_at(dead);
        records.retain(|(client, _)| owners_of(view, self.replication, client).first() == Some(&self.me));
        records
    }

    /// Takes in the sessions of a dead node this node acts for: persistent
    /// ones are adopted (from the copy, if this node is their standby; the
    /// will due after its delay), the wills of the others published now.
    pub(super) fn adopt(&self, broker: &Broker, orphans: Vec<(Arc<str>, Record)>) {
        let mut dead_nodes = Vec::new();
        for (client, record) in orphans {
            let dead = NodeId(record.home);
            if !dead_nodes.contains(&dead) {
                dead_nodes.push(dead);
            }
            let (version, _) = self.sessions.directory.lock().claim(&broker.storage, &client, self.me, false);
            self.sessions.homed.lock().insert(client.clone(), version);
            match self.copy_of(broker, &client, &record) {
                Some(moved) => {
                    tracing::info!(%client, "session of a dead node adopted");
                    self.take_in(broker, &client, moved);
                    self.note_adopted(dead, client.clone());
                    bump(&self.sessions.stats.adopted);
                    self.tell_offline(&client);
                }
                None => {
                    let will = match (record.connected, record.will, record.pending_will) {
                        (true, Some((will, _)), _) => Some(will),
                        (false, _, Some((_, will))) => Some(will),
                        _ => None,
                    };
                    if let Some(will) = will {
                        tracing::info!(%client, "will of a dead node's client published");
                        bump(&self.sessions.stats.wills_of_dead);
                        broker.publish_will(will);
                    }
                    self.sessions.tell(&client, Presence::Ended);
                }
            }
        }
        // What others held for those nodes and sent on before this node
        // had declared them dead.
        for dead in dead_nodes {
            let waiting = self.sessions.orphans_waiting.lock().remove(&dead);
            if let Some(messages) = waiting {
                self.deliver_orphaned(broker, dead, messages);
            }
        }
    }

    /// Takes `moved` in as `client_id`'s session here; its standby gets
    /// this node's whole copy (the one it kept of the previous home goes).
    fn take_in(&self, broker: &Broker, client_id: &str, moved: MovedSession) {
        broker.absorb(client_id, moved);
        bump(&self.sessions.stats.moved_in);
        let _ = self.sessions.told.send(Told::TakenIn(client_id.into()));
    }

    fn note_adopted(&self, dead: NodeId, client: Arc<str>) {
        let mut adopted = self.sessions.adopted.lock();
        adopted.entry(dead).or_insert_with(|| (Instant::now(), Vec::new())).1.push(client);
    }

    /// Messages another node (or this one) held for `dead`, for the sessions
    /// this node adopted from it (matched against their subscriptions; a
    /// copy a session already holds is skipped). Kept for later, bounded,
    /// while `dead` is not dead here yet.
    pub(super) fn deliver_orphaned(&self, broker: &Broker, dead: NodeId, messages: Vec<Arc<Message>>) {
        if self.is_live(dead) {
            let mut waiting = self.sessions.orphans_waiting.lock();
            let held = waiting.entry(dead).or_default();
            let room = ORPHANS_WAITING.saturating_sub(held.len());
            held.extend(messages.into_iter().take(room));
            return;
        }
        let clients = {
            let mut adopted = self.sessions.adopted.lock();
            adopted.retain(|_, (since, _)| since.elapsed() < ADOPTED_KEPT);
            adopted.get(&dead).map(|(_, clients)| clients.clone()).unwrap_or_default()
        };
        if clients.is_empty() {
            return;
        }
        let queued: usize = messages.iter().map(|m| broker.deliver_to_sessions(m, &clients)).sum();
        self.sessions.stats.orphans_delivered.fetch_add(queued as u64, Ordering::Relaxed);
    }

    // ----- telling the directory -------------------------------------------

    /// The directory task: tells each client's directory owners what its
    /// home did (in order), copies deliveries to its standby, and after a
    /// membership change tells new owners and standbys what they lack.
    pub(super) async fn directory_task(self: Arc<Self>, mut changes: mpsc::UnboundedReceiver<Told>) {
        let mut known = Known::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        loop {
            tokio::select! {
                n = changes.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        return;
                    }
                    let view = self.view();
                    for change in batch.drain(..) {
                        self.tell_change(&view, &mut known, change);
                    }
                }
                _ = tick.tick() => {
                    let view = self.view();
                    if view.version() != known.view {
                        known.view = view.version();
                        self.tell_again(&view, &mut known);
                    }
                }
            }
        }
    }

    fn tell_change(&self, view: &Membership, known: &mut Known, change: Told) {
        let (client, update, to_all) = match change {
            Told::Stored(Mirrored::Session(client, session)) => {
                known.entry(&client).session = Some(session.clone());
                (client, Update::Session(session), true)
            }
            Told::Stored(Mirrored::SessionRemoved(client)) => {
                if let Some(k) = known.clients.get_mut(&client) {
                    k.session = None;
                }
                (client, Update::SessionGone, true)
            }
            Told::TakenIn(client) => {
                let version = self.sessions.version_of(&client);
                if let Some(standby) = owners_of(view, self.replication, &client).into_iter().find(|o| *o != self.me) {
                    known.standbys.insert(client.clone(), standby);
                    self.send_copy(&client, version, standby, true);
                }
                return;
            }
            Told::HandedOver(client) => {
                known.clients.remove(&client);
                known.standbys.remove(&client);
                return;
            }
            Told::Stored(Mirrored::Delivery(client, seq, delivery)) => {
                (client, Update::Delivery { seq, delivery: *delivery }, false)
            }
            Told::Stored(Mirrored::DeliveryRemoved(client, seq)) => (client, Update::DeliveryDone { seq }, false),
            Told::Presence(client, presence) => {
                let update = match presence {
                    Presence::Connected { will } => Update::Presence { connected: true, will, pending_will: None },
                    Presence::Disconnected { pending_will } => {
                        Update::Presence { connected: false, will: None, pending_will }
                    }
                    Presence::Ended => Update::Ended,
                };
                match &update {
                    Update::Ended => {
                        known.clients.remove(&client);
                        known.standbys.remove(&client);
                    }
                    _ => known.entry(&client).presence = Some(update.clone()),
                }
                (client, update, true)
            }
        };
        let version = self.sessions.version_of(&client);
        if matches!(update, Update::Ended) {
            let mut homed = self.sessions.homed.lock();
            if homed.get(&client) == Some(&version) {
                homed.remove(&client);
            }
        }
        let owners = owners_of(view, self.replication, &client);
        match to_all {
            true => {
                for owner in &owners {
                    self.tell_owner(*owner, &client, version, update.clone());
                }
            }
            false => {
                let standby = owners.iter().copied().find(|o| *o != self.me);
                if let Some(standby) = standby {
                    if known.standbys.get(&client) != Some(&standby) {
                        known.standbys.insert(client.clone(), standby);
                        // A new standby gets the whole copy first.
                        self.send_copy(&client, version, standby, false);
                    } else {
                        self.tell_owner(standby, &client, version, update);
                    }
                }
            }
        }
    }

    /// After a membership change: each session's record to its owners
    /// (some may be new), its copy to a new standby.
    fn tell_again(&self, view: &Membership, known: &mut Known) {
        let clients: Vec<Arc<str>> = known.clients.keys().cloned().collect();
        for client in clients {
            let version = self.sessions.version_of(&client);
            let owners = owners_of(view, self.replication, &client);
            let entry = known.entry(&client).clone();
            for owner in &owners {
                if let Some(session) = &entry.session {
                    self.tell_owner(*owner, &client, version, Update::Session(session.clone()));
                }
                if let Some(presence) = &entry.presence {
                    self.tell_owner(*owner, &client, version, presence.clone());
                }
            }
            let standby = owners.iter().copied().find(|o| *o != self.me);
            match standby {
                Some(standby) if entry.session.is_some() && known.standbys.get(&client) != Some(&standby) => {
                    known.standbys.insert(client.clone(), standby);
                    self.send_copy(&client, version, standby, false);
                }
                _ => {}
            }
        }
    }

    /// Sends `standby` this home's whole copy of `client`'s deliveries
    /// (`whole`: the session was taken in here, other homes' copies go).
    fn send_copy(&self, client: &str, version: u64, standby: NodeId, whole: bool) {
        let Some(broker) = self.broker.upgrade() else { return };
        match broker.storage.deliveries(client) {
            Ok(deliveries) => self.tell_owner(standby, client, version, Update::Copy { deliveries, whole }),
            Err(err) => tracing::error!(cause = %err, client, "cannot read a session's deliveries for its standby"),
        }
    }

    fn tell_owner(&self, owner: NodeId, client: &str, version: u64, update: Update) {
        if owner == self.me {
            if let Some(broker) = self.broker.upgrade() {
                self.sessions.directory.lock().apply(&broker.storage, client, self.me, version, update);
            }
            return;
        }
        self.send_session(owner, &SessionFrame::Directory { client: client.to_string(), version, update });
    }

    // ----- leaving ---------------------------------------------------------

    /// Leaves gracefully: closes every connection (5.0: 0x8B; wills as for
    /// any connection the server closes), has each session's successor take
    /// it over, and waits (bounded) until they have and the outbox is empty.
    pub async fn leave(&self) {
        let Some(broker) = self.broker.upgrade() else { return };
        broker.start_leaving();
        broker.kick_all(DisconnectReason::ServerShuttingDown).await;
        let others: Vec<NodeId> = self.state.lock().live.iter().copied().filter(|n| *n != self.me).collect();
        if others.is_empty() {
            return;
        }
        let after = Membership::new(0, others, self.view().config());
        let clients = broker.session_ids();
        tracing::info!(sessions = clients.len(), "leaving the fleet: handing sessions over");
        for client in &clients {
            if let Some(successor) = owners_of(&after, self.replication, client).first() {
                self.send_session(*successor, &SessionFrame::Take { client: client.to_string() });
            }
        }
        // Until the sessions are gone, the publishes routed (the wills just
        // published may wait for a route lookup), their QoS 1/2 forwards
        // acknowledged and the send queues written out: bounded.
        let deadline = Instant::now() + LEAVE_WAIT;
        let unfinished = || {
            let st = self.state.lock();
            st.outbox.len() + st.routing.len() + st.replay.len()
        };
        while Instant::now() < deadline {
            if broker.session_count() == 0 && unfinished() == 0 && self.client.send_budget().used() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (left, held) = (broker.session_count(), unfinished());
        match left + held {
            0 => tracing::info!("every session handed over"),
            _ => {
                tracing::warn!(sessions = left, unacknowledged = held, "left with sessions or forwards not handed over")
            }
        }
    }
}

/// What the directory task has told of the sessions homed here.
#[derive(Default)]
struct Known {
    clients: HashMap<Arc<str>, KnownSession>,
    standbys: HashMap<Arc<str>, NodeId>,
    view: u64,
}

#[derive(Default, Clone)]
struct KnownSession {
    presence: Option<Update>,
    session: Option<StoredSession>,
}

impl Known {
    fn entry(&mut self, client: &Arc<str>) -> &mut KnownSession {
        self.clients.entry(client.clone()).or_default()
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The fleet id of a local QoS 1/2 publish.
pub(super) fn message_id(me: NodeId, next: &AtomicU64) -> FleetId {
    (me.0, next.fetch_add(1, Ordering::Relaxed))
}
