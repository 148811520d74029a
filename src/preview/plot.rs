//! `loss.png`: the loss terms per step, raw and smoothed, on a log scale, with the
//! warm-up / DS-Bal switch and DS-Bal's chosen sample marked.

use image::RgbImage;
use plotters::prelude::*;

use super::{font, FONT_FAMILY};
use crate::error::{Error, Result};

pub const WIDTH: u32 = 960;
pub const HEIGHT: u32 = 540;

/// The logged terms and their colours.
const TERMS: [(&str, RGBColor); 4] = [
    ("loss", RGBColor(20, 20, 20)),
    ("l_diff", RGBColor(31, 119, 180)),
    ("l_attn", RGBColor(255, 127, 14)),
    ("l_pres", RGBColor(44, 160, 44)),
];
/// One colour per sample DS-Bal can choose.
const SAMPLES: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];
/// Weight of the newest value in the smoothed curves (an exponential moving average).
const SMOOTHING: f64 = 0.1;

/// One term's positive, finite values by step (a log scale cannot show 0).
fn series(log: &[serde_json::Value], key: &str) -> Vec<(f64, f64)> {
    log.iter()
        .filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(key)?.as_f64()?)))
        .filter(|&(_, v)| v.is_finite() && v > 0.0)
        .collect()
}

fn smoothed(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut ema = None;
    points
        .iter()
        .map(|&(x, v)| {
            let e = ema.map_or(v, |e: f64| e + SMOOTHING * (v - e));
            ema = Some(e);
            (x, e)
        })
        .collect()
}

/// Plots `train_log.jsonl`'s lines; `switch` is the last warm-up step.
pub fn loss_plot(log: &[serde_json::Value], switch: Option<usize>) -> Result<RgbImage> {
    font()?;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut buf, log, switch).map_err(|e| Error::internal(format!("drawing loss.png: {e}")))?;
    RgbImage::from_raw(WIDTH, HEIGHT, buf).ok_or_else(|| Error::internal("plot buffer size"))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// A term's name, colour and points.
type Term<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn draw(buf: &mut [u8], log: &[serde_json::Value], switch: Option<usize>) -> DrawResult {
    let terms: Vec<Term> = (TERMS.iter())
        .map(|&(k, c)| (k, c, series(log, k)))
        .collect();
    let values = terms.iter().flat_map(|t| t.2.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo <= hi {
        (lo / 2.0, hi * 1.5)
    } else {
        (1e-3, 1.0)
    };
    let last = log
        .last()
        .and_then(|l| l.get("step")?.as_f64())
        .unwrap_or(1.0);

    let area = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    let mut chart = ChartBuilder::on(&area)
        .caption("training losses", (FONT_FAMILY, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..last.max(1.0), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (log scale)")
        .label_style((FONT_FAMILY, 13))
        .light_line_style(WHITE.mix(0.0))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()?;
    if let Some(s) = switch.filter(|&s| (s as f64) < last) {
        let x = s as f64 + 0.5;
        chart
            .draw_series(LineSeries::new([(x, lo), (x, hi)], BLACK.mix(0.4)))?
            .label("warm-up | DS-Bal")
            .legend(|(x, y)| PathElement::new([(x, y - 6), (x, y + 6)], BLACK.mix(0.4)));
    }
    for (key, colour, points) in &terms {
        let faint = colour.mix(0.25);
        chart.draw_series(LineSeries::new(points.iter().copied(), faint))?;
        chart
            .draw_series(LineSeries::new(smoothed(points), colour.stroke_width(2)))?
            .label(*key)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
    }
    draw_choices(&mut chart, log, lo)?;
    chart
        .configure_series_labels()
        .label_font((FONT_FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    area.present()?;
    Ok(())
}

/// A dot along the bottom per DS-Bal step, coloured by the sample it optimized.
fn draw_choices<DB: DrawingBackend, X, Y>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    log: &[serde_json::Value],
    lo: f64,
) -> DrawResult
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
    DB::ErrorType: 'static,
{
    let choices: Vec<(f64, usize)> = (log.iter())
        .filter_map(|l| {
            Some((
                l.get("step")?.as_f64()?,
                l.get("chosen_sample")?.as_u64()? as usize,
            ))
        })
        .collect();
    for (s, colour) in SAMPLES.iter().enumerate() {
        let mine: Vec<(f64, f64)> = (choices.iter())
            .filter(|c| c.1 % SAMPLES.len() == s)
            .map(|c| (c.0, lo * 1.15))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let dots = mine.into_iter().map(|p| Circle::new(p, 2, colour.filled()));
        chart
            .draw_series(dots)?
            .label(format!("DS-Bal chose <v{s}>"))
            .legend(move |(x, y)| Circle::new((x + 9, y), 3, colour.filled()));
    }
    Ok(())
}
