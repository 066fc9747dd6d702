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

/// Labelled vertical bars (one colour per group), values printed on top.
pub fn bars(title: &str, y: &str, bars: &[(String, f64, usize)]) -> AnyResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let hi = bars
            .iter()
            .map(|b| b.1)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.15;
        let n = bars.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(110)
            .y_label_area_size(78)
            .build_cartesian_2d(0f64..n as f64, 0f64..hi)?;
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_label_style(
                ("sans-serif", 12)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )
            .y_desc(y)
            .draw()?;
        for (i, (_, v, group)) in bars.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let color = PALETTE[group % PALETTE.len()];
            let x = i as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *v)],
                color.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{v:.3}"),
                (x + 0.2, *v + hi * 0.01),
                ("sans-serif", 11),
            )))?;
        }
        root.present()?;
    }
    Ok(svg)
}
