//! SVG plots of benchmark results (plotters, SVG backend: no fonts or system libraries).

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::BenchError;

fn draw_err(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Output {
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Paging rate per mode, as horizontal bars (pages/s).
pub fn paging_rates(path: &Path, modes: &[(String, f64)]) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, (900, 60 + 40 * modes.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let max = modes.iter().map(|(_, r)| *r).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Demand paging rate (pages/s, higher is better)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(130)
        .build_cartesian_2d(0.0..max, (0..modes.len()).into_segmented())
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.15))
        .x_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .y_label_formatter(&|seg| match seg {
            SegmentValue::CenterOf(i) => modes.get(*i).map_or(String::new(), |(n, _)| n.clone()),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| draw_err(path, e))?;
    chart
        .draw_series(modes.iter().enumerate().map(|(i, (_, rate))| {
            Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*rate, SegmentValue::Exact(i + 1)),
                ],
                Palette99::pick(i).filled(),
            )
        }))
        .map_err(|e| draw_err(path, e))?;
    root.present().map_err(|e| draw_err(path, e))
}

/// Cumulative distributions of a latency per variant, from the `cdf` points of each
/// percentile object: `(name, percentiles JSON)`.
pub fn latency_cdfs(
    path: &Path,
    title: &str,
    series: &[(String, Value)],
) -> Result<(), BenchError> {
    let points: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, p)| {
            let pts = p["cdf"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|qv| {
                            Some(((qv[1].as_f64()? / 1000.0).max(0.1), qv[0].as_f64()?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            (name.clone(), pts)
        })
        .filter(|(_, pts): &(String, Vec<(f64, f64)>)| !pts.is_empty())
        .collect();
    let max_us = points
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(1.0, f64::max)
        * 1.5;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.1..max_us).log_scale(), 0.0..1.0)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.15))
        .x_desc("microseconds (log scale)")
        .y_desc("fraction of stalls")
        .draw()
        .map_err(|e| draw_err(path, e))?;
    for (i, (name, pts)) in points.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw_err(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    root.present().map_err(|e| draw_err(path, e))
}

/// Paging rate against vCPU count, one line per mode: `(mode, [(vcpus, pages/s)])`.
pub fn rates_by_vcpus(path: &Path, series: &[(String, Vec<(u32, f64)>)]) -> Result<(), BenchError> {
    let max_vcpus = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(v, _)| *v))
        .max()
        .unwrap_or(1);
    let max_rate = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, r)| *r))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Demand paging rate by vCPUs (pages/s, higher is better)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0u32..max_vcpus + 1, 0.0..max_rate)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.15))
        .x_desc("vCPUs")
        .y_desc("pages/s")
        .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw_err(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| draw_err(path, e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    root.present().map_err(|e| draw_err(path, e))
}

/// Lines of `(x, y)` points, one per named series.
pub fn lines(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), BenchError> {
    let max = |f: fn(&(f64, f64)) -> f64| {
        series
            .iter()
            .flat_map(|(_, p)| p.iter().map(f))
            .fold(1.0, f64::max)
            * 1.05
    };
    let (max_x, max_y) = (max(|p| p.0), max(|p| p.1));
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.15))
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| draw_err(path, e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw_err(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    root.present().map_err(|e| draw_err(path, e))
}
