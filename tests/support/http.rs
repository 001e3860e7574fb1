//! One HTTP GET (or an empty POST) on 127.0.0.1 (the nodes' metrics, JSON
//! API and fault hooks), blocking, and the GET for a task. Nothing more of
//! HTTP: no keep-alive, no TLS.

use std::io::{Read, Write};
use std::time::Duration;

/// How long an answer may take: a debug-build node on a starved machine can
/// take seconds for `/metrics`.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// GET `path` from 127.0.0.1:`port` as HTTP/1.0, so the server closes after
/// its answer and the body is everything after the head: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    request(port, "GET", path)
}

/// An empty POST to `path`, like [`http_get`].
pub fn http_post(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    request(port, "POST", path)
}

fn request(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

/// [`http_get`] from a task: on tokio's blocking pool, so a broker running
/// in the same runtime can answer meanwhile.
pub async fn http_get_async(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http_get(port, &path)).await.expect("the GET does not panic")
}
