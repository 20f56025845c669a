//! SVG line plots for budget sweeps, scatter plots of methods, Markdown tables for reports.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::error::{Error, Result};

/// One named curve; points are (x, y), in any order.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A plot range around `[lo, hi]` with 5% margins, widened when all values are equal.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        (lo.abs() * 0.1).max(1.0)
    };
    (lo - pad, hi + pad)
}

type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type DrawResult = std::result::Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// Writes an SVG plot to `path`: the frame (caption, axes, mesh) over the padded range of
/// `points`, the series `body` draws, and their legend. Fails on no points or a non-finite
/// coordinate.
fn draw(
    path: &Path,
    size: (u32, u32),
    title: &str,
    (x_label, y_label): (&str, &str),
    points: impl Iterator<Item = (f64, f64)>,
    body: impl FnOnce(&mut Chart) -> DrawResult,
) -> Result<()> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut any = false;
    for (x, y) in points {
        if !x.is_finite() || !y.is_finite() {
            return Err(Error::InvalidInput(format!(
                "plot {}: point ({x}, {y}) is not finite",
                path.display()
            )));
        }
        any = true;
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !any {
        return Err(Error::InvalidInput(format!(
            "plot {}: no points to draw",
            path.display()
        )));
    }
    let (x0, x1) = padded(x0, x1);
    let (y0, y1) = padded(y0, y1);

    let plot_err = |e: &dyn std::fmt::Display| Error::Plot(format!("{}: {e}", path.display()));
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| plot_err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| plot_err(&e))?;
    body(&mut chart).map_err(|e| plot_err(&e))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| plot_err(&e))?;
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}

/// Writes an SVG line plot to `path`: one colour and legend entry per series, each point
/// marked and the points joined in x order. Fails on no points or a non-finite coordinate.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let points = series.iter().flat_map(|s| s.points.iter().copied());
    draw(
        path,
        (900, 560),
        title,
        (x_label, y_label),
        points,
        |chart| {
            for (i, s) in series.iter().enumerate() {
                let colour = Palette99::pick(i).to_rgba();
                let mut pts = s.points.clone();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                chart
                    .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
            }
            Ok(())
        },
    )
}

/// One named set of labelled points (x, y, label).
#[derive(Clone, Debug, PartialEq)]
pub struct Labelled {
    pub name: String,
    pub points: Vec<(f64, f64, String)>,
}

/// Writes an SVG scatter plot to `path`: one colour and legend entry per set, each point
/// marked and labelled (points are not joined: they are different methods, not a curve).
pub fn scatter_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    sets: &[Labelled],
) -> Result<()> {
    let points = sets
        .iter()
        .flat_map(|s| s.points.iter().map(|p| (p.0, p.1)));
    draw(
        path,
        (1000, 640),
        title,
        (x_label, y_label),
        points,
        |chart| {
            for (i, s) in sets.iter().enumerate() {
                let colour = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(
                        s.points
                            .iter()
                            .map(|p| Circle::new((p.0, p.1), 5, colour.filled())),
                    )?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, colour.filled()));
                chart.draw_series(s.points.iter().map(|p| {
                    Text::new(
                        p.2.clone(),
                        (p.0, p.1),
                        ("sans-serif", 12).into_font().color(&colour),
                    )
                }))?;
            }
            Ok(())
        },
    )
}

/// A GitHub-flavoured Markdown table, columns padded to equal width. Rows shorter than the
/// widest row get empty cells; `|` in a cell is escaped and newlines become spaces.
pub fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |s: &str| s.replace('|', "\\|").replace(['\r', '\n'], " ");
    let ncols = rows
        .iter()
        .map(Vec::len)
        .chain(std::iter::once(headers.len()))
        .max()
        .unwrap_or(0);
    let mut table: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    table.push(headers.iter().map(|h| clean(h)).collect());
    table.extend(rows.iter().map(|r| r.iter().map(|c| clean(c)).collect()));
    for row in &mut table {
        row.resize(ncols, String::new());
    }
    let mut widths = vec![3usize; ncols];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (cell, &w) in cells.iter().zip(&widths) {
            let pad = w - cell.chars().count();
            s.push(' ');
            s.push_str(cell);
            s.push_str(&" ".repeat(pad));
            s.push_str(" |");
        }
        s.push('\n');
        s
    };
    let mut out = line(&table[0]);
    out.push('|');
    for &w in &widths {
        out.push_str(&"-".repeat(w + 2));
        out.push('|');
    }
    out.push('\n');
    for row in &table[1..] {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that every element opened in `svg` is closed in order (a small well-formedness
    /// check; processing instructions, comments and self-closing tags are skipped).
    fn tags_balanced(svg: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let Some(end) = rest[start..].find('>') else {
                return false;
            };
            let tag = &rest[start + 1..start + end];
            rest = &rest[start + end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            let name: String = tag
                .trim_start_matches('/')
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            if tag.starts_with('/') {
                if stack.pop().as_deref() != Some(name.as_str()) {
                    return false;
                }
            } else {
                stack.push(name);
            }
        }
        stack.is_empty()
    }

    /// The trimmed contents of every `<text>` element.
    fn texts(svg: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find("<text") {
            let after = &rest[start..];
            let (Some(open_end), Some(close)) = (after.find('>'), after.find("</text>")) else {
                break;
            };
            out.push(after[open_end + 1..close].trim().to_string());
            rest = &after[close..];
        }
        out
    }

    #[test]
    fn writes_svg_with_series_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.svg");
        let series = vec![
            Series {
                name: "SamKV".into(),
                // Out of x order on purpose; the line must still be drawn left to right.
                points: vec![(0.3, 0.41), (0.1, 0.35), (0.2, 0.40)],
            },
            Series {
                name: "CacheBlend & co".into(),
                points: vec![(0.1, 0.30), (0.2, 0.33), (0.3, 0.36)],
            },
        ];
        line_plot(&path, "F1 vs budget", "kept fraction", "F1", &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(tags_balanced(&svg));
        let t = texts(&svg);
        for want in [
            "SamKV",
            "CacheBlend &amp; co",
            "F1 vs budget",
            "kept fraction",
            "F1",
        ] {
            assert!(t.iter().any(|x| x == want), "no <text> {want:?} in {t:?}");
        }
        // Two series -> two polylines and six point markers.
        assert!(svg.matches("<polyline").count() >= 2);
        assert_eq!(svg.matches("<circle").count(), 6);
    }

    #[test]
    fn rejects_empty_and_non_finite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.svg");
        assert!(matches!(
            line_plot(&path, "t", "x", "y", &[]),
            Err(Error::InvalidInput(_))
        ));
        let bad = [Series {
            name: "s".into(),
            points: vec![(0.0, f64::NAN)],
        }];
        assert!(matches!(
            line_plot(&path, "t", "x", "y", &bad),
            Err(Error::InvalidInput(_))
        ));
        // A single point still gets a usable (non-degenerate) range.
        let one = [Series {
            name: "one".into(),
            points: vec![(1.0, 1.0)],
        }];
        line_plot(&path, "t", "x", "y", &one).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(texts(&svg).iter().any(|x| x == "one"));
    }

    #[test]
    fn markdown_table_layout() {
        let rows = vec![
            vec!["Recompute".to_string(), "0.444".to_string()],
            vec!["SamKV".to_string(), "0.453".to_string()],
        ];
        let t = markdown_table(&["method", "F1"], &rows);
        let expected = "\
| method    | F1    |
|-----------|-------|
| Recompute | 0.444 |
| SamKV     | 0.453 |
";
        assert_eq!(t, expected);
    }

    #[test]
    fn markdown_table_ragged_and_escaped() {
        let rows = vec![
            vec!["a|b".to_string()],
            vec!["x".into(), "y\nz".into(), "w".into()],
        ];
        let t = markdown_table(&["h"], &rows);
        let expected = "\
| h    |     |     |
|------|-----|-----|
| a\\|b |     |     |
| x    | y z | w   |
";
        assert_eq!(t, expected);
    }
}
