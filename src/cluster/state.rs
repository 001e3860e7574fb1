//! What the cluster's state mutex guards (see "Locks" in `super`): the
//! routing core, who is who (peer ids ↔ node ids, incarnations, the live
//! set), publishes being routed or held behind their publisher's parked
//! one, the outbox, the inbound numbering, and what is known of peers that
//! are not members (strangers, the dead, the refused).
//!
//! Job: the data and the bookkeeping that needs nothing else (pruning the
//! dead, naming peers). Boundary: no I/O, no sends; the rooms of `super`
//! act on it.

use super::dedupe::Inbound;
use super::guard;
use super::node_id;
use super::outbox::Outbox;
use crate::broker::message::Message;
use kadmq_dht::core::{Node, NodeId, RouteTicket, SharedPick};
use kadmq_dht::driver::PeerId;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A local publish being routed (waiting for a lookup) or just routed.
pub(super) struct Routing {
    pub message: Arc<Message>,
    /// Destinations of its QoS 1/2 forwards.
    pub waiting: super::outbox::Waiting,
    /// An outbox record (`routed: false`) was written while it waited.
    pub persisted: bool,
    /// Routed again for these shared groups only (their picked node died).
    pub only: Option<Vec<SharedPick>>,
}

/// A SUBACK waiting until every owner acknowledged the routes it asks for.
pub(super) struct RouteWaiter {
    pub tickets: Vec<RouteTicket>,
    pub tx: RouteSettled,
}

/// Tells a waiting SUBACK its routes are acknowledged.
pub(super) struct RouteSettled(Option<tokio::sync::oneshot::Sender<()>>);

impl RouteSettled {
    pub fn new(tx: tokio::sync::oneshot::Sender<()>) -> RouteSettled {
        RouteSettled(Some(tx))
    }

    pub fn take(&mut self) -> Option<tokio::sync::oneshot::Sender<()>> {
        self.0.take()
    }

    /// The SUBACK stopped waiting (its timeout passed, the client left).
    pub fn is_closed(&self) -> bool {
        self.0.as_ref().is_none_or(|tx| tx.is_closed())
    }
}

/// A publish in a publisher's queue (`State::held`): the one parked in the
/// core has no message here; the ones behind it have theirs, and whether it
/// was persisted unrouted.
pub(super) type HeldPublish = (u64, Option<(Arc<Message>, bool)>);

pub(super) struct State {
    pub node: Node,
    pub peers: HashMap<NodeId, PeerId>,
    /// The reverse of `peers`: a node id is a SHA-256 of the peer id,
    /// computed once per peer, not per frame.
    pub ids: HashMap<PeerId, NodeId>,
    pub incarnations: HashMap<NodeId, u64>,
    pub live: BTreeSet<NodeId>,
    pub routing: HashMap<u64, Routing>,
    pub outbox: Outbox,
    /// Unrouted outbox records of the previous run, routed again at `task::REPLAY_AFTER`.
    pub replay: Vec<(u64, Message)>,
    pub inbound: Inbound,
    pub timer_at: Option<u64>,
    /// Per publisher with a publish parked in the core (waiting for a
    /// lookup): that publish's id first, then its later publishes, held
    /// back so that none overtakes it (message, persisted unrouted).
    pub held: HashMap<Arc<str>, VecDeque<HeldPublish>>,
    /// Members we had taken for dead, and how many more times (one per
    /// tick) to tell them: the notice is a frame, and frames right after a
    /// link comes back can be lost.
    pub rejoin_notices: HashMap<NodeId, u8>,
    /// Frames of peers whose record has not arrived (yet).
    pub strangers: guard::Strangers,
    /// Peers declared dead, and since when (their frames are dropped).
    pub dead: HashMap<PeerId, Instant>,
    /// Peers the driver refused (fleet settings differ): their frames are dropped.
    pub refused: HashMap<PeerId, Instant>,
    /// Dead peers whose address maps are pruned, and since when they are
    /// dead: their identity goes after [`IDENTITY_KEPT`] dead timeouts.
    pub gone: HashMap<NodeId, Instant>,
    /// SUBACKs waiting for their routes' acknowledgements.
    pub route_waiters: Vec<RouteWaiter>,
}

/// Dead peers' identities (incarnation, inbound numbering) are kept this
/// many dead timeouts, as long as the driver keeps a dead member (so a late
/// record cannot bring it back): a member that returns within it is known
/// as one we took for dead (it gets the rejoin notice), and its QoS 1/2
/// forwards continue their numbering (no duplicate delivery).
const IDENTITY_KEPT: u32 = 10;

impl State {
    pub fn new(node: Node, peer_id: PeerId, outbox: Outbox, replay: Vec<(u64, Message)>) -> State {
        let me = node.id();
        State {
            node,
            peers: HashMap::from([(me, peer_id)]),
            ids: HashMap::from([(peer_id, me)]),
            incarnations: HashMap::new(),
            live: BTreeSet::from([me]),
            routing: HashMap::new(),
            outbox,
            replay,
            inbound: Inbound::default(),
            timer_at: None,
            held: HashMap::new(),
            rejoin_notices: HashMap::new(),
            strangers: guard::Strangers::default(),
            dead: HashMap::new(),
            refused: HashMap::new(),
            gone: HashMap::new(),
            route_waiters: Vec::new(),
        }
    }

    /// Forgets the per-peer state of peers dead (or refused) for longer
    /// than `dead_timeout`: their address maps, rejoin notices and held
    /// frames; their identity after [`IDENTITY_KEPT`] dead timeouts.
    /// Returns the peers whose links and log state should go too.
    pub fn prune(&mut self, now: Instant, dead_timeout: Duration) -> Vec<PeerId> {
        let expired = |since: &Instant| now.saturating_duration_since(*since) > dead_timeout;
        let mut gone: Vec<PeerId> = self.dead.iter().filter(|(_, since)| expired(since)).map(|(p, _)| *p).collect();
        gone.extend(self.refused.iter().filter(|(_, since)| expired(since)).map(|(p, _)| *p));
        for peer in &gone {
            let since = self.dead.remove(peer).or(self.refused.remove(peer)).unwrap_or(now);
            self.strangers.take(peer);
            if let Some(id) = self.ids.remove(peer) {
                self.peers.remove(&id);
                self.rejoin_notices.remove(&id);
                self.gone.insert(id, since);
            }
        }
        let keep = dead_timeout * IDENTITY_KEPT;
        let (incarnations, inbound, live) = (&mut self.incarnations, &mut self.inbound, &self.live);
        self.gone.retain(|id, since| {
            // Back meanwhile (a member again): its identity is in use.
            if live.contains(id) {
                return false;
            }
            let keep = now.saturating_duration_since(*since) <= keep;
            if !keep {
                incarnations.remove(id);
                inbound.forget(*id);
            }
            keep
        });
        gone
    }

    /// The routing core's id of `peer`, remembered both ways.
    pub fn id_of(&mut self, peer: PeerId) -> NodeId {
        let id = *self.ids.entry(peer).or_insert_with(|| node_id(&peer));
        self.peers.entry(id).or_insert(peer);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_state_of_long_dead_peers_is_pruned() {
        let me_peer = PeerId::random();
        let me = node_id(&me_peer);
        let mut st =
            State::new(Node::new(me, kadmq_dht::core::RoutingConfig::default()), me_peer, Outbox::new(1), Vec::new());
        let t0 = Instant::now();
        let dead_timeout = Duration::from_secs(8);
        let peers: Vec<PeerId> = (0..50).map(|_| PeerId::random()).collect();
        for (i, peer) in peers.iter().enumerate() {
            let id = st.id_of(*peer);
            st.incarnations.insert(id, 1);
            st.rejoin_notices.insert(id, 3);
            st.inbound.accept(id, super::super::outbox::Sequence { epoch: 1, seq: 0, base: 0 });
            // The first 40 die at t0; the rest stay members.
            if i < 40 {
                st.dead.insert(*peer, t0);
            } else {
                st.live.insert(id);
            }
        }
        let stranger = PeerId::random();
        st.refused.insert(stranger, t0);
        let sizes = |st: &State| (st.peers.len(), st.ids.len(), st.incarnations.len(), st.inbound.len());
        assert_eq!(sizes(&st), (51, 51, 50, 50));

        assert!(st.prune(t0 + dead_timeout / 2, dead_timeout).is_empty(), "not dead long enough");
        let gone = st.prune(t0 + dead_timeout * 2, dead_timeout);
        assert_eq!(gone.len(), 41, "the dead and the refused");
        assert_eq!((st.peers.len(), st.ids.len(), st.rejoin_notices.len()), (11, 11, 10));
        assert!(st.dead.is_empty() && st.refused.is_empty());
        // Identities stay a while longer, then go too.
        assert_eq!((st.incarnations.len(), st.inbound.len()), (50, 50));
        st.prune(t0 + dead_timeout * (IDENTITY_KEPT + 1), dead_timeout);
        assert_eq!(sizes(&st), (11, 11, 10, 10));
        assert!(st.gone.is_empty());
        assert!(st.peers.contains_key(&me), "never itself");
    }
}
