//! `kadmq-sim`: runs a scenario file and prints (and optionally writes) the report.

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kadmq_sim::{report, Report, Scenario, Simulation};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "kadmq-sim", version, about = "Simulate a kadmq fleet on the real routing core")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario file.
    Run(RunArgs),
    /// Print a scenario with every default filled in.
    Show {
        scenario: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The scenario (TOML), e.g. sim/scenarios/small.toml.
    scenario: PathBuf,
    /// Seed of the run (overrides `seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Write report.json, CSV series and SVG plots here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Overrides `fleet.nodes`.
    #[arg(long)]
    nodes: Option<usize>,
    /// Overrides `subscriptions.count`.
    #[arg(long)]
    subscriptions: Option<usize>,
    /// Overrides `publishes.count`.
    #[arg(long)]
    publishes: Option<usize>,
    /// Overrides `fleet.replication`.
    #[arg(long)]
    replication: Option<usize>,
    /// Overrides `fleet.shard_depth`.
    #[arg(long)]
    shard_depth: Option<usize>,
    /// Overrides `fleet.ownership` (xor or ring).
    #[arg(long)]
    ownership: Option<String>,
    /// Overrides `fleet.vnodes`.
    #[arg(long)]
    vnodes: Option<u32>,
    /// Any scenario key, e.g. `--set churn.crash=0.01 --set network.loss=0.001`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

impl RunArgs {
    fn overrides(&self) -> Vec<String> {
        let mut o = Vec::new();
        let mut put = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                o.push(format!("{key}={v}"));
            }
        };
        put("seed", self.seed.map(|v| v.to_string()));
        put("fleet.nodes", self.nodes.map(|v| v.to_string()));
        put("subscriptions.count", self.subscriptions.map(|v| v.to_string()));
        put("publishes.count", self.publishes.map(|v| v.to_string()));
        put("fleet.replication", self.replication.map(|v| v.to_string()));
        put("fleet.shard_depth", self.shard_depth.map(|v| v.to_string()));
        put("fleet.ownership", self.ownership.as_ref().map(|v| format!("\"{v}\"")));
        put("fleet.vnodes", self.vnodes.map(|v| v.to_string()));
        o.extend(self.set.iter().cloned());
        o
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Show { scenario, set } => {
            let s = Scenario::load(&scenario, &set)?;
            print!("{}", toml::to_string_pretty(&s)?);
            Ok(())
        }
        Command::Run(args) => run(args),
    }
}

/// Peak and current resident memory (kB) from /proc/self/status.
fn memory_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let scenario = Scenario::load(&args.scenario, &args.overrides())?;
    // The seed goes to stderr first, so a crashed run can be replayed.
    eprintln!("kadmq-sim: scenario {} seed {}", scenario.name, scenario.seed);
    let started = Instant::now();
    let (_, rss_before) = memory_kb();
    let nodes = scenario.fleet.nodes;
    let mut sim = Simulation::new(scenario);
    let (_, rss_built) = memory_kb();
    let setup_s = started.elapsed().as_secs_f64();
    let end = sim.end_ms();
    let bar = ProgressBar::new(end);
    if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} virtual ms {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let step = (end / 200).max(1);
    let mut t = 0;
    while t < end {
        t = (t + step).min(end);
        sim.run_until(t);
        // Only shown once the run has taken a few seconds.
        if started.elapsed().as_secs() >= 3 {
            bar.set_position(t);
            bar.set_message(format!("{} live nodes", sim.live_nodes()));
        }
    }
    bar.finish_and_clear();
    let outcome = sim.finish();
    let report = Report::from_outcome(&outcome);
    let wall = started.elapsed().as_secs_f64();
    let (peak_kb, _) = memory_kb();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    let perf = serde_json::json!({
        "wall_seconds": wall,
        "setup_seconds": setup_s,
        "events": outcome.events,
        "events_per_second": outcome.events as f64 / wall,
        "peak_rss_mib": peak_kb as f64 / 1024.0,
        "rss_after_fleet_built_mib": rss_built as f64 / 1024.0,
        "bytes_per_node_at_build": (rss_built.saturating_sub(rss_before) * 1024) as f64 / nodes as f64,
    });
    // Wall-clock figures are not part of the deterministic report.
    eprintln!(
        "kadmq-sim: {:.1} s wall, {} events ({:.0}/s), peak RSS {:.0} MiB, ~{:.0} B/node at build",
        wall,
        outcome.events,
        outcome.events as f64 / wall,
        peak_kb as f64 / 1024.0,
        perf["bytes_per_node_at_build"].as_f64().unwrap_or(0.0)
    );
    if let Some(dir) = &args.out {
        report::write_outputs(dir, &report, &outcome).with_context(|| format!("writing {}", dir.display()))?;
        std::fs::write(dir.join("perf.json"), serde_json::to_string_pretty(&perf)? + "\n")?;
        eprintln!("kadmq-sim: wrote {}", dir.display());
    }
    Ok(())
}
