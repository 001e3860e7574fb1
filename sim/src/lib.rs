//! # kadmq-sim
//!
//! A discrete-event simulator that runs thousands of virtual kadmq nodes on
//! the real routing core of `kadmq-dht`, on a virtual network and clock.
//! It holds no routing logic of its own: what it measures is what the fleet
//! runs.
//!
//! # Layout
//!
//! - [`engine`]: the virtual clock and the event queue (deterministic ties).
//! - [`dice`]: the seeded random numbers every choice of a run comes from.
//! - [`network`]: latency distributions, loss, partitions, per-link order, counters.
//! - [`scenario`]: scenario files (TOML) and `--set` overrides.
//! - [`workload`]: the Zipf-skewed topic tree, filters with wildcards and `$share` groups.
//! - [`oracle`]: the global subscription table every delivery is checked against.
//! - [`fleet`]: the adapter: one core `Node` per virtual member, churn and partitions.
//! - [`report`]: figures, the stdout table, JSON/CSV outputs; [`plot`]: SVG plots.
//!
//! A run: [`Scenario::load`] → [`fleet::Simulation::new`] → `run` →
//! [`report::Report::from_outcome`]. The same scenario and seed give the
//! same report, byte for byte.

pub mod dice;
pub mod engine;
pub mod fleet;
pub mod network;
pub mod oracle;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod workload;

pub use fleet::{Outcome, Simulation};
pub use report::Report;
pub use scenario::Scenario;

/// Runs a scenario to the end.
pub fn run(scenario: Scenario) -> (Report, Outcome) {
    let outcome = Simulation::new(scenario).run();
    (Report::from_outcome(&outcome), outcome)
}
