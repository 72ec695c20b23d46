//! The report's charts, drawn with plotters: each [`Chart`] is data, drawn once per
//! backend — SVG text inline in the HTML page, PNG files beside it. Text in the PNGs is
//! set in the Ubuntu typeface that `epaint_default_fonts` carries (no system fonts are
//! needed); the SVG asks the browser for `sans-serif`.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::report::{RunFiles, TrainPoint};

/// Series colours (matplotlib's "tab10", which users of these tools know).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A line (or dots) on a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points in order.
    pub points: Vec<(f64, f64)>,
    /// Dots joined by a line (`false`: a line only).
    pub dots: bool,
}

/// What a chart shows.
#[derive(Debug, Clone)]
pub enum Plot {
    /// Lines over a shared x axis.
    Lines {
        /// X axis title.
        x: String,
        /// Y axis title.
        y: String,
        /// The lines.
        series: Vec<Series>,
    },
    /// A confusion matrix: rows true, columns predicted.
    Heatmap {
        /// Class names.
        names: Vec<String>,
        /// `counts[true][predicted]`.
        counts: Vec<Vec<u64>>,
    },
    /// Predicted against true values, with the diagonal.
    Scatter {
        /// What the values are.
        target: String,
        /// `(true, predicted)`.
        points: Vec<(f64, f64)>,
    },
}

/// One chart of the report.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File stem of its PNG, and the HTML anchor.
    pub name: String,
    /// Caption.
    pub title: String,
    /// The data.
    pub plot: Plot,
}

impl Chart {
    /// Pixel size: curves are wide, a heatmap grows with its classes.
    pub fn size(&self) -> (u32, u32) {
        match &self.plot {
            Plot::Lines { .. } => (560, 330),
            Plot::Scatter { .. } => (520, 480),
            Plot::Heatmap { names, .. } => {
                let k = names.len() as u32;
                let side = (96 * k).clamp(240, 760);
                (side + 190, side + 150)
            }
        }
    }
}

/// One value of a training log entry, when it has it.
type PointValue = fn(&TrainPoint) -> Option<f64>;

/// The charts `run` has data for, in page order.
pub fn charts(run: &RunFiles) -> Vec<Chart> {
    let mut out = Vec::new();
    let finite = |v: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        v.into_iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    };
    let train_loss = finite(run.train.iter().map(|p| (p.step, p.loss)).collect());
    let eval_loss = finite(
        run.evals
            .iter()
            .filter_map(|e| Some((e.step, *e.metrics.get("loss")?)))
            .collect(),
    );
    if !train_loss.is_empty() || !eval_loss.is_empty() {
        out.push(Chart {
            name: "loss".into(),
            title: "Loss".into(),
            plot: Plot::Lines {
                x: "step".into(),
                y: "loss".into(),
                series: vec![
                    Series {
                        name: "train".into(),
                        points: train_loss,
                        dots: false,
                    },
                    Series {
                        name: "eval".into(),
                        points: eval_loss,
                        dots: true,
                    },
                ],
            },
        });
    }
    // One line per training log entry: the learning rate and the gradient norm.
    let per_step: [(&str, &str, &str, PointValue); 2] = [
        ("learning_rate", "Learning rate", "learning rate", |p| {
            p.learning_rate
        }),
        (
            "grad_norm",
            "Gradient norm (before clipping)",
            "norm",
            |p| p.grad_norm,
        ),
    ];
    for (name, title, y, get) in per_step {
        let points = finite(
            run.train
                .iter()
                .filter_map(|p| Some((p.step, get(p)?)))
                .collect(),
        );
        if !points.is_empty() {
            out.push(Chart {
                name: name.into(),
                title: title.into(),
                plot: Plot::Lines {
                    x: "step".into(),
                    y: y.into(),
                    series: vec![Series {
                        name: name.into(),
                        points,
                        dots: false,
                    }],
                },
            });
        }
    }
    let mut names: Vec<&String> = run
        .evals
        .iter()
        .flat_map(|e| e.metrics.keys())
        .filter(|k| *k != "loss")
        .collect();
    names.sort();
    names.dedup();
    let series: Vec<Series> = names
        .iter()
        .map(|k| Series {
            name: k.to_string(),
            points: finite(
                run.evals
                    .iter()
                    .filter_map(|e| Some((e.epoch, *e.metrics.get(*k)?)))
                    .collect(),
            ),
            dots: true,
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if !series.is_empty() {
        out.push(Chart {
            name: "eval_metrics".into(),
            title: "Evaluation metrics per epoch".into(),
            plot: Plot::Lines {
                x: "epoch".into(),
                y: "value".into(),
                series,
            },
        });
    }
    if let Some((names, counts)) = &run.confusion {
        out.push(Chart {
            name: "confusion_matrix".into(),
            title: "Confusion matrix (rows: true, columns: predicted)".into(),
            plot: Plot::Heatmap {
                names: names.clone(),
                counts: counts.clone(),
            },
        });
    }
    if run.problem_type() == Some("regression") {
        let targets = run
            .predictions
            .iter()
            .map(|p| p.output.len())
            .max()
            .unwrap_or(0);
        let target_names = run
            .start
            .as_ref()
            .and_then(|m| m.get("labels"))
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default();
        for t in 0..targets.min(4) {
            let points = finite(
                run.predictions
                    .iter()
                    .filter_map(|p| Some((p.target.get(t)?.as_f64()?, *p.output.get(t)?)))
                    .collect(),
            );
            if points.is_empty() {
                continue;
            }
            let target = target_names
                .get(t)
                .and_then(|v| v.as_str())
                .map_or_else(|| format!("target {t}"), str::to_string);
            out.push(Chart {
                name: format!("predicted_vs_true_{t}"),
                title: format!("Predicted against true: {target}"),
                plot: Plot::Scatter { target, points },
            });
        }
    }
    out
}

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // The bytes are a valid TrueType font compiled into the binary.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("drawing a chart: {e}"))
}

/// The chart as an SVG document (for inlining in HTML).
pub fn svg(chart: &Chart) -> Result<String> {
    register_font();
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, chart.size()).into_drawing_area();
        draw(chart, &root)?;
        root.present().map_err(draw_err)?;
    }
    Ok(s)
}

/// Writes the chart as a PNG file at `path` (whole: a temporary file renamed into place).
pub fn write_png(chart: &Chart, path: &Path) -> Result<()> {
    register_font();
    // The bitmap backend picks the encoder from the extension, so the temporary name
    // keeps `.png`.
    let tmp = path.with_extension("tmp.png");
    let drawn = (|| {
        let root = BitMapBackend::new(&tmp, chart.size()).into_drawing_area();
        draw(chart, &root)?;
        root.present().map_err(draw_err)
    })();
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(match e {
            Error::Msg(m) => Error::file(path, m),
            e => e,
        });
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn draw<DB: DrawingBackend>(chart: &Chart, root: &DrawingArea<DB, Shift>) -> Result<()> {
    root.fill(&WHITE).map_err(draw_err)?;
    match &chart.plot {
        Plot::Lines { x, y, series } => lines(root, &chart.title, x, y, series),
        Plot::Heatmap { names, counts } => heatmap(root, &chart.title, names, counts),
        Plot::Scatter { target, points } => scatter(root, &chart.title, target, points),
    }
}

/// `[lo, hi]` of `values` with a margin, never empty.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.05
    };
    (lo - pad, hi + pad)
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

fn lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x: &str,
    y: &str,
    series: &[Series],
) -> Result<()> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1) = span(all().map(|p| p.0));
    let (y0, y1) = span(all().map(|p| p.1));
    // Epochs are whole numbers: one tick each, half an epoch of room either side.
    let whole = all().all(|p| p.0 == p.0.trunc());
    let ticks = if whole && x == "epoch" {
        let (lo, hi) = (x0.ceil(), x1.floor());
        (x0, x1) = (lo - 0.5, hi + 0.5);
        (hi - lo) as usize + 1
    } else {
        8
    };
    let mut c = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err)?;
    c.configure_mesh()
        .x_desc(x)
        .y_desc(y)
        .x_labels(ticks.min(20))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        c.draw_series(LineSeries::new(
            s.points.iter().copied(),
            colour.stroke_width(2),
        ))
        .map_err(draw_err)?
        .label(s.name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        if s.dots {
            c.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(draw_err)?;
        }
    }
    if series.len() > 1 {
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 14))
            .position(legend_corner(series))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Where the legend hides least: lines that rise (metrics) leave the lower right free,
/// lines that fall (losses) the upper right.
fn legend_corner(series: &[Series]) -> SeriesLabelPosition {
    let rising = series
        .iter()
        .filter_map(|s| Some(s.points.last()?.1 - s.points.first()?.1))
        .sum::<f64>()
        > 0.0;
    if rising {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

fn heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    names: &[String],
    counts: &[Vec<u64>],
) -> Result<()> {
    // A discrete range is inclusive: 0..k-1 holds the k classes.
    let k = names.len() as i32;
    let label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) if *i >= 0 && *i < k => {
            let n = &names[*i as usize];
            if n.chars().count() > 14 {
                format!("{}…", n.chars().take(13).collect::<String>())
            } else {
                n.clone()
            }
        }
        _ => String::new(),
    };
    let mut c = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .margin_top(20)
        .x_label_area_size(70)
        .y_label_area_size(110)
        .build_cartesian_2d((0..k - 1).into_segmented(), (0..k - 1).into_segmented())
        .map_err(draw_err)?;
    c.configure_mesh()
        .disable_mesh()
        .x_desc("predicted")
        .y_desc("true")
        .x_labels(k as usize)
        .y_labels(k as usize)
        .x_label_formatter(&|v| label(v))
        .y_label_formatter(&|v| label(&flip(v, k)))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(draw_err)?;
    let cell_px = (root.dim_in_pixel().0.saturating_sub(200) / (k.max(1) as u32)).max(8);
    let font = (cell_px / 4).clamp(9, 18);
    for (t, row) in counts.iter().enumerate() {
        let total: u64 = row.iter().sum();
        for (p, &n) in row.iter().enumerate() {
            let frac = if total > 0 {
                n as f64 / total as f64
            } else {
                0.0
            };
            let fill = RGBColor(
                (247.0 - 239.0 * frac) as u8,
                (251.0 - 203.0 * frac) as u8,
                (255.0 - 148.0 * frac) as u8,
            );
            // Row 0 on top.
            let y = k - 1 - t as i32;
            let (x, yv) = (p as i32, y);
            c.draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(x), SegmentValue::Exact(yv)),
                    (SegmentValue::Exact(x + 1), SegmentValue::Exact(yv + 1)),
                ],
                fill.filled(),
            )))
            .map_err(draw_err)?;
            let ink = if frac > 0.5 { WHITE } else { BLACK };
            let style = TextStyle::from(("sans-serif", font).into_font())
                .color(&ink)
                .pos(Pos::new(HPos::Center, VPos::Center));
            c.draw_series(std::iter::once(Text::new(
                n.to_string(),
                (SegmentValue::CenterOf(x), SegmentValue::CenterOf(yv)),
                style,
            )))
            .map_err(draw_err)?;
        }
    }
    Ok(())
}

/// The class a segment of the (bottom-up) y axis shows.
fn flip(v: &SegmentValue<i32>, k: i32) -> SegmentValue<i32> {
    match v {
        SegmentValue::CenterOf(i) => SegmentValue::CenterOf(k - 1 - i),
        other => other.clone(),
    }
}

fn scatter<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    target: &str,
    points: &[(f64, f64)],
) -> Result<()> {
    let (lo, hi) = span(points.iter().flat_map(|p| [p.0, p.1]));
    let mut c = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(lo..hi, lo..hi)
        .map_err(draw_err)?;
    c.configure_mesh()
        .x_desc(format!("true {target}"))
        .y_desc(format!("predicted {target}"))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    c.draw_series(LineSeries::new(
        [(lo, lo), (hi, hi)],
        RGBColor(150, 150, 150),
    ))
    .map_err(draw_err)?;
    c.draw_series(
        points
            .iter()
            .map(|&p| Circle::new(p, 3, PALETTE[0].mix(0.6).filled())),
    )
    .map_err(draw_err)?;
    Ok(())
}
