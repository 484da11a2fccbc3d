//! Human-readable output: times in the business time zone, ages, aligned tables, progress bars.

use std::io::{self, Write};
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether a byte is a terminal control character to show escaped: C0 controls but newline
/// and tab, and DEL. Provider strings (messages, codes, ids) reach the operator's terminal,
/// and ESC, CR or BEL there could clear the screen, hide a line or retitle the window. These
/// bytes never occur inside a multi-byte UTF-8 character, so escaping them byte by byte keeps
/// the rest of the text intact.
fn is_terminal_control(b: u8) -> bool {
    (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f
}

/// `text` with terminal control characters shown as `\u{1b}` escapes: the one rule every
/// text renderer's output goes through ([`Escaped`]).
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match u8::try_from(c) {
            Ok(b) if is_terminal_control(b) => out.push_str(&format!("\\u{{{b:x}}}")),
            _ => out.push(c),
        }
    }
    out
}

/// A writer that passes everything through [`escape_controls`]'s rule: refundctl's output
/// goes through it, so no renderer can print a provider's control characters raw. JSON output
/// is unchanged by it (serde_json already writes control characters as `\u001b`).
pub struct Escaped<W> {
    inner: W,
}

impl<W: Write> Escaped<W> {
    pub fn new(inner: W) -> Self {
        Self { inner }
    }
}

impl<W: Write> Write for Escaped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut start = 0;
        for (i, &b) in buf.iter().enumerate() {
            if is_terminal_control(b) {
                self.inner.write_all(&buf[start..i])?;
                write!(self.inner, "\\u{{{b:x}}}")?;
                start = i + 1;
            }
        }
        self.inner.write_all(&buf[start..])?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A `--since`: an age back from now (`45s`, `30m`, `2h`, `7d`) or an RFC 3339 time.
pub fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    let t = s.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(t) {
        return Ok(at.with_timezone(&Utc));
    }
    let unit = t.chars().last().unwrap_or(' ');
    let seconds: i64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3_600,
        'd' => 86_400,
        _ => 0,
    };
    let n: Option<i64> = t[..t.len() - unit.len_utf8().min(t.len())].parse().ok();
    let at = n
        .filter(|n| *n >= 0 && seconds > 0)
        .and_then(|n| n.checked_mul(seconds))
        .and_then(chrono::Duration::try_seconds)
        .and_then(|age| Utc::now().checked_sub_signed(age));
    match at {
        Some(at) => Ok(at),
        None => Err(format!(
            "{s:?} is neither an age like 30m, 2h or 7d nor an RFC 3339 time like \
             2026-11-21T10:00:00+08:00"
        )),
    }
}

/// `2026-11-21 10:00:03 +08:00` in the business time zone.
pub fn time(at: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    at.with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S %:z")
        .to_string()
}

/// `2026-11-21 10:00:03.123 +08:00`, for timelines where order within a second matters.
pub fn time_ms(at: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    at.with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S%.3f %:z")
        .to_string()
}

/// How long ago, compactly: `12s`, `4m10s`, `5h12m`, `3d4h`.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m, sec) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    }
}

/// Seconds from `at` to now.
pub fn seconds_since(at: DateTime<Utc>) -> i64 {
    (Utc::now() - at).num_seconds()
}

/// A time with its age: `2026-11-21 10:00:03 +08:00 (3h12m ago)`.
pub fn time_ago(at: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    format!("{} ({} ago)", time(at, tz), age(seconds_since(at)))
}

/// Microseconds as milliseconds with one decimal: `12.3 ms`.
pub fn latency(us: i64) -> String {
    format!("{}.{} ms", us / 1000, (us % 1000) / 100)
}

/// Cuts text to at most `max` characters, marking the cut; newlines become spaces.
pub fn cut(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut s: String = flat.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// An optional value, `-` when absent.
pub fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Writes an aligned table; columns listed in `right` are right-aligned (numbers).
pub fn table(
    out: &mut dyn Write,
    indent: &str,
    headers: &[&str],
    rows: &[Vec<String>],
    right: &[usize],
) -> io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut s = String::from(indent);
        for (i, cell) in cells.into_iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if right.contains(&i) {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            } else {
                s.push_str(cell);
                if i != last {
                    s.push_str(&" ".repeat(pad));
                }
            }
            if i != last {
                s.push_str("  ");
            }
        }
        s.trim_end().to_owned()
    };
    writeln!(out, "{}", line(headers.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// A progress bar on stderr, or nothing when `show` is false (not a terminal).
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(show: bool, len: u64, what: &str) -> Self {
        if !show || len == 0 {
            return Self { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:40}] {pos}/{len} ({percent}%) eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar: Some(bar) }
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Runs `f` (which writes a result line) with the bar cleared, so lines and bar don't mix.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_control_characters_are_shown_escaped_and_text_is_kept() {
        assert_eq!(
            escape_controls("a\x1b[2Jb\r\x07\x7f"),
            "a\\u{1b}[2Jb\\u{d}\\u{7}\\u{7f}"
        );
        assert_eq!(
            escape_controls("line\n\tnext ünïcode"),
            "line\n\tnext ünïcode"
        );
        let mut buf: Vec<u8> = Vec::new();
        {
            let mut w = Escaped::new(&mut buf);
            writeln!(w, "msg: \x1b[2J ünï").unwrap();
        }
        assert_eq!(String::from_utf8(buf).unwrap(), "msg: \\u{1b}[2J ünï\n");
    }

    #[test]
    fn since_takes_an_age_or_an_rfc3339_time() {
        let now = Utc::now();
        let two_hours = parse_since("2h").unwrap();
        assert!(
            (now - two_hours - chrono::Duration::hours(2))
                .num_seconds()
                .abs()
                <= 1
        );
        let week = parse_since("7d").unwrap();
        assert!((now - week - chrono::Duration::days(7)).num_seconds().abs() <= 1);
        assert_eq!(
            parse_since("2026-11-21T10:00:00+08:00").unwrap(),
            "2026-11-21T02:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        for bad in [
            "yesterday",
            "2",
            "h",
            "",
            "-3h",
            "3w",
            "99999999999999999d",
            "9999999999999999s",
        ] {
            assert!(parse_since(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ages_are_compact() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(59), "59s");
        assert_eq!(age(250), "4m10s");
        assert_eq!(age(3 * 3600 + 12 * 60 + 5), "3h12m");
        assert_eq!(age(2 * 86_400 + 5 * 3600), "2d5h");
        assert_eq!(age(-5), "0s");
    }

    #[test]
    fn tables_align_columns_and_right_align_numbers() {
        let mut out = Vec::new();
        table(
            &mut out,
            "",
            &["CAUSE", "COUNT", "NOTE"],
            &[
                vec!["retries_exhausted".into(), "7".into(), "x".into()],
                vec!["a".into(), "1234".into(), "y".into()],
            ],
            &[1],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "CAUSE              COUNT  NOTE\nretries_exhausted      7  x\na                   1234  y\n"
        );
    }

    #[test]
    fn cut_marks_the_cut_and_flattens_newlines() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("abcdefgh", 5), "abcd…");
        assert_eq!(cut("a\nb", 5), "a b");
    }
}
