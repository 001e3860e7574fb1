//! The `kadmq` binary as an operator runs it against a fleet:
//! `kadmq cluster status`, and `kadmq start` refusing a bad cluster
//! configuration with one readable line.

use crate::support::lab::{wait_for_members, Lab};
use crate::support::ports::free_port;
use crate::support::process::{kadmq, Process};
use crate::support::wait::wait_for_port;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

fn status(http: &str) -> Output {
    kadmq().args(["cluster", "status", "--http", http]).output().expect("run kadmq cluster status")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that `out` failed with exactly one line on stderr, starting with `start`.
fn assert_fails_with_one_line(out: &Output, start: &str) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "expected a failure; stdout: {}", text(&out.stdout));
    assert!(stderr.starts_with(start), "stderr should start with {start:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line expected: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A single (non-clustered) node on `http_port`, listening.
fn solo(data_dir: &Path, http_port: u16) -> Process {
    let mut command = kadmq();
    command
        .args(["start", "--no-ws", "--mqtt", &format!("127.0.0.1:{}", free_port())])
        .args(["--http", &format!("127.0.0.1:{http_port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let solo = Process::spawn(command);
    wait_for_port(http_port, Duration::from_secs(30));
    solo
}

#[test]
fn cluster_status_lists_the_members_and_marks_the_answering_node() {
    let lab = Lab::new();
    let n1 = lab.node("n1", None);
    // The bootstrap address needs no /p2p/<peer id> (what the README does).
    let n2 = lab.node("n2", Some(&format!("/ip4/127.0.0.1/tcp/{}", n1.p2p_port)));
    wait_for_members(&[&n1, &n2], &["n1", "n2"]);

    let out = status(&format!("127.0.0.1:{}", n1.http_port));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("2 members (2 alive) as seen by n1"), "{stdout}");
    let header = lines.iter().find(|l| l.contains("NAME")).expect("a header line");
    for column in ["NAME", "STATE", "PEER ID", "ADDRESSES", "MQTT", "INCARNATION", "CONNECTIONS", "SHARDS", "ENTRIES"] {
        assert!(header.contains(column), "no {column} column: {stdout}");
    }
    let row = |name: &str| {
        lines.iter().find(|l| l.split_whitespace().any(|w| w == name)).unwrap_or_else(|| panic!("no {name}: {stdout}"))
    };
    assert!(row("n1").starts_with("* n1 "), "the answering node is marked: {stdout}");
    assert!(row("n2").starts_with("  n2 "), "{stdout}");
    for (node, name) in [(&n1, "n1"), (&n2, "n2")] {
        let row = row(name);
        assert!(row.contains(" alive "), "{stdout}");
        assert!(row.contains(&node.peer_id()), "{name}'s peer id: {stdout}");
        assert!(row.contains(&format!("mqtt://127.0.0.1:{}", node.mqtt_port)), "{stdout}");
        assert!(row.contains(&format!("/ip4/127.0.0.1/tcp/{}", node.p2p_port)), "{stdout}");
    }

    // KADMQ_HTTP names the node as --http does.
    let out =
        kadmq().args(["cluster", "status"]).env("KADMQ_HTTP", format!("127.0.0.1:{}", n2.http_port)).output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("as seen by n2") && stdout.contains("* n2 "), "{stdout}");
}

#[test]
fn cluster_status_of_a_single_node_says_it_runs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let _solo = solo(&dir.path().join("solo"), http_port);
    let addr = format!("127.0.0.1:{http_port}");
    let out = status(&addr);
    assert_fails_with_one_line(&out, &format!("kadmq: the node at {addr} runs alone (not started with --p2p-listen)"));
}

#[test]
fn cluster_status_of_a_closed_port_is_one_clear_line() {
    let addr = format!("127.0.0.1:{}", free_port());
    let out = status(&addr);
    assert_fails_with_one_line(&out, &format!("kadmq: no node reachable at {addr}: "));
    assert!(text(&out.stderr).contains(&format!("--http {addr}")), "{}", text(&out.stderr));
}

#[test]
fn start_refuses_a_missing_cluster_key_file_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexistent.key");
    let expected = format!("kadmq: invalid configuration: cannot read the cluster key file {}", missing.display());

    let out = kadmq()
        .args(["start", "--no-ws", "--mqtt", "127.0.0.1:0", "--p2p-listen", "/ip4/127.0.0.1/tcp/0"])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .arg("--cluster-key-file")
        .arg(&missing)
        .output()
        .unwrap();
    assert_fails_with_one_line(&out, &expected);

    // The same through the environment.
    let out = kadmq()
        .args(["start", "--no-ws", "--mqtt", "127.0.0.1:0"])
        .env("KADMQ_DATA_DIR", dir.path().join("d"))
        .env("KADMQ_P2P_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .env("KADMQ_CLUSTER_KEY_FILE", &missing)
        .output()
        .unwrap();
    assert_fails_with_one_line(&out, &expected);
}

#[test]
fn start_refuses_bad_cluster_settings_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new();
    let start = || {
        let mut command = kadmq();
        command.args(["start", "--no-ws", "--mqtt", "127.0.0.1:0"]).env("KADMQ_DATA_DIR", dir.path().join("d"));
        command
    };
    let out = start().env("KADMQ_BOOTSTRAP", "/ip4/127.0.0.1/tcp/7000").output().unwrap();
    assert_fails_with_one_line(
        &out,
        "kadmq: invalid configuration: cluster.bootstrap needs cluster.p2p_listen (--p2p-listen) too",
    );

    let out = start().env("KADMQ_P2P_LISTEN", "/ip4/127.0.0.1/tcp/0").output().unwrap();
    assert_fails_with_one_line(&out, "kadmq: invalid configuration: a cluster needs a key");

    let out = start()
        .env("KADMQ_P2P_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .env("KADMQ_CLUSTER_KEY_FILE", &lab.key)
        .env("KADMQ_BOOTSTRAP", "/ip4/127.0.0.1/tcp/7000,kadmq-1:7000")
        .output()
        .unwrap();
    assert_fails_with_one_line(
        &out,
        "kadmq: invalid configuration: cluster.bootstrap: \"kadmq-1:7000\" is not a multiaddr",
    );

    let out = start()
        .env("KADMQ_P2P_LISTEN", "/ip4/127.0.0.1/tcp/0")
        .env("KADMQ_CLUSTER_KEY_FILE", &lab.key)
        .env("KADMQ_REPLICATION", "0")
        .output()
        .unwrap();
    assert_fails_with_one_line(
        &out,
        "kadmq: invalid configuration: cluster.replication (--replication) must be at least 1",
    );
}
