//! Interop with paho-mqtt, the Python client: a script that subscribes
//! with one paho client and publishes at QoS 0, 1 and 2 with another, over
//! TCP or WebSocket, and the check around it (a Rust watcher must see the
//! same messages). Both binaries run it: against one broker
//! (`tests/broker`) and through a round-robin proxy over a fleet
//! (`tests/cluster`). Where paho-mqtt is not installed the tests say so
//! and pass (`./test.sh` tries to install it first).

use super::raw::{Raw, QUIET, WAIT};
use kadmq::protocol::QoS as Q;
use std::net::SocketAddr;

const PAHO_SCRIPT: &str = r#"
import sys, threading, time
import paho.mqtt.client as mqtt

host, port, transport, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
topic = "interop/" + tag
subscribed, done = threading.Event(), threading.Event()
got = []

def client(name):
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                    protocol=mqtt.MQTTv311, transport=transport)
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
    return c

def on_connect(c, userdata, flags, reason_code, properties):
    if reason_code != 0:
        print("connect failed", reason_code); sys.exit(2)
    c.subscribe(topic, qos=2)

def on_subscribe(c, userdata, mid, reason_codes, properties):
    if [int(r.value) for r in reason_codes] != [2]:
        print("suback", reason_codes)
    subscribed.set()

def on_message(c, userdata, msg):
    got.append((msg.qos, msg.payload.decode()))
    if len(got) == 3:
        done.set()

sub = client("paho-sub-" + tag)
sub.on_connect, sub.on_subscribe, sub.on_message = on_connect, on_subscribe, on_message
sub.connect(host, port, keepalive=30)
sub.loop_start()
if not subscribed.wait(5):
    print("no SUBACK"); sys.exit(1)

pub = client("paho-pub-" + tag)
pub.connect(host, port, keepalive=30)
pub.loop_start()
for qos in (0, 1, 2):
    info = pub.publish(topic, "q%d" % qos, qos=qos)
    info.wait_for_publish(5)
    if not info.is_published():
        print("publish at QoS", qos, "not acknowledged"); sys.exit(1)
if not done.wait(5):
    print("received only", got); sys.exit(1)
if sorted(got) != [(0, "q0"), (1, "q1"), (2, "q2")]:
    print("wrong messages", got); sys.exit(1)
pub.disconnect(); sub.disconnect()
pub.loop_stop(); sub.loop_stop()
print("OK", transport)
"#;

/// Whether python3 can import paho-mqtt; if not, prints the skip (on
/// stdout and stderr, so it shows whether or not output is captured).
pub async fn installed_or_skip() -> bool {
    let probe = tokio::process::Command::new("python3").args(["-c", "import paho.mqtt.client"]).output();
    let installed = matches!(tokio::time::timeout(WAIT, probe).await, Ok(Ok(out)) if out.status.success());
    if !installed {
        println!("skipped: paho-mqtt not installed");
        eprintln!("skipped: paho-mqtt not installed");
    }
    installed
}

/// Runs the script against 127.0.0.1:`port` over `transport` (`tcp` or
/// `websockets`), its topic and client ids tagged `tag`; panics unless it
/// reports OK within 20 s.
pub async fn run(port: u16, transport: &str, tag: &str) {
    let run = tokio::process::Command::new("python3")
        .args(["-c", PAHO_SCRIPT, "127.0.0.1", &port.to_string(), transport, tag])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("paho script finishes within 20 s")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "paho over {transport} failed: {stdout}\n{stderr}");
    assert!(stdout.contains(&format!("OK {transport}")), "{stdout}\n{stderr}");
}

/// The interop check: a Rust 3.1.1 watcher at `watch` subscribes to
/// `interop/#` at QoS 2, the script runs once for each `(port, transport,
/// tag)`, and the watcher must have received exactly the three messages of
/// each run.
pub async fn interop(watch: SocketAddr, runs: &[(u16, &str, &str)]) {
    let (mut watcher, _) = Raw::v311(watch, "paho-watch", true).await;
    watcher.subscribe_id(1, &[("interop/#", Q::ExactlyOnce)]).await;
    for (port, transport, tag) in runs {
        run(*port, transport, tag).await;
    }
    let mut got: Vec<(String, Vec<u8>)> =
        watcher.drain(QUIET).await.into_iter().map(|p| (p.topic, p.payload.to_vec())).collect();
    got.sort();
    let mut want: Vec<(String, Vec<u8>)> = runs
        .iter()
        .flat_map(|(_, _, tag)| (0..3).map(move |q| (format!("interop/{tag}"), format!("q{q}").into_bytes())))
        .collect();
    want.sort();
    assert_eq!(got, want);
}
