//! Who is signed in: operators from a file of argon2 password hashes, or named by a trusted
//! proxy's header; their roles; sessions; CSRF tokens.
//!
//! Sessions live in this process (a console restart signs everybody out, and a second replica
//! needs sticky sessions). The session cookie is `HttpOnly`, `SameSite=Strict` and, unless
//! configured otherwise, `Secure`. Every form carries a CSRF token: an HMAC, under a key made
//! at start, of the session's id (or of the proxy-named operator), compared in constant time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::Deserialize;

/// What an operator may do. Each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read every page.
    Viewer,
    /// Also replay, discard, resolve and correct (a second person approves those two), and
    /// explain reconciliation cases.
    Operator,
    /// Also approve or reject another operator's resolution or correction.
    Approver,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Approver => "approver",
        }
    }
}

/// One entry of the operators file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorEntry {
    name: String,
    role: Role,
    /// Argon2 PHC string. Absent: this operator signs in through the proxy only.
    #[serde(default)]
    password_hash: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorsFile {
    #[serde(default)]
    operators: Vec<OperatorEntry>,
}

/// The operators who may sign in, by name.
#[derive(Debug, Clone, Default)]
pub struct Operators {
    by_name: HashMap<String, OperatorEntry>,
}

/// A hash verified when the name is unknown, so that a wrong name costs as long as a wrong
/// password and does not tell which names exist.
const DECOY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$0ijp8HcgG8qvvnXJ1DZ0bm9vpbmF4Rk2g0ye6S0fMX8";

impl Operators {
    /// Reads and checks the operators file: names unique and non-empty, hashes parseable.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading console.operators_file {}", path.display()))?;
        let file: OperatorsFile = toml::from_str(&text)
            .with_context(|| format!("parsing console.operators_file {}", path.display()))?;
        let mut by_name = HashMap::new();
        for (i, op) in file.operators.into_iter().enumerate() {
            let at = format!("{} operators[{i}]", path.display());
            if op.name.trim().is_empty() || op.name != op.name.trim() {
                anyhow::bail!("{at}.name: must be a name without surrounding spaces");
            }
            if let Some(h) = &op.password_hash {
                PasswordHash::new(h).map_err(|e| {
                    anyhow::anyhow!("{at}.password_hash: not an argon2 PHC string ({e})")
                })?;
            }
            if by_name.contains_key(&op.name) {
                anyhow::bail!("{at}.name: {:?} is listed twice", op.name);
            }
            by_name.insert(op.name.clone(), op);
        }
        if by_name.is_empty() {
            anyhow::bail!(
                "console.operators_file {} names no operator",
                path.display()
            );
        }
        Ok(Self { by_name })
    }

    /// The role of a listed operator.
    pub fn role(&self, name: &str) -> Option<Role> {
        self.by_name.get(name).map(|o| o.role)
    }

    /// The operator's role when the password is theirs (runs argon2: call off the async
    /// threads).
    pub fn verify(&self, name: &str, password: &str) -> Option<Role> {
        let entry = self.by_name.get(name);
        let hash = entry
            .and_then(|e| e.password_hash.as_deref())
            .unwrap_or(DECOY_HASH);
        let parsed = PasswordHash::new(hash).ok()?;
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        match entry {
            Some(e) if ok && e.password_hash.is_some() => Some(e.role),
            _ => None,
        }
    }
}

/// An argon2id PHC string for `password` (what `refund-console hash-password` prints).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| anyhow::anyhow!("making a salt: {e}"))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing: {e}"))?
        .to_string())
}

/// How the operator was recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A session cookie, with its id.
    Session(String),
    /// The trusted proxy's header.
    Proxy,
}

/// The signed-in operator of a request.
#[derive(Debug, Clone)]
pub struct Signed {
    pub name: String,
    pub role: Role,
    pub via: Via,
    /// This request's CSRF token, for the forms of the page.
    pub csrf: String,
}

impl Signed {
    /// Whether the operator's role allows what needs `role`.
    pub fn may(&self, role: Role) -> bool {
        self.role >= role
    }
}

struct Session {
    name: String,
    last_used: Instant,
}

/// Sessions by id, and the key CSRF tokens are made with.
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
    idle: Duration,
    key: [u8; 32],
}

impl Sessions {
    pub fn new(idle: Duration) -> Self {
        Self {
            by_id: Mutex::new(HashMap::new()),
            idle,
            key: rand::random(),
        }
    }

    /// Starts a session for `name`: its id, for the cookie.
    pub fn start(&self, name: &str) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut map = self.lock();
        // Forget the expired ones while here: the map stays as big as the signed-in set.
        let idle = self.idle;
        map.retain(|_, s| s.last_used.elapsed() < idle);
        map.insert(
            id.clone(),
            Session {
                name: name.to_owned(),
                last_used: Instant::now(),
            },
        );
        id
    }

    /// The operator of a live session (and it counts as used now).
    pub fn touch(&self, id: &str) -> Option<String> {
        let mut map = self.lock();
        let s = map.get_mut(id)?;
        if s.last_used.elapsed() >= self.idle {
            map.remove(id);
            return None;
        }
        s.last_used = Instant::now();
        Some(s.name.clone())
    }

    /// Ends a session.
    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the map leaves it consistent (each change is one call).
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The CSRF token for forms posted under `via` by `name`.
    pub fn csrf_token(&self, via: &Via, name: &str) -> String {
        let subject = match via {
            Via::Session(id) => format!("session:{id}"),
            Via::Proxy => format!("proxy:{name}"),
        };
        self.mac(subject.as_bytes())
    }

    /// A token for the sign-in form, bound to the pre-session cookie's value.
    pub fn sign_in_token(&self, pre: &str) -> String {
        self.mac(format!("sign-in:{pre}").as_bytes())
    }

    fn mac(&self, data: &[u8]) -> String {
        let mac = openssl::pkey::PKey::hmac(&self.key)
            .and_then(|key| {
                let mut signer =
                    openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key)?;
                signer.update(data)?;
                signer.sign_to_vec()
            })
            // HMAC-SHA256 with a 32-byte key does not fail; an empty token never matches.
            .unwrap_or_default();
        hex::encode(mac)
    }
}

/// Failed sign-ins of a name: after [`Throttle::MAX_FAILURES`] within [`Throttle::WINDOW`],
/// the name is refused without its password being checked until the window since the first
/// failure has passed, so a password cannot be guessed at argon2's pace. Keyed by name, not by
/// address: guessing from many addresses is the case it is for (the price: somebody who knows
/// a name can keep it locked out; an administrator sees the refusals in the log).
pub struct Throttle {
    failures: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
        }
    }
}

impl Throttle {
    pub const MAX_FAILURES: u32 = 5;
    pub const WINDOW: Duration = Duration::from_secs(15 * 60);

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, u32)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `name` must wait before it may try again; `None`: it may now.
    pub fn blocked(&self, name: &str) -> Option<Duration> {
        let map = self.lock();
        let (first, count) = map.get(name)?;
        let left = Self::WINDOW.checked_sub(first.elapsed())?;
        (*count >= Self::MAX_FAILURES).then_some(left)
    }

    /// Counts a failed sign-in of `name`.
    pub fn failed(&self, name: &str) {
        let mut map = self.lock();
        // Forget windows that are over while here: the map stays as big as the recent failures.
        map.retain(|_, (first, _)| first.elapsed() < Self::WINDOW);
        let entry = map.entry(name.to_owned()).or_insert((Instant::now(), 0));
        entry.1 = entry.1.saturating_add(1);
    }

    /// A successful sign-in clears the name's failures.
    pub fn succeeded(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// Whether a token sent with a form is the expected one (constant time).
pub fn token_matches(expected: &str, sent: &str) -> bool {
    !expected.is_empty()
        && expected.len() == sent.len()
        && openssl::memcmp::eq(expected.as_bytes(), sent.as_bytes())
}

/// Whether `peer` is one of the proxies whose header is believed.
pub fn is_trusted(trusted: &[IpAddr], peer: IpAddr) -> bool {
    trusted
        .iter()
        .any(|t| *t == peer || t.to_canonical() == peer.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn a_listed_operator_signs_in_with_their_password_only() {
        let hash = hash_password("correct horse").unwrap();
        let f = file(&format!(
            "[[operators]]\nname = \"alice\"\nrole = \"operator\"\npassword_hash = \"{hash}\"\n"
        ));
        let ops = Operators::load(f.path()).unwrap();
        assert_eq!(ops.verify("alice", "correct horse"), Some(Role::Operator));
        assert_eq!(ops.verify("alice", "wrong"), None);
        assert_eq!(ops.verify("mallory", "correct horse"), None);
    }

    #[test]
    fn an_operator_without_a_hash_cannot_sign_in_by_password() {
        let f = file("[[operators]]\nname = \"sso-bob\"\nrole = \"viewer\"\n");
        let ops = Operators::load(f.path()).unwrap();
        assert_eq!(ops.role("sso-bob"), Some(Role::Viewer));
        assert_eq!(ops.verify("sso-bob", ""), None);
    }

    #[test]
    fn the_operators_file_names_the_entry_at_fault() {
        let f = file(
            "[[operators]]\nname = \"a\"\nrole = \"viewer\"\n\
             [[operators]]\nname = \"b\"\nrole = \"viewer\"\npassword_hash = \"plain\"\n",
        );
        let e = format!("{:#}", Operators::load(f.path()).unwrap_err());
        assert!(e.contains("operators[1].password_hash"), "{e}");
        let f = file("[[operators]]\nname = \"a\"\nrole = \"admin\"\n");
        let e = format!("{:#}", Operators::load(f.path()).unwrap_err());
        assert!(e.contains("admin"), "{e}");
    }

    #[test]
    fn roles_are_a_ladder() {
        assert!(Role::Approver > Role::Operator && Role::Operator > Role::Viewer);
    }

    #[test]
    fn a_csrf_token_belongs_to_its_session() {
        let s = Sessions::new(Duration::from_secs(60));
        let a = s.start("alice");
        let b = s.start("bob");
        let ta = s.csrf_token(&Via::Session(a.clone()), "alice");
        assert!(token_matches(&ta, &s.csrf_token(&Via::Session(a), "alice")));
        assert!(!token_matches(&ta, &s.csrf_token(&Via::Session(b), "bob")));
        assert!(!token_matches(&ta, ""));
    }

    #[test]
    fn a_name_is_refused_after_five_failed_sign_ins_and_a_success_clears_them() {
        let t = Throttle::default();
        for _ in 0..Throttle::MAX_FAILURES - 1 {
            t.failed("alice");
        }
        assert_eq!(t.blocked("alice"), None, "four failures still leave a try");
        t.succeeded("alice");
        for _ in 0..Throttle::MAX_FAILURES {
            t.failed("alice");
        }
        let left = t.blocked("alice").expect("blocked after five");
        assert!(left > Throttle::WINDOW - Duration::from_secs(5), "{left:?}");
        assert_eq!(t.blocked("bob"), None, "another name is not affected");
    }

    #[test]
    fn an_idle_session_expires() {
        let s = Sessions::new(Duration::from_millis(1));
        let id = s.start("alice");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.touch(&id), None);
    }
}
