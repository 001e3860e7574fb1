//! `kadmq-loadgen`: an end-to-end MQTT load generator for any broker.
//!
//! Publishers and subscribers are raw tokio `TcpStream`s (TCP_NODELAY, batched
//! writes) speaking MQTT 3.1.1 or 5.0 through kadmq's own codec. Every payload
//! carries its send time and sequence number, so subscribers measure latency
//! (HDR histogram) and detect loss, duplicates and reordering. A run is
//! bounded by a message count and a hard time limit and stops by itself.
//!
//! ```text
//! kadmq-loadgen --pub-addrs 127.0.0.1:1883 --mode fan-in --publishers 8 \
//!     --qos 1 --messages 20000 --payload 64 --json
//! ```
//!
//! Modes (P publishers, S subscribers, M messages per publisher):
//! - `fan-in`: publisher i publishes on `<prefix>/<run>/in/<i>`; every
//!   subscriber holds `<prefix>/<run>/in/+`. Expected: P x M per subscriber.
//! - `fan-out`: all publishers publish on `<prefix>/<run>/out`, every
//!   subscriber holds it. Expected: P x M per subscriber.
//! - `pairs`: P pairs; publisher i and subscriber i share
//!   `<prefix>/<run>/pair/<i>` (S is taken to be P). Expected: M per subscriber.
//! - `idle`: `--connections` clients, each subscribed to its own topic, held
//!   `--hold` seconds, nothing published (what idle connections cost; see
//!   `idle.rs` and `benches/connections.sh`).
//!
//! Throughput is messages received (all subscribers) divided by the time
//! from the first send to the last receive.
//!
//! Exit status: 0 = run completed (loss is reported, not an error), 1 = could
//! not connect or subscribe, 3 = the run ended early (duration limit, broker
//! closed a connection); the report is printed in every case but 1.

mod conn;
mod idle;
mod payload;
mod publisher;
mod subscriber;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use conn::Conn;
use kadmq::protocol::{QoS, Version};
use publisher::{PubConfig, PubResult, Template};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subscriber::{SubConfig, SubResult};
use tokio::task::JoinSet;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    /// N publishers -> every subscriber (default 1) on one wildcard filter.
    FanIn,
    /// Every publisher (default 1) -> N subscribers on one topic.
    FanOut,
    /// N publisher/subscriber pairs, each pair on its own topic.
    Pairs,
    /// N idle connections, one subscription each (--connections, --hold).
    Idle,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::FanIn => "fan-in",
            Mode::FanOut => "fan-out",
            Mode::Pairs => "pairs",
            Mode::Idle => "idle",
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "kadmq-loadgen", version, about = "End-to-end MQTT load generator (any broker)")]
struct Args {
    /// Broker addresses for publishers, host:port[,...]; publishers take them in turn
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:1883")]
    pub_addrs: Vec<String>,
    /// Broker addresses for subscribers, host:port[,...] [default: --pub-addrs]
    #[arg(long, value_delimiter = ',')]
    sub_addrs: Vec<String>,
    /// Publisher connections (in pairs mode: the number of pairs)
    #[arg(long, default_value_t = 1)]
    publishers: u32,
    /// Subscriber connections (ignored in pairs mode)
    #[arg(long, default_value_t = 1)]
    subscribers: u32,
    #[arg(long, value_enum, default_value_t = Mode::FanIn)]
    mode: Mode,
    /// QoS of the PUBLISHes and of the subscriptions
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Messages per publisher
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Payload size in bytes (at least 20: time, sequence, publisher)
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Most unacknowledged QoS 1/2 messages per publisher
    #[arg(long, default_value_t = 100)]
    inflight: usize,
    /// Messages per second per publisher, 0 = as fast as possible
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Hard stop for the whole run, in seconds (connecting included)
    #[arg(long, default_value_t = 60.0)]
    duration_limit: f64,
    /// Seconds subscribers wait for missing messages after the publishers finish
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// MQTT protocol version: 3 (3.1.1) or 5
    #[arg(long, default_value = "3", value_parser = ["3", "5"])]
    mqtt_version: String,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
    /// Runtime worker threads [default: number of CPUs]
    #[arg(long)]
    threads: Option<usize>,
    /// First topic level; a random run id follows it
    #[arg(long, default_value = "kadmq-bench")]
    topic_prefix: String,
    /// Keep-alive in CONNECT, seconds (0: none). Only idle mode sends
    /// PINGREQ: otherwise give more than the run lasts (rumqttd refuses 0)
    #[arg(long, default_value_t = 0)]
    keep_alive: u16,
    /// Idle mode: connections to open and hold
    #[arg(long, default_value_t = 1_000)]
    connections: u32,
    /// Idle mode: seconds to hold them once all are subscribed
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
}

/// One run's result; `--json` prints it as is (serde_json writes a
/// non-finite figure as null).
#[derive(Debug, serde::Serialize)]
struct Report {
    mode: Mode,
    qos: u8,
    #[serde(rename = "mqtt_version")]
    version: &'static str,
    publishers: u32,
    subscribers: u32,
    messages_per_publisher: u64,
    payload: usize,
    rate_per_publisher: f64,
    sent: u64,
    completed: u64,
    rejected: u64,
    expected: u64,
    received: u64,
    unique: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    foreign: u64,
    elapsed_s: f64,
    #[serde(rename = "throughput_msg_s")]
    throughput: f64,
    #[serde(rename = "send_rate_msg_s")]
    send_rate: f64,
    #[serde(rename = "latency_p50_us")]
    p50_us: f64,
    #[serde(rename = "latency_p99_us")]
    p99_us: f64,
    #[serde(rename = "latency_p999_us")]
    p999_us: f64,
    #[serde(rename = "latency_max_us")]
    max_us: f64,
    #[serde(rename = "latency_mean_us")]
    mean_us: f64,
    errors: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.pub_addrs.is_empty() {
        bail!("--pub-addrs is empty");
    }
    if args.publishers == 0 || args.subscribers == 0 {
        bail!("--publishers and --subscribers must be at least 1");
    }
    if args.payload < payload::HEADER {
        bail!("--payload must be at least {} bytes", payload::HEADER);
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        bail!("--rate must be 0 or positive");
    }
    if args.duration_limit <= 0.0 || args.duration_limit.is_nan() || args.drain < 0.0 || args.drain.is_nan() {
        bail!("--duration-limit must be positive and --drain not negative");
    }
    payload::now_ns(); // start the shared clock
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.enable_all().build().context("starting the tokio runtime")?;
    if args.mode == Mode::Idle {
        return run_idle(&args, runtime);
    }
    let report = runtime.block_on(run(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    // Connections were closed inside `run`; don't wait for stray tasks.
    runtime.shutdown_timeout(Duration::from_millis(100));
    // The report is out either way; a script can tell a run that hit the
    // duration limit or lost its connection by the exit code.
    if !report.errors.is_empty() {
        std::process::exit(3);
    }
    Ok(())
}

/// `--mode idle`: prints the readiness line, then the report.
fn run_idle(args: &Args, runtime: tokio::runtime::Runtime) -> Result<()> {
    if args.connections == 0 || args.hold < 0.0 || !args.hold.is_finite() {
        bail!("--connections must be at least 1 and --hold not negative");
    }
    let run_id = format!("{:08x}", rand::random::<u32>());
    let cfg = idle::IdleConfig {
        addrs: args.pub_addrs.clone(),
        connections: args.connections,
        qos: QoS::from_u8(args.qos).expect("clap checked the range"),
        version: if args.mqtt_version == "5" { Version::V5 } else { Version::V311 },
        keep_alive: args.keep_alive,
        hold: Duration::from_secs_f64(args.hold),
        deadline: Instant::now() + Duration::from_secs_f64(args.duration_limit),
        topic_base: format!("{}/{run_id}", args.topic_prefix),
        run_id,
    };
    let report = runtime.block_on(idle::run(cfg))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "idle: {} connections subscribed in {:.3} s, held {:.1} s, {} closed early",
            report.connections, report.connect_s, report.held_s, report.closed_early
        );
        for e in &report.errors {
            println!("  error       {e}");
        }
    }
    runtime.shutdown_timeout(Duration::from_millis(100));
    if report.closed_early > 0 {
        std::process::exit(3);
    }
    Ok(())
}

async fn run(args: &Args) -> Result<Report> {
    let limit = Duration::from_secs_f64(args.duration_limit);
    let deadline = Instant::now() + limit;
    let qos = QoS::from_u8(args.qos).expect("clap checked the range");
    let version = if args.mqtt_version == "5" { Version::V5 } else { Version::V311 };
    let sub_addrs = if args.sub_addrs.is_empty() { &args.pub_addrs } else { &args.sub_addrs };
    let publishers = args.publishers;
    let subscribers = if args.mode == Mode::Pairs { publishers } else { args.subscribers };
    let run_id = format!("{:08x}", rand::random::<u32>());
    let base = format!("{}/{run_id}", args.topic_prefix);
    let pub_topic = |i: u32| match args.mode {
        Mode::FanIn => format!("{base}/in/{i}"),
        Mode::FanOut | Mode::Idle => format!("{base}/out"),
        Mode::Pairs => format!("{base}/pair/{i}"),
    };
    let sub_filter = |i: u32| match args.mode {
        Mode::FanIn => format!("{base}/in/+"),
        Mode::FanOut | Mode::Idle => format!("{base}/out"),
        Mode::Pairs => format!("{base}/pair/{i}"),
    };
    let expected_per_sub = match args.mode {
        Mode::FanIn | Mode::FanOut | Mode::Idle => publishers as u64 * args.messages,
        Mode::Pairs => args.messages,
    };
    let keep_alive = args.keep_alive;
    let templates = (0..publishers)
        .map(|i| Template::new(&pub_topic(i), qos, args.payload, version))
        .collect::<Result<Vec<_>>>()?;

    // Subscribers first, each subscribed before any publisher connects.
    let mut set = JoinSet::new();
    for i in 0..subscribers {
        let addr = sub_addrs[i as usize % sub_addrs.len()].clone();
        let filter = sub_filter(i);
        let client_id = format!("lg-{run_id}-s{i}");
        set.spawn(async move {
            let mut conn = Conn::connect(&addr, client_id, version, keep_alive, 64 * 1024).await?;
            conn.subscribe(&filter, qos).await?;
            anyhow::Ok((i, conn))
        });
    }
    let mut sub_conns = collect_conns(set, deadline, "subscribers").await?;
    let mut set = JoinSet::new();
    for i in 0..publishers {
        let addr = args.pub_addrs[i as usize % args.pub_addrs.len()].clone();
        let client_id = format!("lg-{run_id}-p{i}");
        set.spawn(
            async move { anyhow::Ok((i, Conn::connect(&addr, client_id, version, keep_alive, 64 * 1024).await?)) },
        );
    }
    let mut pub_conns = collect_conns(set, deadline, "publishers").await?;
    sub_conns.sort_by_key(|(i, _)| *i);
    pub_conns.sort_by_key(|(i, _)| *i);

    // Go.
    let publishers_done_ns = Arc::new(AtomicU64::new(0));
    let mut sub_tasks = JoinSet::new();
    for (_, conn) in sub_conns {
        let cfg = SubConfig {
            expected: expected_per_sub,
            publishers,
            messages: args.messages,
            deadline,
            drain: Duration::from_secs_f64(args.drain),
            publishers_done_ns: publishers_done_ns.clone(),
        };
        sub_tasks.spawn(subscriber::run(conn, cfg));
    }
    let mut pub_tasks = JoinSet::new();
    for ((i, conn), template) in pub_conns.into_iter().zip(templates) {
        let cfg =
            PubConfig { index: i, qos, messages: args.messages, inflight: args.inflight, rate: args.rate, deadline };
        pub_tasks.spawn(publisher::run(conn, cfg, template));
    }
    let mut pub_results: Vec<PubResult> = Vec::new();
    let mut goodbyes = JoinSet::new();
    while let Some(joined) = pub_tasks.join_next().await {
        let (result, conn) = joined.context("publisher task")?;
        pub_results.push(result);
        goodbyes.spawn(conn.goodbye());
    }
    publishers_done_ns.store(payload::now_ns().max(1), Ordering::Release);
    let mut sub_results: Vec<SubResult> = Vec::new();
    while let Some(joined) = sub_tasks.join_next().await {
        let (result, conn) = joined.context("subscriber task")?;
        sub_results.push(result);
        goodbyes.spawn(conn.goodbye());
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while goodbyes.join_next().await.is_some() {} }).await;

    Ok(summarise(args, version, subscribers, expected_per_sub, pub_results, sub_results))
}

/// Waits for all connection tasks, failing on the first error or at the deadline.
async fn collect_conns(
    mut set: JoinSet<Result<(u32, Conn)>>,
    deadline: Instant,
    what: &str,
) -> Result<Vec<(u32, Conn)>> {
    let mut conns = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Err(_) => bail!("connect: {what} not connected before the duration limit"),
            Ok(None) => return Ok(conns),
            Ok(Some(joined)) => {
                let conn = joined.context("connect task")?.with_context(|| format!("connect: {what}"))?;
                conns.push(conn);
            }
        }
    }
}

fn summarise(
    args: &Args,
    version: Version,
    subscribers: u32,
    expected_per_sub: u64,
    pubs: Vec<PubResult>,
    subs: Vec<SubResult>,
) -> Report {
    let mut latency = subscriber::new_histogram();
    let mut errors = Vec::new();
    for p in &pubs {
        errors.extend(p.error.iter().map(|e| format!("publisher: {e}")));
    }
    for s in &subs {
        latency.add(&s.latency).expect("same histogram bounds");
        errors.extend(s.error.iter().map(|e| format!("subscriber: {e}")));
    }
    let sum = |f: &dyn Fn(&SubResult) -> u64| subs.iter().map(f).sum::<u64>();
    let expected = expected_per_sub * subscribers as u64;
    let unique = sum(&|s| s.unique);
    let received = sum(&|s| s.received);
    let first_send = pubs.iter().filter_map(|p| p.first_send_ns).min();
    let last_send = pubs.iter().filter_map(|p| p.last_send_ns).max();
    let last_receive = subs.iter().filter_map(|s| s.last_receive_ns).max();
    let sent: u64 = pubs.iter().map(|p| p.sent).sum();
    let elapsed_s = match (first_send, last_receive) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => 0.0,
    };
    let send_rate = match (first_send, last_send) {
        (Some(a), Some(b)) if b > a => sent as f64 / ((b - a) as f64 / 1e9),
        _ => 0.0,
    };
    let us = |ns: u64| ns as f64 / 1000.0;
    let empty = latency.is_empty();
    let q = |quantile: f64| if empty { 0.0 } else { us(latency.value_at_quantile(quantile)) };
    Report {
        mode: args.mode,
        qos: args.qos,
        version: if version == Version::V5 { "5" } else { "3.1.1" },
        publishers: args.publishers,
        subscribers,
        messages_per_publisher: args.messages,
        payload: args.payload,
        rate_per_publisher: args.rate,
        sent,
        completed: pubs.iter().map(|p| p.completed).sum(),
        rejected: pubs.iter().map(|p| p.rejected).sum(),
        expected,
        received,
        unique,
        lost: expected.saturating_sub(unique),
        duplicates: sum(&|s| s.duplicates),
        reordered: sum(&|s| s.reordered),
        foreign: sum(&|s| s.foreign),
        elapsed_s,
        throughput: if elapsed_s > 0.0 { received as f64 / elapsed_s } else { 0.0 },
        send_rate,
        p50_us: q(0.5),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: if empty { 0.0 } else { us(latency.max()) },
        mean_us: if empty { 0.0 } else { latency.mean() / 1000.0 },
        errors,
    }
}

fn print_text(r: &Report) {
    println!(
        "{} QoS {} MQTT {}: {} publisher(s) -> {} subscriber(s), {} msg/publisher, {} B{}",
        r.mode.name(),
        r.qos,
        r.version,
        r.publishers,
        r.subscribers,
        r.messages_per_publisher,
        r.payload,
        if r.rate_per_publisher > 0.0 { format!(", {} msg/s/publisher", r.rate_per_publisher) } else { String::new() }
    );
    println!("  sent        {} (acknowledged {}, rejected {})", r.sent, r.completed, r.rejected);
    println!(
        "  received    {} of {} expected: lost {}, duplicates {}, reordered {}, foreign {}",
        r.received, r.expected, r.lost, r.duplicates, r.reordered, r.foreign
    );
    println!(
        "  throughput  {:.0} msg/s received ({:.3} s first send to last receive); sent at {:.0} msg/s",
        r.throughput, r.elapsed_s, r.send_rate
    );
    println!(
        "  latency     p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us, mean {:.1} us",
        r.p50_us, r.p99_us, r.p999_us, r.max_us, r.mean_us
    );
    for e in &r.errors {
        println!("  error       {e}");
    }
}
