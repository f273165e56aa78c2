//! Plots as SVG, written by hand: line charts and bar charts.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 420.0;
const L: f64 = 70.0;
const R: f64 = 170.0;
const T: f64 = 40.0;
const B: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Half-width of an interval around each point (empty: none), drawn
    /// as a whisker.
    pub err: Vec<f64>,
}

impl Series {
    pub fn new(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            err: Vec::new(),
        }
    }
}

pub struct Axis {
    pub label: String,
    pub log: bool,
    pub min: f64,
    pub max: f64,
}

impl Axis {
    pub fn log(label: &str, min: f64, max: f64) -> Self {
        Self {
            label: label.into(),
            log: true,
            min,
            max,
        }
    }

    pub fn linear(label: &str, min: f64, max: f64) -> Self {
        Self {
            label: label.into(),
            log: false,
            min,
            max,
        }
    }
}

fn scale(a: &Axis, v: f64, lo: f64, hi: f64) -> f64 {
    let (v, mn, mx) = if a.log {
        (v.max(a.min).ln(), a.min.ln(), a.max.ln())
    } else {
        (v, a.min, a.max)
    };
    let f = ((v - mn) / (mx - mn)).clamp(0.0, 1.0);
    lo + f * (hi - lo)
}

fn ticks(a: &Axis) -> Vec<f64> {
    if a.log {
        let mut t = Vec::new();
        let mut v = 10f64.powf(a.min.log10().floor());
        while v <= a.max * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                let x = v * m;
                if x >= a.min * 0.9999 && x <= a.max * 1.0001 {
                    t.push(x);
                }
            }
            v *= 10.0;
        }
        t
    } else {
        (0..=5)
            .map(|i| a.min + (a.max - a.min) * i as f64 / 5.0)
            .collect()
    }
}

fn head(s: &mut String, title: &str) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        (L + W - R) / 2.0,
        esc(title)
    );
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn axes(s: &mut String, x: &Axis, y: &Axis) {
    let (x0, x1, y0, y1) = (L, W - R, H - B, T);
    let _ = writeln!(
        s,
        r#"<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="black" fill="none"/>"#
    );
    for t in ticks(x) {
        let px = scale(x, t, x0, x1);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{y0}" x2="{px:.1}" y2="{y1}" stroke="#eee"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + 16.0,
            fmt_tick(t)
        );
    }
    for t in ticks(y) {
        let py = scale(y, t, y0, y1);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            py + 4.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        H - 12.0,
        esc(&x.label)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (y0 + y1) / 2.0,
        esc(&y.label)
    );
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn legend(s: &mut String, names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        let y = T + 10.0 + 20.0 * i as f64;
        let x = W - R + 15.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="14" height="4" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            y - 4.0,
            COLORS[i % COLORS.len()],
            x + 20.0,
            y + 2.0,
            esc(n)
        );
    }
}

/// A line chart; `hline` draws a dashed reference at that y.
pub fn lines(title: &str, x: &Axis, y: &Axis, series: &[Series], hline: Option<f64>) -> String {
    let mut s = String::new();
    head(&mut s, title);
    axes(&mut s, x, y);
    for (i, se) in series.iter().enumerate() {
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(|(a, b)| a.is_finite() && b.is_finite())
            .map(|(a, b)| {
                format!(
                    "{:.1},{:.1}",
                    scale(x, *a, L, W - R),
                    scale(y, *b, H - B, T)
                )
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            pts.join(" "),
        );
        for ((a, b), e) in se.points.iter().zip(&se.err) {
            if !(a.is_finite() && b.is_finite() && e.is_finite()) {
                continue;
            }
            let px = scale(x, *a, L, W - R);
            let (lo, hi) = (scale(y, b - e, H - B, T), scale(y, b + e, H - B, T));
            let _ = writeln!(
                s,
                r#"<path d="M{px:.1},{lo:.1} L{px:.1},{hi:.1} M{:.1},{lo:.1} L{:.1},{lo:.1} M{:.1},{hi:.1} L{:.1},{hi:.1}" stroke="{color}" fill="none"/><circle cx="{px:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                px - 4.0,
                px + 4.0,
                px - 4.0,
                px + 4.0,
                scale(y, *b, H - B, T)
            );
        }
    }
    if let Some(h) = hline {
        let py = scale(y, h, H - B, T);
        let _ = writeln!(
            s,
            r#"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="black" stroke-dasharray="5,4"/>"#,
            W - R
        );
    }
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut s, &names);
    s.push_str("</svg>\n");
    s
}

/// A bar chart of one value per name; `hline` draws a dashed reference.
pub fn bars(title: &str, ylabel: &str, values: &[(String, f64)], hline: Option<f64>) -> String {
    let mut s = String::new();
    head(&mut s, title);
    let max = values
        .iter()
        .map(|v| v.1)
        .chain(hline)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let y = Axis {
        label: ylabel.into(),
        log: false,
        min: 0.0,
        max,
    };
    let x = Axis {
        label: String::new(),
        log: false,
        min: 0.0,
        max: 1.0,
    };
    let (x0, x1, y0) = (L, W - R, H - B);
    let _ = writeln!(
        s,
        r#"<path d="M{x0},{T} L{x0},{y0} L{x1},{y0}" stroke="black" fill="none"/>"#
    );
    for t in ticks(&y) {
        let py = scale(&y, t, y0, T);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            py + 4.0,
            fmt_tick(t)
        );
    }
    let _ = x;
    let n = values.len().max(1) as f64;
    let slot = (x1 - x0) / n;
    for (i, (name, v)) in values.iter().enumerate() {
        let v = if v.is_finite() { *v } else { max };
        let px = x0 + slot * (i as f64 + 0.2);
        let py = scale(&y, v, y0, T);
        let _ = writeln!(
            s,
            r#"<rect x="{px:.1}" y="{py:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            slot * 0.6,
            y0 - py,
            COLORS[i % COLORS.len()],
            px + slot * 0.3,
            y0 + 16.0,
            esc(name)
        );
    }
    if let Some(h) = hline {
        let py = scale(&y, h, y0, T);
        let _ = writeln!(
            s,
            r#"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="black" stroke-dasharray="5,4"/><text x="{}" y="{:.1}">lower bound</text>"#,
            x1 + 5.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (y0 + T) / 2.0,
        esc(ylabel)
    );
    s.push_str("</svg>\n");
    s
}
