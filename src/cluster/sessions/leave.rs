//! Leaving the fleet gracefully (SIGTERM): connections closed, sessions
//! handed to their successors, publishes finished.

use super::*;

impl Cluster {
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
