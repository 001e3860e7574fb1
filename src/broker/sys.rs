//! `$SYS/broker/...`: broker counters published as retained messages every
//! `sys_interval_secs`.

use super::message::Message;
use super::{Broker, Stats};
use crate::protocol::{MessageProperties, QoS};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// The topics and their current values.
pub fn snapshot(broker: &Broker) -> Vec<(&'static str, String)> {
    let s = &broker.stats;
    vec![
        ("$SYS/broker/version", format!("kadmq {}", env!("CARGO_PKG_VERSION"))),
        ("$SYS/broker/uptime", format!("{} seconds", broker.uptime().as_secs())),
        ("$SYS/broker/clients/connected", Stats::get(&s.clients_connected).to_string()),
        ("$SYS/broker/clients/total", broker.session_count().to_string()),
        ("$SYS/broker/messages/received", Stats::get(&s.messages_received).to_string()),
        ("$SYS/broker/messages/sent", Stats::get(&s.messages_sent).to_string()),
        ("$SYS/broker/messages/dropped", Stats::get(&s.messages_dropped).to_string()),
        ("$SYS/broker/bytes/received", Stats::get(&s.bytes_received).to_string()),
        ("$SYS/broker/bytes/sent", Stats::get(&s.bytes_sent).to_string()),
        ("$SYS/broker/subscriptions/count", broker.subscription_count().to_string()),
        ("$SYS/broker/retained messages/count", broker.retained_count().to_string()),
    ]
}

pub fn publish_snapshot(broker: &Broker) {
    for (topic, value) in snapshot(broker) {
        broker.publish(Message {
            topic: topic.to_string(),
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: MessageProperties::default(),
            expires_at_ms: None,
            origin: None,
            fleet_id: None,
        });
    }
}

/// Publishes `$SYS` every `interval` until `stop` resolves.
pub async fn run(broker: Arc<Broker>, interval: Duration, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticker.tick() => publish_snapshot(&broker),
        }
    }
}
