//! Small hand-written SVG line charts: throughput and p99 latency against
//! concurrency (durable vs the answer-before-upload upper bound), and
//! commit cost against database size.

pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// One panel: x on a log2 scale (concurrency), y linear from 0.
fn panel(
    out: &mut String,
    x0: f64,
    title: &str,
    (x_label, y_label): (&str, &str),
    series: &[Series],
) {
    let (w, h, left, top) = (380.0, 260.0, 60.0, 40.0);
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let (xmin, xmax) = (
        xs.iter().cloned().fold(f64::MAX, f64::min).max(1.0).log2(),
        xs.iter().cloned().fold(1.0, f64::max).log2(),
    );
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let px = |x: f64| {
        x0 + left + (x.max(1.0).log2() - xmin) / (xmax - xmin).max(1e-9) * (w - left - 20.0)
    };
    let py = |y: f64| top + (h - top - 40.0) * (1.0 - y / ymax);
    out.push_str(&format!(
        "<text x=\"{}\" y=\"24\" font-size=\"14\" font-weight=\"bold\">{title}</text>\n",
        x0 + left
    ));
    out.push_str(&format!(
        "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"#333\"/><line x1=\"{0}\" y1=\"{2}\" x2=\"{3}\" y2=\"{2}\" stroke=\"#333\"/>\n",
        x0 + left,
        top,
        py(0.0),
        x0 + w - 20.0
    ));
    for i in 0..=4 {
        let y = ymax * i as f64 / 4.0;
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{:.0}</text>\n",
            x0 + left - 4.0,
            py(y) + 3.0,
            y
        ));
    }
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ticks.dedup();
    for x in ticks {
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{x}</text>\n",
            px(x),
            py(0.0) + 14.0
        ));
    }
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{x_label}</text>\n",
        x0 + left + (w - left) / 2.0,
        py(0.0) + 30.0
    ));
    out.push_str(&format!("<text x=\"{}\" y=\"{}\" font-size=\"11\" transform=\"rotate(-90 {} {})\" text-anchor=\"middle\">{y_label}</text>\n", x0 + 14.0, top + 90.0, x0 + 14.0, top + 90.0));
    for (n, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
            s.color,
            path.join(" ")
        ));
        for (x, y) in &s.points {
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>\n",
                px(*x),
                py(*y),
                s.color
            ));
        }
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{}\">{}</text>\n",
            x0 + left + 10.0,
            top + 14.0 + 14.0 * n as f64,
            s.color,
            s.name
        ));
    }
}

pub fn chart(throughput: &[Series], p99: &[Series]) -> String {
    let mut out = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"780\" height=\"270\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
    );
    panel(
        &mut out,
        0.0,
        "Increments per second",
        ("concurrent clients", "increments/s"),
        throughput,
    );
    panel(
        &mut out,
        390.0,
        "p99 latency",
        ("concurrent clients", "ms"),
        p99,
    );
    out.push_str("</svg>\n");
    out
}

/// Commit cost against database size (x on a log scale): latency on the
/// left, bytes uploaded per commit on the right.
pub fn size_chart(latency: &[Series], bytes: &[Series]) -> String {
    let mut out = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"780\" height=\"270\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
    );
    panel(
        &mut out,
        0.0,
        "Commit p50, one client",
        ("database size (MB)", "ms"),
        latency,
    );
    panel(
        &mut out,
        390.0,
        "Uploaded per commit",
        ("database size (MB)", "KiB"),
        bytes,
    );
    out.push_str("</svg>\n");
    out
}
