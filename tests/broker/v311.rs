//! MQTT 3.1.1 behaviour with the rumqttc v4 client.

use crate::common::TestBroker;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o
}

#[tokio::test]
async fn smoke_publish_subscribe_qos1() {
    let broker = TestBroker::start().await;
    let (sub, mut sub_loop) = AsyncClient::new(options("sub", broker.port()), 10);
    sub.subscribe("a/+", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await.unwrap() {
            break;
        }
    }
    let (publisher, mut pub_loop) = AsyncClient::new(options("pub", broker.port()), 10);
    tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
    publisher.publish("a/b", QoS::AtLeastOnce, false, "hello").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = sub_loop.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("delivery");
    assert_eq!(got.topic, "a/b");
    assert_eq!(&got.payload[..], b"hello");
    assert_eq!(got.qos, QoS::AtLeastOnce);
}
