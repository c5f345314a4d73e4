//! A loss-curve picture as a self-contained SVG: the training loss of every step and, when
//! there is held-out data, its loss at each evaluation, on axes with round tick labels.

use crate::error::{Error, Result};
use crate::io::write_atomic;
use std::fmt::Write;
use std::path::Path;

/// Round tick values covering `[lo, hi]`: about `target` steps of 1, 2 or 5 × 10^k.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A tick label with as many decimals as the tick spacing needs (none for integers).
fn label(v: f64, spacing: f64) -> String {
    let decimals = if spacing >= 1.0 {
        0
    } else {
        (-spacing.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

/// Writes an SVG line chart of `losses` (one per step, from step 1) and the evaluations
/// `evals` (`(step, loss)`) atomically. There must be at least one step.
pub fn write_loss_svg(
    path: &Path,
    losses: &[f64],
    evals: &[(usize, f64)],
    title: &str,
) -> Result<()> {
    if losses.is_empty() {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: "no steps: there is no loss to draw".into(),
        });
    }
    let (w, h) = (720.0, 420.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
    let finite: Vec<f64> = losses
        .iter()
        .chain(evals.iter().map(|(_, l)| l))
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if finite.is_empty() {
        (0.0, 1.0)
    } else if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        // A little air above and below the curve.
        let pad = 0.04 * (hi - lo);
        (lo - pad, hi + pad)
    };
    let steps = losses.len();
    // The step axis runs from 0 to the last step; step k is drawn at x(k).
    let x_max = steps.max(1) as f64;
    let x = |k: f64| left + (w - left - right) * k / x_max;
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
    let _ = writeln!(
        s,
        r##"<path d="M{left} {top} V{} H{}" stroke="black" fill="none"/>"##,
        h - bottom,
        w - right
    );
    // Loss axis: round values with grid lines.
    let yt = nice_ticks(lo, hi, 5);
    let yspacing = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
    for &v in &yt {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            y(v) + 4.0,
            label(v, yspacing),
            yy = y(v)
        );
    }
    // Step axis: round integers.
    let mut xt: Vec<f64> = nice_ticks(0.0, x_max, 6)
        .into_iter()
        .filter(|v| v.fract() == 0.0)
        .collect();
    if xt.is_empty() {
        xt = vec![0.0, x_max];
    }
    for &k in &xt {
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{}" y2="{}" stroke="black"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - bottom,
            h - bottom + 4.0,
            h - bottom + 18.0,
            label(k, 1.0),
            xx = x(k)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">step</text>"##,
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
        .map(|(i, &v)| format!("{:.1},{:.1}", x((i + 1) as f64), y(v)))
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
        pts.join(" ")
    );
    let ev: Vec<&(usize, f64)> = evals.iter().filter(|(_, v)| v.is_finite()).collect();
    if !ev.is_empty() {
        let pts: Vec<String> = ev
            .iter()
            .map(|(k, v)| format!("{:.1},{:.1}", x(*k as f64), y(*v)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#ff7f0e" stroke-width="2"/>"##,
            pts.join(" ")
        );
        for p in &pts {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r##"<circle cx="{cx}" cy="{cy}" r="3" fill="#ff7f0e"/>"##);
        }
        // Legend.
        let lx = w - right - 150.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" x2="{}" y1="{top}" y2="{top}" stroke="#1f77b4" stroke-width="2"/><text x="{}" y="{}">training</text><line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="#ff7f0e" stroke-width="2"/><text x="{}" y="{}">held-out (--eval-data)</text>"##,
            lx + 20.0,
            lx + 26.0,
            top + 4.0,
            lx + 20.0,
            top + 16.0,
            top + 16.0,
            lx + 26.0,
            top + 20.0
        );
    }
    s.push_str("</svg>\n");
    write_atomic(path, s.as_bytes())
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            nice_ticks(0.0, 300.0, 6),
            vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]
        );
        let t = nice_ticks(2.137, 3.961, 5);
        assert_eq!(t, vec![2.5, 3.0, 3.5]);
        let t = nice_ticks(0.0, 1.0, 5);
        assert_eq!(t.len(), 6, "{t:?}");
        assert_eq!(label(t[3], t[1] - t[0]), "0.6");
        assert_eq!(label(150.0, 50.0), "150");
        assert_eq!(nice_ticks(0.0, 7.0, 6), vec![0.0, 2.0, 4.0, 6.0]);
    }
}
