//! The benchmark picture: four panels (throughput, efficiency, tail latency, balance), one colour
//! per proxy. Text is drawn with a font shipped on crates.io so the bench needs no system fonts.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::proxy_bench::{Measured, RATES};

const COLOURS: [RGBColor; 5] = [
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type Chart<'a> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The series' names and colours in a framed box.
fn legend<'a>(chart: &mut Chart<'a>, position: SeriesLabelPosition) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

pub fn draw(results: &[Measured], path: &Path) -> anyhow::Result<()> {
    // Registering twice is harmless; plotters keeps the first.
    register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::HACK_REGULAR,
    )
    .map_err(|_| anyhow::anyhow!("bundled font unreadable"))?;
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(50);
    title.draw_text(
        "fanout vs direct, HAProxy and nginx: unary gRPC to 10 backends (one proxy thread each)",
        &("sans-serif", 22).into_font().color(&BLACK),
        (20, 15),
    )?;
    let panels = body.split_evenly((2, 2));

    let throughput: Vec<(usize, f64)> = results
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.calls_per_second()))
        .collect();
    bars(
        &panels[0],
        "calls/s at saturation (higher is better)",
        results,
        &throughput,
    )?;
    let efficiency: Vec<(usize, f64)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.calls_per_cpu_second().map(|c| (i, c)))
        .collect();
    bars(
        &panels[1],
        "calls per proxy CPU-second (higher is better)",
        results,
        &efficiency,
    )?;
    tail_latency(&panels[2], results)?;
    balance(&panels[3], results)?;
    root.present()?;
    Ok(())
}

fn bars(
    panel: &Panel,
    caption: &str,
    results: &[Measured],
    values: &[(usize, f64)],
) -> anyhow::Result<()> {
    let max = values.iter().map(|v| v.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(panel)
        .caption(caption, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(10)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..values.len() as f64, 0f64..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (slot, (i, value)) in values.iter().enumerate() {
        let x = slot as f64;
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series([Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *value)],
                colour.filled(),
            )])?
            .label(results[*i].name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
        chart.draw_series([Text::new(
            format!("{value:.0}"),
            (x + 0.3, value + max * 0.02),
            ("sans-serif", 14),
        )])?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

fn tail_latency(panel: &Panel, results: &[Measured]) -> anyhow::Result<()> {
    let n = results.len() as f64;
    let p99 = |r: &Measured, k: usize| r.p99(k).as_secs_f64() * 1000.0;
    // A peer overloaded at a rate (seconds where the rest take milliseconds) would flatten
    // every other bar: the scale stops at ten times the median, and its bar at the top.
    let mut all: Vec<f64> = results
        .iter()
        .flat_map(|r| (0..RATES.len()).map(move |k| p99(r, k)))
        .collect();
    all.sort_by(f64::total_cmp);
    let median = all.get(all.len() / 2).copied().unwrap_or(0.1);
    let max = all
        .iter()
        .copied()
        .filter(|v| *v <= median * 10.0)
        .fold(0.1, f64::max)
        * 1.15;
    let height = |r: &Measured, k: usize| p99(r, k).min(max * 0.95);
    let mut chart = ChartBuilder::on(panel)
        .caption(
            "p99 latency in ms at fixed rates (lower is better)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..RATES.len() as f64, 0f64..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(RATES.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let group = x.floor() as usize;
            if (x.fract() - 0.5).abs() < 1e-6 && group < RATES.len() {
                format!("{} calls/s", RATES[group])
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()?;
    for (i, r) in results.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let width = 0.8 / n;
        let bars = (0..RATES.len()).map(|k| {
            let x = k as f64 + 0.1 + width * i as f64;
            Rectangle::new([(x, 0.0), (x + width * 0.9, height(r, k))], colour.filled())
        });
        chart
            .draw_series(bars)?
            .label(r.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
        chart.draw_series((0..RATES.len()).map(|k| {
            let x = k as f64 + 0.1 + width * i as f64;
            Text::new(
                format!("{:.2}", p99(r, k)),
                (x, height(r, k) + max * 0.02),
                ("sans-serif", 12),
            )
        }))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

fn balance(panel: &Panel, results: &[Measured]) -> anyhow::Result<()> {
    let backends = results.first().map_or(0, |r| r.shares().len());
    let share = |r: &Measured| -> Vec<f64> {
        let total = r.shares().iter().sum::<u64>().max(1) as f64;
        r.shares()
            .iter()
            .map(|&c| 100.0 * c as f64 / total)
            .collect()
    };
    let max = results.iter().flat_map(share).fold(20.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(panel)
        .caption(
            "share of calls per backend, % (even = 10)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..backends as f64 - 0.5, 0f64..max)?;
    chart
        .configure_mesh()
        .x_labels(backends)
        .x_label_formatter(&|x| format!("b{}", x.round() as i64))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, r) in results.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<(f64, f64)> = share(r)
            .into_iter()
            .enumerate()
            .map(|(b, s)| (b as f64, s))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
            .label(r.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], colour.stroke_width(2)));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, colour.filled())),
        )?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}
