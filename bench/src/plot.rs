//! `--plot FILE.svg`: latency by percentile, the way HdrHistogram's plotter draws it.
//!
//! The x axis is the percentile on a log scale of 1/(1-p), so 90%, 99%, 99.9%, 99.99% and
//! 99.999% are evenly spaced and the tail, which the SLO is about, gets most of the width. The
//! y axis is latency in milliseconds. A run draws its first-attempt and final curves; a sweep
//! draws each step's first-attempt curve. The SLO's limit is drawn as a dashed line when it is
//! in range.
//!
//! Points come from the histogram's own quantile iteration (`iter_quantiles`), so a curve has
//! a few hundred points however many samples there were. Text is written as SVG `<text>`
//! (plotters' SVG backend with no font features), so nothing needs font files.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::report::SLO_FIRST_P999_US;

/// The right edge: 99.999%, i.e. log10(1/(1-p)) = 5. Points further right are drawn at the
/// edge, so each curve still ends at its maximum.
const X_MAX: f64 = 5.0;
/// Points per halving of the distance to 100% (HdrHistogram's plotter uses 5 too).
const TICKS_PER_HALF_DISTANCE: u32 = 5;
const SIZE_PX: (u32, u32) = (960, 600);
/// Colours for successive curves; cycled when there are more.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One curve: a label and the latencies (µs) it draws.
pub struct Curve<'a> {
    pub label: String,
    pub latencies_us: &'a Histogram<u64>,
}

/// The points of one curve: (log10(1/(1-p)) capped at [`X_MAX`], latency in ms).
pub fn points(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<(f64, f64)> = histogram
        .iter_quantiles(TICKS_PER_HALF_DISTANCE)
        .map(|step| {
            let x = x_of_quantile(step.quantile_iterated_to());
            let latency_ms = histogram.highest_equivalent(step.value_iterated_to()) as f64 / 1_000.0;
            (x, latency_ms)
        })
        .collect();
    // The iteration's last step is the maximum at quantile 1; make sure it is there.
    points.push((X_MAX, histogram.max() as f64 / 1_000.0));
    points
}

/// log10(1/(1-q)), capped at [`X_MAX`]: 0.9 → 1, 0.99 → 2, 1 → X_MAX.
fn x_of_quantile(quantile: f64) -> f64 {
    let quantile = if quantile.is_nan() {
        0.0
    } else {
        quantile.clamp(0.0, 1.0)
    };
    let remaining = 1.0 - quantile;
    if remaining <= 10f64.powf(-X_MAX) {
        X_MAX
    } else {
        (-remaining.log10()).clamp(0.0, X_MAX)
    }
}

/// The axis label at `x`: 0 → "0%", 1 → "90%", 3 → "99.9%"; between whole steps, the exact
/// percentile to as many decimals as the step has nines.
pub fn percentile_label(x: f64) -> String {
    if x < 0.05 {
        return "0%".into();
    }
    let percentile = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.ceil() as usize).saturating_sub(2);
    format!("{percentile:.decimals$}%")
}

/// Draws the curves into an SVG file.
pub fn write_svg(path: &Path, title: &str, curves: &[Curve<'_>]) -> Result<(), String> {
    draw(path, title, curves).map_err(|error| format!("cannot draw {}: {error}", path.display()))
}

fn draw(path: &Path, title: &str, curves: &[Curve<'_>]) -> Result<(), Box<dyn std::error::Error>> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|curve| (curve.label.as_str(), points(curve.latencies_us)))
        .collect();
    let highest_ms = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(_, latency_ms)| latency_ms))
        .fold(0.0f64, f64::max);
    let slo_ms = SLO_FIRST_P999_US as f64 / 1_000.0;
    // Show the SLO line when the curves come near it; otherwise it would flatten them.
    let y_max_ms = if highest_ms >= slo_ms / 2.0 {
        highest_ms.max(slo_ms) * 1.05
    } else {
        highest_ms.max(0.001) * 1.05
    };

    let root = SVGBackend::new(path, SIZE_PX).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        // Room for the last percentile label, centred on the right edge.
        .margin_right(48)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..X_MAX, 0.0..y_max_ms)?;
    chart
        .configure_mesh()
        .x_labels(X_MAX as usize + 1)
        .x_label_formatter(&|x| percentile_label(*x))
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()?;
    if y_max_ms > slo_ms {
        let limit = [(0.0, slo_ms), (X_MAX, slo_ms)];
        chart
            .draw_series(DashedLineSeries::new(limit, 8, 6, RED.stroke_width(1)))?
            .label(format!("SLO: first-attempt p99.9 < {slo_ms} ms"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    }
    for (index, (label, points)) in series.into_iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_nines() {
        let labels: Vec<String> = (0..=5).map(|x| percentile_label(f64::from(x))).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]);
        assert_eq!(percentile_label(0.5), "68%");
    }

    #[test]
    fn quantiles_map_to_nines() {
        assert_eq!(x_of_quantile(0.0), 0.0);
        assert!((x_of_quantile(0.99) - 2.0).abs() < 1e-9);
        assert_eq!(x_of_quantile(1.0), X_MAX);
        assert_eq!(x_of_quantile(0.999_999_9), X_MAX);
        assert_eq!(x_of_quantile(f64::NAN), 0.0);
    }

    // Points rise with the percentile, stay within the axis, and end at the maximum.
    #[test]
    fn points_rise_to_the_max() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for value_us in 1..=100_000u64 {
            histogram.record(value_us).unwrap();
        }
        let points = points(&histogram);
        assert!(points.len() > 20);
        assert!(points
            .windows(2)
            .all(|pair| pair[0].0 <= pair[1].0 && pair[0].1 <= pair[1].1));
        assert!(points.iter().all(|&(x, _)| (0.0..=X_MAX).contains(&x)));
        let &(last_x, last_ms) = points.last().unwrap();
        assert_eq!(last_x, X_MAX);
        assert!((last_ms - 100.0).abs() < 0.1, "{last_ms}");
        assert!(super::points(&Histogram::<u64>::new(3).unwrap()).is_empty());
    }

    // The file is an SVG naming both curves; an unwritable path is an error, not a panic.
    #[test]
    fn writes_an_svg() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        histogram.record_n(800, 1_000).unwrap();
        histogram.record(6_000).unwrap();
        let path = std::env::temp_dir().join(format!("shardgate-bench-plot-{}.svg", std::process::id()));
        let curves = [
            Curve {
                label: "first attempt".into(),
                latencies_us: &histogram,
            },
            Curve {
                label: "final".into(),
                latencies_us: &histogram,
            },
        ];
        write_svg(&path, "test", &curves).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..60.min(svg.len())]);
        for text in ["first attempt", "final", "99.9%", "latency (ms)"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(write_svg(Path::new("/nonexistent-dir/x.svg"), "t", &curves).is_err());
    }
}
