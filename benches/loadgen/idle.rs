//! `--mode idle`: many connections that hold one subscription each and
//! publish nothing, for measuring what an idle connection costs a broker.
//!
//! It opens `--connections` clients (at most [`CONNECTING`] handshakes at a
//! time), each subscribed to its own topic, prints one JSON line
//! `{"idle_ready": N, "connect_s": T}` once every one is subscribed (a
//! script reads the broker's memory then), holds them for `--hold` seconds
//! (sending PINGREQ every half keep-alive when `--keep-alive` is set), and
//! closes them. Each client keeps small buffers, so 15,000 fit in one
//! process.

use crate::conn::Conn;
use anyhow::{bail, Context, Result};
use kadmq::protocol::{Packet, QoS, Version};
use std::io::Write;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Handshakes under way at once (a burst of thousands of SYNs overflows a
/// listener's backlog).
const CONNECTING: usize = 256;
/// Read and write buffer of each idle client.
const BUFFER: usize = 256;

pub struct IdleConfig {
    pub addrs: Vec<String>,
    pub connections: u32,
    pub qos: QoS,
    pub version: Version,
    pub keep_alive: u16,
    pub hold: Duration,
    pub deadline: Instant,
    pub topic_base: String,
    pub run_id: String,
}

/// What an idle run saw.
#[derive(Debug, serde::Serialize)]
pub struct IdleReport {
    pub mode: &'static str,
    pub connections: u32,
    pub connect_s: f64,
    pub held_s: f64,
    /// Connections the broker closed (or that failed) while held.
    pub closed_early: u32,
    pub errors: Vec<String>,
}

pub async fn run(cfg: IdleConfig) -> Result<IdleReport> {
    let started = Instant::now();
    let gate = std::sync::Arc::new(Semaphore::new(CONNECTING));
    let mut connecting = JoinSet::new();
    for i in 0..cfg.connections {
        let addr = cfg.addrs[i as usize % cfg.addrs.len()].clone();
        let client_id = format!("lg-{}-i{i}", cfg.run_id);
        let filter = format!("{}/idle/{i}", cfg.topic_base);
        let (gate, version, keep_alive, qos) = (gate.clone(), cfg.version, cfg.keep_alive, cfg.qos);
        connecting.spawn(async move {
            let _turn = gate.acquire_owned().await.expect("the gate is never closed");
            let mut conn = Conn::connect(&addr, client_id, version, keep_alive, BUFFER).await?;
            conn.subscribe(&filter, qos).await?;
            anyhow::Ok(conn)
        });
    }
    let mut conns = Vec::with_capacity(cfg.connections as usize);
    loop {
        match tokio::time::timeout_at(cfg.deadline, connecting.join_next()).await {
            Err(_) => bail!("connect: {} of {} idle clients before the duration limit", conns.len(), cfg.connections),
            Ok(None) => break,
            Ok(Some(joined)) => conns.push(joined.context("connect task")?.context("connect: idle client")?),
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{{\"idle_ready\":{},\"connect_s\":{connect_s:.3}}}", conns.len())?;
    out.flush()?;
    drop(out);

    let held_from = Instant::now();
    let until = (held_from + cfg.hold).min(cfg.deadline);
    let ping_every = (cfg.keep_alive > 0).then(|| Duration::from_secs(u64::from(cfg.keep_alive)) / 2);
    let mut holding = JoinSet::new();
    for conn in conns {
        holding.spawn(hold(conn, until, ping_every));
    }
    let mut closed_early = 0;
    let mut errors = Vec::new();
    while let Some(joined) = holding.join_next().await {
        if let Err(err) = joined.context("idle task")? {
            closed_early += 1;
            if errors.len() < 10 {
                errors.push(format!("idle client: {err:#}"));
            }
        }
    }
    Ok(IdleReport {
        mode: "idle",
        connections: cfg.connections,
        connect_s,
        held_s: held_from.elapsed().as_secs_f64(),
        closed_early,
        errors,
    })
}

/// Holds `conn` open until `until`, answering nothing but reading what
/// comes (PINGRESP), pinging every `ping_every`; then says goodbye.
async fn hold(mut conn: Conn, until: Instant, ping_every: Option<Duration>) -> Result<()> {
    let mut next_ping = ping_every.map(|every| Instant::now() + every);
    loop {
        let wake = next_ping.map_or(until, |at| at.min(until));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= until {
                    conn.goodbye().await;
                    return Ok(());
                }
                conn.queue(&Packet::PingReq)?;
                conn.flush().await?;
                next_ping = ping_every.map(|every| Instant::now() + every);
            }
            packet = conn.read_packet() => {
                match packet? {
                    Packet::PingResp => {}
                    other => bail!("{}: unexpected {}", conn.client_id, other.name()),
                }
            }
        }
    }
}
