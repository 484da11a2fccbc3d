//! `refund-reconciler runs`: the stored runs, newest first, so that finance can see what was
//! reconciled, against what, and which run is a day's answer (the one not superseded).

use std::io::Write;

use chrono::Utc;
use shared::config::Config;
pub use shared::store::runs::{RunRow, list};
use sqlx::Connection;

use crate::report::yuan;

/// Output format of `runs --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunsFormat {
    /// A table.
    Text,
    /// One JSON object per run, one per line.
    Json,
}

/// Writes `runs` as a table or JSON lines.
pub fn write<W: Write>(runs: &[RunRow], format: RunsFormat, out: &mut W) -> std::io::Result<()> {
    match format {
        RunsFormat::Json => {
            for r in runs {
                serde_json::to_writer(&mut *out, r)?;
                out.write_all(b"\n")?;
            }
        }
        RunsFormat::Text => {
            writeln!(
                out,
                "{:>6}  {:10}  {:8}  {:9}  {:20}  {:>6}  {:>6}  {:>22}  {:>22}  {:>20}  {:>10}",
                "RUN",
                "DATE",
                "SCOPE",
                "SOURCE",
                "STATUS",
                "DISCR",
                "PEND",
                "LEDGER fen (yuan)",
                "PROVIDER fen (yuan)",
                "DIFF fen (yuan)",
                "SUPERSEDED"
            )?;
            for r in runs {
                let money = |v: i64| format!("{v} ({})", yuan(v));
                writeln!(
                    out,
                    "{:>6}  {:10}  {:8}  {:9}  {:20}  {:>6}  {:>6}  {:>22}  {:>22}  {:>20}  {:>10}",
                    r.id,
                    r.date.to_string(),
                    r.provider.as_deref().unwrap_or("all"),
                    r.source,
                    r.status,
                    r.discrepancies,
                    r.pending,
                    money(r.ledger_total),
                    money(r.provider_total),
                    money(r.diff),
                    r.superseded_by
                        .map_or_else(|| "-".to_owned(), |id| format!("by {id}"))
                )?;
                if let Some(e) = &r.error {
                    writeln!(out, "        failed: {e}")?;
                }
            }
            if runs.is_empty() {
                writeln!(out, "(no runs)")?;
            } else {
                writeln!(
                    out,
                    "A day's result is its latest run not superseded; source `attempts` is our own \
                     recorded answers, not an independent comparison."
                )?;
            }
        }
    }
    Ok(())
}

/// `refund-reconciler runs`.
pub async fn runs_command(
    args: crate::cli::RunsArgs,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let date = args
        .date
        .map(|d| config.tz().map(|tz| d.resolve(tz, Utc::now())))
        .transpose()?;
    let options = shared::store::connect_options(&config)?;
    let mut conn = sqlx::ConnectOptions::connect(&options).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot use the database at {}: {e}",
            config.database_url_redacted()
        )
    })?;
    let runs = list(&mut conn, date, args.limit).await?;
    let _ = conn.close().await;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    write(&runs, args.format, &mut w)?;
    w.flush()?;
    Ok(())
}
