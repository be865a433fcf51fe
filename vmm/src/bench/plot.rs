//! SVG plots of benchmark results (plotters, SVG backend: no fonts or system libraries), one
//! figure per benchmark, drawn from its JSON. Each mode has one colour in every plot of the
//! project ([`colour`]); every figure says in its title what ran (vCPUs, memory, rounds, host
//! CPUs) and whether the run was cut short; legends sit beside the data, never over it.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use super::BenchError;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn draw_err(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Output {
        path: path.into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Draws the plot of a finished benchmark's JSON (`benchmark` says which) at `path`.
pub fn draw(path: &Path, json: &Value) -> Result<(), BenchError> {
    match json["benchmark"].as_str() {
        Some("faults") => faults(path, json),
        Some("collapse") => collapse(path, json),
        Some("restore") => restore(path, json),
        Some("reclaim") => reclaim(path, json),
        Some("resume") => resume(path, json),
        other => Err(draw_err(path, format!("no plot for benchmark {other:?}"))),
    }
}

/// Every mode's colour, the same in every plot: the kernel's own paths in greys and browns,
/// this VMM's userfaultfd paths in blues and greens, its collapse orders in reds and purples,
/// restores in pale tones.
const COLOURS: &[(&str, RGBColor)] = &[
    ("kernel-4k", RGBColor(0x7f, 0x7f, 0x7f)),
    ("kernel-thp", RGBColor(0x8c, 0x56, 0x4b)),
    ("hugetlb", RGBColor(0xe3, 0x77, 0xc2)),
    ("uffd-zero", RGBColor(0x1f, 0x77, 0xb4)),
    ("uffd-image", RGBColor(0x17, 0xbe, 0xcf)),
    ("uffd-zero-2m", RGBColor(0x2c, 0xa0, 0x2c)),
    ("uffd-image-2m", RGBColor(0xbc, 0xbd, 0x22)),
    ("prealloc", RGBColor(0xd6, 0x27, 0x28)),
    ("legacy", RGBColor(0x94, 0x67, 0xbd)),
    ("unlocked", RGBColor(0xff, 0x7f, 0x0e)),
    ("khugepaged", RGBColor(0x5a, 0x5a, 0x5a)),
    ("madv-collapse", RGBColor(0xa0, 0x7a, 0x50)),
    ("eager", RGBColor(0x9e, 0x8f, 0xc9)),
    ("lazy-4k", RGBColor(0x6b, 0xae, 0xd6)),
    ("lazy-2m", RGBColor(0x74, 0xc4, 0x76)),
    ("prefetch", RGBColor(0xef, 0x6a, 0x6a)),
    ("replay", RGBColor(0xb2, 0x18, 0x2b)),
    ("external", RGBColor(0xfd, 0xae, 0x6b)),
    ("external-2m", RGBColor(0xc7, 0xc7, 0x3a)),
    ("no-reclaim", RGBColor(0x40, 0x40, 0x40)),
    ("report-4k", RGBColor(0x08, 0x45, 0x94)),
    ("report-thp", RGBColor(0x00, 0x8b, 0x45)),
    ("report-hugetlb", RGBColor(0xae, 0x01, 0x7e)),
    ("balloon-4k", RGBColor(0xe6, 0x55, 0x0d)),
];

/// The colour of `label`: its mode's; a variant of a mode (`prealloc/mremap`) is its mode's
/// colour, paler.
pub fn colour(label: &str) -> RGBColor {
    let (mode, variant) = label.split_once('/').unwrap_or((label, ""));
    let base = COLOURS
        .iter()
        .find(|(name, _)| *name == mode)
        .map(|(_, c)| *c)
        .unwrap_or_else(|| {
            let hash = mode
                .bytes()
                .fold(7usize, |h, b| h.wrapping_mul(31) + b as usize);
            let c = Palette99::pick(hash).to_rgba();
            RGBColor(c.0, c.1, c.2)
        });
    if variant.is_empty() {
        base
    } else {
        let pale = |c: u8| c + (255 - c) / 2;
        RGBColor(pale(base.0), pale(base.1), pale(base.2))
    }
}

fn host_cpus(json: &Value) -> u64 {
    json["host_cpus"].as_u64().unwrap_or(0)
}

fn partial(json: &Value) -> &'static str {
    if json["partial"] == true {
        " (partial: stopped by a signal)"
    } else {
        ""
    }
}

fn mib(bytes: &Value) -> String {
    crate::units::ByteSize(bytes.as_u64().unwrap_or(0)).to_string()
}

/// A legend in its own area: a swatch and a name per entry, then notes.
fn legend(area: &Area, entries: &[(String, RGBColor)], notes: &[&str]) -> Result<(), String> {
    let style = ("sans-serif", 13).into_font();
    let mut y = 30;
    for (name, c) in entries {
        area.draw(&Rectangle::new([(8, y - 5), (26, y + 5)], c.filled()))
            .map_err(|e| e.to_string())?;
        area.draw(&Text::new(name.clone(), (32, y - 7), style.clone()))
            .map_err(|e| e.to_string())?;
        y += 20;
    }
    for note in notes {
        y += 6;
        area.draw(&Text::new(note.to_string(), (8, y - 7), style.clone()))
            .map_err(|e| e.to_string())?;
        y += 14;
    }
    Ok(())
}

/// A figure at `path` of `size`, whose body `body` draws.
fn figure(
    path: &Path,
    size: (u32, u32),
    body: impl FnOnce(&Area) -> Result<(), String>,
) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
    body(&root).map_err(|e| draw_err(path, e))?;
    root.present().map_err(|e| draw_err(path, e))
}

/// One horizontal bar per row, `(label, value, spread, text)`: the bar to the value, a line
/// across the spread (min to max) where there is one, and the text after it.
type Bar = (String, f64, Option<(f64, f64)>, String);

fn bars(area: &Area, title: &str, x_desc: &str, rows: &[Bar], log: bool) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    // The first row at the top.
    let rows: Vec<&Bar> = rows.iter().rev().collect();
    let top = rows
        .iter()
        .map(|r| r.2.map_or(r.1, |s| s.1).max(r.1))
        .fold(0.0, f64::max);
    let (lo, hi) = if log {
        let low = rows
            .iter()
            .map(|r| r.1)
            .filter(|v| *v > 0.0)
            .fold(f64::MAX, f64::min)
            .min(top);
        ((low / 3.0).max(0.01), (top * 40.0).max(1.0))
    } else {
        (0.0, (top * 1.35).max(1.0))
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(190);
    let n = rows.len().max(1);
    let label = |seg: &SegmentValue<usize>| match seg {
        SegmentValue::CenterOf(i) => rows.get(*i).map_or(String::new(), |r| r.0.clone()),
        _ => String::new(),
    };
    let rows = &rows;
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .light_line_style(WHITE)
                .bold_line_style(BLACK.mix(0.12))
                .x_desc(x_desc)
                .y_label_formatter(&label)
                .y_labels(n)
                .x_label_formatter(&|v: &f64| compact(*v))
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(e)?;
            for (i, (name, value, spread, text)) in rows.iter().enumerate() {
                let c = colour(name.split_whitespace().next().unwrap_or(name));
                let corners = [
                    (lo, SegmentValue::Exact(i)),
                    (value.max(lo), SegmentValue::Exact(i + 1)),
                ];
                chart
                    .draw_series(std::iter::once(Rectangle::new(corners.clone(), c.filled())))
                    .map_err(e)?;
                // A white edge keeps neighbouring bars apart.
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        corners,
                        WHITE.stroke_width(3),
                    )))
                    .map_err(e)?;
                let mut end = value.max(lo);
                if let Some((min, max)) = spread {
                    let (min, max) = (min.max(lo), max.max(lo));
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![
                                (min, SegmentValue::CenterOf(i)),
                                (max, SegmentValue::CenterOf(i)),
                            ],
                            BLACK.stroke_width(2),
                        )))
                        .map_err(e)?;
                    end = end.max(max);
                }
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("  {text}"),
                        (end, SegmentValue::CenterOf(i)),
                        ("sans-serif", 12).into_font(),
                    )))
                    .map_err(e)?;
            }
        }};
    }
    if log {
        body!(
            builder
                .build_cartesian_2d((lo..hi).log_scale(), (0..n).into_segmented())
                .map_err(e)?
        );
    } else {
        body!(
            builder
                .build_cartesian_2d(lo..hi, (0..n).into_segmented())
                .map_err(e)?
        );
    }
    Ok(())
}

/// A number for an axis: `250k`, `1.5M`, `12`, `0.5`.
fn compact(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.0}k", v / 1e3),
        a if a >= 10.0 || a == 0.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

/// `vmm bench faults`: for one vCPU count, a bar per mode (the median rate, the spread over
/// rounds, the ratio to `kernel-4k` written on it); for a sweep, the rate against vCPUs on a
/// log2 axis, a line per mode, with the host's CPU count marked.
fn faults(path: &Path, json: &Value) -> Result<(), BenchError> {
    let counts = json["counts"].as_array().cloned().unwrap_or_default();
    let shape = format!(
        "x {} per vCPU, {} round(s), {}-CPU host{}",
        mib(&json["mem_per_vcpu_bytes"]),
        json["repeat"],
        host_cpus(json),
        partial(json)
    );
    if counts.len() <= 1 {
        let count = counts.first().cloned().unwrap_or_default();
        let rows: Vec<Bar> = count["modes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let rate = m["pages_per_sec"].as_f64().unwrap_or(0.0);
                let rounds: Vec<f64> = m["rounds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_f64)
                    .collect();
                let spread = (rounds.len() > 1).then(|| {
                    (
                        rounds.iter().copied().fold(f64::MAX, f64::min),
                        rounds.iter().copied().fold(0.0, f64::max),
                    )
                });
                let ratio = m["ratio_to_kernel_4k"]
                    .as_f64()
                    .map_or(String::new(), |r| format!("{r:.2}x of kernel-4k, "));
                (
                    m["mode"].as_str().unwrap_or("?").to_string(),
                    rate,
                    spread,
                    format!("{ratio}{:.0}k/s", rate / 1e3),
                )
            })
            .collect();
        let title = format!(
            "Demand paging, {} vCPU(s) {shape}",
            count["vcpus"].as_u64().unwrap_or(0)
        );
        return figure(path, (1000, 110 + 34 * rows.len().max(1) as u32), |root| {
            bars(
                root,
                &title,
                "pages/s (bar: median over rounds; line: lowest to highest round)",
                &rows,
                false,
            )
        });
    }
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for count in &counts {
        let vcpus = count["vcpus"].as_f64().unwrap_or(1.0);
        for m in count["modes"].as_array().into_iter().flatten() {
            let (mode, rate) = (
                m["mode"].as_str().unwrap_or("?"),
                m["pages_per_sec"].as_f64(),
            );
            let Some(rate) = rate else { continue };
            let point = (vcpus.log2(), rate);
            match series.iter_mut().find(|(n, _)| n == mode) {
                Some((_, pts)) => pts.push(point),
                None => series.push((mode.to_string(), vec![point])),
            }
        }
    }
    let max_x = counts
        .iter()
        .filter_map(|c| c["vcpus"].as_f64())
        .fold(1.0, f64::max)
        .max(host_cpus(json) as f64)
        .log2();
    let max_y = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let title = format!("Demand paging rate by vCPU count, {shape}");
    let cpus = host_cpus(json);
    figure(path, (1100, 560), |root| {
        let (plot, side) = root.split_horizontally(880);
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.25..max_x + 0.25, 0.0..max_y)
            .map_err(e)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .bold_line_style(BLACK.mix(0.12))
            .x_desc("vCPUs (log2 scale)")
            .y_desc("pages/s")
            .x_labels(((max_x + 1.0) * 2.0) as usize + 1)
            .x_label_formatter(&|x| {
                let whole = x.round();
                if (x - whole).abs() < 1e-6 && whole >= 0.0 {
                    format!("{}", 2f64.powf(whole) as u64)
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(e)?;
        if cpus > 0 {
            let x = (cpus as f64).log2();
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x, 0.0), (x, max_y)],
                    6,
                    4,
                    BLACK.mix(0.6).stroke_width(1),
                ))
                .map_err(e)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {cpus} host CPUs"),
                    (x, max_y * 0.97),
                    ("sans-serif", 12).into_font(),
                )))
                .map_err(e)?;
        }
        for (name, pts) in &series {
            let c = colour(name);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(e)?;
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(e)?;
        }
        let entries: Vec<(String, RGBColor)> =
            series.iter().map(|(n, _)| (n.clone(), colour(n))).collect();
        legend(&side, &entries, &["median over rounds"])
    })
}

/// `vmm bench collapse`: a panel for each figure the tables are about (write-lock p99, an
/// extent's hold per commit p99, time to all-huge, the guest's own stall p99), a bar per
/// variant and table (vCPUs, allocation latency), each with its sample count.
fn collapse(path: &Path, json: &Value) -> Result<(), BenchError> {
    let tables = json["tables"].as_array().cloned().unwrap_or_default();
    let several = tables.len() > 1;
    let rows_of = |key: &str, us: bool| -> Vec<Bar> {
        let mut rows = Vec::new();
        for t in &tables {
            let at = match (several, t["cold"] == true) {
                (false, _) => String::new(),
                (true, true) => format!(" x{} cold", t["vcpus"].as_u64().unwrap_or(0)),
                (true, false) => format!(
                    " x{} +{}ms",
                    t["vcpus"].as_u64().unwrap_or(0),
                    t["alloc_latency_ms"].as_f64().unwrap_or(0.0)
                ),
            };
            for v in t["variants"].as_array().into_iter().flatten() {
                let name = v["variant"].as_str().unwrap_or("?");
                let rounds = v["rounds"].as_array().map_or(0, Vec::len);
                let (value, count) = if us {
                    (
                        v[key]["p99"].as_f64().map(|ns| ns / 1e3),
                        v[key]["count"].as_f64(),
                    )
                } else {
                    (v[key].as_f64().map(|ns| ns / 1e6), None)
                };
                let Some(value) = value else { continue };
                let text = match (us, count) {
                    (true, Some(n)) => format!("{value:.1} us (n={n:.0}, {rounds} round(s))"),
                    (true, None) => format!("{value:.1} us ({rounds} round(s))"),
                    (false, _) if value < 10.0 => format!("{value:.1} ms ({rounds} round(s))"),
                    (false, _) => format!("{value:.0} ms ({rounds} round(s))"),
                };
                rows.push((format!("{name}{at}"), value, None, text));
            }
        }
        rows
    };
    let panels = [
        (
            "Write lock held, p99 (log scale)",
            rows_of("write_lock_ns", true),
            "microseconds",
            true,
        ),
        (
            "One extent held per commit, p99 (log scale)",
            rows_of("commit_ns", true),
            "microseconds",
            true,
        ),
        (
            "Time until every extent is a 2 MiB page (log scale)",
            rows_of("time_to_all_huge_ns", false),
            "milliseconds (lower is better)",
            true,
        ),
        (
            "The guest's own longest-access p99 during the collapse (log scale)",
            rows_of("guest_stall_ns", true),
            "microseconds",
            true,
        ),
    ];
    let heights: Vec<u32> = panels
        .iter()
        .map(|p| 90 + 26 * p.1.len().max(1) as u32)
        .collect();
    let title = format!(
        "Collapsing {} of guest RAM while the guest writes it, {} round(s), {}-CPU host{}",
        mib(&json["memory_bytes"]),
        json["repeat"],
        host_cpus(json),
        partial(json)
    );
    figure(path, (1100, 50 + heights.iter().sum::<u32>()), |root| {
        root.draw(&Text::new(
            title.clone(),
            (10, 12),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(|e| e.to_string())?;
        let mut rest = root.split_vertically(50).1;
        for ((name, rows, x_desc, log), height) in panels.iter().zip(&heights) {
            let (panel, below) = rest.split_vertically(*height);
            if rows.is_empty() {
                panel
                    .draw(&Text::new(
                        format!("{name}: no variant measured it"),
                        (10, 20),
                        ("sans-serif", 14).into_font(),
                    ))
                    .map_err(|e| e.to_string())?;
            } else {
                bars(&panel, name, x_desc, rows, *log)?;
            }
            rest = below;
        }
        Ok(())
    })
}

/// A mode's samples over a restore: `(ms, resident MiB, huge MiB)`.
type ModeSeries = (String, Vec<(f64, f64, f64)>);

/// `vmm bench restore`: a panel per image (dense, sparse), resident MiB (solid) and MiB
/// mapped by 2 MiB pages (dashed) over time, a line of each per mode, up to the guest's end.
fn restore(path: &Path, json: &Value) -> Result<(), BenchError> {
    let title = format!(
        "Restoring {} of guest RAM: resident (solid) and 2 MiB-mapped (dashed) MiB, first \
         round{}",
        mib(&json["memory_bytes"]),
        partial(json)
    );
    timelines(path, json, &title, "ms since the restore began", |t| {
        format!(
            "{} image ({} filled)",
            t["density"].as_str().unwrap_or("?"),
            mib(&t["filled_bytes"])
        )
    })
}

fn resume(path: &Path, json: &Value) -> Result<(), BenchError> {
    let title = format!(
        "Resuming a snapshot of {} (working set {}), one clone: resident (solid) and 2 \
         MiB-mapped (dashed) MiB, first round{}",
        mib(&json["memory_bytes"]),
        mib(&json["working_set_bytes"]),
        partial(json)
    );
    timelines(path, json, &title, "ms since the vCPUs started", |t| {
        format!("{} working set", t["pattern"].as_str().unwrap_or("?"))
    })
}

fn reclaim(path: &Path, json: &Value) -> Result<(), BenchError> {
    let title = format!(
        "Giving back what the guest frees ({}% of {}): resident (solid) and 2 MiB-mapped \
         (dashed) MiB, first round{}",
        json["free_percent"],
        mib(&json["memory_bytes"]),
        partial(json)
    );
    timelines(path, json, &title, "ms since the VM was built", |t| {
        format!("shape {}", t["shape"].as_str().unwrap_or("?"))
    })
}

/// One panel per table, one pair of lines per mode: resident and huge MiB over time, from
/// the first round's `series_ms_mib_huge_mib`.
fn timelines(
    path: &Path,
    json: &Value,
    title: &str,
    x_desc: &str,
    panel: impl Fn(&Value) -> String,
) -> Result<(), BenchError> {
    let tables = json["tables"].as_array().cloned().unwrap_or_default();
    let mut modes: Vec<String> = Vec::new();
    let panels: Vec<(String, Vec<ModeSeries>)> = tables
        .iter()
        .map(|t| {
            let lines = t["modes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let name = m["mode"].as_str().unwrap_or("?").to_string();
                    if !modes.contains(&name) {
                        modes.push(name.clone());
                    }
                    let pts = m["rounds"][0]["series_ms_mib_huge_mib"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?, p[2].as_f64()?)))
                        .collect();
                    (name, pts)
                })
                .collect();
            (panel(t), lines)
        })
        .collect();
    let title = title.to_string();
    let rows = panels.len().max(1) as u32;
    figure(path, (1100, 60 + 420 * rows), |root| {
        root.draw(&Text::new(
            title.clone(),
            (10, 12),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(|e| e.to_string())?;
        let (body, side) = root.split_vertically(50).1.split_horizontally(880);
        let entries: Vec<(String, RGBColor)> =
            modes.iter().map(|n| (n.clone(), colour(n))).collect();
        legend(
            &side,
            &entries,
            &[
                "solid: resident",
                "dashed: mapped by",
                "2 MiB pages",
                "until the guest ended",
            ],
        )?;
        let areas = body.split_evenly((panels.len().max(1), 1));
        for ((name, lines), area) in panels.iter().zip(areas) {
            let e = |e: DrawingAreaErrorKind<_>| e.to_string();
            let max_x = lines
                .iter()
                .flat_map(|(_, p)| p.iter().map(|p| p.0))
                .fold(1.0, f64::max)
                * 1.03;
            let max_y = lines
                .iter()
                .flat_map(|(_, p)| p.iter().map(|p| p.1.max(p.2)))
                .fold(1.0, f64::max)
                * 1.08;
            let mut chart = ChartBuilder::on(&area)
                .caption(name, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..max_x, 0.0..max_y)
                .map_err(e)?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .bold_line_style(BLACK.mix(0.12))
                .x_desc(x_desc)
                .y_desc("MiB")
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(e)?;
            for (mode, pts) in lines {
                let c = colour(mode);
                chart
                    .draw_series(LineSeries::new(
                        pts.iter().map(|p| (p.0, p.1)),
                        c.stroke_width(2),
                    ))
                    .map_err(e)?;
                chart
                    .draw_series(DashedLineSeries::new(
                        pts.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>(),
                        6,
                        4,
                        c.stroke_width(2),
                    ))
                    .map_err(e)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_has_its_own_colour_and_variants_are_paler() {
        for (i, (a, ca)) in COLOURS.iter().enumerate() {
            for (b, cb) in &COLOURS[..i] {
                assert_ne!(ca, cb, "{a} and {b} share a colour");
            }
        }
        assert_eq!(colour("prealloc"), colour("prealloc"));
        assert_ne!(colour("prealloc"), colour("prealloc/mremap"));
        assert_eq!(colour("something new"), colour("something new"));
    }
}
