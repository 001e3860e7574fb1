//! The routing core's frames (dht/src/core/frame.rs) and what a node does
//! with them (dht/src/core/node.rs).
//!
//! The whole input is first decoded as one frame (rmp-serde); a frame that
//! decodes must re-encode and decode to itself. Then the input is read as a
//! script for one sans-IO `Node` in a four-node view, set up with local
//! subscriptions and publishes waiting for lookups, the way the simulator
//! drives it (no network: events in, actions out):
//!
//! - op byte `o`, `o % 8` in 0..=4: a frame. Sender = `SENDERS[o / 8 % 5]`
//!   (the three other members, then two nodes outside the view), then a
//!   u16 (little-endian) length and that many bytes, decoded as a frame;
//!   if it decodes it is handled as `Event::Frame`.
//! - 5: time moves on by the next byte × 50 ms and the timer fires.
//! - 6: a local publish on one of a few topics.
//! - 7: the view changes (node `o / 8 % 3 + 2` leaves or comes back).
//!
//! An input in which no frame decodes is not run (only frames are the
//! point; the rest shapes the node's state around them).
//!
//! Checked: the node never sends to itself, and `handle` of a frame, a
//! timer or a view never errors (nor panics).
#![no_main]

use kadmq_dht::core::{self, Action, Event, Frame, Membership, Node, NodeId, OwnershipConfig, RoutingConfig};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

const ME: NodeId = NodeId(1);
const SENDERS: [NodeId; 5] = [NodeId(2), NodeId(3), NodeId(4), NodeId(1 << 40), NodeId(u64::MAX)];
const TOPICS: [&str; 4] = ["a/b", "devices/x/t", "b/c/d", "$SYS/x"];

fn round_trips(frame: &Frame) {
    let bytes = core::encode(frame);
    assert_eq!(&core::decode(&bytes).expect("an encoded frame decodes"), frame);
}

fn check(out: &mut Vec<Action>) {
    for action in out.drain(..) {
        if let Action::Send { to, .. } = &action {
            assert_ne!(*to, ME, "a node never sends to itself");
        }
    }
}

const ALL: [NodeId; 4] = [ME, NodeId(2), NodeId(3), NodeId(4)];

/// The node every run starts from (set up once; `Node: Clone` with the
/// dht crate's `fuzzing` feature): a four-node view, local plain and shared
/// subscriptions, and publishes, some parked on lookups.
fn start() -> (Node, Arc<Membership>) {
    let config = RoutingConfig {
        replication: 2,
        cache_capacity: 8,
        handoff_grace_ms: 500,
        handoff_warmup_ms: 300,
        lookup_timeout_ms: 200,
        anti_entropy_interval_ms: 1000,
        ..RoutingConfig::default()
    };
    let mut node = Node::new(ME, config);
    let mut out = Vec::new();
    let view = Arc::new(Membership::new(1, ALL, OwnershipConfig::Xor));
    node.handle(1_000, Event::Membership(view.clone()), &mut out).unwrap();
    for (filter, group) in [("a/+", None), ("b/#", Some("g")), ("devices/x/t", None), ("#", None)] {
        node.handle(1_000, Event::Subscribe { filter, group }, &mut out).unwrap();
    }
    for (msg, topic) in TOPICS.iter().enumerate() {
        node.handle(1_000, Event::Publish { topic, msg: msg as u64 }, &mut out).unwrap();
    }
    check(&mut out);
    (node, view)
}

enum Op {
    Frame(NodeId, Frame),
    Timer(u64),
    Publish(&'static str),
    View(NodeId),
}

thread_local! {
    static START: (Node, Arc<Membership>) = start();
}

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = core::decode(data) {
        round_trips(&frame);
    }

    // Parsed first: a script in which no frame decodes applies nothing.
    let mut ops = Vec::new();
    let mut script = data;
    while let Some((&op, rest)) = script.split_first() {
        script = rest;
        let arg = (op / 8) as usize;
        ops.push(match op % 8 {
            0..=4 => {
                let Some((len, rest)) = script.split_first_chunk::<2>() else { break };
                let len = (u16::from_le_bytes(*len) as usize).min(rest.len());
                let (bytes, rest) = rest.split_at(len);
                script = rest;
                match core::decode(bytes) {
                    Ok(frame) => Op::Frame(SENDERS[arg % SENDERS.len()], frame),
                    Err(_) => continue,
                }
            }
            5 => {
                let Some((&step, rest)) = script.split_first() else { break };
                script = rest;
                Op::Timer(step as u64 * 50)
            }
            6 => Op::Publish(TOPICS[arg % TOPICS.len()]),
            _ => Op::View(ALL[arg % 3 + 1]),
        });
    }
    if !ops.iter().any(|op| matches!(op, Op::Frame(..))) {
        return;
    }

    let (mut node, mut view) = START.with(|start| start.clone());
    let mut out = Vec::new();
    let mut now = 1_000u64;
    let mut msg = 100;
    for op in ops {
        match op {
            Op::Frame(from, frame) => node.handle(now, Event::Frame { from, frame }, &mut out).unwrap(),
            Op::Timer(step) => {
                now += step;
                node.handle(now, Event::Timer, &mut out).unwrap();
            }
            Op::Publish(topic) => {
                msg += 1;
                node.handle(now, Event::Publish { topic, msg }, &mut out).unwrap();
            }
            Op::View(toggled) => {
                let members: Vec<NodeId> = if view.contains(toggled) {
                    view.members().iter().copied().filter(|m| *m != toggled).collect()
                } else {
                    view.members().iter().copied().chain([toggled]).collect()
                };
                view = Arc::new(view.next(members));
                node.handle(now, Event::Membership(view.clone()), &mut out).unwrap();
            }
        }
        check(&mut out);
    }
});
