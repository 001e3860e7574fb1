//! The `kadmq` binary as a user runs it: help, configuration precedence
//! (flags > environment > file > defaults), refusal of bad configuration.

use crate::support::ports::free_port;
use crate::support::process::kadmq;
use crate::support::wait::wait_for_port;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Starts the binary, waits until `expected_port` accepts, checks that
/// `unexpected_port` does not, and kills the child by its own id.
fn assert_listens_on(mut command: Command, expected_port: u16, unexpected_port: u16) {
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn kadmq");
    wait_for_port(expected_port, Duration::from_secs(5));
    let listens_elsewhere = listening(unexpected_port);
    let _ = child.kill();
    let _ = child.wait();
    assert!(!listens_elsewhere, "also listening on {unexpected_port}");
}

#[test]
fn help_names_the_commands_and_options() {
    let out = kadmq().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("start") && text.contains("config"), "{text}");

    let out = kadmq().args(["start", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for option in ["--mqtt", "--ws", "--data-dir", "--config", "--log", "KADMQ_MQTT", "mqtt.max_queued_messages"] {
        assert!(text.contains(option), "start --help lacks {option}:\n{text}");
    }
}

#[test]
fn config_prints_the_default_file() {
    let out = kadmq().arg("config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(kadmq::Config::from_toml(&text).unwrap(), kadmq::Config::default());
}

#[test]
fn environment_beats_file_and_flag_beats_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let file = dir.path().join("kadmq.toml");
    std::fs::write(
        &file,
        format!("data_dir = {:?}\n[listeners]\nmqtt = [\"127.0.0.1:{file_port}\"]\nws = []\n", dir.path().join("d")),
    )
    .unwrap();

    // File alone.
    let mut command = kadmq();
    command.args(["start", "--config"]).arg(&file);
    assert_listens_on(command, file_port, env_port);

    // Environment over file.
    let mut command = kadmq();
    command.args(["start", "--config"]).arg(&file).env("KADMQ_MQTT", format!("127.0.0.1:{env_port}"));
    assert_listens_on(command, env_port, file_port);

    // Flag over environment.
    let mut command = kadmq();
    command
        .args(["start", "--config"])
        .arg(&file)
        .env("KADMQ_MQTT", format!("127.0.0.1:{env_port}"))
        .args(["--mqtt", &format!("127.0.0.1:{flag_port}")]);
    assert_listens_on(command, flag_port, env_port);
}

#[test]
fn bad_configuration_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kadmq.toml");
    std::fs::write(&file, "[mqtt]\nmax_queue = 5\n").unwrap();
    let out = kadmq().args(["start", "--config"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_queue") && !stderr.contains("panicked"), "{stderr}");

    let out =
        kadmq().args(["start", "--receive-maximum", "0", "--data-dir"]).arg(dir.path().join("d")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("receive_maximum") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = kadmq()
        .args(["start", "--no-ws", "--mqtt", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{stderr}");
}

#[test]
fn keygen_writes_a_cluster_key_and_will_not_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    let out = kadmq().args(["keygen", "--out"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = std::fs::read_to_string(&key).unwrap();
    assert!(kadmq_dht::driver::parse_cluster_key(&first).is_ok(), "{first}");

    let out = kadmq().args(["keygen", "--out"]).arg(&key).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), first, "kept");

    let out = kadmq().args(["keygen", "--force", "--out"]).arg(&key).output().unwrap();
    assert!(out.status.success());
    assert_ne!(std::fs::read_to_string(&key).unwrap(), first, "replaced");
}

#[test]
fn id_is_stable_for_a_data_dir_and_the_broker_still_starts_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let id = |extra: &[&str]| {
        let out = kadmq().args(["id", "--data-dir"]).arg(&data).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let peer = id(&[]);
    assert!(peer.starts_with("12D3Koo"), "{peer}");
    assert_eq!(id(&[]), peer, "same data dir, same peer id");
    let addr = id(&["--p2p-listen", "/ip4/127.0.0.1/tcp/7001"]);
    assert_eq!(addr, format!("/ip4/127.0.0.1/tcp/7001/p2p/{peer}"));

    // The node key shares the data directory with the store.
    let port = free_port();
    let mut command = kadmq();
    command.args(["start", "--no-ws", "--mqtt", &format!("127.0.0.1:{port}"), "--data-dir"]).arg(&data);
    assert_listens_on(command, port, free_port());
}
