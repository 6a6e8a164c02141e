//! The chart of a results file: latency percentiles against request rate
//! for every contender (log scales both ways, medians over the repeats,
//! overloaded points left out), and each one's maximum throughput.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

const FONT_FILES: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const COLOURS: [RGBColor; 7] = [
    RGBColor(110, 110, 110),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// plotters draws text with a font registered at run time (no system font
/// lookup): Debian's DejaVu Sans, which `make bench-compare` installs.
fn register_font() -> Result<()> {
    let path = FONT_FILES
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| anyhow!("no DejaVu Sans font (apt-get install fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path}: not a font"))
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("chart: {e}")
}

pub fn draw(result: &Value, out: &Path) -> Result<()> {
    register_font()?;
    let summary = &result["summary"];
    let names: Vec<String> = summary["contenders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let rates: Vec<f64> = result["settings"]["rates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    let point = |name: &str, rate: f64, key: &str| -> Option<f64> {
        let r = &summary["by_load"][format!("{rate}")][name];
        (r["overloaded"] == false)
            .then(|| r[key]["median"].as_f64())
            .flatten()
            .filter(|v| *v > 0.0)
    };
    let all: Vec<f64> = names
        .iter()
        .flat_map(|n| {
            rates.iter().flat_map(move |&r| {
                ["p50_ms", "p90_ms", "p99_ms", "p999_ms"]
                    .into_iter()
                    .filter_map(move |k| point(n, r, k))
            })
        })
        .collect();
    let (ymin, ymax) = all
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), &v| (a.min(v), b.max(v)));
    anyhow::ensure!(ymax > 0.0, "no latency to draw");
    // Headroom above the highest point, so that the legend (upper left)
    // covers no point: it takes about the upper 40% of a panel.
    let ytop = ymax * (ymax / ymin).powf(0.7).max(1.5);
    let (xmin, xmax) = rates
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), &v| (a.min(v), b.max(v)));

    let root = BitMapBackend::new(out, (1400, 1250)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "Gateway latency and throughput on loopback, {} ({} CPUs, shared with load generator and upstream)",
        result["date"].as_str().unwrap_or_default(),
        result["machine"]["cpus"],
    );
    let root = root.titled(&title, ("sans-serif", 22)).map_err(err)?;
    let (top, bottom) = root.split_vertically(860);
    let panels = top.split_evenly((2, 2));
    for (panel, (key, label)) in panels.iter().zip([
        ("p50_ms", "p50"),
        ("p90_ms", "p90"),
        ("p99_ms", "p99"),
        ("p999_ms", "p99.9"),
    ]) {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{label} latency (ms) vs offered rate (requests/s)"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (xmin * 0.8..xmax * 1.25).log_scale(),
                (ymin * 0.7..ytop).log_scale(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("requests per second (open loop)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("ms")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        for (i, name) in names.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let pts: Vec<(f64, f64)> = rates
                .iter()
                .filter_map(|&r| point(name, r, key).map(|v| (r, v)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(err)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, colour.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }

    // Maximum throughput, one bar per contender.
    let max: Vec<(String, f64)> = names
        .iter()
        .filter_map(|n| {
            summary["by_load"]["max"][n]["answered_per_second"]["median"]
                .as_f64()
                .map(|v| (n.clone(), v.max(1.0)))
        })
        .collect();
    let top_rps = max.iter().map(|m| m.1).fold(10.0, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            format!(
                "maximum throughput (requests/s answered, closed loop, {} connections, median of repeats)",
                result["settings"]["max_throughput"]["connections"]
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(230)
        .build_cartesian_2d((1.0..top_rps * 3.0).log_scale(), 0.0..max.len() as f64)
        .map_err(err)?;
    let labels: Vec<String> = max.iter().map(|m| m.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(max.len() * 2 + 1)
        .y_label_formatter(&|y| {
            let i = (y - 0.5).round();
            if (y - 0.5 - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 14))
        .x_desc("requests per second")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (name, v)) in max.iter().enumerate() {
        let colour = names
            .iter()
            .position(|n| n == name)
            .map_or(BLACK, |k| COLOURS[k % COLOURS.len()]);
        let y = i as f64;
        chart
            .draw_series([Rectangle::new(
                [(1.0, y + 0.2), (*v, y + 0.8)],
                colour.filled(),
            )])
            .map_err(err)?;
        chart
            .draw_series([Text::new(
                format!("{v:.0}"),
                (*v * 1.1, y + 0.35),
                ("sans-serif", 14),
            )])
            .map_err(err)?;
    }
    root.present()
        .with_context(|| format!("write {}", out.display()))?;
    Ok(())
}
