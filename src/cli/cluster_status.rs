//! `kadmq cluster status`: ask a running node for `/api/v1/cluster` and
//! print the members as a table.
//!
//! Job: one HTTP/1.0 GET over a plain `TcpStream` (with timeouts; no HTTP
//! client dependency), the answer parsed into [`ClusterStatus`], and the
//! table rendering. Boundary: no broker, no cluster code runs here; what
//! the node answered is all there is.

use crate::cluster::status::{ClusterStatus, MemberStatus};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long connecting to the node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the node may take to answer.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer read (a fleet of thousands of members fits).
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;
/// The path asked for.
pub const PATH: &str = "/api/v1/cluster";

/// Why the status could not be shown. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{addr:?} is not a host:port address ({cause})")]
    BadAddress { addr: String, cause: String },
    #[error("cannot resolve {addr}: {cause}")]
    Resolve { addr: String, cause: String },
    #[error("no node reachable at {addr}: {cause} (is a node running with `--http {addr}`?)")]
    Unreachable { addr: String, cause: String },
    #[error("{addr} did not answer the HTTP request: {cause} (is it a kadmq node's --http address?)")]
    NoAnswer { addr: String, cause: String },
    #[error("the node at {addr} runs alone (not started with --p2p-listen)")]
    NotClustered { addr: String },
    #[error("{addr} answered HTTP {status} for {PATH}: {body} (is it a kadmq node's --http address?)")]
    Http { addr: String, status: u16, body: String },
    #[error("{addr} sent an unreadable cluster status ({cause}); is it a kadmq node's --http address?")]
    Unreadable { addr: String, cause: String },
}

/// GETs `/api/v1/cluster` from the node whose HTTP endpoint is `addr`
/// (`host:port`; an unspecified address such as `0.0.0.0:8080`, as a
/// node's own `KADMQ_HTTP` may say, means this host).
pub fn fetch(addr: &str) -> Result<ClusterStatus, StatusError> {
    let (status, body) = get(addr, PATH)?;
    match status {
        200 => serde_json::from_str(&body)
            .map_err(|err| StatusError::Unreadable { addr: addr.into(), cause: err.to_string() }),
        404 if body.contains("runs alone") => Err(StatusError::NotClustered { addr: addr.into() }),
        status => Err(StatusError::Http { addr: addr.into(), status, body: first_line(&body) }),
    }
}

/// One HTTP/1.0 GET: (status code, body).
fn get(addr: &str, path: &str) -> Result<(u16, String), StatusError> {
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::InvalidInput => StatusError::BadAddress { addr: addr.into(), cause: err.to_string() },
            _ => StatusError::Resolve { addr: addr.into(), cause: err.to_string() },
        })?
        .map(local_if_unspecified)
        .collect();
    let mut last_error = None;
    let mut stream = None;
    for target in &targets {
        match TcpStream::connect_timeout(target, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(err) => last_error = Some(err),
        }
    }
    let Some(mut stream) = stream else {
        let cause = last_error.map_or_else(|| "the name resolves to no address".to_string(), |e| e.to_string());
        return Err(StatusError::Unreachable { addr: addr.into(), cause });
    };
    let no_answer = |err: std::io::Error| StatusError::NoAnswer { addr: addr.into(), cause: err.to_string() };
    stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(no_answer)?;
    stream.set_write_timeout(Some(READ_TIMEOUT)).map_err(no_answer)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n").map_err(no_answer)?;
    let mut response = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut response).map_err(no_answer)?;
    parse_response(&response).ok_or_else(|| StatusError::NoAnswer {
        addr: addr.into(),
        cause: if response.is_empty() { "empty response".into() } else { "not an HTTP response".into() },
    })
}

/// A node listening on `0.0.0.0` (or `[::]`) is reached on loopback.
fn local_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Splits an HTTP/1.x response (read to its end) into status and body.
fn parse_response(response: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    if !status_line.starts_with("HTTP/1.") {
        return None;
    }
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn first_line(body: &str) -> String {
    let line = body.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("(empty body)");
    match line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

/// The columns of the table, in order.
pub const COLUMNS: [&str; 9] =
    ["NAME", "STATE", "PEER ID", "ADDRESSES", "MQTT", "INCARNATION", "CONNECTIONS", "SHARDS", "ENTRIES"];

/// The status as text: a summary line, then one row per member, columns
/// aligned; `*` marks the node that answered.
pub fn render(status: &ClusterStatus) -> String {
    let rows: Vec<[String; 9]> = status.members.iter().map(row).collect();
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let alive = status.members.iter().filter(|m| m.state == "alive").count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} members ({alive} alive) as seen by {}; replication {}, shard depth {}{}",
        status.members.len(),
        status.node,
        status.replication,
        status.shard_depth,
        if status.admitted { "" } else { "; joining: MQTT clients refused until then" }
    );
    let mut line = |marker: &str, cells: &[String]| {
        let mut text = String::from(marker);
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line("  ", &COLUMNS.map(String::from));
    for (member, row) in status.members.iter().zip(&rows) {
        line(if member.local { "* " } else { "  " }, row);
    }
    out
}

fn row(m: &MemberStatus) -> [String; 9] {
    let list = |items: &[String]| if items.is_empty() { "-".to_string() } else { items.join(",") };
    [
        m.name.clone(),
        m.state.clone(),
        m.peer_id.clone(),
        list(&m.addresses),
        list(&m.mqtt_listeners),
        m.incarnation.to_string(),
        m.connections.to_string(),
        m.shards.to_string(),
        m.entries.to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, local: bool, state: &str) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            peer_id: format!("12D3Koo{name}"),
            node_id: "00112233aabbccdd".into(),
            state: state.into(),
            local,
            addresses: vec![format!("/ip4/127.0.0.1/tcp/700{}", name.len())],
            mqtt_listeners: Vec::new(),
            incarnation: 3,
            connections: 12,
            shards: 40,
            entries: 1234,
        }
    }

    #[test]
    fn table_is_aligned_and_marks_the_answering_node() {
        let status = ClusterStatus {
            node: "n1".into(),
            replication: 3,
            shard_depth: 2,
            admitted: true,
            members: vec![member("n1", true, "alive"), member("node-two", false, "suspect")],
        };
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], "2 members (1 alive) as seen by n1; replication 3, shard depth 2");
        assert!(lines[1].starts_with("  NAME      STATE    PEER ID"), "{text}");
        assert!(lines[2].starts_with("* n1        alive    12D3Koon1 "), "{text}");
        assert!(lines[3].starts_with("  node-two  suspect  12D3Koonode-two "), "{text}");
        // Every column starts at the same offset on every line.
        for column in ["STATE", "MQTT", "ENTRIES"] {
            let at = lines[1].find(column).unwrap();
            assert!(lines[2..].iter().all(|l| l.as_bytes()[at - 1] == b' ' && l.as_bytes()[at] != b' '), "{text}");
        }
        assert!(lines[2].contains(" - "), "empty MQTT list shows as -: {text}");
        assert!(lines[2].ends_with("1234"), "{text}");
        let joining = render(&ClusterStatus { admitted: false, ..status });
        assert_eq!(
            joining.lines().next().unwrap(),
            "2 members (1 alive) as seen by n1; replication 3, shard depth 2; joining: MQTT clients refused until then"
        );
    }

    #[test]
    fn a_status_without_the_admitted_field_reads_as_admitted() {
        let json = r#"{"node":"n1","replication":3,"shard_depth":2,"members":[]}"#;
        let status: ClusterStatus = serde_json::from_str(json).unwrap();
        assert!(status.admitted);
    }

    #[test]
    fn responses_are_split_into_status_and_body() {
        assert_eq!(
            parse_response(b"HTTP/1.0 404 Not Found\r\ncontent-length: 4\r\n\r\nnope"),
            Some((404, "nope".into()))
        );
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_response(b""), None);
    }

    #[test]
    fn unspecified_addresses_mean_this_host() {
        assert_eq!(local_if_unspecified("0.0.0.0:8080".parse().unwrap()), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(local_if_unspecified("[::]:8080".parse().unwrap()), "[::1]:8080".parse().unwrap());
        assert_eq!(local_if_unspecified("10.0.0.5:8080".parse().unwrap()), "10.0.0.5:8080".parse().unwrap());
    }

    #[test]
    fn a_closed_port_is_one_readable_line() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = fetch(&format!("127.0.0.1:{port}")).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StatusError::Unreachable { .. }), "{text}");
        assert!(
            text.starts_with(&format!("no node reachable at 127.0.0.1:{port}: ")) && !text.contains('\n'),
            "{text}"
        );
        assert!(matches!(fetch("no-port-here").unwrap_err(), StatusError::BadAddress { .. }));
    }
}
