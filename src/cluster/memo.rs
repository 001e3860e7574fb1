//! The per-topic route memo: a topic published again while nothing that
//! decides routes changed reuses the route the core computed the first
//! time, without the core and without the state mutex.
//!
//! Job: remember, per topic, what the core decided (the forwards with their
//! send queues, the local recipients), valid for one core *generation*
//! (bumped by every event but publishes, forwards and lost-frame reports); replay it. Boundary:
//! not for `$share` routes (they pick a member per message), nor for
//! publishes the core could not route at once (a lookup).

use super::links::Sender;
use super::state::State;
use super::Cluster;
use crate::broker::Recipients;
use kadmq_dht::core::{Action, ForwardRoute, NodeId};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Topics whose routes are remembered; past it the memo starts afresh.
const TOPIC_ROUTES: usize = 65_536;

/// What the core decided for a topic, replayed for later publishes to it
/// while the core's generation is unchanged.
#[derive(Clone)]
pub(super) struct TopicRoute {
    generation: u64,
    pub forwards: Vec<(NodeId, Sender, ForwardRoute)>,
    pub local: Option<Recipients>,
}

thread_local! {
    /// Each publishing thread's copy of the topic routes it used: no lock
    /// and no shared reference count per publish. Valid for one cluster
    /// (its address) and one generation; emptied when either changes.
    static THREAD_ROUTES: std::cell::RefCell<ThreadRoutes> = std::cell::RefCell::default();
}

#[derive(Default)]
struct ThreadRoutes {
    cluster: usize,
    generation: u64,
    routes: ahash::AHashMap<Box<str>, TopicRoute>,
}

/// A core route for this node's own subscribers, in the broker's terms.
pub(super) fn recipients(route: ForwardRoute) -> Recipients {
    let groups = route
        .shared
        .into_iter()
        .map(|pick| crate::broker::ShareGroup { group: pick.group, filter: pick.filter })
        .collect();
    Recipients::Chosen { plain: route.plain, groups }
}

impl Cluster {
    /// Runs `f` on the route remembered for `topic`, if nothing changed
    /// since: this thread's copy, else the shared one (copied for next time).
    pub(super) fn with_remembered_route<T>(&self, topic: &str, f: impl FnOnce(&TopicRoute) -> T) -> Option<T> {
        let generation = self.generation.load(Ordering::Acquire);
        let me = self as *const Cluster as usize;
        THREAD_ROUTES.with_borrow_mut(|mine| {
            if mine.cluster != me || mine.generation != generation || mine.routes.len() >= TOPIC_ROUTES {
                mine.routes.clear();
                mine.cluster = me;
                mine.generation = generation;
            }
            if !mine.routes.contains_key(topic) {
                let shared = self.topic_routes.read().get(topic).filter(|r| r.generation == generation).cloned()?;
                mine.routes.insert(topic.into(), (*shared).clone());
            }
            mine.routes.get(topic).map(f)
        })
    }

    /// Remembers what the core decided for a publish to `topic` (`actions`,
    /// all of it, emitted at `generation`), unless it depends on the message
    /// (`$share` picks) or was not decided at once (a lookup).
    pub(super) fn remember_route(&self, st: &State, topic: &str, id: u64, generation: u64, actions: &[Action]) {
        let mut route = TopicRoute { generation, forwards: Vec::new(), local: None };
        let mut routed = false;
        for action in actions {
            match action {
                Action::Forward { to, msg, route: to_route } if *msg == id && to_route.shared.is_empty() => {
                    let Some(peer) = st.peers.get(to) else { return };
                    route.forwards.push((*to, self.links.sender(*peer), to_route.clone()));
                }
                Action::Deliver { msg, route: local } if *msg == id && local.shared.is_empty() => {
                    route.local = Some(recipients(local.clone()))
                }
                Action::Routed { msg, .. } if *msg == id => routed = true,
                _ => return,
            }
        }
        if !routed {
            return;
        }
        let mut routes = self.topic_routes.write();
        if routes.len() >= TOPIC_ROUTES {
            routes.clear();
        }
        routes.insert(topic.into(), Arc::new(route));
    }
}
