//! SVG charts for the reports (plotters, rendered to a string): lines or points over two axes, and
//! labelled bars. Must never: invent a point; every value plotted is one a report carries.

use plotters::prelude::*;

use crate::report::AnyResult;

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Axis scale.
#[derive(Clone, Copy, PartialEq)]
pub enum Scale {
    Linear,
    Log,
}

pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub x_scale: Scale,
    pub y_scale: Scale,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn range(vals: impl Iterator<Item = f64>, scale: Scale) -> (f64, f64) {
    let vals: Vec<f64> = vals
        .filter(|v| v.is_finite() && (scale == Scale::Linear || *v > 0.0))
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return if scale == Scale::Log {
            (0.1, 10.0)
        } else {
            (0.0, 1.0)
        };
    }
    match scale {
        Scale::Log => {
            let (lo, hi) = if hi / lo < 1.5 {
                (lo / 1.5, hi * 1.5)
            } else {
                (lo, hi)
            };
            (lo / 1.2, hi * 1.2)
        }
        Scale::Linear => {
            let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.02).max(1e-9);
            (lo - pad, hi + pad)
        }
    }
}

/// An axis label: powers of ten on log axes, a few significant digits otherwise.
fn tick(v: f64, scale: Scale) -> String {
    match scale {
        Scale::Log => format!("{v:.0e}"),
        Scale::Linear if v == 0.0 => "0".into(),
        Scale::Linear if v.abs() >= 1e5 || v.abs() < 1e-3 => format!("{v:.1e}"),
        Scale::Linear if v.abs() >= 100.0 => format!("{v:.0}"),
        Scale::Linear => format!("{}", (v * 1e4).round() / 1e4),
    }
}

/// Lines with markers, one colour per series, a legend.
pub fn lines(axes: &Axes, series: &[Series]) -> AnyResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let all = || series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = range(all().map(|p| p.0), axes.x_scale);
        let (y0, y1) = range(all().map(|p| p.1), axes.y_scale);
        let mut b = ChartBuilder::on(&root);
        b.caption(axes.title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(78);
        // The four scale combinations are four chart types in plotters.
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(axes.x)
                    .y_desc(axes.y)
                    .x_label_formatter(&|v: &f64| tick(*v, axes.x_scale))
                    .y_label_formatter(&|v: &f64| tick(*v, axes.y_scale))
                    .draw()?;
                for (i, s) in series.iter().enumerate() {
                    let color = PALETTE[i % PALETTE.len()];
                    let pts: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .copied()
                        .filter(|&(x, y)| {
                            x.is_finite()
                                && y.is_finite()
                                && (axes.x_scale == Scale::Linear || x > 0.0)
                                && (axes.y_scale == Scale::Linear || y > 0.0)
                        })
                        .collect();
                    chart
                        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                        .label(s.label.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                        });
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()?;
            }};
        }
        match (axes.x_scale, axes.y_scale) {
            (Scale::Linear, Scale::Linear) => draw!(b.build_cartesian_2d(x0..x1, y0..y1)?),
            (Scale::Log, Scale::Linear) => {
                draw!(b.build_cartesian_2d((x0..x1).log_scale(), y0..y1)?)
            }
            (Scale::Linear, Scale::Log) => {
                draw!(b.build_cartesian_2d(x0..x1, (y0..y1).log_scale())?)
            }
            (Scale::Log, Scale::Log) => {
                draw!(b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?)
            }
        }
        root.present()?;
    }
    Ok(svg)
}

/// Labelled horizontal bars (one colour per group, first bar on top), values printed at their
/// ends: labels stay horizontal and readable however many bars there are.
pub fn bars(title: &str, x: &str, bars: &[(String, f64, usize)]) -> AnyResult<String> {
    let mut svg = String::new();
    {
        let n = bars.len().max(1);
        let height = (120 + 26 * n).clamp(320, 2000) as u32;
        let root = SVGBackend::with_string(&mut svg, (900, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let hi = bars
            .iter()
            .map(|b| b.1)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(170)
            .build_cartesian_2d(0f64..hi, 0f64..n as f64)?;
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        // Row i (from the top) spans [n - i - 1, n - i].
        let label_at = |y: &f64| {
            let row = n as f64 - y - 0.5;
            let i = row.round();
            if (row - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n * 2 + 1)
            .y_label_formatter(&label_at)
            .x_label_formatter(&|v: &f64| tick(*v, Scale::Linear))
            .x_desc(x)
            .draw()?;
        for (i, (_, v, group)) in bars.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let color = PALETTE[group % PALETTE.len()];
            let y = (n - i - 1) as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y + 0.15), (*v, y + 0.85)],
                color.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{v:.3}"),
                (*v + hi * 0.01, y + 0.7),
                ("sans-serif", 12),
            )))?;
        }
        root.present()?;
    }
    Ok(svg)
}
