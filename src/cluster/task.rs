//! The cluster task: the loop that drives the rooms of `super`.
//!
//! Job: take driver events in batches (the receive path) and deliver what
//! each batch received, in order, once the state mutex is released; fire
//! the core's timer; tick once a second (outbox resends, rejoin notices,
//! pruning, the replay of the last run's unrouted publishes, the load in
//! our heartbeats, the peers file). Delivering here, not in a second task,
//! saves a wake-up per batch on the path a QoS 1/2 acknowledgement waits
//! for (docs/BENCHMARKS.md, "Held acknowledgements"). Boundary: started by
//! [`super::start`] into the server's task set; ends by itself when the
//! driver stops (no detached task).

use super::links::Class;
use super::publish::deliver_all;
use super::wire;
use super::Cluster;
use kadmq_dht::core::Event;
use kadmq_dht::driver;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Driver events handled per lock of the core.
const EVENT_BATCH: usize = 512;
/// Outbox records of the previous run that were not routed yet are routed
/// again this long after start (so the node has heard of its peers).
pub(super) const REPLAY_AFTER: Duration = Duration::from_secs(5);

impl Cluster {
    /// The cluster task: driver events, the core's timer, and a 1 s tick.
    /// Ends when the driver stops.
    pub(super) async fn run(self: Arc<Self>, mut events: mpsc::Receiver<driver::Event>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        loop {
            let timer_at = self.state.lock().timer_at;
            let wake = timer_at.map(|at| tokio::time::Instant::from_std(self.started + Duration::from_millis(at)));
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = events.recv_many(&mut batch, EVENT_BATCH) => {
                    if received == 0 {
                        tracing::info!("cluster driver stopped");
                        return;
                    }
                    let received = self.on_events(batch.drain(..));
                    if !received.is_empty() {
                        self.deliver_received(received);
                    }
                }
                _ = timer => self.on_timer(),
                _ = self.timer.notified() => {}
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    fn on_timer(&self) {
        let Some(broker) = self.broker.upgrade() else { return };
        let mut local = Vec::new();
        {
            let mut st = self.state.lock();
            st.timer_at = None;
            let mut actions = Vec::new();
            let _ = self.core_event(&mut st, Event::Timer, &mut actions);
            self.execute(&mut st, &broker.storage, actions, None, &mut local);
        }
        deliver_all(&broker, local);
    }

    async fn on_tick(&self) {
        let Some(broker) = self.broker.upgrade() else { return };
        let now = self.now();
        let mut local = Vec::new();
        let load = {
            let mut st = self.state.lock();
            let st = &mut *st;
            let (live, peers) = (&st.live, &st.peers);
            for (sequence, id, message, to, route) in st.outbox.due(now, |node| live.contains(&node)) {
                if let Some(peer) = peers.get(&to) {
                    self.links
                        .sender(*peer)
                        .send(Class::Resendable, |out| wire::write_forward(out, id, Some(sequence), &message, &route));
                }
            }
            self.membership_tick(st);
            self.retained.sweep(&broker.storage, broker.now_ms());
            self.retained_check(st, broker.now_ms());
            if self.started.elapsed() >= REPLAY_AFTER {
                // Their unrouted records are on disk: once routed they
                // are rewritten (or forgotten, with no destination).
                for (id, message) in std::mem::take(&mut st.replay) {
                    self.route(st, &broker.storage, id, Arc::new(message), true, &mut local);
                }
            }
            driver::Load {
                connections: crate::broker::Stats::get(&broker.stats.clients_connected),
                shards: st.node.shards_owned() as u64,
                entries: st.node.entries_owned() as u64,
            }
        };
        deliver_all(&broker, local);
        let expired = self.qos2_seen.lock().expire(broker.now_ms());
        let removals = expired.into_iter().map(|(origin, id)| broker.storage.seen_removal(origin, id)).collect();
        if let Err(err) = broker.storage.commit(removals) {
            tracing::error!(cause = %err, "could not forget QoS 2 delivery records");
        }
        // Outbox removals (and anything else) written since the last flush
        // go to disk at least once a second, publishes or not.
        if let Err(err) = broker.storage.flush() {
            tracing::error!(cause = %err, "storage flush failed");
        }
        let _ = self.client.set_load(load).await;
        if self.started.elapsed().as_secs() % 10 == 5 {
            self.remember_members().await;
        }
    }
}
