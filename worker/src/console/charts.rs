//! Charts drawn as SVG on the server: no script, no chart library to ship or vendor. Colours
//! are SVG `fill` attributes, never `style`: the console's Content-Security-Policy allows no
//! inline style.

use maud::{Markup, html};

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 20.0;

/// One stack: where it is, its segments (top, height, colour) and its hover text.
struct Bar<'a> {
    x: f64,
    segments: Vec<(f64, f64, &'a str)>,
    tip: String,
}

/// Stacked bars, one per label (x), one colour per series; the y axis from 0 to the tallest
/// stack. Each bar carries a `<title>` with its numbers, which a browser shows on hover.
pub fn stacked_bars(title: &str, labels: &[String], series: &[(&str, &str, Vec<i64>)]) -> Markup {
    let n = labels.len().max(1);
    let totals: Vec<i64> = (0..n)
        .map(|i| {
            series
                .iter()
                .map(|(_, _, v)| v.get(i).copied().unwrap_or(0).max(0))
                .sum()
        })
        .collect();
    let top = totals.iter().copied().max().unwrap_or(0).max(1);
    let plot_w = WIDTH - LEFT;
    let plot_h = HEIGHT - BOTTOM;
    let slot = plot_w / n as f64;
    let bar = (slot * 0.8).max(1.0);
    let y = |v: i64| plot_h - (v as f64 / top as f64) * plot_h;
    let bars: Vec<Bar<'_>> = (0..labels.len())
        .map(|i| {
            let mut base = 0i64;
            let mut segments = Vec::new();
            let mut tip = labels[i].clone();
            for (name, colour, v) in series {
                let value = v.get(i).copied().unwrap_or(0).max(0);
                tip.push_str(&format!(" · {name} {value}"));
                if value > 0 {
                    segments.push((y(base + value), y(base) - y(base + value), *colour));
                }
                base += value;
            }
            Bar {
                x: LEFT + i as f64 * slot + (slot - bar) / 2.0,
                segments,
                tip,
            }
        })
        .collect();
    html! {
        figure.chart {
            figcaption { (title) }
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title) xmlns="http://www.w3.org/2000/svg" {
                line x1=(LEFT) y1="0" x2=(LEFT) y2=(plot_h) stroke="#999" {}
                line x1=(LEFT) y1=(plot_h) x2=(WIDTH) y2=(plot_h) stroke="#999" {}
                text x=(LEFT - 4.0) y="10" text-anchor="end" font-size="10" { (top) }
                text x=(LEFT - 4.0) y=(plot_h) text-anchor="end" font-size="10" { "0" }
                @for (i, b) in bars.iter().enumerate() {
                    g {
                        title { (b.tip) }
                        @for (y0, h, colour) in &b.segments {
                            rect x=(format!("{:.1}", b.x)) y=(format!("{y0:.1}")) width=(format!("{bar:.1}")) height=(format!("{h:.1}")) fill=(colour) {}
                        }
                    }
                    @if i % 10 == 0 {
                        text x=(format!("{:.1}", b.x)) y=(HEIGHT - 6.0) font-size="10" { (labels.get(i).map(String::as_str).unwrap_or("")) }
                    }
                }
            }
            p.legend { @for (name, colour, v) in series {
                svg.swatch width="10" height="10" viewBox="0 0 10 10" aria-hidden="true" { rect width="10" height="10" fill=(colour) {} } " " (name) " " b { (v.iter().sum::<i64>()) } " "
            } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_is_as_tall_as_its_values_and_the_tallest_fills_the_plot() {
        let labels = vec!["a".to_owned(), "b".to_owned()];
        let svg = stacked_bars(
            "t",
            &labels,
            &[("x", "#000", vec![1, 4]), ("y", "#111", vec![1, 0])],
        )
        .into_string();
        // The tallest stack (4) reaches the top of the plot; the value 1 on top of 1 ends halfway
        // up a plot scaled to 4 (160 * (1 - 2/4) = 80).
        assert!(svg.contains(r#"y="0.0""#), "{svg}");
        assert!(svg.contains(r#"y="80.0""#), "{svg}");
        assert!(svg.contains("a · x 1 · y 1"), "{svg}");
        assert!(
            svg.contains("<b>5</b>") && svg.contains("<b>1</b>"),
            "{svg}"
        );
    }

    #[test]
    fn a_chart_without_data_draws_an_empty_plot() {
        let svg = stacked_bars("t", &[], &[("x", "#000", vec![])]).into_string();
        let (plot, legend) = svg.split_once(r#"<p class="legend">"#).unwrap();
        assert!(!plot.contains("<rect"), "{svg}");
        assert!(legend.contains("x <b>0</b>"), "{svg}");
    }
}
