//! Micro-benchmarks of the broker's hot paths (criterion).
//!
//! - `trie`: matching topics against 1,000,000 filters in
//!   `SubscriptionTrie` (built once, outside the timed loop), and inserting
//!   and removing a filter in that trie.
//! - `codec`: encode and decode of PUBLISH (QoS 0/1, 64 B and 1 KiB payloads,
//!   MQTT 3.1.1 and 5.0 with properties), CONNECT and SUBSCRIBE.
//!
//! `cargo bench --bench broker` runs in about two minutes; pass a filter
//! (`cargo bench --bench broker -- trie`) to run part of it.

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

fn config() -> Criterion {
    Criterion::default()
        .sample_size(40)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        // The default 100,000 bootstrap resamples and the plots took ~4 s per
        // benchmark on two cores, longer than the measurement itself.
        .nresamples(10_000)
        .without_plots()
}

mod trie {
    use criterion::Criterion;
    use kadmq::broker::trie::SubscriptionTrie;
    use std::hint::black_box;

    pub const DEVICES: u32 = 100_000;
    pub const METRICS: [&str; 9] =
        ["temperature", "humidity", "pressure", "battery", "status", "rssi", "voltage", "current", "uptime"];

    /// 1,000,000 filters, a mix a fleet of devices might hold:
    /// - 900,000 exact `devices/{id}/{metric}` (100,000 devices x 9 metrics);
    /// - 50,000 `devices/{id}/+` (even ids);
    /// - 25,000 `devices/{id}/#` (ids divisible by 4);
    /// - 20,000 `+/{id}/status` (ids divisible by 5);
    /// - 5,000 `tenants/{t}/#`.
    pub fn build() -> SubscriptionTrie<u32, ()> {
        let mut trie = SubscriptionTrie::new();
        let mut key = 0u32;
        let mut add = |trie: &mut SubscriptionTrie<u32, ()>, filter: String| {
            trie.insert(&filter, key, ());
            key += 1;
        };
        for id in 0..DEVICES {
            for metric in METRICS {
                add(&mut trie, format!("devices/{id}/{metric}"));
            }
            if id % 2 == 0 {
                add(&mut trie, format!("devices/{id}/+"));
            }
            if id % 4 == 0 {
                add(&mut trie, format!("devices/{id}/#"));
            }
            if id % 5 == 0 {
                add(&mut trie, format!("+/{id}/status"));
            }
        }
        for t in 0..5_000 {
            add(&mut trie, format!("tenants/{t}/#"));
        }
        assert_eq!(trie.len(), 1_000_000);
        trie
    }

    fn count(trie: &SubscriptionTrie<u32, ()>, topic: &str) -> usize {
        let mut n = 0;
        trie.for_each_match(topic, |k, _| {
            black_box(k);
            n += 1;
        });
        n
    }

    pub fn bench(c: &mut Criterion) {
        let started = std::time::Instant::now();
        let mut trie = build();
        eprintln!("trie: built 1,000,000 filters in {:.2?}", started.elapsed());
        // Exact + `devices/40/+` + `devices/40/#` + `+/40/status`.
        let hit = "devices/40/status";
        assert_eq!(count(&trie, hit), 4);
        // Only the exact filter.
        let hit_one = "devices/99999/temperature";
        assert_eq!(count(&trie, hit_one), 1);
        // First level exists, device does not; `+/.../...` also misses.
        let miss = "devices/1000000/temperature";
        assert_eq!(count(&trie, miss), 0);
        // Unknown first level: only the root `+` branch is walked.
        let miss_root = "factory/line7/pressure";
        assert_eq!(count(&trie, miss_root), 0);

        let mut g = c.benchmark_group("trie_1m");
        g.bench_function("match_hit_4", |b| b.iter(|| count(&trie, black_box(hit))));
        g.bench_function("match_hit_1", |b| b.iter(|| count(&trie, black_box(hit_one))));
        g.bench_function("match_miss", |b| b.iter(|| count(&trie, black_box(miss))));
        g.bench_function("match_miss_root", |b| b.iter(|| count(&trie, black_box(miss_root))));
        // Insert then remove, so the trie stays at 1M. A new key on an
        // existing filter (no new nodes), and a filter under a new device
        // (two new nodes created, then pruned).
        g.bench_function("insert_remove_existing_filter", |b| {
            b.iter(|| {
                trie.insert(black_box("devices/123/temperature"), u32::MAX, ());
                trie.remove(black_box("devices/123/temperature"), &u32::MAX)
            })
        });
        g.bench_function("insert_remove_new_branch", |b| {
            b.iter(|| {
                trie.insert(black_box("devices/new-device/temperature"), u32::MAX, ());
                trie.remove(black_box("devices/new-device/temperature"), &u32::MAX)
            })
        });
        g.finish();
        assert_eq!(trie.len(), 1_000_000);
    }
}

mod codec {
    use bytes::{Bytes, BytesMut};
    use criterion::{BatchSize, Criterion};
    use kadmq::protocol::{
        decode, encode, Connect, ConnectProperties, LastWill, MessageProperties, Packet, Publish, PublishProperties,
        QoS, Subscribe, SubscribeFilter, SubscriptionOptions, Version, WillProperties,
    };
    use std::hint::black_box;

    const MAX: usize = 1 << 24;

    fn publish(qos: QoS, payload: usize, version: Version) -> Packet {
        let properties = match version {
            Version::V311 => PublishProperties::default(),
            Version::V5 => PublishProperties {
                message: MessageProperties {
                    payload_format_indicator: Some(0),
                    message_expiry_interval: Some(3600),
                    content_type: Some("application/octet-stream".into()),
                    response_topic: Some("devices/4711/replies".into()),
                    correlation_data: Some(Bytes::from_static(b"req-000042")),
                    user_properties: vec![("tenant".into(), "acme".into()), ("trace".into(), "abc123".into())],
                },
                topic_alias: None,
                subscription_identifiers: Vec::new(),
            },
        };
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: "devices/4711/temperature".into(),
            packet_id: (qos != QoS::AtMostOnce).then_some(4711),
            payload: Bytes::from(vec![0x5a; payload]),
            properties,
        })
    }

    fn connect(version: Version) -> Packet {
        let v5 = version == Version::V5;
        Packet::Connect(Connect {
            version,
            client_id: "sensor-gateway-0042".into(),
            clean_start: true,
            keep_alive: 60,
            username: Some("gateway".into()),
            password: Some(Bytes::from_static(b"s3cret-password")),
            will: Some(LastWill {
                topic: "devices/4711/status".into(),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: if v5 {
                    WillProperties { will_delay_interval: Some(5), ..WillProperties::default() }
                } else {
                    WillProperties::default()
                },
            }),
            properties: if v5 {
                ConnectProperties {
                    session_expiry_interval: Some(3600),
                    receive_maximum: Some(100),
                    maximum_packet_size: Some(1 << 20),
                    topic_alias_maximum: Some(16),
                    user_properties: vec![("site".into(), "berlin".into())],
                    ..ConnectProperties::default()
                }
            } else {
                ConnectProperties::default()
            },
        })
    }

    fn subscribe(version: Version) -> Packet {
        let filter = |f: &str, qos| SubscribeFilter { filter: f.into(), options: SubscriptionOptions::qos(qos) };
        Packet::Subscribe(Subscribe {
            packet_id: 7,
            filters: vec![
                filter("devices/+/temperature", QoS::AtLeastOnce),
                filter("devices/4711/#", QoS::ExactlyOnce),
                filter("alerts/critical", QoS::AtMostOnce),
            ],
            subscription_identifier: (version == Version::V5).then_some(42),
            user_properties: Vec::new(),
        })
    }

    fn pair(c: &mut Criterion, name: &str, packet: &Packet, version: Version) {
        let mut wire = BytesMut::new();
        encode(packet, version, &mut wire).expect("encodes");
        let wire = wire.freeze();
        // What we decode must be what we encoded.
        let decoded = decode(&mut BytesMut::from(&wire[..]), version, MAX).expect("decodes").expect("whole");
        let mut again = BytesMut::new();
        encode(&decoded, version, &mut again).expect("re-encodes");
        assert_eq!(wire, again.freeze(), "{name}: round trip");

        let mut g = c.benchmark_group(format!("codec/{name}"));
        let mut out = BytesMut::with_capacity(4096);
        g.bench_function("encode", |b| {
            b.iter(|| {
                out.clear();
                encode(black_box(packet), version, &mut out).expect("encodes");
                black_box(out.len())
            })
        });
        // The read buffer and the decoded packet are made and dropped outside
        // the timed part. Like a connection's read buffer after its first
        // packet, the buffer is already in shared mode, so `split_to` in
        // `decode` does not allocate.
        let setup = || {
            let mut buf = BytesMut::with_capacity(2 * wire.len());
            buf.extend_from_slice(&wire);
            buf.extend_from_slice(&wire);
            drop(buf.split_off(wire.len()));
            buf
        };
        g.bench_function("decode", |b| {
            b.iter_batched_ref(setup, |buf| decode(black_box(buf), version, MAX), BatchSize::SmallInput)
        });
        g.finish();
    }

    pub fn bench(c: &mut Criterion) {
        for (v, version) in [("v311", Version::V311), ("v5", Version::V5)] {
            for (q, qos) in [("qos0", QoS::AtMostOnce), ("qos1", QoS::AtLeastOnce)] {
                for (p, payload) in [("64B", 64), ("1KiB", 1024)] {
                    pair(c, &format!("publish_{v}_{q}_{p}"), &publish(qos, payload, version), version);
                }
            }
        }
        for (v, version) in [("v311", Version::V311), ("v5", Version::V5)] {
            pair(c, &format!("connect_{v}"), &connect(version), version);
            pair(c, &format!("subscribe_{v}"), &subscribe(version), version);
        }
    }
}

fn trie(c: &mut Criterion) {
    trie::bench(c);
}

fn codec(c: &mut Criterion) {
    codec::bench(c);
}

criterion_group! {
    name = benches;
    config = config();
    targets = trie, codec
}
criterion_main!(benches);
