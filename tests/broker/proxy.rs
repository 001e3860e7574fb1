//! The round-robin proxy of `support::proxy` (the cluster tests' load
//! balancer) against two plain TCP backends that say who they are: new
//! connections alternate between them, bytes go both ways unchanged, and
//! dropping the proxy closes its listener and every connection it carries.

use crate::support::proxy::Proxy;
use crate::support::raw::WAIT;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that greets each connection with its `name` byte, then echoes.
async fn backend(name: u8) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream.write_all(&[name]).await.is_err() {
                    return;
                }
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Reads exactly `n` bytes within [`WAIT`].
async fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf)).await.expect("bytes in time").expect("read");
    buf
}

#[tokio::test]
async fn proxy_sends_each_new_connection_to_the_next_backend_and_copies_both_ways() {
    let backends = vec![backend(b'1').await, backend(b'2').await];
    let proxy = Proxy::start(backends);
    let mut connections = Vec::new();
    let mut greeted = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        greeted.push(read_n(&mut c, 1).await[0]);
        connections.push(c);
    }
    assert_eq!(greeted, b"121", "the connections landed on backends {greeted:?}");
    assert_eq!(proxy.routed(), vec![0, 1, 0]);

    // Bytes both ways, each connection to its own backend, many reads'
    // worth (written while the echo is read, so no buffer has to hold it all).
    for (i, c) in connections.iter_mut().enumerate() {
        let payload: Vec<u8> = (0..200_000u32).map(|b| (b as u8) ^ i as u8).collect();
        let (mut read, mut write) = c.split();
        let mut echo = vec![0; payload.len()];
        let both = async { tokio::try_join!(write.write_all(&payload), read.read_exact(&mut echo)) };
        tokio::time::timeout(WAIT, both).await.expect("echo in time").expect("echo");
        assert!(echo == payload, "the echo of connection {i} differs");
    }

    // A connection the client closes is closed on the backend too: its
    // echo ends, so the proxy closes our side.
    let mut closing = connections.pop().unwrap();
    closing.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, closing.read_to_end(&mut rest)).await.expect("closed in time").unwrap();
    assert_eq!(n, 0, "nothing after the close: {rest:?}");

    // Dropped: the open connections close, and nothing listens any more.
    let addr = proxy.addr();
    drop(proxy);
    for c in &mut connections {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, c.read_to_end(&mut rest)).await.expect("closed in time");
        assert!(read.map_or(true, |n| n == 0), "a dropped proxy still carries bytes: {rest:?}");
    }
    assert!(TcpStream::connect(addr).await.is_err(), "the dropped proxy still accepts");
}

#[tokio::test]
async fn proxy_closes_a_connection_whose_backend_refuses_and_goes_on() {
    // A port nothing listens on: bound, then closed.
    let refusing = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let proxy = Proxy::start(vec![refusing, backend(b'2').await]);
    let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, first.read_to_end(&mut rest)).await.expect("closed in time");
    assert!(read.map_or(true, |n| n == 0), "got {rest:?} from a refusing backend");
    let mut second = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(read_n(&mut second, 1).await, b"2");
    assert_eq!(proxy.routed(), vec![0, 1]);
}
