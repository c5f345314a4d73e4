//! A loss-curve picture as a self-contained SVG.

use crate::error::Result;
use crate::io::write_atomic;
use std::fmt::Write;
use std::path::Path;

/// Writes an SVG line chart of `losses` (one per step, from step 1) atomically.
pub fn write_loss_svg(path: &Path, losses: &[f64], title: &str) -> Result<()> {
    let (w, h) = (720.0, 420.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let finite: Vec<f64> = losses.iter().copied().filter(|x| x.is_finite()).collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if finite.is_empty() {
        (0.0, 1.0)
    } else if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let n = losses.len().max(2);
    let x = |i: usize| left + (w - left - right) * i as f64 / (n - 1) as f64;
    let y = |v: f64| top + (h - top - bottom) * (hi - v) / (hi - lo);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"##,
        w / 2.0,
        escape(title)
    );
    // Axes, with the extreme values and a middle grid line.
    let _ = writeln!(
        s,
        r##"<path d="M{left} {top} V{} H{}" stroke="black" fill="none"/>"##,
        h - bottom,
        w - right
    );
    for v in [lo, (lo + hi) / 2.0, hi] {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.3}</text>"##,
            w - right,
            left - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{}" >1</text><text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="middle">step</text>"##,
        h - bottom + 18.0,
        w - right,
        h - bottom + 18.0,
        losses.len(),
        (left + w - right) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r##"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">loss</text>"##,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    let pts: Vec<String> = losses
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v)))
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
        pts.join(" ")
    );
    s.push_str("</svg>\n");
    write_atomic(path, s.as_bytes())
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
