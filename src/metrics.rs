//! Prometheus figures: the one shape every part of the node reports its
//! counters and gauges in, and their text exposition.
//!
//! Job: a [`Figure`] type and [`render`] (text format 0.0.4). Boundary:
//! what the figures are is up to their owners (`crate::http` for the
//! broker's, `crate::cluster::metrics` for the cluster's); no HTTP here.

use std::fmt::Write;

/// One figure: Prometheus name, type, help and value.
pub struct Figure {
    pub name: &'static str,
    pub kind: &'static str,
    pub help: &'static str,
    pub value: u64,
    /// One label (name, value) for a series of a labelled metric.
    pub label: Option<(&'static str, &'static str)>,
}

impl Figure {
    /// An unlabelled figure.
    pub fn new(name: &'static str, kind: &'static str, help: &'static str, value: u64) -> Figure {
        Figure { name, kind, help, value, label: None }
    }
}

/// Appends `figures` to `out` in the text exposition format. The series of
/// a labelled metric must follow each other: they get one HELP and TYPE.
pub fn render(out: &mut String, figures: impl IntoIterator<Item = Figure>) {
    let mut last = "";
    for f in figures {
        if f.name != last {
            let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", f.name, f.help, f.name, f.kind);
            last = f.name;
        }
        match f.label {
            Some((key, value)) => {
                let _ = writeln!(out, "{}{{{key}=\"{value}\"}} {}", f.name, f.value);
            }
            None => {
                let _ = writeln!(out, "{} {}", f.name, f.value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_labelled_metric_gets_one_help_line_for_its_series() {
        let mut out = String::new();
        let labelled = |value| Figure { label: Some(("reason", value)), ..Figure::new("x_total", "counter", "X.", 1) };
        render(&mut out, [Figure::new("up", "gauge", "Up.", 1), labelled("a"), labelled("b")]);
        assert_eq!(
            out,
            "# HELP up Up.\n# TYPE up gauge\nup 1\n# HELP x_total X.\n# TYPE x_total counter\n\
             x_total{reason=\"a\"} 1\nx_total{reason=\"b\"} 1\n"
        );
    }
}
