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
//! Rooms: `claim.rs` (claims and hand-overs), `tell.rs` (the directory
//! task: records to the owners, copies to the standby, repair after a
//! membership change), `dead.rs` (a dead node's sessions adopted, its
//! clients' wills published, what others held for it given to them),
//! `leave.rs` (SIGTERM); here the frames, the shared state and the answers
//! to other nodes' frames.
//!
//! Boundary: the owner side's data is [`Directory`]; sessions
//! themselves are the broker's ([`Broker::export_session`],
//! [`Broker::prepare_arrival`], [`Broker::absorb`]); frames leave through
//! the cluster's send queues.
//!
//! [`directory`]: super::directory

mod claim;
mod dead;
mod leave;
mod tell;

use super::directory::{Directory, Record};
use super::links::{self, Class};
use super::wire;
use super::Cluster;
use crate::broker::message::Message;
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
const SENT_ON_WAITING: usize = 100_000;
/// How long messages sent on for a dead node wait for this node to adopt
/// sessions from it (it declares it dead itself, then adopts).
const SENT_ON_KEPT: Duration = Duration::from_secs(60);
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
    /// session in, and other homes' copies are void), in parts by bytes:
    /// the first replaces, the others (`more`) add.
    Copy {
        deliveries: Vec<(u64, StoredDelivery)>,
        whole: bool,
        more: bool,
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
    /// Requests under way: id → the node asked, and where its answers go.
    requests: Mutex<HashMap<u64, (NodeId, mpsc::UnboundedSender<SessionFrame>)>>,
    next_request: AtomicU64,
    told: mpsc::UnboundedSender<Told>,
    /// Hand-overs and takes under way (each bounded in time).
    tasks: Mutex<JoinSet<()>>,
    /// Per dead node, since when and the clients whose sessions this node
    /// adopted from it: what others held for it goes to them.
    adopted: Mutex<HashMap<NodeId, Adopted>>,
    /// Messages held for a node not (yet) dead here, for when it is.
    sent_on_waiting: Mutex<HashMap<NodeId, Waiting>>,
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
    pub sent_on_delivered: AtomicU64,
    /// Messages held for a dead node that came before this node adopted
    /// its sessions and could not wait (over the bound, or no adoption
    /// within the wait).
    pub sent_on_dropped: AtomicU64,
    /// Messages another node sent on for a node that is alive here,
    /// forwarded to it.
    pub sent_on_relayed: AtomicU64,
    /// Messages sent on for a node this node never knew (it adopted none
    /// of its sessions): not kept.
    pub sent_on_unknown: AtomicU64,
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
            sent_on_waiting: Mutex::new(HashMap::new()),
            settled_at: Mutex::new(Instant::now()),
            stats: SessionStats::default(),
        };
        (sessions, changes)
    }

    /// Whether this node adopted sessions of dead node `node` (or ran
    /// adoption for it) within the time it remembers that.
    pub(in crate::cluster) fn adopted_from(&self, node: NodeId) -> bool {
        self.adopted.lock().contains_key(&node)
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
                "kadmq_cluster_sent_on_delivered_total",
                "counter",
                "Messages other nodes held for a dead node, queued here for the sessions adopted from it.",
                get(&s.sent_on_delivered),
            ),
            Figure::new(
                "kadmq_cluster_sent_on_dropped_total",
                "counter",
                "Messages other nodes held for a dead node that came before this node adopted its sessions and could not wait for it (over 100,000 waiting, or no adoption within 60 s): lost for those sessions.",
                get(&s.sent_on_dropped),
            ),
            Figure::new(
                "kadmq_cluster_sent_on_relayed_total",
                "counter",
                "Messages another node held for a node it took for dead and sent on, forwarded from here to that node (alive here).",
                get(&s.sent_on_relayed),
            ),
            Figure::new(
                "kadmq_cluster_sent_on_unknown_total",
                "counter",
                "Messages another node sent on for a node this node never knew, forgot (the later of ten dead timeouts and ten minutes after its death) or has not heard of since it restarted: none of its sessions is here; not kept.",
                get(&s.sent_on_unknown),
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

/// Since when, and which messages sent on for a dead node, wait here.
type Waiting = (Instant, Vec<Arc<Message>>);

/// Since when, which clients' sessions a node took from a dead one, and
/// whether `adopt` ran for it.
type Adopted = (Instant, Vec<Arc<str>>, bool);

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
        self.sessions.requests.lock().insert(req, (to, answers));
        self.send_session(to, &frame(req));
        (req, answered)
    }

    fn forget_request(&self, req: u64) {
        self.sessions.requests.lock().remove(&req);
    }

    // ----- frames from other nodes -----------------------------------------

    /// A session frame from member `from` (under the batch's state lock:
    /// what takes time runs in a task of its own).
    pub(super) fn on_session_frame(
        &self,
        st: &crate::cluster::state::State,
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
                // Only the node asked answers (another member's answer is dropped).
                if let Some((_, answers)) = self.sessions.requests.lock().get(&req).filter(|(asked, _)| *asked == from)
                {
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

    pub(super) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
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
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// `items` cut in parts of at most [`PART_BYTES`] (topics, payloads and
/// room for the rest), in order; one part at least, so one frame each.
pub(super) fn in_parts<T>(items: Vec<T>, message: impl Fn(&T) -> &Message) -> Vec<Vec<T>> {
    let mut parts: Vec<Vec<T>> = vec![Vec::new()];
    let mut bytes = 0;
    for item in items {
        let m = message(&item);
        let size = m.topic.len() + m.payload.len() + 256;
        if bytes + size > PART_BYTES && !parts.last().is_some_and(Vec::is_empty) {
            parts.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        parts.last_mut().expect("one part at least").push(item);
    }
    parts
}
