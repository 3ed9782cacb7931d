//! Plots as hand-written SVG (rects, lines, polylines and text): throughput
//! bars with min-max whiskers, latency percentile curves, and proxy memory
//! per idle session on a log scale.

use std::fmt::Write as _;

use serde_json::Value;

use super::report::median;

const WIDTH: f64 = 900.0;
const LEFT: f64 = 290.0;
const RIGHT: f64 = 40.0;
const BAR: f64 = 22.0;
const GAP: f64 = 8.0;
const TOP: f64 = 50.0;

/// Line colours for the curves, one per row in turn.
const PALETTE: [&str; 12] = [
    "#555555", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2",
    "#d62728", "#ff7f0e", "#7f7f7f", "#393b79",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fill(row: &Value) -> &'static str {
    match (
        row["family"].as_str(),
        row["tls"].as_bool().unwrap_or(false),
    ) {
        (Some("direct"), _) => "#888888",
        (Some("consolegate"), false) => "#ff7f0e",
        (Some("consolegate"), true) => "#ffbb78",
        (_, false) => "#1f77b4",
        (_, true) => "#aec7e8",
    }
}

fn header(height: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" font-size=\"16\" text-anchor=\"middle\">{}</text>\n",
        WIDTH / 2.0,
        esc(title)
    )
}

fn rows(report: &Value) -> Vec<&Value> {
    report["rows"]
        .as_array()
        .map(|v| v.iter().collect())
        .unwrap_or_default()
}

/// Every plot that has data: (file name, SVG text).
pub fn plots(report: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(s) = throughput(report) {
        out.push(("throughput.svg".to_owned(), s));
    }
    if let Some(s) = latency(report) {
        out.push(("latency.svg".to_owned(), s));
    }
    if let Some(s) = memory(report) {
        out.push(("memory.svg".to_owned(), s));
    }
    out
}

/// A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten.
fn nice_max(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * p)
}

/// Horizontal bars: `value(row)` gives (median, min, max).
fn bars(
    report: &Value,
    title: &str,
    axis: &str,
    log: bool,
    value: impl Fn(&str) -> Option<(f64, f64, f64)>,
) -> Option<String> {
    let data: Vec<(&Value, (f64, f64, f64))> = rows(report)
        .into_iter()
        .filter_map(|r| Some((r, value(r["id"].as_str()?)?)))
        .filter(|(_, (m, _, _))| *m > 0.0)
        .collect();
    if data.is_empty() {
        return None;
    }
    let height = TOP + data.len() as f64 * (BAR + GAP) + 50.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let top_value = data.iter().map(|(_, (_, _, hi))| *hi).fold(0.0, f64::max);
    let (lo_exp, hi_exp) = if log {
        let lo = data
            .iter()
            .map(|(_, (_, lo, _))| *lo)
            .fold(f64::INFINITY, f64::min);
        (
            lo.max(0.01).log10().floor(),
            top_value
                .max(0.01)
                .log10()
                .ceil()
                .max(lo.log10().floor() + 1.0),
        )
    } else {
        (0.0, nice_max(top_value))
    };
    let x = |v: f64| -> f64 {
        if log {
            let f = (v.max(1e-9).log10() - lo_exp) / (hi_exp - lo_exp);
            LEFT + f.clamp(0.0, 1.0) * plot_w
        } else {
            LEFT + (v / hi_exp).clamp(0.0, 1.0) * plot_w
        }
    };
    let mut s = header(height, title);
    let axis_y = height - 40.0;
    // Grid and ticks.
    let ticks: Vec<f64> = if log {
        (lo_exp as i32..=hi_exp as i32)
            .map(|e| 10f64.powi(e))
            .collect()
    } else {
        (0..=5).map(|i| hi_exp * f64::from(i) / 5.0).collect()
    };
    for t in ticks {
        let tx = x(t);
        let _ = writeln!(
            s,
            "<line x1=\"{tx:.1}\" y1=\"{TOP}\" x2=\"{tx:.1}\" y2=\"{axis_y}\" stroke=\"#dddddd\"/>\n\
             <text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            axis_y + 16.0,
            trim(t)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        LEFT + plot_w / 2.0,
        axis_y + 34.0,
        esc(axis)
    );
    for (i, (row, (m, lo, hi))) in data.iter().enumerate() {
        let y = TOP + i as f64 * (BAR + GAP);
        let label = row["label"].as_str().unwrap_or("?");
        let x0 = if log { LEFT } else { x(0.0) };
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{BAR}\" fill=\"{}\"/>\n\
             <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
            LEFT - 8.0,
            y + BAR * 0.7,
            esc(label),
            (x(*m) - x0).max(1.0),
            fill(row),
            x(*lo),
            y + BAR / 2.0,
            x(*hi),
            y + BAR / 2.0,
            x(*hi) + 4.0,
            y + BAR * 0.7,
            trim(*m)
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

/// A number with as few digits as it needs.
fn trim(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn min_med_max(report: &Value, id: &str, scenario: &str, metric: &str) -> Option<(f64, f64, f64)> {
    let c = &report["summary"][id][scenario][metric];
    Some((
        c["median"].as_f64()?,
        c["min"].as_f64()?,
        c["max"].as_f64()?,
    ))
}

fn throughput(report: &Value) -> Option<String> {
    bars(
        report,
        "Bulk throughput, compute to tenant (median, whiskers min-max)",
        "Gbit/s",
        false,
        |id| min_med_max(report, id, "bulk", "gbit_per_s"),
    )
}

fn memory(report: &Value) -> Option<String> {
    bars(
        report,
        "Proxy memory per idle session (median, whiskers min-max)",
        "KiB per session (log scale)",
        true,
        |id| {
            let direct = report["rows"]
                .as_array()?
                .iter()
                .any(|r| r["id"] == id && r["family"] == "direct");
            if direct {
                return None;
            }
            min_med_max(report, id, "idle", "proxy_kib_per_session")
        },
    )
}

/// Where a percentile sits on the x axis: log10(1 / (1 - q)), so 90, 99,
/// 99.9 are evenly spaced; 100 (the max) is put one step past 99.99.
fn q_pos(q: f64) -> f64 {
    if q >= 100.0 {
        5.0
    } else {
        (1.0 / (1.0 - q / 100.0)).log10().min(4.5)
    }
}

fn latency(report: &Value) -> Option<String> {
    let curves: Vec<(&Value, Vec<(f64, f64)>)> = rows(report)
        .into_iter()
        .filter_map(|r| {
            let c = report["summary"][r["id"].as_str()?]["latency"]["curve_us"].as_array()?;
            let pts: Vec<(f64, f64)> = c
                .iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .filter(|(_, us)| *us > 0.0)
                .collect();
            (!pts.is_empty()).then_some((r, pts))
        })
        .collect();
    if curves.is_empty() {
        return None;
    }
    let legend_h = 18.0 * curves.len() as f64;
    let plot_top = TOP;
    let plot_h = 380.0;
    let height = plot_top + plot_h + 60.0 + legend_h;
    let (left, plot_w) = (80.0, WIDTH - 80.0 - RIGHT);
    let all: Vec<f64> = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, us)| *us))
        .collect();
    let lo = all
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = all
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let x = |q: f64| left + q_pos(q) / 5.0 * plot_w;
    let y = |us: f64| plot_top + plot_h - (us.log10() - lo) / (hi - lo) * plot_h;
    let mut s = header(
        height,
        "Round-trip latency by percentile (median of runs, log scale)",
    );
    for (q, label) in [
        (0.0, "min"),
        (50.0, "50"),
        (90.0, "90"),
        (99.0, "99"),
        (99.9, "99.9"),
        (99.99, "99.99"),
        (100.0, "max"),
    ] {
        let tx = x(q);
        let _ = writeln!(
            s,
            "<line x1=\"{tx:.1}\" y1=\"{plot_top}\" x2=\"{tx:.1}\" y2=\"{:.1}\" stroke=\"#dddddd\"/>\n\
             <text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            plot_top + plot_h,
            plot_top + plot_h + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>",
        left + plot_w / 2.0,
        plot_top + plot_h + 34.0
    );
    for e in lo as i32..=hi as i32 {
        let v = 10f64.powi(e);
        let ty = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{ty:.1}\" x2=\"{:.1}\" y2=\"{ty:.1}\" stroke=\"#dddddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{} us</text>",
            left + plot_w,
            left - 6.0,
            ty + 4.0,
            trim(v)
        );
    }
    for (i, (row, pts)) in curves.iter().enumerate() {
        let colour = if row["family"] == "consolegate" {
            ["#ff7f0e", "#d62728", "#e377c2", "#ffbb78"][i % 4]
        } else {
            PALETTE[i % PALETTE.len()]
        };
        let dash = if row["tls"].as_bool().unwrap_or(false) {
            " stroke-dasharray=\"6 3\""
        } else {
            ""
        };
        let points: Vec<String> = pts
            .iter()
            .map(|(q, us)| format!("{:.1},{:.1}", x(*q), y(*us)))
            .collect();
        let ly = plot_top + plot_h + 52.0 + 18.0 * i as f64;
        let p99 = median(
            report,
            row["id"].as_str().unwrap_or(""),
            "latency",
            "p99_us",
        );
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/>\n\
             <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{} (p99 {} us)</text>",
            points.join(" "),
            ly - 4.0,
            left + 30.0,
            ly - 4.0,
            left + 36.0,
            ly,
            esc(row["label"].as_str().unwrap_or("?")),
            p99.map_or("-".into(), trim)
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plots_are_svg_with_one_bar_or_curve_per_row() {
        let stat = |m: f64| json!({"median": m, "min": m * 0.9, "max": m * 1.1, "n": 3});
        let report = json!({
            "rows": [
                {"id": "direct", "label": "direct", "family": "direct", "tls": false},
                {"id": "cg", "label": "consolegate <ws>", "family": "consolegate", "tls": false},
            ],
            "summary": {
                "direct": {"bulk": {"gbit_per_s": stat(12.0)},
                           "latency": {"curve_us": [[0.0, 8.0], [50.0, 10.0], [100.0, 40.0]]}},
                "cg": {"bulk": {"gbit_per_s": stat(6.0)},
                       "latency": {"curve_us": [[0.0, 20.0], [50.0, 25.0], [100.0, 90.0]]},
                       "idle": {"proxy_kib_per_session": stat(12.0)}},
            }
        });
        let plots = plots(&report);
        let names: Vec<&str> = plots.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["throughput.svg", "latency.svg", "memory.svg"]);
        let (_, bars) = &plots[0];
        assert!(bars.starts_with("<svg"));
        assert!(bars.trim_end().ends_with("</svg>"));
        assert_eq!(bars.matches("<rect").count(), 3, "background + 2 bars");
        assert!(bars.contains("consolegate &lt;ws&gt;"));
        assert_eq!(plots[1].1.matches("<polyline").count(), 2);
        assert_eq!(
            plots[2].1.matches("<rect").count(),
            2,
            "direct has no memory bar"
        );
        assert!(nice_max(7.3) == 10.0 && nice_max(13.0) == 20.0 && nice_max(0.3) == 0.5);
    }
}
