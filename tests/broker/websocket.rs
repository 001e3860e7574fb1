//! MQTT over WebSocket (path /mqtt, subprotocol mqtt): a raw tungstenite
//! client carrying MQTT bytes, mixed with TCP clients; paho-mqtt interop.

use crate::common::{joining_broker, TestBroker};
use crate::support::http::http_get_async;
use crate::support::mqtt::Client;
use crate::support::paho;
use crate::support::raw::{connect_v311, connect_v5, encode311, publish_packet, will, Raw, WAIT};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use kadmq::protocol::{self, ConnectReason, Packet as P, PubAck, QoS as Q, Subscribe, SubscribeFilter, Version};
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{Response, StatusCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn ws_open(
    addr: SocketAddr,
    path: &str,
    subprotocol: Option<&str>,
) -> Result<(Ws, Response<Option<Vec<u8>>>), WsError> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(p) = subprotocol {
        request.headers_mut().insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request)).await.expect("handshake in time")
}

/// An MQTT 3.1.1 client over a WebSocket: binary frames carry the bytes.
struct WsMqtt {
    ws: Ws,
    buf: BytesMut,
}

impl WsMqtt {
    async fn connect(addr: SocketAddr, client_id: &str) -> WsMqtt {
        let (ws, response) = ws_open(addr, "/mqtt", Some("mqtt")).await.expect("WebSocket handshake");
        assert_eq!(response.headers().get("sec-websocket-protocol").map(|v| v.as_bytes()), Some(&b"mqtt"[..]));
        let mut c = WsMqtt { ws, buf: BytesMut::new() };
        c.send(&P::Connect(connect_v311(client_id, true, 30))).await;
        match c.recv().await {
            P::ConnAck(a) => assert_eq!(a.code, ConnectReason::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    async fn send(&mut self, packet: &P) {
        self.send_bytes(encode311(packet)).await;
    }

    async fn send_bytes(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.expect("send frame");
    }

    /// The next MQTT packet, whatever the framing; panics after [`WAIT`].
    async fn recv(&mut self) -> P {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(p) = protocol::decode(&mut self.buf, Version::V311, protocol::MAX_PACKET_SIZE).unwrap() {
                    return p;
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(data))) => self.buf.extend_from_slice(&data),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("expected a binary frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("packet in time")
    }

    /// Waits for the broker to end the WebSocket (close frame, EOF or reset).
    async fn expect_closed(&mut self) {
        match tokio::time::timeout(WAIT, self.ws.next()).await.expect("closed in time") {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {}
            Some(Ok(m)) => panic!("expected the close, got {m:?}"),
        }
    }
}

fn subscribe(packet_id: u16, filter: &str, qos: Q) -> P {
    P::Subscribe(Subscribe {
        packet_id,
        filters: vec![SubscribeFilter { filter: filter.into(), options: protocol::SubscriptionOptions::qos(qos) }],
        subscription_identifier: None,
        user_properties: vec![],
    })
}

#[tokio::test]
async fn ws_handshake_answers_subprotocol_mqtt() {
    let broker = TestBroker::start().await;
    let (_ws, response) = ws_open(broker.ws(), "/mqtt", Some("mqtt")).await.expect("handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let protocols: Vec<_> = response.headers().get_all("sec-websocket-protocol").iter().collect();
    assert_eq!(protocols.len(), 1, "{protocols:?}");
    assert_eq!(protocols[0], "mqtt");
    // Offered among others, mqtt is the one chosen.
    let (_ws, response) = ws_open(broker.ws(), "/mqtt", Some("mqttv3.1, mqtt")).await.expect("handshake");
    assert_eq!(response.headers().get("sec-websocket-protocol").unwrap(), "mqtt");
}

#[tokio::test]
async fn ws_wrong_path_is_refused() {
    let broker = TestBroker::start().await;
    for path in ["/", "/mqt", "/mqtt/x", "/other"] {
        match ws_open(broker.ws(), path, Some("mqtt")).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::NOT_FOUND, "path {path}"),
            Err(other) => panic!("path {path}: expected an HTTP refusal, got {other:?}"),
            Ok(_) => panic!("path {path} must be refused"),
        }
    }
    // The listener still serves the right path.
    WsMqtt::connect(broker.ws(), "ws-after-refusals").await;
}

/// A node that has not joined its fleet yet refuses a CONNECT over
/// WebSocket as over TCP: CONNACK return code 3 (MQTT 5 over TCP: 0x88
/// Server unavailable), then the close; `/health/ready` says 503.
#[tokio::test]
async fn ws_clients_are_refused_until_the_node_joined() {
    let keys = tempfile::tempdir().unwrap();
    let broker = joining_broker(keys.path(), 600_000).await;
    let server = broker.server.as_ref().unwrap();
    let http = server.http_addr().unwrap().port();
    assert_eq!(http_get_async(http, "/health/ready").await.unwrap().0, 503);
    assert_eq!(http_get_async(http, "/health/live").await.unwrap().0, 200);

    let (ws, _) = ws_open(broker.ws(), "/mqtt", Some("mqtt")).await.expect("WebSocket handshake");
    let mut c = WsMqtt { ws, buf: BytesMut::new() };
    c.send(&P::Connect(connect_v311("ws-early", true, 30))).await;
    match c.recv().await {
        P::ConnAck(a) => assert_eq!((a.code, a.session_present), (ConnectReason::ServerUnavailable, false)),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c.expect_closed().await;

    let (mut tcp, ack) = Raw::connect(broker.mqtt(), connect_v5("tcp-early")).await;
    assert_eq!(ack.code, ConnectReason::ServerUnavailable);
    assert!(tcp.expect_closed(WAIT).await.is_empty());
    assert_eq!(server.broker.admission.refused(), 2);
    assert!(!server.broker.admission.is_admitted());
}

#[tokio::test]
async fn ws_connect_subscribe_and_receive_from_tcp_and_back() {
    let broker = TestBroker::start().await;
    let mut ws = WsMqtt::connect(broker.ws(), "ws-sub").await;
    ws.send(&subscribe(1, "mix/ws", Q::AtLeastOnce)).await;
    match ws.recv().await {
        P::SubAck(a) => assert_eq!((a.packet_id, a.reasons), (1, vec![1])),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    // TCP (rumqttc) → WebSocket.
    let (mut tcp, _) = Client::connect(Client::options("tcp-pub", broker.port())).await;
    tcp.client.publish("mix/ws", rumqttc::QoS::AtLeastOnce, false, "from tcp").await.unwrap();
    match ws.recv().await {
        P::Publish(p) => {
            assert_eq!((p.topic.as_str(), &p.payload[..], p.qos), ("mix/ws", &b"from tcp"[..], Q::AtLeastOnce));
            ws.send(&P::PubAck(PubAck::new(p.packet_id.unwrap()))).await;
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }

    // WebSocket → TCP, QoS 2 with the full flow over WebSocket.
    assert_eq!(tcp.subscribe("mix/tcp", rumqttc::QoS::ExactlyOnce).await.len(), 1);
    ws.send(&publish_packet("mix/tcp", b"from ws", Q::ExactlyOnce, false, Some(9))).await;
    assert_eq!(ws.recv().await, P::PubRec(PubAck::new(9)));
    ws.send(&P::PubRel(PubAck::new(9))).await;
    assert_eq!(ws.recv().await, P::PubComp(PubAck::new(9)));
    let p = tcp.next_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.qos), ("mix/tcp", &b"from ws"[..], rumqttc::QoS::ExactlyOnce));

    ws.send_bytes(vec![0xC0, 0x00]).await;
    assert_eq!(ws.recv().await, P::PingResp);
}

#[tokio::test]
async fn ws_packets_may_span_frames_and_share_frames() {
    let broker = TestBroker::start().await;
    let (ws, _) = ws_open(broker.ws(), "/mqtt", Some("mqtt")).await.unwrap();
    let mut c = WsMqtt { ws, buf: BytesMut::new() };
    // CONNECT cut in three frames.
    let connect = encode311(&P::Connect(connect_v311("ws-frames", true, 30)));
    c.send_bytes(connect[..1].to_vec()).await;
    c.send_bytes(connect[1..5].to_vec()).await;
    c.send_bytes(connect[5..].to_vec()).await;
    assert!(matches!(c.recv().await, P::ConnAck(a) if a.code == ConnectReason::Success));
    // SUBSCRIBE, PUBLISH to itself and PINGREQ in one frame.
    let mut frame = encode311(&subscribe(2, "frames/t", Q::AtMostOnce));
    frame.extend(encode311(&publish_packet("frames/t", b"x", Q::AtMostOnce, false, None)));
    frame.extend([0xC0, 0x00]);
    c.send_bytes(frame).await;
    let mut got = vec![c.recv().await, c.recv().await, c.recv().await];
    got.sort_by_key(|p| p.name());
    assert!(matches!(&got[0], P::PingResp), "{got:?}");
    assert!(matches!(&got[1], P::Publish(p) if &p.payload[..] == b"x"), "{got:?}");
    assert!(matches!(&got[2], P::SubAck(a) if a.reasons == vec![0]), "{got:?}");
}

#[tokio::test]
async fn ws_text_frame_or_garbage_closes_only_that_connection() {
    let broker = TestBroker::start().await;
    let mut bystander = WsMqtt::connect(broker.ws(), "ws-bystander").await;

    let mut texting = WsMqtt::connect(broker.ws(), "ws-text").await;
    texting.ws.send(Message::Text("hello".into())).await.unwrap();
    texting.expect_closed().await;

    let (ws, _) = ws_open(broker.ws(), "/mqtt", Some("mqtt")).await.unwrap();
    let mut garbage = WsMqtt { ws, buf: BytesMut::new() };
    garbage.send_bytes(vec![0xff; 16]).await;
    garbage.expect_closed().await;

    bystander.send_bytes(vec![0xC0, 0x00]).await;
    assert_eq!(bystander.recv().await, P::PingResp);
}

#[tokio::test]
async fn ws_will_is_published_when_the_websocket_drops() {
    let broker = TestBroker::start().await;
    let (mut watcher, _) = Raw::v311(broker.mqtt(), "ws-will-watch", true).await;
    watcher.subscribe_id(1, &[("wswill/t", Q::AtLeastOnce)]).await;
    let (ws, _) = ws_open(broker.ws(), "/mqtt", Some("mqtt")).await.unwrap();
    let mut c = WsMqtt { ws, buf: BytesMut::new() };
    let mut connect = connect_v311("ws-will", true, 30);
    connect.will = Some(will("wswill/t", b"ws gone", Q::AtLeastOnce, false));
    c.send(&P::Connect(connect)).await;
    assert!(matches!(c.recv().await, P::ConnAck(_)));
    drop(c); // TCP closed without a close frame or DISCONNECT
    let p = watcher.recv_publish().await;
    assert_eq!(&p.payload[..], b"ws gone");
    watcher.complete(&p).await;
}

// --- interop with paho-mqtt (python) ------------------------------------------------

#[tokio::test]
async fn paho_interop_over_tcp_and_websocket() {
    if !paho::installed_or_skip().await {
        return;
    }
    let broker = TestBroker::start().await;
    paho::interop(broker.mqtt(), &[(broker.port(), "tcp", "tcp"), (broker.ws().port(), "websockets", "ws")]).await;
}
