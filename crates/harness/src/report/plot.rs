//! `--plot FILE.svg`: the error relative to scale of every stage along the
//! network's depth, on a log scale, with the tolerance and a mark at the
//! first failure. Error growth is seen faster than read.

use plotters::prelude::*;

use super::Report;
use crate::metrics::{Comparison, Verdict};

const SIZE: (u32, u32) = (1200, 560);
/// The lowest error drawn; exact agreement (zero) sits on the bottom edge.
const FLOOR: f64 = 1e-12;

/// The plot as SVG text.
pub fn svg(report: &Report) -> Result<String, String> {
    let mut text = String::new();
    draw(report, &mut text).map_err(|error| error.to_string())?;
    Ok(text)
}

fn draw<'a>(report: &Report, text: &'a mut String) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let root = SVGBackend::with_string(text, SIZE).into_drawing_area();
    root.fill(&WHITE)?;

    let series = |pick: fn(&super::StageReport) -> Option<&Comparison>| -> Vec<(f64, f64, bool)> {
        report
            .stages
            .iter()
            .enumerate()
            .filter_map(|(position, stage)| {
                pick(stage).map(|c| {
                    (
                        position as f64,
                        c.relative_error.max(FLOOR),
                        c.verdict == Verdict::Fail,
                    )
                })
            })
            .collect()
    };
    let cumulative = series(|stage| stage.cumulative.as_ref());
    let isolated = series(|stage| stage.isolated.as_ref());
    let tolerance: Vec<(f64, f64)> = report
        .stages
        .iter()
        .enumerate()
        .filter_map(|(position, stage)| {
            let scale = stage.primary()?.scale;
            let tolerance = (report.tolerance)
                .for_stage(&stage.name, stage.floor.as_ref())
                .ok()?
                .tolerance;
            let bound = tolerance.rtol + tolerance.atol_for(scale) / scale.max(f64::MIN_POSITIVE);
            Some((position as f64, bound.max(FLOOR)))
        })
        .collect();
    // The reference's own float32 error against float64, where it was measured.
    let noise_floor: Vec<(f64, f64)> = report
        .stages
        .iter()
        .enumerate()
        .filter_map(|(position, stage)| Some((position as f64, stage.floor?.relative.max(FLOOR))))
        .collect();

    let values = cumulative
        .iter()
        .chain(&isolated)
        .map(|&(_, y, _)| y)
        .chain(tolerance.iter().chain(&noise_floor).map(|&(_, y)| y))
        .filter(|y| y.is_finite());
    let (low, high) = values
        .filter(|&y| y > FLOOR)
        .fold((1e-7f64, 1e-3f64), |(low, high), y| {
            (low.min(y), high.max(y))
        });
    // A decade below for exact agreement, one above for the labels.
    let (low, high) = (
        10f64.powf(low.log10().floor() - 1.0),
        10f64.powf(high.log10().ceil() + 1.0),
    );
    // A NaN or Inf mismatch (an infinite error) at the top of the axis,
    // and labelled there: drawn alone it looked like an error of `high`.
    let non_finite: Vec<f64> = (cumulative.iter().chain(&isolated))
        .filter(|&&(_, y, _)| !y.is_finite())
        .map(|&(x, _, _)| x)
        .collect();
    let clamp = |points: Vec<(f64, f64, bool)>| -> Vec<(f64, f64, bool)> {
        points
            .into_iter()
            .map(|(x, y, failed)| (x, if y.is_finite() { y.max(low) } else { high }, failed))
            .collect()
    };
    let (cumulative, isolated) = (clamp(cumulative), clamp(isolated));
    let stages = report.stages.len().max(2) as f64;

    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: max|err| / max|ref| per stage ({:?})",
                report.model, report.mode
            )
            .to_lowercase(),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5f64..stages - 0.5, (low..high).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("stage, in execution order")
        .y_desc("relative error (log)")
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_labels(12)
        .disable_x_mesh()
        .draw()?;

    // Where each layer starts, so that depth reads as the network's parts.
    let grey = RGBColor(150, 150, 150);
    let mut previous_layer: Option<&str> = None;
    let mut labels = 0;
    for (position, stage) in report.stages.iter().enumerate() {
        let layer = match (&stage.layer, stage.name.as_str()) {
            (Some(layer), _) => layer.as_str(),
            // A layer's own stage (its output) has no enclosing layer.
            (None, name) if stage.is_layer() => name,
            (None, name) if name == "avgpool" || name.split('.').next() == Some("fc") => "head",
            (None, _) => "stem",
        };
        if previous_layer != Some(layer) {
            let x = position as f64 - 0.5;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, low), (x, high)],
                grey.stroke_width(1),
            )))?;
            // Alternate heights: the stem is only four stages wide.
            let height = if labels % 2 == 0 { 3.0 } else { 12.0 };
            chart.draw_series(std::iter::once(Text::new(
                format!(" {layer}"),
                (x, low * height),
                ("sans-serif", 14).into_font().color(&grey),
            )))?;
            labels += 1;
        }
        previous_layer = Some(layer);
    }

    let red = RGBColor(200, 30, 30);
    if !noise_floor.is_empty() {
        // A band from the bottom up to the floor: error below it is the
        // reference's own rounding.
        let band = RGBColor(120, 170, 120);
        let mut outline: Vec<(f64, f64)> =
            noise_floor.iter().map(|&(x, y)| (x, y.max(low))).collect();
        outline.extend(noise_floor.iter().rev().map(|&(x, _)| (x, low)));
        chart
            .draw_series(std::iter::once(Polygon::new(
                outline,
                band.mix(0.25).filled(),
            )))?
            .label("float32 noise floor (reference vs float64)")
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 20, y + 5)], band.mix(0.4).filled())
            });
    }
    chart
        .draw_series(DashedLineSeries::new(tolerance, 6, 4, red.stroke_width(2)))?
        .label("tolerance")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(2)));
    // Cumulative error grows along the depth: a line. Isolated error is
    // each stage's own: points.
    for (points, color, label, line) in [
        (
            &cumulative,
            RGBColor(31, 119, 180),
            "cumulative (end to end)",
            true,
        ),
        (
            &isolated,
            RGBColor(255, 127, 14),
            "isolated (reference inputs)",
            false,
        ),
    ] {
        if points.is_empty() {
            continue;
        }
        if line {
            chart.draw_series(LineSeries::new(
                points.iter().map(|&(x, y, _)| (x, y)),
                color.stroke_width(2),
            ))?;
        }
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, y, _)| Circle::new((x, y), 3, color.filled())),
            )?
            .label(label)
            .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
        // Failing stages ringed in red, each in its series' colour.
        chart.draw_series(
            points
                .iter()
                .filter(|&&(_, _, failed)| failed)
                .map(|&(x, y, _)| Circle::new((x, y), 5, red.stroke_width(2))),
        )?;
    }
    chart.draw_series(non_finite.iter().map(|&x| {
        Text::new(
            " NaN/Inf",
            (x, high / 1.6),
            ("sans-serif", 13).into_font().color(&red),
        )
    }))?;
    if let Some(first) = &report.summary.first_failure {
        if let Some(position) = report.stages.iter().position(|s| &s.name == first) {
            let x = position as f64;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, low), (x, high)],
                red.stroke_width(1),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!(" first failure: {first}"),
                (x, high / 4.0),
                ("sans-serif", 15).into_font().color(&red),
            )))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
