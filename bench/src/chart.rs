//! SVG charts (plotters, SVG backend only).

use crate::report::Cell;
use crate::stats::Summary;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const LABEL_W: u32 = 250;
const ROW_H: u32 = 30;

/// Horizontal grouped bars: per workload x mode, the pair-wise median quring/raw and
/// quring/QEMU ratios with min-max whiskers and a line at 1.
pub fn ratio_chart(title: &str, cells: &[&Cell]) -> Result<String, String> {
    let n = cells.len().max(1);
    let height = 150 + ROW_H * n as u32;
    let xmax = cells.iter().flat_map(|c| [c.vs_raw, c.vs_qemu]).flatten().map(|s| s.max).fold(1.2f64, f64::max) * 1.08;
    // the plot has 1.5 empty rows on top for the legend
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, height)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| format!("chart: {e}");
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .margin_left(LABEL_W)
            .x_label_area_size(40)
            .build_cartesian_2d(0f64..xmax, -0.5f64..(n as f64 + 1.0))
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("ratio (pair-wise median; whiskers: min-max; >1 = quring faster)")
            .draw()
            .map_err(e)?;
        let row_y = |i: usize| (n - 1 - i) as f64;
        let raw_col = RGBColor(66, 114, 196);
        let qemu_col = RGBColor(237, 125, 49);
        let bars = |offset: (f64, f64), pick: fn(&Cell) -> Option<Summary>| {
            cells.iter().enumerate().filter_map(move |(i, c)| {
                let s = pick(c)?;
                let y = row_y(i);
                Some([(0.0, y + offset.0), (s.median, y + offset.1)])
            })
        };
        chart
            .draw_series(bars((0.02, 0.36), |c| c.vs_raw).map(|r| Rectangle::new(r, raw_col.filled())))
            .map_err(e)?
            .label("quring / raw (fio io_uring)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], raw_col.filled()));
        chart
            .draw_series(bars((-0.36, -0.02), |c| c.vs_qemu).map(|r| Rectangle::new(r, qemu_col.filled())))
            .map_err(e)?
            .label("quring / QEMU (qemu-img bench)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], qemu_col.filled()));
        let whiskers = cells.iter().enumerate().flat_map(|(i, c)| {
            let y = row_y(i);
            [(c.vs_raw, y + 0.19), (c.vs_qemu, y - 0.19)]
                .into_iter()
                .filter_map(|(s, y)| s.map(|s| PathElement::new(vec![(s.min, y), (s.max, y)], BLACK.stroke_width(1))))
        });
        chart.draw_series(whiskers).map_err(e)?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(1.0, -0.5), (1.0, n as f64 - 0.5)],
                RED.stroke_width(1),
            )))
            .map_err(e)?;
        for (i, c) in cells.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(0.0, row_y(i)));
            let style = ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(HPos::Right, VPos::Center));
            root.draw(&Text::new(format!("{} / {}", c.workload, c.mode), (px - 8, py), style)).map_err(e)?;
            if c.vs_raw.is_none() && c.vs_qemu.is_none() {
                let style = ("sans-serif", 12).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
                let why =
                    if c.quring.iops.is_none() { "quring failed: no ratio" } else { "baselines failed: no ratio" };
                root.draw(&Text::new(why, (px + 6, py), style)).map_err(e)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{cells, tests::fixture};

    #[test]
    fn chart_svg() {
        let res = fixture();
        let cs = cells(&res);
        let refs: Vec<&Cell> = cs.iter().collect();
        let svg = ratio_chart("shm", &refs).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("randread-4k / standard"));
        assert!(svg.contains("quring failed: no ratio"));
        assert!(svg.contains("quring / QEMU"));
        assert!(svg.matches("<rect").count() > 4);
        assert!(ratio_chart("empty", &[]).unwrap().starts_with("<svg"));
    }
}
