//! The doorway between the broker and the rest of the fleet.
//!
//! Job: the few types the broker and the cluster glue (`crate::cluster`)
//! exchange, in the broker's own terms. Boundary: the broker knows the
//! fleet only as a [`Fleet`]; the cluster reaches the broker's sessions
//! only through [`super::Broker::deliver`] with [`Recipients`]. Neither
//! sees the other's locks: the broker calls the fleet with none of its own
//! held (see "Locks" in `super`), so the fleet may deliver from inside a
//! call.

use super::message::Message;
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
    /// message: the other nodes keep a copy, so their new subscribers get it.
    fn retained(&self, message: &Message);
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
