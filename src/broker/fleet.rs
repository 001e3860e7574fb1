//! The doorway between the broker and the rest of the fleet.
//!
//! Job: the few types the broker and the cluster glue (`crate::cluster`)
//! exchange, in the broker's own terms. Boundary: the broker knows the
//! fleet only as a [`Fleet`]; the cluster reaches the broker's sessions
//! only through [`super::Broker::deliver`] with [`Recipients`]. Neither
//! sees the other's locks: the broker calls the fleet with none of its own
//! held (see "Locks" in `super`), so the fleet may deliver from inside a
//! call.

use super::message::{FleetId, Message};
use super::session::{Session, Subscription};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The rest of the fleet, as the broker sees it (implemented by
/// `crate::cluster`). Without one the broker is a single node.
pub trait Fleet: Send + Sync {
    /// A local subscription to `filter` (`group` for `$share/group/filter`)
    /// began. Called in the order the subscriptions changed, with no broker
    /// lock held.
    fn subscribed(&self, filter: &str, group: Option<&str>);
    /// A local subscription ended (same order and locks as `subscribed`).
    fn unsubscribed(&self, filter: &str, group: Option<&str>);
    /// Routes a local publish: forwards it to the other nodes that want it,
    /// and says which of this node's subscribers the broker delivers it to.
    /// For QoS 1/2, once this returns the forwards are safe (in the
    /// persisted outbox until their destinations acknowledge them).
    fn publish(&self, message: &Arc<Message>) -> PublishRoute;
    /// A local publish set (or, with an empty payload, cleared) a retained
    /// message: the fleet keeps it (at the topic's owners), the broker not.
    /// The future resolves once the owners have it (or the fleet's timeout
    /// passed): a client's PUBACK waits for it.
    fn retained(&self, message: &Message) -> Option<BoxFuture<'static, ()>>;
    /// Gathers the fleet's retained messages matching `filter` (not
    /// `$share/…`), once each, and queues them for `session`'s new
    /// `subscription` (through [`super::Broker::queue_retained`]) when they
    /// come.
    fn send_retained(&self, session: &Arc<Session>, filter: &str, subscription: &Subscription);
    /// A client `client_id` is connecting here: makes this node its
    /// session's home in the fleet's directory, and brings the session here
    /// from the node that holds it (through [`super::Broker::prepare_arrival`]
    /// and [`super::Broker::absorb`]), or has it discarded there
    /// (`clean_start`). The guard is held until the new connection is
    /// attached: a later CONNECT elsewhere takes the session only then.
    fn claim<'a>(&'a self, client_id: &'a str, clean_start: bool) -> BoxFuture<'a, ClaimGuard>;
    /// What the directory keeps of a session this node holds (called with
    /// no broker lock held, in the order things happened).
    fn presence(&self, client_id: &str, presence: Presence);
    /// The fleet's name for a local QoS 1/2 publish.
    fn message_id(&self) -> FleetId;
    /// A message for shared group `group` on `filter` whose member here
    /// ended without it, and no other member is here: it goes to a member
    /// on another node (called with no broker lock held).
    fn reroute_shared(&self, message: &Arc<Message>, group: &str, filter: &str);
    /// Resolves once every owner of these filters' shards acknowledged this
    /// node's routes for them as they stand now (filters without
    /// `$share/group/`, already told through `subscribed`), or once the
    /// fleet's timeout passed. `None`: nothing to wait for.
    fn routes_settled(&self, filters: &[&str]) -> Option<BoxFuture<'static, ()>>;
    /// Resolves once the QoS 1/2 forwards of local publishes numbered up
    /// to `upto` ([`Fleet::message_id`]) are acknowledged by their
    /// destinations, or once a short window passed, having made the
    /// storage's next flush write them. A client's PUBACK waits for this,
    /// then for the flush, so a forward acknowledged in time is never
    /// written. `None`: nothing to wait for (flush and acknowledge).
    fn forwards_settled(&self, upto: u64) -> Option<BoxFuture<'static, ()>>;
}

/// A boxed future, for the fleet's asynchronous calls.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Held while a claimed session is being attached (see [`Fleet::claim`]).
pub type ClaimGuard = Box<dyn Send>;

/// A session's state for the fleet's directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Presence {
    /// A client is connected, with its will and Will Delay Interval (s).
    Connected { will: Option<(Message, u32)> },
    /// The client went away; a will waits for its delay (Unix ms when due).
    Disconnected { pending_will: Option<(u64, Message)> },
    /// The session ended.
    Ended,
}

/// What the fleet decided for a local publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishRoute {
    /// Routed: `forwards` copies left for other nodes, and the local
    /// subscribers (if any) the broker delivers to now.
    Decided { local: Option<Recipients>, forwards: usize },
    /// The route is being looked up; the fleet forwards the message and
    /// hands its local part to [`super::Broker::deliver`] once it knows.
    /// A QoS 1/2 message is persisted until then.
    Pending,
    /// Not published: the fleet cannot keep another QoS 1/2 message now
    /// (its outbox is full). The publisher is told (MQTT 5: 0x97).
    Refused,
}

/// Which of this node's matching subscriptions get a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// Every one (a single node; a topic that never leaves the node).
    All,
    /// As the fleet's route says: every plain (non-shared) subscription if
    /// `plain`, and one member of each listed shared group (the fleet picked
    /// this node for them).
    Chosen { plain: bool, groups: Vec<ShareGroup> },
}

/// A shared subscription group: `$share/{group}/{filter}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareGroup {
    pub group: String,
    pub filter: String,
}

impl Recipients {
    /// Whether non-shared subscriptions get the message.
    pub fn plain(&self) -> bool {
        match self {
            Recipients::All => true,
            Recipients::Chosen { plain, .. } => *plain,
        }
    }

    /// Whether one member of shared group `group` on `filter` gets it.
    pub fn group(&self, group: &str, filter: &str) -> bool {
        match self {
            Recipients::All => true,
            Recipients::Chosen { groups, .. } => groups.iter().any(|g| g.group == group && g.filter == filter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_recipients_name_plain_and_groups_apart() {
        let all = Recipients::All;
        assert!(all.plain() && all.group("g", "a/#"));
        let groups = vec![ShareGroup { group: "g".into(), filter: "a/#".into() }];
        let only_group = Recipients::Chosen { plain: false, groups };
        assert!(!only_group.plain());
        assert!(only_group.group("g", "a/#"));
        assert!(!only_group.group("g", "a/+"), "same group, other filter");
        assert!(!only_group.group("h", "a/#"));
        let only_plain = Recipients::Chosen { plain: true, groups: Vec::new() };
        assert!(only_plain.plain() && !only_plain.group("g", "a/#"));
    }
}
