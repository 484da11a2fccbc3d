//! `enqueue --file F`: publishes v1 requests from a JSON-lines file with publisher confirms.
//!
//! Every line is validated with the intake's own parser ([`shared::job::parse_request`]), so a
//! line that the worker would reject is reported here — line number, field, reason — and not
//! published. Valid lines are published as they are, persistent and mandatory, with up to
//! [`WINDOW`] confirms outstanding. Blank lines are skipped. Publishing a file again is safe:
//! the worker takes a repeated `refund_no` with the same content as a duplicate.

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use shared::job::{Rejection, parse_request, sniff_refund_no};

use super::publish::{PendingConfirm, Publisher};
use super::render::Progress;
use super::{Ctl, Out, Status};

/// Confirms outstanding at most.
pub const WINDOW: usize = 256;

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    refundctl enqueue --file requests.jsonl\n  \
    jq -c '.[]' batch.json | refundctl enqueue --file -")]
pub struct EnqueueArgs {
    /// JSON-lines file, one v1 request per line (`-` reads standard input).
    #[arg(long, value_name = "F")]
    pub file: PathBuf,
}

/// A line that was not published, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineProblem {
    /// 1-based line number in the file.
    pub line: usize,
    pub refund_no: Option<String>,
    /// The field at fault (`$` for the line as a whole), or `broker`.
    pub field: String,
    pub reason: String,
}

/// What an enqueue did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnqueueReport {
    /// Lines the broker confirmed.
    pub accepted: usize,
    /// Lines that are not valid requests (not published).
    pub invalid: Vec<LineProblem>,
    /// Valid lines the broker did not take (nack, unroutable).
    pub not_published: Vec<LineProblem>,
    pub blank: usize,
}

impl EnqueueReport {
    pub fn status(&self) -> Status {
        Status::from_ok(self.invalid.is_empty() && self.not_published.is_empty())
    }
}

/// Validates and publishes every line of `args.file`.
pub async fn enqueue(
    ctl: &Ctl,
    args: &EnqueueArgs,
    out: &mut Out,
) -> anyhow::Result<EnqueueReport> {
    let data = if args.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        buf
    } else {
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?
    };
    let lines: Vec<&[u8]> = data
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect();
    let mut report = EnqueueReport::default();
    let content_lines = lines
        .iter()
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    if content_lines == 0 {
        report.blank = lines.len().saturating_sub(1);
        writeln!(
            out,
            "accepted 0, invalid 0: {} has no requests",
            args.file.display()
        )?;
        return Ok(report);
    }
    let publisher = Publisher::connect(&ctl.config, "refundctl-enqueue").await?;
    let progress = Progress::new(ctl.progress, content_lines as u64, "enqueue");
    let mut pending: VecDeque<(usize, Option<String>, PendingConfirm)> = VecDeque::new();
    let last = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        let number = i + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            // The empty piece after a final newline is not a line.
            if number != last || !line.is_empty() {
                report.blank += 1;
            }
            continue;
        }
        // What the worker's intake refuses is not published: a malformed line, or a merchant
        // this config has no client for (the worker would dead-letter it unsent).
        let parsed = parse_request(line).and_then(|request| {
            if ctl
                .idempotency
                .is_configured(request.provider.as_str(), &request.merchant)
            {
                Ok(request)
            } else {
                Err(Rejection::unknown_merchant(&request))
            }
        });
        match parsed {
            Err(rejection) => {
                let problem = LineProblem {
                    line: number,
                    refund_no: sniff_refund_no(line),
                    field: rejection.field,
                    reason: rejection.reason,
                };
                progress.suspend(|| write_problem(out, "invalid", &problem))?;
                progress.inc(1);
                report.invalid.push(problem);
            }
            Ok(request) => {
                let confirm = publisher
                    .send(line, Some(&request.refund_no))
                    .await
                    .with_context(|| broken(number, report.accepted))?;
                pending.push_back((number, Some(request.refund_no), confirm));
                if pending.len() >= WINDOW {
                    settle(&mut pending, &mut report, &progress, out).await?;
                }
            }
        }
    }
    while !pending.is_empty() {
        settle(&mut pending, &mut report, &progress, out).await?;
    }
    progress.finish();
    publisher.close().await;
    writeln!(
        out,
        "accepted {}, invalid {}{} ({} lines{})",
        report.accepted,
        report.invalid.len(),
        if report.not_published.is_empty() {
            String::new()
        } else {
            format!(", not published {}", report.not_published.len())
        },
        content_lines,
        if report.blank > 0 {
            format!(", {} blank skipped", report.blank)
        } else {
            String::new()
        }
    )?;
    Ok(report)
}

/// Waits for the oldest outstanding confirm.
async fn settle(
    pending: &mut VecDeque<(usize, Option<String>, PendingConfirm)>,
    report: &mut EnqueueReport,
    progress: &Progress,
    out: &mut Out,
) -> anyhow::Result<()> {
    let Some((number, refund_no, confirm)) = pending.pop_front() else {
        return Ok(());
    };
    match confirm.wait().await {
        Ok(()) => report.accepted += 1,
        Err(super::publish::PublishError::Amqp(e)) => {
            return Err(anyhow::Error::new(e).context(broken(number, report.accepted)));
        }
        Err(e) => {
            let problem = LineProblem {
                line: number,
                refund_no,
                field: "broker".into(),
                reason: e.to_string(),
            };
            progress.suspend(|| write_problem(out, "not published", &problem))?;
            report.not_published.push(problem);
        }
    }
    progress.inc(1);
    Ok(())
}

fn broken(line: usize, accepted: usize) -> String {
    format!(
        "the broker connection failed at line {line} after {accepted} confirmed lines; lines \
         from there on may or may not have been published (enqueueing the file again is safe: \
         the worker recognises duplicates)"
    )
}

fn write_problem(out: &mut Out, what: &str, p: &LineProblem) -> std::io::Result<()> {
    writeln!(
        out,
        "line {}: {what}: {}: {}{}",
        p.line,
        p.field,
        p.reason,
        p.refund_no
            .as_deref()
            .map(|n| format!(" (refund_no {n})"))
            .unwrap_or_default()
    )
}
