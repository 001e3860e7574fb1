//! The report: what a run measured, as figures people and tools can read.
//!
//! [`Report::from_outcome`] reduces an [`Outcome`] to the figures the
//! design asks for (delivery against the oracle in steady state and while
//! disturbed, route entries per node against a fully replicated table,
//! lookups and cache hits, wire traffic per publish and per subscribe,
//! entries moved per join/leave against the ideal, time to re-converge).
//! It holds no wall-clock time and iterates nothing in hash order, so the
//! same seed gives the same bytes. [`write_outputs`] writes report.json,
//! CSV series and SVG plots.
//!
//! Boundary: arithmetic and formatting over an outcome; no simulation.

use crate::fleet::{Disturbance, DisturbanceRecord, Outcome};
use crate::network::{kind_name, FORWARD, KINDS};
use anyhow::Context;
use kadmq_dht::core::{Counters, FrameKind};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Delivery {
    pub publishes: u64,
    /// Node-level deliveries the oracle expected (one per matching node,
    /// plus one per matching shared group).
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Not delivered to a subscription younger than `report.fresh_ms` at
    /// publish time (a publish racing a subscribe elsewhere): not counted
    /// in `expected` or `lost`.
    pub missed_fresh: u64,
    /// Deliveries beyond the first to the same node (or group).
    pub duplicates: u64,
    /// Deliveries the oracle did not expect.
    pub unexpected: u64,
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CauseDelivery {
    pub cause: &'static str,
    pub delivery: Delivery,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Distribution {
    pub mean: f64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub max_over_mean: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RouteTable {
    /// Distinct (filter, group, node) entries: what each node would hold
    /// if the table were fully replicated.
    pub full_table: u64,
    pub shards: usize,
    /// Entries owned per live node.
    pub per_node: Distribution,
    /// Mean entries per node / full table (R/N would be perfect sharding).
    pub mean_fraction_of_full: f64,
    pub ideal_fraction: f64,
    /// Nodes owning no entries.
    pub idle_nodes: usize,
    pub cache_entries_per_node: f64,
    /// Audits at which some publisher cached a shard whose entry count
    /// differed from the oracle's, while no disturbance was open.
    pub steady_audits_with_stale_cache: usize,
    pub steady_audits: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Lookups {
    pub remote_lookups_per_publish: f64,
    /// Shard reads served by the cache / (cache hits + misses).
    pub cache_hit_rate: f64,
    /// Shard reads served from shards the publisher owns itself.
    pub owned_reads: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub lookups_failed: u64,
    pub lookup_retries: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KindTraffic {
    pub kind: &'static str,
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Wire {
    pub per_kind: Vec<KindTraffic>,
    /// Lookups, replies, unwatches and forwards per publish.
    pub messages_per_publish: f64,
    pub bytes_per_publish: f64,
    /// Non-replacing asserts and deltas per subscription made.
    pub messages_per_subscribe: f64,
    pub bytes_per_subscribe: f64,
    pub lost: u64,
    pub cut_by_partition: u64,
    pub to_dead_nodes: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Movement {
    pub kind: &'static str,
    pub events: usize,
    /// Entries re-asserted (full-shard asserts) after these events, per event.
    pub entries_per_event: f64,
    /// The same as a fraction of the R-replicated table (ideal: 1/N).
    pub fraction: f64,
    pub ideal_fraction: f64,
    pub ratio_to_ideal: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Convergence {
    pub kind: &'static str,
    pub events: usize,
    pub converged: usize,
    pub mean_ms: f64,
    pub max_ms: u64,
}

/// The figures of one run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes_initial: usize,
    pub nodes_final: usize,
    pub nodes_created: usize,
    pub replication: usize,
    pub shard_depth: usize,
    pub ownership: String,
    pub subscriptions: u64,
    pub virtual_ms: u64,
    pub events: u64,
    pub delivery_total: Delivery,
    pub delivery_steady: Delivery,
    pub delivery_disturbed: Delivery,
    /// Disturbed publishes by cause: the latest disturbance open when they
    /// were made, else the first that started while they were in flight.
    pub delivery_by_cause: Vec<CauseDelivery>,
    pub route_table: RouteTable,
    pub lookups: Lookups,
    pub wire: Wire,
    pub movement: Vec<Movement>,
    pub convergence: Vec<Convergence>,
    pub disturbances: Vec<DisturbanceRecord>,
    pub core_counters: Counters,
    pub core_errors: u64,
    pub subscriptions_skipped: u64,
}

/// One point of the time series.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SeriesPoint {
    pub t_ms: u64,
    pub publishes: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub delivery_ratio: f64,
    pub publish_messages: u64,
    pub messages_per_publish: f64,
    pub all_messages: u64,
    pub replicas_consistent: f64,
    /// Cached shards whose entry count differs from the oracle's (last audit).
    pub cached_stale: u64,
    pub live_nodes: usize,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

fn tally(d: &mut Delivery, m: &crate::fleet::MsgRecord, fresh_ms: u64) {
    d.publishes += 1;
    let got = m.plain_got.iter().chain(&m.shared_got);
    let since = m.expected.plain_since.iter().chain(&m.expected.shared_since);
    for (&got, &since) in got.zip(since) {
        if got > 0 {
            d.expected += 1;
            d.delivered += 1;
            d.duplicates += got as u64 - 1;
        } else if since + fresh_ms > m.at {
            d.missed_fresh += 1;
        } else {
            d.expected += 1;
            d.lost += 1;
        }
    }
    d.unexpected += m.unexpected as u64;
}

fn close(mut d: Delivery) -> Delivery {
    d.ratio = if d.expected == 0 { 1.0 } else { d.delivered as f64 / d.expected as f64 };
    d
}

pub fn distribution(values: &[u64]) -> Distribution {
    if values.is_empty() {
        return Distribution::default();
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let mean = sorted.iter().sum::<u64>() as f64 / sorted.len() as f64;
    let at = |q: f64| sorted[((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)];
    let max = *sorted.last().expect("non-empty");
    Distribution { mean, p50: at(0.5), p99: at(0.99), max, max_over_mean: ratio(max as f64, mean) }
}

fn is_publish_kind(k: usize) -> bool {
    k == FORWARD || matches!(FrameKind::ALL[k], FrameKind::Lookup | FrameKind::LookupReply | FrameKind::Unwatch)
}

impl Report {
    pub fn from_outcome(o: &Outcome) -> Report {
        let s = &o.scenario;
        let (mut total, mut steady, mut disturbed) = (Delivery::default(), Delivery::default(), Delivery::default());
        let fresh = s.report.fresh_ms;
        let mut by_cause: Vec<Delivery> = vec![Delivery::default(); Disturbance::ALL.len()];
        for m in &o.msgs {
            tally(&mut total, m, fresh);
            tally(if m.steady { &mut steady } else { &mut disturbed }, m, fresh);
            if let (false, Some(cause)) = (m.steady, m.cause) {
                tally(&mut by_cause[cause as usize], m, fresh);
            }
        }
        let delivery_by_cause = Disturbance::ALL
            .into_iter()
            .zip(by_cause)
            .filter(|(_, d)| d.publishes > 0)
            .map(|(cause, d)| CauseDelivery { cause: cause.name(), delivery: close(d) })
            .collect();
        let entries: Vec<u64> = o.gauges.iter().map(|g| g.entries_owned as u64).collect();
        let per_node = distribution(&entries);
        let live = o.gauges.len().max(1) as f64;
        let full = o.full_table_entries as f64;
        let route_table = RouteTable {
            full_table: o.full_table_entries,
            shards: o.shards,
            mean_fraction_of_full: ratio(per_node.mean, full),
            ideal_fraction: (s.fleet.replication as f64 / live).min(1.0),
            idle_nodes: entries.iter().filter(|&&e| e == 0).count(),
            cache_entries_per_node: o.gauges.iter().map(|g| g.cache_entries as f64).sum::<f64>() / live,
            steady_audits_with_stale_cache: o.audits.iter().filter(|a| a.steady && a.cached_stale > 0).count(),
            steady_audits: o.audits.iter().filter(|a| a.steady).count(),
            per_node,
        };
        let c = &o.counters;
        let lookups = Lookups {
            remote_lookups_per_publish: ratio(c.lookups_sent as f64, c.publishes as f64),
            cache_hit_rate: ratio(c.cache_hits as f64, (c.cache_hits + c.cache_misses) as f64),
            owned_reads: c.owned_reads,
            cache_hits: c.cache_hits,
            cache_misses: c.cache_misses,
            lookups_failed: c.lookups_failed,
            lookup_retries: c.lookup_retries,
        };
        let mut kinds = [(0u64, 0u64); KINDS];
        for b in &o.wire {
            for (k, kind) in kinds.iter_mut().enumerate() {
                kind.0 += b.messages[k];
                kind.1 += b.bytes[k];
            }
        }
        let sum_kinds = |pred: &dyn Fn(usize) -> bool| {
            (0..KINDS).filter(|&k| pred(k)).fold((0u64, 0u64), |(m, b), k| (m + kinds[k].0, b + kinds[k].1))
        };
        let (pub_m, pub_b) = sum_kinds(&is_publish_kind);
        // Subscription traffic: deltas, and asserts minus the re-assertions.
        let (delta_m, delta_b) = sum_kinds(&|k| k < FORWARD && FrameKind::ALL[k] == FrameKind::Delta);
        let assert_k = FrameKind::ALL.iter().position(|k| *k == FrameKind::Assert).expect("listed");
        let reasserts = c.reassertions;
        let assert_bytes_each = ratio(kinds[assert_k].1 as f64, kinds[assert_k].0 as f64);
        let sub_m = delta_m + kinds[assert_k].0.saturating_sub(reasserts);
        let sub_b = delta_b as f64 + kinds[assert_k].0.saturating_sub(reasserts) as f64 * assert_bytes_each;
        let publishes = o.msgs.len() as f64;
        let wire = Wire {
            per_kind: (0..KINDS)
                .map(|k| KindTraffic { kind: kind_name(k), messages: kinds[k].0, bytes: kinds[k].1 })
                .collect(),
            messages_per_publish: ratio(pub_m as f64, publishes),
            bytes_per_publish: ratio(pub_b as f64, publishes),
            messages_per_subscribe: ratio(sub_m as f64, o.subscribe_ops as f64),
            bytes_per_subscribe: ratio(sub_b, o.subscribe_ops as f64),
            lost: o.net_lost,
            cut_by_partition: o.net_cut,
            to_dead_nodes: o.net_to_dead,
        };
        let r = s.fleet.replication as f64;
        let movement = [Disturbance::Join, Disturbance::Leave, Disturbance::Crash]
            .into_iter()
            .map(|kind| {
                let events: Vec<&DisturbanceRecord> = o.disturbances.iter().filter(|d| d.kind == kind).collect();
                let n = events.len();
                let moved = o.moved[kind as usize] as f64;
                let per_event = ratio(moved, n as f64);
                // The R-replicated table at the time of each event, and the
                // ideal share one node holds of it (1/N, N after a join).
                let table: f64 = events.iter().map(|d| d.entries as f64 * r).sum::<f64>();
                let ideal: f64 = events
                    .iter()
                    .map(|d| if kind == Disturbance::Join { 1.0 / d.nodes as f64 } else { 1.0 / (d.nodes + 1) as f64 })
                    .sum::<f64>();
                let fraction = ratio(moved, table);
                let ideal_fraction = ratio(ideal, n as f64);
                Movement {
                    kind: kind.name(),
                    events: n,
                    entries_per_event: per_event,
                    fraction,
                    ideal_fraction,
                    ratio_to_ideal: ratio(fraction, ideal_fraction),
                }
            })
            .collect();
        let convergence = Disturbance::ALL
            .into_iter()
            .filter_map(|kind| {
                let events: Vec<&DisturbanceRecord> = o.disturbances.iter().filter(|d| d.kind == kind).collect();
                if events.is_empty() {
                    return None;
                }
                let times: Vec<u64> = events.iter().filter_map(|d| d.converged_at_ms.map(|t| t - d.at_ms)).collect();
                Some(Convergence {
                    kind: kind.name(),
                    events: events.len(),
                    converged: times.len(),
                    mean_ms: ratio(times.iter().sum::<u64>() as f64, times.len() as f64),
                    max_ms: times.iter().copied().max().unwrap_or(0),
                })
            })
            .collect();
        Report {
            scenario: s.name.clone(),
            seed: s.seed,
            nodes_initial: s.fleet.nodes,
            nodes_final: o.live_nodes,
            nodes_created: o.nodes_created,
            replication: s.fleet.replication,
            shard_depth: s.fleet.shard_depth,
            ownership: match s.fleet.ownership {
                crate::scenario::OwnershipKind::Xor => "xor".into(),
                crate::scenario::OwnershipKind::Ring => format!("ring/{}", s.fleet.vnodes),
            },
            subscriptions: o.subscribe_ops,
            virtual_ms: o.end_ms,
            events: o.events,
            delivery_total: close(total),
            delivery_steady: close(steady),
            delivery_disturbed: close(disturbed),
            delivery_by_cause,
            route_table,
            lookups,
            wire,
            movement,
            convergence,
            disturbances: if o.disturbances.len() <= 1_000 { o.disturbances.clone() } else { Vec::new() },
            core_counters: o.counters.clone(),
            core_errors: o.core_errors,
            subscriptions_skipped: o.subscriptions_skipped,
        }
    }

    /// The summary table printed on stdout.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let w = &mut t;
        let _ = writeln!(
            w,
            "scenario {} (seed {}): {} nodes -> {} live ({} created), R={}, depth={}, {}",
            self.scenario,
            self.seed,
            self.nodes_initial,
            self.nodes_final,
            self.nodes_created,
            self.replication,
            self.shard_depth,
            self.ownership
        );
        let _ = writeln!(
            w,
            "{} subscriptions, {} publishes, {:.1} s virtual, {} events",
            self.subscriptions,
            self.delivery_total.publishes,
            self.virtual_ms as f64 / 1000.0,
            self.events
        );
        let _ = writeln!(w, "\ndelivery        publishes   expected  delivered       lost  duplicate  unexpected     ratio  missed-fresh");
        for (name, d) in [
            ("steady", &self.delivery_steady),
            ("disturbed", &self.delivery_disturbed),
            ("total", &self.delivery_total),
        ] {
            let _ = writeln!(
                w,
                "  {:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>9.5} {:>13}",
                name, d.publishes, d.expected, d.delivered, d.lost, d.duplicates, d.unexpected, d.ratio, d.missed_fresh
            );
        }
        for c in &self.delivery_by_cause {
            let d = &c.delivery;
            let _ = writeln!(
                w,
                "    {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>9.5} {:>13}",
                c.cause,
                d.publishes,
                d.expected,
                d.delivered,
                d.lost,
                d.duplicates,
                d.unexpected,
                d.ratio,
                d.missed_fresh
            );
        }
        let rt = &self.route_table;
        let _ = writeln!(
            w,
            "\nroute entries per node: mean {:.1}  p50 {}  p99 {}  max {}  max/mean {:.2}  (full table {}, {} shards)",
            rt.per_node.mean,
            rt.per_node.p50,
            rt.per_node.p99,
            rt.per_node.max,
            rt.per_node.max_over_mean,
            rt.full_table,
            rt.shards
        );
        let _ = writeln!(
            w,
            "  mean/full {:.5} (ideal R/N {:.5}), idle nodes {}, cache entries per node {:.1}; steady audits with a stale cached shard: {} of {}",
            rt.mean_fraction_of_full,
            rt.ideal_fraction,
            rt.idle_nodes,
            rt.cache_entries_per_node,
            rt.steady_audits_with_stale_cache,
            rt.steady_audits
        );
        let l = &self.lookups;
        let _ = writeln!(
            w,
            "lookups: {:.4} remote per publish, cache hit rate {:.4}, failed {}, retries {}",
            l.remote_lookups_per_publish, l.cache_hit_rate, l.lookups_failed, l.lookup_retries
        );
        let c = &self.core_counters;
        let _ = writeln!(
            w,
            "splits: {} shards split by an owner ({} adoptions by other owners), {} filters moved to child shards",
            c.splits, c.splits_adopted, c.filters_moved
        );
        let wi = &self.wire;
        let _ = writeln!(
            w,
            "wire: {:.2} msgs / {:.0} B per publish, {:.2} msgs / {:.0} B per subscribe; lost {}, cut {}, to dead {}",
            wi.messages_per_publish,
            wi.bytes_per_publish,
            wi.messages_per_subscribe,
            wi.bytes_per_subscribe,
            wi.lost,
            wi.cut_by_partition,
            wi.to_dead_nodes
        );
        let _ = write!(w, "  by kind:");
        for k in &wi.per_kind {
            if k.messages > 0 {
                let _ = write!(w, " {} {}/{}B", k.kind, k.messages, k.bytes);
            }
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "movement        events   entries/event   fraction   ideal 1/N   ratio");
        for m in &self.movement {
            if m.events > 0 {
                let _ = writeln!(
                    w,
                    "  {:<12} {:>6} {:>15.1} {:>10.5} {:>11.5} {:>7.2}",
                    m.kind, m.events, m.entries_per_event, m.fraction, m.ideal_fraction, m.ratio_to_ideal
                );
            }
        }
        let _ = writeln!(w, "re-convergence  events  converged   mean ms   max ms");
        for c in &self.convergence {
            let _ =
                writeln!(w, "  {:<12} {:>6} {:>10} {:>9.0} {:>8}", c.kind, c.events, c.converged, c.mean_ms, c.max_ms);
        }
        if self.core_errors > 0 {
            let _ = writeln!(w, "core errors: {}", self.core_errors);
        }
        t
    }
}

/// The time series, one point per `report.sample_ms`.
pub fn series(o: &Outcome) -> Vec<SeriesPoint> {
    let step = o.scenario.report.sample_ms;
    let buckets = (o.end_ms / step) as usize + 1;
    let mut points: Vec<SeriesPoint> =
        (0..buckets).map(|b| SeriesPoint { t_ms: b as u64 * step, ..SeriesPoint::default() }).collect();
    for m in &o.msgs {
        let p = &mut points[((m.at / step) as usize).min(buckets - 1)];
        let mut d = Delivery::default();
        tally(&mut d, m, o.scenario.report.fresh_ms);
        p.publishes += 1;
        p.expected += d.expected;
        p.delivered += d.delivered;
        p.lost += d.lost;
        p.duplicates += d.duplicates;
    }
    for (b, w) in o.wire.iter().enumerate().take(buckets) {
        points[b].publish_messages = (0..KINDS).filter(|&k| is_publish_kind(k)).map(|k| w.messages[k]).sum();
        points[b].all_messages = w.messages.iter().sum();
    }
    for a in &o.audits {
        let p = &mut points[((a.at / step) as usize).min(buckets - 1)];
        p.replicas_consistent = if a.replicas == 0 { 1.0 } else { a.replicas_ok as f64 / a.replicas as f64 };
        p.live_nodes = a.live_nodes;
        p.cached_stale = a.cached_stale;
    }
    for p in &mut points {
        p.delivery_ratio = if p.expected == 0 { 1.0 } else { p.delivered as f64 / p.expected as f64 };
        p.messages_per_publish = ratio(p.publish_messages as f64, p.publishes as f64);
    }
    points
}

/// Writes report.json, series.csv, entries_per_node.csv and the SVG plots.
pub fn write_outputs(dir: &Path, report: &Report, o: &Outcome) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report)? + "\n";
    std::fs::write(dir.join("report.json"), json)?;
    let points = series(o);
    let mut csv = String::from(
        "t_ms,publishes,expected,delivered,lost,duplicates,delivery_ratio,publish_messages,messages_per_publish,all_messages,replicas_consistent,cached_stale,live_nodes\n",
    );
    for p in &points {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{:.6},{},{:.4},{},{:.6},{},{}",
            p.t_ms,
            p.publishes,
            p.expected,
            p.delivered,
            p.lost,
            p.duplicates,
            p.delivery_ratio,
            p.publish_messages,
            p.messages_per_publish,
            p.all_messages,
            p.replicas_consistent,
            p.cached_stale,
            p.live_nodes
        );
    }
    std::fs::write(dir.join("series.csv"), csv)?;
    let mut csv = String::from("entries_owned,shards_owned,cache_entries,local_filters\n");
    let mut gauges = o.gauges.clone();
    gauges.sort_by_key(|g| std::cmp::Reverse(g.entries_owned));
    for g in &gauges {
        let _ = writeln!(csv, "{},{},{},{}", g.entries_owned, g.shards_owned, g.cache_entries, g.local_filters);
    }
    std::fs::write(dir.join("entries_per_node.csv"), csv)?;
    let entries: Vec<u64> = o.gauges.iter().map(|g| g.entries_owned as u64).collect();
    crate::plot::histogram(
        &dir.join("entries_per_node.svg"),
        &format!("route entries per node ({})", report.scenario),
        &entries,
    )?;
    let t: Vec<f64> = points.iter().map(|p| p.t_ms as f64 / 1000.0).collect();
    let with_publishes: Vec<(f64, f64)> =
        points.iter().zip(&t).filter(|(p, _)| p.publishes > 0).map(|(p, &t)| (t, p.delivery_ratio)).collect();
    crate::plot::line(&dir.join("delivery_ratio.svg"), "delivered / expected", "time (s, virtual)", &with_publishes)?;
    let mpp: Vec<(f64, f64)> =
        points.iter().zip(&t).filter(|(p, _)| p.publishes > 0).map(|(p, &t)| (t, p.messages_per_publish)).collect();
    crate::plot::line(&dir.join("messages_per_publish.svg"), "messages per publish", "time (s, virtual)", &mpp)?;
    Ok(())
}
