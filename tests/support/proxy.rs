//! A round-robin TCP proxy on 127.0.0.1, the load balancer of a fleet as a
//! client sees it: each new connection goes to the next backend in turn
//! (1, 2, 3, 1, ...), and its bytes are copied both ways until either side
//! closes. It knows nothing of MQTT and never health-checks: a connection
//! whose backend refuses is closed (the client sees the close), and the
//! next one goes to the backend after it.
//!
//! It runs on a thread of its own (a single-threaded tokio runtime), so it
//! serves tests on a plain thread and in a task alike. Dropping the
//! [`Proxy`] stops it: the listener closes and so does every connection it
//! carries.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// How long the proxy waits for a backend to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    routed: Arc<Mutex<Vec<usize>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 (bound here, before this
    /// returns, so no other process can take it) in front of `backends`.
    pub fn start(backends: Vec<SocketAddr>) -> Proxy {
        assert!(!backends.is_empty(), "a proxy needs a backend");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let routed = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn({
                let routed = routed.clone();
                move || {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener).expect("tokio listener");
                        tokio::select! {
                            _ = stopped => {}
                            _ = serve(listener, backends, routed) => {}
                        }
                    });
                    // Dropping the runtime drops every connection's task, and their sockets.
                }
            })
            .expect("spawn the proxy thread");
        Proxy { addr, routed, stop: Some(stop), thread: Some(thread) }
    }

    /// Over the MQTT ports of nodes on 127.0.0.1.
    pub fn over_ports(ports: &[u16]) -> Proxy {
        Proxy::start(ports.iter().map(|&p| SocketAddr::from(([127, 0, 0, 1], p))).collect())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The backend (its index in the list given to [`Proxy::start`]) each
    /// connection accepted so far went to, in the order they came.
    pub fn routed(&self) -> Vec<usize> {
        self.routed.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections for ever, each to the next backend.
async fn serve(listener: TcpListener, backends: Vec<SocketAddr>, routed: Arc<Mutex<Vec<usize>>>) {
    let mut next = 0;
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(err) => {
                // Out of descriptors, say: wait rather than spin.
                eprintln!("proxy {}: accept: {err}", listener.local_addr().map(|a| a.port()).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let backend = next % backends.len();
        next += 1;
        routed.lock().unwrap().push(backend);
        tokio::spawn(pipe(client, backends[backend]));
    }
}

/// Carries one connection: bytes both ways until one side closes.
async fn pipe(mut client: TcpStream, backend: SocketAddr) {
    let mut server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
        Ok(Ok(server)) => server,
        // Refused or no answer: the client sees its connection closed.
        _ => return,
    };
    // MQTT is small packets: do not let Nagle hold them back.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
