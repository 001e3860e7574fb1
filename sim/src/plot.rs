//! SVG plots of a run (plotters, SVG backend only).
//!
//! Boundary: drawing given numbers; nothing is computed here.

use anyhow::anyhow;
use plotters::prelude::*;
use std::path::Path;

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

/// A histogram of `values` in about 40 bins.
pub fn histogram(path: &Path, title: &str, values: &[u64]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let bins = 40u64;
    let width = max.div_ceil(bins).max(1);
    let mut counts = vec![0u64; (max / width + 1) as usize];
    for &v in values {
        counts[(v / width) as usize] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..(counts.len() as u64 * width), 0u64..top + top / 10 + 1)
        .map_err(err)?;
    chart.configure_mesh().disable_x_mesh().x_desc("entries owned").y_desc("nodes").draw().map_err(err)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = i as u64 * width;
            Rectangle::new([(x0, 0), (x0 + width, c)], BLUE.mix(0.6).filled())
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A line through `points` (x ascending).
pub fn line(path: &Path, title: &str, x_desc: &str, points: &[(f64, f64)]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max);
    let y_min = points.iter().map(|p| p.1).fold(y_max, f64::min);
    let pad = ((y_max - y_min) * 0.1).max(0.01);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (y_min - pad).max(0.0)..y_max + pad)
        .map_err(err)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(title).draw().map_err(err)?;
    chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE)).map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
