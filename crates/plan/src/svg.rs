//! Hand-written SVG charts (grouped bars, lines, a pipeline timeline): no plotting
//! dependency, deterministic output that diffs cleanly.

use crate::sim::{Span, SpanKind};
use std::fmt::Write;

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

/// One named series of values, one per category / x.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum and tick step for data up to `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|f| f * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn header(out: &mut String, w: f64, h: f64, title: &str) {
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        w / 2.0,
        esc(title)
    );
}

#[allow(clippy::too_many_arguments)]
fn y_axis(
    out: &mut String,
    x0: f64,
    y0: f64,
    x1: f64,
    plot_h: f64,
    ymax: f64,
    step: f64,
    label: &str,
) {
    let mut v = 0.0;
    while v <= ymax + step * 1e-9 {
        let y = y0 - v / ymax * plot_h;
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#ddd"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            x0 - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
        v += step;
    }
    let _ = writeln!(
        out,
        r#"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="black"/>"#,
        y0 - plot_h
    );
    let _ = writeln!(
        out,
        r#"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        y0 - plot_h / 2.0,
        esc(label)
    );
}

fn legend(out: &mut String, x: f64, y: f64, names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        let yy = y + i as f64 * 18.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/>"#,
            yy - 10.0,
            PALETTE[i % PALETTE.len()]
        );
        let _ = writeln!(out, r#"<text x="{}" y="{yy}">{}</text>"#, x + 18.0, esc(n));
    }
}

/// Grouped bars: one group per category, one bar per series; values printed on the bars.
pub fn grouped_bars(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[Series],
) -> String {
    let (w, h) = (760.0, 420.0);
    let (x0, y0, x1, top) = (70.0, 360.0, 560.0, 40.0);
    let plot_h = y0 - top;
    let vmax = series
        .iter()
        .flat_map(|s| s.values.iter().cloned())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (ymax, step) = nice_axis(vmax);
    let mut out = String::new();
    header(&mut out, w, h, title);
    y_axis(&mut out, x0, y0, x1, plot_h, ymax, step, y_label);
    let groups = categories.len().max(1) as f64;
    let gw = (x1 - x0) / groups;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    for (c, cat) in categories.iter().enumerate() {
        let gx = x0 + c as f64 * gw + gw * 0.1;
        for (si, s) in series.iter().enumerate() {
            let v = s.values.get(c).cloned().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let bh = v / ymax * plot_h;
            let x = gx + si as f64 * bw;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{}"/>"#,
                y0 - bh,
                bw * 0.92,
                PALETTE[si % PALETTE.len()]
            );
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                x + bw * 0.46,
                y0 - bh - 3.0,
                fmt_tick(v)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x0 + c as f64 * gw + gw / 2.0,
            y0 + 18.0,
            esc(cat)
        );
    }
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut out, x1 + 20.0, top + 20.0, &names);
    out.push_str("</svg>\n");
    out
}

/// Lines with markers over shared x values.
pub fn lines(title: &str, x_label: &str, y_label: &str, xs: &[f64], series: &[Series]) -> String {
    let (w, h) = (760.0, 420.0);
    let (x0, y0, x1, top) = (70.0, 360.0, 560.0, 40.0);
    let plot_h = y0 - top;
    let vmax = series
        .iter()
        .flat_map(|s| s.values.iter().cloned())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (ymax, step) = nice_axis(vmax);
    let xmin = xs.iter().cloned().fold(f64::INFINITY, f64::min);
    let xmax = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let xspan = if xmax > xmin { xmax - xmin } else { 1.0 };
    let px = |x: f64| x0 + 20.0 + (x - xmin) / xspan * (x1 - x0 - 40.0);
    let mut out = String::new();
    header(&mut out, w, h, title);
    y_axis(&mut out, x0, y0, x1, plot_h, ymax, step, y_label);
    for &x in xs {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(x),
            y0 + 18.0,
            fmt_tick(x)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        y0 + 40.0,
        esc(x_label)
    );
    for (si, s) in series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let pts: Vec<String> = xs
            .iter()
            .zip(&s.values)
            .filter(|(_, v)| v.is_finite())
            .map(|(x, v)| format!("{:.1},{:.1}", px(*x), y0 - v / ymax * plot_h))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, r#"<circle cx="{x}" cy="{y}" r="3.5" fill="{color}"/>"#);
        }
    }
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut out, x1 + 20.0, top + 20.0, &names);
    out.push_str("</svg>\n");
    out
}

/// A Gantt chart of one simulated step: rows are nodes, bars are tasks coloured by
/// micro-batch (communication rows in grey tones).
pub fn timeline(title: &str, rows: &[String], spans: &[Span], max_layers: Option<u32>) -> String {
    let spans: Vec<&Span> = spans
        .iter()
        .filter(|s| max_layers.is_none_or(|m| s.layer < m))
        .collect();
    let t0 = spans
        .iter()
        .map(|s| s.start_s)
        .fold(f64::INFINITY, f64::min);
    let t1 = spans
        .iter()
        .map(|s| s.end_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let (t0, t1) = if t0.is_finite() && t1 > t0 {
        (t0, t1)
    } else {
        (0.0, 1.0)
    };
    let row_h = 22.0;
    let (x0, x1, top) = (150.0, 940.0, 40.0);
    let h = top + rows.len() as f64 * row_h + 70.0;
    let w = 960.0;
    let px = |t: f64| x0 + (t - t0) / (t1 - t0) * (x1 - x0);
    let mut out = String::new();
    header(&mut out, w, h, title);
    for (i, r) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            x0 - 8.0,
            y + 15.0,
            esc(r)
        );
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{:.1}" x2="{x1}" y2="{:.1}" stroke="#eee"/>"##,
            y + row_h,
            y + row_h
        );
    }
    for s in &spans {
        let y = top + s.row as f64 * row_h + 3.0;
        let color = match s.kind {
            SpanKind::Attention | SpanKind::Expert => {
                PALETTE[s.micro_batch as usize % PALETTE.len()]
            }
            SpanKind::Dispatch => "#999999",
            SpanKind::Combine => "#666666",
        };
        let _ = writeln!(
            out,
            r#"<rect x="{:.2}" y="{y:.1}" width="{:.2}" height="{}" fill="{color}" stroke="white" stroke-width="0.3"><title>layer {} mb {} {:?} {:.3}-{:.3} ms</title></rect>"#,
            px(s.start_s),
            (px(s.end_s) - px(s.start_s)).max(0.5),
            row_h - 6.0,
            s.layer,
            s.micro_batch,
            s.kind,
            (s.start_s - t0) * 1e3,
            (s.end_s - t0) * 1e3
        );
    }
    let yb = top + rows.len() as f64 * row_h + 20.0;
    let (tmax, step) = nice_axis((t1 - t0) * 1e3);
    let mut v = 0.0;
    while v <= tmax + 1e-9 && v <= (t1 - t0) * 1e3 + 1e-9 {
        let x = px(t0 + v / 1e3);
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{yb}" text-anchor="middle">{}</text>"#,
            fmt_tick(v)
        );
        v += step;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">time within the step, ms (colour = micro-batch)</text>"#,
        (x0 + x1) / 2.0,
        yb + 22.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed() {
        let s = grouped_bars(
            "t <x>",
            "y",
            &["a".into(), "b".into()],
            &[Series {
                name: "s".into(),
                values: vec![1.0, 2.5],
            }],
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("t &lt;x&gt;"));
        let l = lines(
            "t",
            "x",
            "y",
            &[1.0, 2.0],
            &[Series {
                name: "s".into(),
                values: vec![1.0, f64::NAN],
            }],
        );
        assert!(l.contains("polyline"));
        assert_eq!(nice_axis(7.3), (8.0, 2.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
    }
}
