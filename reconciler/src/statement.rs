//! Provider statements: the CSV contract of DESIGN §7, read strictly and streamed into
//! PostgreSQL.
//!
//! A statement is UTF-8 CSV whose first line is exactly
//! `provider,merchant,refund_no,provider_refund_id,refund_fee,settlement_refund_fee,refunded_at`
//! and whose every other line is one payment the provider made. Each field is checked:
//!
//! | field | rule |
//! |---|---|
//! | `provider` | `shengpay` or `wupay` |
//! | `merchant` | 1–128 characters, no control characters |
//! | `refund_no` | 1–32 characters of `[0-9A-Za-z_-]` (the request contract's rule) |
//! | `provider_refund_id` | empty (the provider gave none) or at most 128 characters, no control characters |
//! | `refund_fee` | an integer of fen, ASCII digits only (no sign, decimal point, exponent or space), `1 ..= 100_000_000_000` |
//! | `settlement_refund_fee` | the same, `0 ..= MAX_FEE` (above `refund_fee`: see below) |
//! | `refunded_at` | RFC 3339 with an offset (`2026-11-21T23:59:59.500+08:00`, `...Z`) |
//!
//! Anything else (a different header, a missing or extra field, invalid UTF-8, `12.5`, `1e3`,
//! ` 7`, a timestamp without offset) stops the run before anything is stored, with an error
//! naming the file, the line, and the column and field. Fields may be quoted, lines may end in
//! CRLF, and a leading UTF-8 byte order mark (spreadsheet exports) is ignored.
//!
//! A row that keeps the contract but cannot be right, its settlement above its refund_fee
//! (settlement is the refund minus non-cash coupons), is read and flagged ([`Row::invalid`]):
//! the run reports it as `invalid_at_provider` and reconciles the rest of the day, rather than
//! one impossible row stopping everything.
//!
//! A row's business date is `refunded_at` in the configured time zone. A statement may hold
//! rows of several days; only rows that can matter for the run's date are staged: rows of the
//! date itself, and rows of the neighbouring days inside the grace window of the cut-off they
//! share with it (they decide `pending`, see [`crate::run`]). Other rows, and rows of other
//! providers than `--provider`, are counted and ignored. The dates seen per provider are kept
//! (as [`Coverage`]) because they tell whether the provider's next or previous day was given.
//!
//! Loading streams: the file is parsed on a blocking thread into PostgreSQL's binary `COPY`
//! format in chunks of about 1 MiB, which are sent while the next chunk is parsed; at most a few
//! chunks are in memory whatever the file's size.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, Utc};
use csv::ByteRecord;
use indicatif::ProgressBar;
use sqlx::PgConnection;

use crate::day::{Day, Placement};

/// The contract header (DESIGN §7).
pub const HEADER: [&str; 7] = [
    "provider",
    "merchant",
    "refund_no",
    "provider_refund_id",
    "refund_fee",
    "settlement_refund_fee",
    "refunded_at",
];

/// The upper bound on any amount, as in the request message contract.
pub const MAX_FEE: i64 = 100_000_000_000;

const MAX_TEXT: usize = 128;
const CHUNK: usize = 1 << 20;

/// A statement that cannot be used, and where.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    #[error("statement {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("statement {path} line {line}: {message}")]
    Line {
        path: String,
        line: u64,
        message: String,
    },
    #[error(
        "statement {path} has no row dated {date} ({found}): the statement of another day? \
         Give the statement of {date}; the next or previous day's statement is accepted beside it"
    )]
    WrongDay {
        path: String,
        date: NaiveDate,
        /// What the file holds instead.
        found: String,
    },
    #[error("statement {path} line {line}, column {column} ({field}): {message}")]
    Field {
        path: String,
        line: u64,
        /// 1-based.
        column: usize,
        field: &'static str,
        message: String,
    },
}

/// A statement that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Statement(#[from] StatementError),
    #[error("loading statements into the database: {0}")]
    Db(#[from] sqlx::Error),
}

/// One checked statement row, borrowing from the reader's record buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row<'a> {
    /// Line of the row in its file (the header is line 1).
    pub line: u64,
    pub provider: &'a str,
    pub merchant: &'a str,
    pub refund_no: &'a str,
    pub provider_refund_id: Option<&'a str>,
    pub refund_fee: i64,
    pub settlement_refund_fee: i64,
    pub refunded_at: DateTime<FixedOffset>,
    /// The settlement is above the refund_fee: the provider's account of it cannot be right.
    pub invalid: bool,
}

/// Reads a statement row by row, reusing one record buffer.
pub struct StatementReader<R: Read> {
    path: String,
    csv: csv::Reader<R>,
    record: ByteRecord,
}

impl StatementReader<BufReader<File>> {
    /// Opens a statement file and checks its header.
    pub fn open(path: &std::path::Path) -> Result<Self, StatementError> {
        Self::open_named(path, path.display().to_string())
    }

    /// Opens a statement file named `name` in errors (the URL it was fetched from).
    pub fn open_named(path: &std::path::Path, name: String) -> Result<Self, StatementError> {
        let file = File::open(path).map_err(|source| StatementError::Io {
            path: name.clone(),
            source,
        })?;
        StatementReader::new(name, BufReader::with_capacity(256 * 1024, file))
    }
}

impl<R: Read> StatementReader<R> {
    /// A reader over `input` (named `path` in errors); checks the header.
    pub fn new(path: impl Into<String>, input: R) -> Result<Self, StatementError> {
        let path = path.into();
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(input);
        let mut record = ByteRecord::new();
        let got = csv
            .read_byte_record(&mut record)
            .map_err(|e| csv_error(&path, e))?;
        let expected = HEADER.join(",");
        if !got {
            return Err(StatementError::Line {
                path,
                line: 1,
                message: format!("the file is empty; expected the header `{expected}`"),
            });
        }
        if record.iter().eq(HEADER.iter().map(|h| h.as_bytes())) {
            return Ok(StatementReader { path, csv, record });
        }
        // Both whole, on lines of their own, so that a difference of one character shows;
        // control characters escaped (they would redraw a terminal), and a "header" longer
        // than any real one (a binary file) cut at 1,000 characters.
        let found = record
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        let mut shown: String = found
            .chars()
            .take(1000)
            .flat_map(|c| {
                if c.is_control() {
                    c.escape_default().collect::<Vec<_>>()
                } else {
                    vec![c]
                }
            })
            .collect();
        if found.chars().count() > 1000 {
            shown.push_str(&format!(
                "... ({} characters in all)",
                found.chars().count()
            ));
        }
        Err(StatementError::Line {
            path,
            line: 1,
            message: format!(
                "the header is not the statement contract's\n  expected: {expected}\n  found:    {shown}"
            ),
        })
    }

    /// The name used in errors.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Bytes consumed so far, for progress.
    pub fn bytes_read(&self) -> u64 {
        self.csv.position().byte()
    }

    /// The next row, checked; `None` at the end of the file.
    pub fn next_row(&mut self) -> Result<Option<Row<'_>>, StatementError> {
        let more = self
            .csv
            .read_byte_record(&mut self.record)
            .map_err(|e| csv_error(&self.path, e))?;
        if !more {
            return Ok(None);
        }
        let rec = &self.record;
        let path = &self.path;
        let line = rec.position().map_or(0, |p| p.line());
        if rec.len() != HEADER.len() {
            return Err(StatementError::Line {
                path: path.clone(),
                line,
                message: format!(
                    "expected {} fields ({}), found {}",
                    HEADER.len(),
                    HEADER.join(","),
                    rec.len()
                ),
            });
        }
        let fail = |column: usize, message: String| StatementError::Field {
            path: path.clone(),
            line,
            column: column + 1,
            field: HEADER[column],
            message,
        };
        let mut text = [""; 7];
        for (i, slot) in text.iter_mut().enumerate() {
            let raw = rec.get(i).unwrap_or_default();
            *slot = std::str::from_utf8(raw).map_err(|e| {
                fail(
                    i,
                    format!(
                        "is not valid UTF-8 (invalid byte at offset {})",
                        e.valid_up_to()
                    ),
                )
            })?;
        }
        let [
            provider,
            merchant,
            refund_no,
            provider_refund_id,
            refund_fee,
            settlement,
            at,
        ] = text;
        if !crate::PROVIDERS.contains(&provider) {
            return Err(fail(
                0,
                format!(
                    "{:?} is not a provider (expected shengpay or wupay)",
                    shorten(provider)
                ),
            ));
        }
        check_text(merchant, false).map_err(|m| fail(1, m))?;
        if refund_no.is_empty()
            || refund_no.len() > 32
            || !refund_no
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(fail(
                2,
                format!(
                    "{:?} is not a refund number (1-32 characters of 0-9, A-Z, a-z, _ and -)",
                    shorten(refund_no)
                ),
            ));
        }
        check_text(provider_refund_id, true).map_err(|m| fail(3, m))?;
        let refund_fee = fen(refund_fee).map_err(|m| fail(4, m))?;
        if !(1..=MAX_FEE).contains(&refund_fee) {
            return Err(fail(
                4,
                format!("{refund_fee} is outside 1..={MAX_FEE} fen"),
            ));
        }
        let settlement_refund_fee = fen(settlement).map_err(|m| fail(5, m))?;
        if settlement_refund_fee > MAX_FEE {
            return Err(fail(
                5,
                format!("{settlement_refund_fee} is outside 0..={MAX_FEE} fen"),
            ));
        }
        let refunded_at = DateTime::parse_from_rfc3339(at).map_err(|e| {
            fail(
                6,
                format!(
                    "{:?} is not an RFC 3339 timestamp with an offset, like \
                     2026-11-21T23:59:59.500+08:00 ({e})",
                    shorten(at)
                ),
            )
        })?;
        Ok(Some(Row {
            line,
            provider,
            merchant,
            refund_no,
            provider_refund_id: (!provider_refund_id.is_empty()).then_some(provider_refund_id),
            refund_fee,
            settlement_refund_fee,
            refunded_at,
            invalid: settlement_refund_fee > refund_fee,
        }))
    }
}

fn csv_error(path: &str, e: csv::Error) -> StatementError {
    let line = e.position().map_or(0, |p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(source) => StatementError::Io {
            path: path.to_owned(),
            source,
        },
        other => StatementError::Line {
            path: path.to_owned(),
            line,
            message: format!("not valid CSV: {other:?}"),
        },
    }
}

fn check_text(s: &str, may_be_empty: bool) -> Result<(), String> {
    if s.is_empty() && !may_be_empty {
        return Err("is empty".into());
    }
    if s.chars().count() > MAX_TEXT {
        return Err(format!("is longer than {MAX_TEXT} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{:?} contains a control character", shorten(s)));
    }
    Ok(())
}

/// An amount in fen: ASCII digits only.
fn fen(s: &str) -> Result<i64, String> {
    if s.is_empty() {
        return Err("is empty; expected an integer number of fen".into());
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{:?} is not an integer number of fen (digits only: no sign, decimal point, exponent \
             or spaces)",
            shorten(s)
        ));
    }
    s.parse::<i64>()
        .map_err(|_| format!("{:?} is out of range", shorten(s)))
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= 60 {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(57).collect();
        t.push_str("...");
        t
    }
}

/// The earliest and latest business date a provider's statement rows carry, over every file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    pub dates: BTreeMap<String, (NaiveDate, NaiveDate)>,
}

impl Coverage {
    fn see(&mut self, provider: &str, date: NaiveDate) {
        match self.dates.get_mut(provider) {
            Some((first, last)) => {
                *first = (*first).min(date);
                *last = (*last).max(date);
            }
            None => {
                self.dates.insert(provider.to_owned(), (date, date));
            }
        }
    }

    /// Providers with statement rows dated after `date`: their next day was given.
    pub fn after(&self, date: NaiveDate) -> Vec<String> {
        self.dates
            .iter()
            .filter(|(_, (_, last))| *last > date)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Providers with statement rows dated before `date`: their previous day was given.
    pub fn before(&self, date: NaiveDate) -> Vec<String> {
        self.dates
            .iter()
            .filter(|(_, (first, _))| *first < date)
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// What loading found in one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSummary {
    pub path: String,
    pub rows: u64,
    /// Rows dated the run's date.
    pub on_date: u64,
    /// Rows of a neighbouring day inside a grace window, kept for `pending`.
    pub near_cutoff: u64,
    /// Rows of other dates, or of other providers than `--provider`.
    pub ignored: u64,
    /// The earliest and latest business date of its rows (of the run's providers).
    pub dates: Option<(NaiveDate, NaiveDate)>,
    /// The providers ([`crate::PROVIDERS`]) it has rows of dated the run's date.
    pub providers_on_date: Vec<String>,
    /// The providers it has rows of dated the day before or after the run's date.
    pub providers_next_to_date: Vec<String>,
    /// The provider it was fetched for ([`Input::fetched_for`]).
    pub fetched_for: Option<String>,
}

/// One statement to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub path: PathBuf,
    /// How errors and the stored run name it (a file path, or the URL it was fetched from).
    pub name: String,
    /// The provider whose configured statement of the run's date it is (fetched from
    /// `[reconciler.statements]`); `None` for a file handed in. A fetched statement with no
    /// rows at all (the header only) says the provider paid nothing that day: it is accepted,
    /// where a file handed in without a row of the date is refused as another day's.
    pub fetched_for: Option<String>,
}

impl Input {
    /// A file handed in (`--statement`), named by its path.
    pub fn file(path: PathBuf) -> Self {
        Input {
            name: path.display().to_string(),
            path,
            fetched_for: None,
        }
    }
}

/// What loading found in every file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSummary {
    pub files: Vec<FileSummary>,
    pub coverage: Coverage,
}

/// The session's staging table for statement rows. Temporary: it lives as long as the run's
/// connection, and no other session sees it.
pub const STAGING_DDL: &str = "CREATE TEMP TABLE IF NOT EXISTS recon_statement (
    provider              text NOT NULL,
    merchant              text NOT NULL,
    refund_no             text NOT NULL,
    provider_refund_id    text,
    refund_fee            bigint NOT NULL,
    settlement_refund_fee bigint NOT NULL,
    refunded_at           timestamptz NOT NULL,
    business_date         date NOT NULL,
    edge                  boolean NOT NULL,
    file                  smallint NOT NULL,
    line                  bigint NOT NULL,
    invalid               boolean NOT NULL
)";

const COPY_SQL: &str = "COPY pg_temp.recon_statement (provider, merchant, refund_no, \
    provider_refund_id, refund_fee, settlement_refund_fee, refunded_at, business_date, edge, \
    file, line, invalid) FROM STDIN WITH (FORMAT binary)";

/// Loads `files` into the session's staging table (`recon_statement`), keeping only the rows
/// that matter for `day` (and for `provider`, if given).
pub async fn load(
    conn: &mut PgConnection,
    files: &[Input],
    day: &Day,
    provider: Option<&str>,
    bar: &ProgressBar,
) -> Result<LoadSummary, LoadError> {
    if files.len() > usize::from(u16::MAX >> 1) {
        return Err(StatementError::Line {
            path: files[0].name.clone(),
            line: 0,
            message: "too many statement files".into(),
        }
        .into());
    }
    sqlx::query(STAGING_DDL).execute(&mut *conn).await?;
    sqlx::query("TRUNCATE pg_temp.recon_statement")
        .execute(&mut *conn)
        .await?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, StatementError>>(4);
    let parser = {
        let files = files.to_vec();
        let day = *day;
        let provider = provider.map(str::to_owned);
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || parse_all(&files, &day, provider.as_deref(), &bar, &tx))
    };

    let mut copy = conn.copy_in_raw(COPY_SQL).await?;
    let mut failure: Option<StatementError> = None;
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Ok(bytes) => {
                if let Err(e) = copy.send(bytes).await {
                    drop(rx);
                    let _ = parser.await;
                    return Err(e.into());
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(rx);
    let summary = parser.await.map_err(|e| StatementError::Io {
        path: "statement".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    if let Some(e) = failure {
        copy.abort(e.to_string()).await?;
        return Err(e.into());
    }
    let Some(summary) = summary else {
        copy.abort("statement parser stopped").await?;
        return Err(StatementError::Io {
            path: "statement".into(),
            source: std::io::Error::other("the statement parser stopped early"),
        }
        .into());
    };
    copy.finish().await?;
    // Rows of neighbouring days are looked up by refund_no when deciding `pending`.
    sqlx::query(
        "CREATE INDEX IF NOT EXISTS recon_statement_edge ON pg_temp.recon_statement (refund_no) \
         WHERE edge",
    )
    .execute(&mut *conn)
    .await?;
    Ok(summary)
}

/// Parses every file into binary COPY chunks; `None` if the receiver went away.
fn parse_all(
    files: &[Input],
    day: &Day,
    provider: Option<&str>,
    bar: &ProgressBar,
    tx: &tokio::sync::mpsc::Sender<Result<Vec<u8>, StatementError>>,
) -> Option<LoadSummary> {
    let mut summary = LoadSummary::default();
    let mut buf = Vec::with_capacity(CHUNK + 4096);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    for (index, input) in files.iter().enumerate() {
        let file_index = i16::try_from(index).unwrap_or(i16::MAX);
        let mut reader = match StatementReader::open_named(&input.path, input.name.clone()) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return None;
            }
        };
        let mut fs = FileSummary {
            path: reader.path().to_owned(),
            fetched_for: input.fetched_for.clone(),
            ..FileSummary::default()
        };
        let mut last_progress = 0u64;
        // Per provider of crate::PROVIDERS: rows on the date, rows on a neighbouring date.
        let mut on_date = [false; 2];
        let mut next_to_date = [false; 2];
        let (before, after) = (day.date.pred_opt(), day.date.succ_opt());
        loop {
            let row = match reader.next_row() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return None;
                }
            };
            fs.rows += 1;
            if provider.is_some_and(|p| p != row.provider) {
                fs.ignored += 1;
                continue;
            }
            let at = row.refunded_at.with_timezone(&Utc);
            let date = day.business_date_of(at);
            summary.coverage.see(row.provider, date);
            let p = usize::from(row.provider != crate::PROVIDERS[0]);
            if date == day.date {
                on_date[p] = true;
            } else if Some(date) == before || Some(date) == after {
                next_to_date[p] = true;
            }
            fs.dates = Some(match fs.dates {
                Some((first, last)) => (first.min(date), last.max(date)),
                None => (date, date),
            });
            let edge = match day.place(at) {
                Placement::OnDay => {
                    fs.on_date += 1;
                    false
                }
                Placement::Edge => {
                    fs.near_cutoff += 1;
                    true
                }
                Placement::Outside => {
                    fs.ignored += 1;
                    continue;
                }
            };
            encode_row(&mut buf, &row, at, date, edge, file_index);
            if buf.len() >= CHUNK {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + 4096));
                if tx.blocking_send(Ok(full)).is_err() {
                    return None;
                }
                let read = reader.bytes_read();
                bar.inc(read - last_progress);
                last_progress = read;
            }
        }
        bar.inc(reader.bytes_read().saturating_sub(last_progress));
        let named = |flags: [bool; 2]| {
            crate::PROVIDERS
                .iter()
                .zip(flags)
                .filter(|(_, f)| *f)
                .map(|(p, _)| (*p).to_owned())
                .collect::<Vec<_>>()
        };
        fs.providers_on_date = named(on_date);
        fs.providers_next_to_date = named(next_to_date);
        summary.files.push(fs);
    }
    if let Some(e) = wrong_day(&summary, day.date) {
        let _ = tx.blocking_send(Err(e));
        return None;
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    if tx.blocking_send(Ok(buf)).is_err() {
        return None;
    }
    Some(summary)
}

/// The first file that holds no row of `date` and is not a neighbouring day's statement given
/// beside one of `date` (rows of the day before or after, of a provider another file has rows
/// of `date` of). Such a file is a wrong day's statement: reconciled, every refund of the date
/// would look unpaid, and the run would replace a good one.
fn wrong_day(summary: &LoadSummary, date: NaiveDate) -> Option<StatementError> {
    let on_date = |p: &String, except: usize| {
        summary
            .files
            .iter()
            .enumerate()
            .any(|(i, f)| i != except && f.providers_on_date.contains(p))
    };
    let (_, f) = summary.files.iter().enumerate().find(|(i, f)| {
        f.on_date == 0
            && !f.providers_next_to_date.iter().any(|p| on_date(p, *i))
            // The configured statement of the date, empty: nothing paid that day.
            && !(f.rows == 0 && f.fetched_for.is_some())
    })?;
    let found = match f.dates {
        None if f.rows == 0 => "it has no rows".to_owned(),
        None => format!("none of its {} rows is of the providers reconciled", f.rows),
        Some((first, last)) if first == last => format!("its {} rows are dated {first}", f.rows),
        Some((first, last)) => format!("its {} rows are dated {first} to {last}", f.rows),
    };
    Some(StatementError::WrongDay {
        path: f.path.clone(),
        date,
        found,
    })
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
/// Days from 0001-01-01 (day 1 of the common era) to 2000-01-01.
const PG_EPOCH_DAYS_FROM_CE: i32 = 730_120;

fn encode_row(
    buf: &mut Vec<u8>,
    row: &Row<'_>,
    at: DateTime<Utc>,
    date: NaiveDate,
    edge: bool,
    file: i16,
) {
    fn text(buf: &mut Vec<u8>, s: &str) {
        // Fields are at most 128 characters (checked), so the length fits.
        buf.extend_from_slice(&(s.len() as i32).to_be_bytes());
        buf.extend_from_slice(s.as_bytes());
    }
    fn int8(buf: &mut Vec<u8>, v: i64) {
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&v.to_be_bytes());
    }
    buf.extend_from_slice(&12i16.to_be_bytes());
    text(buf, row.provider);
    text(buf, row.merchant);
    text(buf, row.refund_no);
    match row.provider_refund_id {
        Some(id) => text(buf, id),
        None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    int8(buf, row.refund_fee);
    int8(buf, row.settlement_refund_fee);
    int8(buf, at.timestamp_micros() - PG_EPOCH_UNIX_MICROS);
    buf.extend_from_slice(&4i32.to_be_bytes());
    buf.extend_from_slice(&(date.num_days_from_ce() - PG_EPOCH_DAYS_FROM_CE).to_be_bytes());
    buf.extend_from_slice(&1i32.to_be_bytes());
    buf.push(u8::from(edge));
    buf.extend_from_slice(&2i32.to_be_bytes());
    buf.extend_from_slice(&file.to_be_bytes());
    int8(buf, i64::try_from(row.line).unwrap_or(i64::MAX));
    buf.extend_from_slice(&1i32.to_be_bytes());
    buf.push(u8::from(row.invalid));
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "provider,merchant,refund_no,provider_refund_id,refund_fee,settlement_refund_fee,refunded_at\n";

    fn read_all(text: &[u8]) -> Result<Vec<(u64, String, i64, i64)>, StatementError> {
        let mut r = StatementReader::new("s.csv", text)?;
        let mut out = Vec::new();
        while let Some(row) = r.next_row()? {
            out.push((
                row.line,
                row.refund_no.to_owned(),
                row.refund_fee,
                row.settlement_refund_fee,
            ));
        }
        Ok(out)
    }

    fn with_row(row: &str) -> Vec<u8> {
        format!("{H}shengpay,m1,R1,RO1,100,90,2026-11-21T10:00:00+08:00\n{row}\n").into_bytes()
    }

    #[track_caller]
    fn field_error(text: &[u8], line: u64, column: usize, field: &str) -> String {
        match read_all(text) {
            Err(e @ StatementError::Field { .. }) => {
                let StatementError::Field {
                    line: l,
                    column: c,
                    field: f,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((*l, *c, *f), (line, column, field), "{e}");
                e.to_string()
            }
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_statement_reads_row_by_row_with_line_numbers() {
        let rows = read_all(&with_row("wupay,m2,R-2_x,,5,0,2026-11-21T02:00:00Z")).unwrap();
        assert_eq!(
            rows,
            vec![(2, "R1".into(), 100, 90), (3, "R-2_x".into(), 5, 0)]
        );
    }

    #[test]
    fn crlf_line_ends_and_quoted_fields_are_accepted() {
        let text = H.replace('\n', "\r\n")
            + "\"shengpay\",\"m,1\",R1,RO1,100,90,2026-11-21T10:00:00+08:00\r\n";
        let mut r = StatementReader::new("s.csv", text.as_bytes()).unwrap();
        let row = r.next_row().unwrap().unwrap();
        assert_eq!(row.merchant, "m,1");
    }

    #[test]
    fn the_header_must_be_exact() {
        let e = read_all(b"provider,merchant,refund_no,refund_fee\n").unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, StatementError::Line { line: 1, .. }), "{s}");
        assert!(s.contains("s.csv line 1") && s.contains("header"), "{s}");
        // A spreadsheet's byte order mark is not part of the header.
        assert_eq!(
            read_all(&[b"\xef\xbb\xbf".as_slice(), H.as_bytes()].concat()).unwrap(),
            vec![]
        );
        let e = read_all(b"").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = read_all(H.to_uppercase().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("header"), "{e}");
        // Both headers whole, one above the other, however long.
        let long = "provider,merchant,refund_no,provider_refund_id,refund_fee,settlement_refund_fee,refunded_at,extra_column";
        let e = read_all(format!("{long}\n").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("expected: {}\n", HEADER.join(",")))
                && e.contains(&format!("found:    {long}")),
            "{e}"
        );
    }

    #[test]
    fn amounts_must_be_integers_of_fen() {
        for bad in ["12.5", "1e3", " 7", "+7", "-7", "0x10", "", "7 "] {
            let row = format!("shengpay,m1,R2,RO2,{bad},1,2026-11-21T10:00:00+08:00");
            let s = field_error(&with_row(&row), 3, 5, "refund_fee");
            assert!(s.contains("s.csv line 3, column 5 (refund_fee)"), "{s}");
        }
        let s = field_error(
            &with_row("shengpay,m1,R2,RO2,100,90.0,2026-11-21T10:00:00+08:00"),
            3,
            6,
            "settlement_refund_fee",
        );
        assert!(s.contains("not an integer"), "{s}");
        field_error(
            &with_row("shengpay,m1,R2,RO2,100,100000000001,2026-11-21T10:00:00+08:00"),
            3,
            6,
            "settlement_refund_fee",
        );
        field_error(
            &with_row("shengpay,m1,R2,RO2,0,0,2026-11-21T10:00:00+08:00"),
            3,
            5,
            "refund_fee",
        );
        field_error(
            &with_row("shengpay,m1,R2,RO2,100000000001,0,2026-11-21T10:00:00+08:00"),
            3,
            5,
            "refund_fee",
        );
        field_error(
            &with_row("shengpay,m1,R2,RO2,99999999999999999999,0,2026-11-21T10:00:00+08:00"),
            3,
            5,
            "refund_fee",
        );
    }

    #[test]
    fn a_settlement_above_the_refund_is_read_and_flagged_invalid() {
        let text = with_row("shengpay,m1,R2,RO2,100,101,2026-11-21T10:00:00+08:00");
        let mut r = StatementReader::new("s.csv", text.as_slice()).unwrap();
        assert!(!r.next_row().unwrap().unwrap().invalid);
        let row = r.next_row().unwrap().unwrap();
        assert_eq!(
            (row.refund_fee, row.settlement_refund_fee, row.invalid),
            (100, 101, true)
        );
    }

    #[test]
    fn refunded_at_must_be_rfc_3339_with_an_offset() {
        for bad in [
            "2026-11-21T10:00:00",
            "2026-11-21",
            "21/11/2026 10:00",
            "yesterday",
            "2026-11-21T25:00:00+08:00",
        ] {
            let row = format!("shengpay,m1,R2,RO2,100,90,{bad}");
            let s = field_error(&with_row(&row), 3, 7, "refunded_at");
            assert!(s.contains("RFC 3339"), "{s}");
        }
    }

    #[test]
    fn text_fields_are_checked() {
        field_error(
            &with_row("paypal,m1,R2,RO2,100,90,2026-11-21T10:00:00+08:00"),
            3,
            1,
            "provider",
        );
        field_error(
            &with_row("shengpay,,R2,RO2,100,90,2026-11-21T10:00:00+08:00"),
            3,
            2,
            "merchant",
        );
        for bad in ["", "R 2", "R2\u{e9}", &"R".repeat(33)] {
            let row = format!("shengpay,m1,{bad},RO2,100,90,2026-11-21T10:00:00+08:00");
            field_error(&with_row(&row), 3, 3, "refund_no");
        }
        field_error(
            &with_row("shengpay,m1,R2,\"RO\t2\",100,90,2026-11-21T10:00:00+08:00"),
            3,
            4,
            "provider_refund_id",
        );
    }

    #[test]
    fn a_row_with_missing_or_extra_fields_names_its_line() {
        let e = read_all(&with_row("shengpay,m1,R2,RO2,100,90")).unwrap_err();
        assert!(matches!(e, StatementError::Line { line: 3, .. }), "{e}");
        assert!(e.to_string().contains("expected 7 fields"), "{e}");
        let e = read_all(&with_row(
            "shengpay,m1,R2,RO2,100,90,2026-11-21T10:00:00Z,x",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("found 8"), "{e}");
    }

    #[test]
    fn invalid_utf8_names_the_field() {
        let mut text = with_row("");
        text.truncate(text.len() - 1);
        text.extend_from_slice(b"shengpay,m\xff1,R2,RO2,100,90,2026-11-21T10:00:00Z\n");
        let s = field_error(&text, 3, 2, "merchant");
        assert!(s.contains("UTF-8"), "{s}");
    }

    #[test]
    fn coverage_tells_which_neighbouring_days_were_given() {
        let mut c = Coverage::default();
        let d = |day| NaiveDate::from_ymd_opt(2026, 11, day).unwrap();
        c.see("shengpay", d(21));
        c.see("shengpay", d(22));
        c.see("wupay", d(20));
        c.see("wupay", d(21));
        assert_eq!(c.after(d(21)), vec!["shengpay".to_owned()]);
        assert_eq!(c.before(d(21)), vec!["wupay".to_owned()]);
    }
}
