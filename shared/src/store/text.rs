//! Text as PostgreSQL can store it, whatever came in.
//!
//! PostgreSQL's `text` and `jsonb` cannot hold U+0000, and a message, a provider answer or a
//! serde error that echoes input can carry one. A statement that binds such a value fails for
//! every row in it, so nothing this system stores may depend on input being storable as it came:
//! every value that comes from outside goes through [`storable`] on its way in. The escape is
//! visible (`\u0000`), so an operator reading the row sees that something was there; the raw
//! bytes, where they matter (a rejected message's body), are kept as `bytea` beside their
//! SHA-256.

use std::borrow::Cow;

/// `s` with every U+0000 written as the six characters `\u0000`; borrowed when there is none.
pub fn storable(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\\u0000"))
    } else {
        Cow::Borrowed(s)
    }
}

/// [`storable`] for an optional value.
pub fn storable_opt(s: Option<&str>) -> Option<Cow<'_, str>> {
    s.map(storable)
}

/// The SHA-256 of `bytes` in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The first `max` bytes of `body` and whether it was cut.
pub fn bounded(body: &[u8], max: usize) -> (&[u8], bool) {
    if body.len() > max {
        (&body[..max], true)
    } else {
        (body, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_is_escaped_visibly_and_clean_text_is_not_copied() {
        assert_eq!(storable("a\0b"), "a\\u0000b");
        assert!(matches!(storable("plain"), Cow::Borrowed("plain")));
        assert_eq!(storable_opt(None), None);
    }

    #[test]
    fn a_long_body_is_cut_to_the_bound() {
        assert_eq!(bounded(b"abcdef", 4), (&b"abcd"[..], true));
        assert_eq!(bounded(b"ab", 4), (&b"ab"[..], false));
    }
}
