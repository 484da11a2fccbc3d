//! What an answer means for the refund: which HTTP statuses are a door refusal before any
//! processing, and how an opaque `RefundResult` maps to accepted, declined or unrecognised by
//! the merchant's configured rules.

use super::*;

/// Statuses a server decides before dispatching to an operation: the target, the method, the
/// credentials, the request's size or media type. Not 400 (anything may answer it, at any
/// point) nor 3xx (a redirect may follow a request that was processed).
pub(super) fn refused_at_the_door(status: u16) -> bool {
    matches!(
        status,
        401 | 403 | 404 | 405 | 410 | 411 | 413 | 414 | 415 | 431
    )
}

pub(super) fn is_xml_media_type(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media == "text/xml" || media == "application/xml" || media.ends_with("+xml")
}

/// Maps a `RefundResult` under a merchant's rules. The trimmed value equal to one of
/// `success_results` is a success; one starting with a `failure_prefixes` entry (the longest
/// that matches) is a failure, its code and message read from the rest (see
/// [`split_failure`]); anything else is unrecognised.
pub fn map_result(
    result: &str,
    success_results: &[String],
    failure_prefixes: &[String],
) -> ResultClass {
    let value = result.trim();
    if success_results.iter().any(|s| s == value) {
        return ResultClass::Success;
    }
    let prefix = failure_prefixes
        .iter()
        .filter(|p| !p.is_empty() && value.starts_with(p.as_str()))
        .max_by_key(|p| p.len());
    match prefix {
        Some(p) => {
            let (code, message) = split_failure(&value[p.len()..]);
            ResultClass::Failure { code, message }
        }
        None => ResultClass::Unrecognised,
    }
}

/// Code and message from what follows a failure prefix: leading `:`, `|`, `-` and whitespace
/// are dropped; the code runs to the first `:`, `|` or whitespace (a code is one token, so
/// `FAIL:ORDER_NOT_REFUNDABLE insufficient balance` has code `ORDER_NOT_REFUNDABLE`); the
/// message is the rest, trimmed, less one leading `:` or `|`. An empty code becomes `FAIL`.
pub fn split_failure(rest: &str) -> (String, String) {
    let is_separator = |c: char| matches!(c, ':' | '|');
    let rest = rest.trim_start_matches(|c: char| is_separator(c) || c == '-' || c.is_whitespace());
    let end = rest
        .find(|c: char| is_separator(c) || c.is_whitespace())
        .unwrap_or(rest.len());
    let (code, after) = rest.split_at(end);
    let after = after.trim_start();
    let message = after.strip_prefix(is_separator).unwrap_or(after).trim();
    let code = if code.is_empty() { "FAIL" } else { code };
    (code.to_owned(), message.to_owned())
}
