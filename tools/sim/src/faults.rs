//! Fault rules: which calls get which injected failure.
//!
//! The system under test must survive every way a provider call can go wrong; a rule makes one
//! of those happen on purpose, for the calls it matches, at a seeded rate, optionally only for
//! the first `times` matching calls of each refund number ("fail twice, then succeed").
//!
//! Rules are checked in order; the first rule that matches *and* fires decides the call (its
//! latency and its action). A matching rule that does not fire (rate roll lost, `times` used
//! up) lets the next rules be checked.
//!
//! Each rule applies to one [`Operation`]: a refund call, a ShengPay status query, or a
//! ShengPay notify (matched when the refund ends, independently of the rule that decided the
//! refund call). How an accepted ShengPay refund ends (`refund_close`, `change`) is the
//! provider's fate, not the call's: those rules are matched on their own too
//! ([`FaultEngine::select_end`]), so a refund planted to close closes whatever transport fault
//! or latency rule took its call. The default follows the action, so rules written before queries and notifies
//! existed keep their meaning; an action that cannot happen in its operation is refused when
//! the rules are loaded rather than silently never firing.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::Provider;

/// What a fired rule does to the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// HTTP 500 with a plain-text body; nothing paid.
    Http500,
    /// HTTP 502 whose body is bytes that are not text: NULs and bytes that are not UTF-8, as a
    /// broken gateway sends; nothing paid.
    BinaryBody,
    /// Connection closed with a TCP reset, no response; nothing paid.
    Reset,
    /// No answer until the client gives up (or `hang_max_ms`, then closed unanswered); nothing
    /// paid.
    Hang,
    /// Processed normally (so paid), then the connection is closed without the response.
    DropResponse,
    /// Processed normally (so paid); ShengPay's response `sign` is corrupted, WuPay's response
    /// is truncated XML (WuPay has no signatures, so an unparseable answer plays that role).
    BadSignature,
    /// A definitive business FAIL with `code` (default `ORDER_NOT_REFUNDABLE`); nothing paid.
    Decline,
    /// "Try again later" (default code `SYSTEMERROR`): ShengPay `resultCode FAIL`, WuPay SOAP
    /// Server/Receiver fault or HTTP 500; nothing paid.
    RetryLater,
    /// ShengPay only: the refund call is accepted as usual, but the refund ends `REFUND_CLOSE`
    /// and its amount is released (the order can be refunded again).
    RefundClose,
    /// ShengPay only: the refund call is accepted as usual, but the refund ends `CHANGE` (the
    /// money left the merchant but did not reach the card); its amount stays taken.
    Change,
    /// The refund's notify is never sent.
    NotifyDrop,
    /// The first notify delivery waits the rule's `latency_ms`.
    NotifyDelay,
    /// The final notify is delivered twice, the second after the first got its answer.
    NotifyDuplicate,
    /// A stale `PROCESSING` notify is delivered after the final one.
    NotifyReorder,
    /// The first delivery of the final notify has a corrupted `sign`; retries are signed right.
    NotifyBadSign,
    /// Before the real notify, one correctly signed by the platform but naming another refund
    /// number and another `mchId`, as a replayed foreign notify would.
    NotifyForeign,
}

impl FaultAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultAction::Http500 => "http500",
            FaultAction::BinaryBody => "binary_body",
            FaultAction::Reset => "reset",
            FaultAction::Hang => "hang",
            FaultAction::DropResponse => "drop_response",
            FaultAction::BadSignature => "bad_signature",
            FaultAction::Decline => "decline",
            FaultAction::RetryLater => "retry_later",
            FaultAction::RefundClose => "refund_close",
            FaultAction::Change => "change",
            FaultAction::NotifyDrop => "notify_drop",
            FaultAction::NotifyDelay => "notify_delay",
            FaultAction::NotifyDuplicate => "notify_duplicate",
            FaultAction::NotifyReorder => "notify_reorder",
            FaultAction::NotifyBadSign => "notify_bad_sign",
            FaultAction::NotifyForeign => "notify_foreign",
        }
    }
}

impl FaultAction {
    /// Whether this action says how an accepted refund ends rather than what its call meets.
    fn is_end(self) -> bool {
        matches!(self, FaultAction::RefundClose | FaultAction::Change)
    }

    /// Whether this action can happen in `operation`.
    fn fits(self, operation: Operation) -> bool {
        use FaultAction::*;
        let transport = matches!(
            self,
            Http500 | BinaryBody | Reset | Hang | DropResponse | BadSignature | RetryLater
        );
        let notify = matches!(
            self,
            NotifyDrop
                | NotifyDelay
                | NotifyDuplicate
                | NotifyReorder
                | NotifyBadSign
                | NotifyForeign
        );
        match operation {
            Operation::Refund => !notify,
            Operation::Query | Operation::Any => transport,
            Operation::Notify => notify,
        }
    }

    /// The operation a rule with this action applies to when it names none.
    fn default_operation(self) -> Operation {
        if self.fits(Operation::Notify) {
            Operation::Notify
        } else {
            Operation::Refund
        }
    }
}

/// What a rule applies to. `any` means refund calls and status queries alike (notifies are not
/// calls to the simulator, so their rules always say `notify`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// A refund call (both providers).
    Refund,
    /// A ShengPay status query.
    Query,
    /// The notify ShengPay sends when a refund ends.
    Notify,
    /// Refund calls and status queries.
    Any,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Refund => "refund",
            Operation::Query => "query",
            Operation::Notify => "notify",
            Operation::Any => "any",
        }
    }
}

/// One fault rule, as written in `[[rules]]` or posted to `/_sim/rules`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// A label for logs; no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Only calls to this provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<Provider>,
    /// Only calls for this merchant (our merchant name from the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merchant: Option<String>,
    /// Only calls whose order number matches this regex (unanchored: use `^...$`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_no: Option<String>,
    /// Only calls whose refund number matches this regex (unanchored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_no: Option<String>,
    /// Probability (0..=1) that a matching call fires the rule; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Fire only for the first N matching calls of each refund number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// Delay added before handling the call (then the action, if any, or normal handling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The fault; none means latency only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<FaultAction>,
    /// Error code for `decline` and `retry_later`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Error message for `decline` and `retry_later`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the rule applies to; default `notify` for `notify_*` actions, else `refund`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

impl FaultRule {
    /// A rule with `action` for every call; narrow it with the builder methods.
    pub fn new(action: FaultAction) -> Self {
        FaultRule {
            action: Some(action),
            ..FaultRule::default()
        }
    }

    /// A latency-only rule for every call.
    pub fn latency(ms: u64) -> Self {
        FaultRule {
            latency_ms: Some(ms),
            ..FaultRule::default()
        }
    }

    pub fn order_no(mut self, regex: &str) -> Self {
        self.order_no = Some(regex.to_owned());
        self
    }

    pub fn refund_no(mut self, regex: &str) -> Self {
        self.refund_no = Some(regex.to_owned());
        self
    }

    pub fn provider(mut self, provider: Provider) -> Self {
        self.provider = Some(provider);
        self
    }

    pub fn merchant(mut self, merchant: &str) -> Self {
        self.merchant = Some(merchant.to_owned());
        self
    }

    pub fn rate(mut self, rate: f64) -> Self {
        self.rate = Some(rate);
        self
    }

    pub fn times(mut self, times: u32) -> Self {
        self.times = Some(times);
        self
    }

    pub fn with_latency(mut self, ms: u64) -> Self {
        self.latency_ms = Some(ms);
        self
    }

    pub fn code(mut self, code: &str) -> Self {
        self.code = Some(code.to_owned());
        self
    }

    pub fn message(mut self, message: &str) -> Self {
        self.message = Some(message.to_owned());
        self
    }

    pub fn operation(mut self, operation: Operation) -> Self {
        self.operation = Some(operation);
        self
    }

    /// The operation the rule applies to, its default filled in.
    pub fn effective_operation(&self) -> Operation {
        self.operation.unwrap_or_else(|| {
            self.action
                .map_or(Operation::Refund, FaultAction::default_operation)
        })
    }

    /// `rules[i]`, with the rule's name when it has one: how errors name a rule.
    pub(crate) fn label(&self, index: usize) -> String {
        match &self.name {
            Some(name) => format!("rules[{index}] ({name:?})"),
            None => format!("rules[{index}]"),
        }
    }

    /// Checks the rule; the error names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.compile().map(|_| ())
    }

    fn compile(&self) -> Result<CompiledRule, String> {
        let regex = |field: &str, pattern: &Option<String>| -> Result<Option<Regex>, String> {
            pattern
                .as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|e| format!("{field}: {e}"))
        };
        let rate = self.rate.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&rate) {
            return Err(format!("rate must be between 0 and 1, got {rate}"));
        }
        let takes_code = matches!(
            self.action,
            Some(FaultAction::Decline | FaultAction::RetryLater)
        );
        if !takes_code && (self.code.is_some() || self.message.is_some()) {
            return Err("code and message apply only to decline and retry_later".into());
        }
        if let Some(code) = &self.code {
            // The code travels inside WuPay's `FAIL:<CODE>:<message>` and in JSON: keep it to
            // the characters real provider codes use.
            let ok = !code.is_empty()
                && code.len() <= 64
                && code
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !ok {
                return Err(format!("code {code:?} must be 1-64 of [A-Za-z0-9_.]"));
            }
        }
        // A NUL is allowed: it models a provider whose message carries one (PostgreSQL cannot
        // store it as it comes, and the worker must record the answer all the same).
        if let Some(message) = &self.message
            && message.chars().any(|c| c.is_control() && c != '\0')
        {
            return Err("message must not contain control characters other than NUL".into());
        }
        if self.action.is_none() && self.latency_ms.is_none() {
            return Err("a rule needs an action, a latency_ms, or both".into());
        }
        let operation = self.effective_operation();
        match self.action {
            Some(action) if !action.fits(operation) => {
                return Err(format!(
                    "action {} does not apply to operation {}",
                    action.as_str(),
                    operation.as_str()
                ));
            }
            None if operation == Operation::Notify => {
                return Err("a notify rule needs a notify_* action".into());
            }
            _ => {}
        }
        if operation == Operation::Notify
            && self.latency_ms.is_some()
            && self.action != Some(FaultAction::NotifyDelay)
        {
            return Err("latency_ms on a notify rule applies only to notify_delay".into());
        }
        if self.action == Some(FaultAction::NotifyDelay) && self.latency_ms.is_none() {
            return Err("notify_delay needs latency_ms (how long the first delivery waits)".into());
        }
        let shengpay_only = matches!(operation, Operation::Query | Operation::Notify)
            || matches!(
                self.action,
                Some(FaultAction::RefundClose | FaultAction::Change)
            );
        if shengpay_only && self.provider == Some(Provider::WuPay) {
            return Err(
                "wupay is synchronous: it has no status query, notify, refund_close or change"
                    .into(),
            );
        }
        Ok(CompiledRule {
            operation,
            rule: self.clone(),
            order_no: regex("order_no", &self.order_no)?,
            refund_no: regex("refund_no", &self.refund_no)?,
            rate,
        })
    }
}

struct CompiledRule {
    operation: Operation,
    rule: FaultRule,
    order_no: Option<Regex>,
    refund_no: Option<Regex>,
    rate: f64,
}

impl CompiledRule {
    fn matches(&self, call: &CallKey<'_>) -> bool {
        let rule = &self.rule;
        let operation = self.operation == call.operation
            || (self.operation == Operation::Any && call.operation != Operation::Notify);
        operation
            && rule.provider.is_none_or(|p| p == call.provider)
            && rule
                .merchant
                .as_deref()
                .is_none_or(|m| call.merchant == Some(m))
            && self
                .order_no
                .as_ref()
                .is_none_or(|re| re.is_match(call.order_no.unwrap_or("")))
            && self
                .refund_no
                .as_ref()
                .is_none_or(|re| re.is_match(call.refund_no.unwrap_or("")))
    }
}

/// What identifies a call (or a notify) for rule matching.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CallKey<'a> {
    /// Never [`Operation::Any`]: a call is one thing.
    pub operation: Operation,
    pub provider: Provider,
    pub merchant: Option<&'a str>,
    pub refund_no: Option<&'a str>,
    pub order_no: Option<&'a str>,
}

/// The rule that fired for a call.
#[derive(Clone, Debug)]
pub(crate) struct Fired {
    pub index: usize,
    pub latency_ms: u64,
    pub action: Option<FaultAction>,
    pub code: Option<String>,
    pub message: Option<String>,
}

/// Rules plus the state they need: per-refund counters for `times` and the seeded RNG.
pub(crate) struct FaultEngine {
    rules: Vec<CompiledRule>,
    /// (rule index, provider, merchant, refund_no) -> matching calls seen. Grows with distinct
    /// refund numbers only for rules that use `times`, and is cleared when rules are replaced.
    counts: HashMap<(usize, Provider, String, String), u32>,
    rng: StdRng,
}

impl FaultEngine {
    pub(crate) fn new(rules: &[FaultRule], seed: u64) -> Result<Self, String> {
        let mut engine = FaultEngine {
            rules: Vec::new(),
            counts: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
        };
        engine.replace(rules)?;
        Ok(engine)
    }

    /// Replaces every rule (all or nothing) and forgets the `times` counters.
    pub(crate) fn replace(&mut self, rules: &[FaultRule]) -> Result<(), String> {
        let compiled = rules
            .iter()
            .enumerate()
            .map(|(i, r)| r.compile().map_err(|e| format!("{}: {e}", r.label(i))))
            .collect::<Result<Vec<_>, _>>()?;
        self.rules = compiled;
        self.counts.clear();
        Ok(())
    }

    pub(crate) fn rules(&self) -> Vec<FaultRule> {
        self.rules.iter().map(|r| r.rule.clone()).collect()
    }

    pub(crate) fn clear_counts(&mut self) {
        self.counts.clear();
    }

    /// The random source shared with the providers (nonces, string amounts), so one seed
    /// reproduces a whole run.
    pub(crate) fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Finds the first rule that matches `call` and fires, among those that decide a call (all
    /// but `refund_close` and `change`).
    pub(crate) fn select(&mut self, call: &CallKey<'_>) -> Option<Fired> {
        self.first_firing(call, false)
    }

    /// How an accepted refund is to end: the first `refund_close` or `change` rule that
    /// matches `call` and fires, whichever rule decided the call itself.
    pub(crate) fn select_end(&mut self, call: &CallKey<'_>) -> Option<FaultAction> {
        self.first_firing(call, true).and_then(|f| f.action)
    }

    /// The first rule among the end rules (`ends`) or the others that matches `call` and fires.
    fn first_firing(&mut self, call: &CallKey<'_>, ends: bool) -> Option<Fired> {
        for (index, compiled) in self.rules.iter().enumerate() {
            let end_rule = compiled.rule.action.is_some_and(FaultAction::is_end);
            if end_rule != ends || !compiled.matches(call) {
                continue;
            }
            if let Some(times) = compiled.rule.times {
                let key = (
                    index,
                    call.provider,
                    call.merchant.unwrap_or("").to_owned(),
                    call.refund_no.unwrap_or("").to_owned(),
                );
                let seen = self.counts.entry(key).or_insert(0);
                let this_call = *seen;
                *seen = seen.saturating_add(1);
                if this_call >= times {
                    continue;
                }
            }
            if compiled.rate < 1.0 && !self.rng.random_bool(compiled.rate) {
                continue;
            }
            let rule = &compiled.rule;
            return Some(Fired {
                index,
                latency_ms: rule.latency_ms.unwrap_or(0),
                action: rule.action,
                code: rule.code.clone(),
                message: rule.message.clone(),
            });
        }
        None
    }
}

/// The code and message a fired `decline` / `retry_later` serves: the rule's, else defaults
/// that read like the providers' own.
pub(crate) fn fault_code(fired: &Fired) -> (String, String) {
    let default_code = match fired.action {
        Some(FaultAction::RetryLater) => "SYSTEMERROR",
        _ => "ORDER_NOT_REFUNDABLE",
    };
    let code = fired
        .code
        .clone()
        .unwrap_or_else(|| default_code.to_owned());
    let message = fired
        .message
        .clone()
        .unwrap_or_else(|| describe(&code).to_owned());
    (code, message)
}

/// A human description for a provider error code.
pub(crate) fn describe(code: &str) -> &'static str {
    match code {
        "ORDER_NOT_REFUNDABLE" => "order is not refundable",
        "ORDER_NOT_EXIST" => "order does not exist",
        "NOTENOUGH" => "insufficient balance for the refund",
        "TRADE_OVERDUE" => "order is past its refund period",
        "REFUND_AMOUNT_ERROR" => "refund amount error",
        "SYSTEMERROR" => "system busy, try again later",
        "BIZERR_NEED_RETRY" => "refund in progress, try again later",
        "FREQUENCY_LIMITED" => "too many requests, try again later",
        _ => "refused by a simulator fault rule",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(order_no: &'a str, refund_no: &'a str) -> CallKey<'a> {
        CallKey {
            operation: Operation::Refund,
            provider: Provider::ShengPay,
            merchant: Some("m"),
            refund_no: Some(refund_no),
            order_no: Some(order_no),
        }
    }

    #[test]
    fn times_limits_a_rule_to_the_first_calls_of_each_refund() {
        let rules = [FaultRule::new(FaultAction::Reset).order_no("^X").times(2)];
        let mut engine = FaultEngine::new(&rules, 1).expect("valid rules");
        let fired = |e: &mut FaultEngine, r| e.select(&call("X1", r)).is_some();
        assert!(fired(&mut engine, "R1"));
        assert!(fired(&mut engine, "R1"));
        assert!(!fired(&mut engine, "R1"));
        assert!(fired(&mut engine, "R2"));
        assert!(engine.select(&call("Y1", "R3")).is_none());
    }

    #[test]
    fn the_same_seed_fires_the_same_calls() {
        let rules = [FaultRule::new(FaultAction::Http500).rate(0.5)];
        let run = || {
            let mut engine = FaultEngine::new(&rules, 42).expect("valid rules");
            (0..64)
                .map(|i| engine.select(&call("O", &i.to_string())).is_some())
                .collect::<Vec<_>>()
        };
        let first = run();
        assert_eq!(first, run());
        assert!(first.iter().any(|f| *f) && first.iter().any(|f| !*f));
    }

    #[test]
    fn invalid_rules_are_refused_with_a_reason() {
        let bad_regex = FaultRule::new(FaultAction::Reset).order_no("(");
        assert!(bad_regex.validate().unwrap_err().contains("order_no"));
        assert!(
            FaultRule::new(FaultAction::Reset)
                .rate(1.5)
                .validate()
                .is_err()
        );
        assert!(
            FaultRule::new(FaultAction::Reset)
                .code("X")
                .validate()
                .is_err()
        );
        assert!(
            FaultRule::new(FaultAction::Decline)
                .code("A:B")
                .validate()
                .is_err()
        );
        assert!(FaultRule::default().validate().is_err());
    }

    #[test]
    fn an_action_outside_its_operation_is_refused_naming_the_rule() {
        let rule = FaultRule {
            name: Some("lost notifies".into()),
            ..FaultRule::new(FaultAction::NotifyDrop).operation(Operation::Query)
        };
        let error = FaultEngine::new(&[rule], 1).err().unwrap_or_default();
        assert!(error.contains("rules[0] (\"lost notifies\")"), "{error}");
        assert!(error.contains("notify_drop"), "{error}");
        for bad in [
            FaultRule::new(FaultAction::Decline).operation(Operation::Query),
            FaultRule::new(FaultAction::Http500).operation(Operation::Notify),
            FaultRule::new(FaultAction::RefundClose).operation(Operation::Any),
            FaultRule::new(FaultAction::NotifyDelay),
            FaultRule::new(FaultAction::Change).provider(Provider::WuPay),
            FaultRule::latency(5).operation(Operation::Notify),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        for good in [
            FaultRule::new(FaultAction::Reset).operation(Operation::Query),
            FaultRule::new(FaultAction::Http500).operation(Operation::Any),
            FaultRule::new(FaultAction::NotifyDelay).with_latency(10),
            FaultRule::new(FaultAction::RefundClose),
        ] {
            assert!(good.validate().is_ok(), "{good:?}");
        }
    }

    #[test]
    fn how_a_refund_ends_is_chosen_apart_from_the_rule_that_takes_its_call() {
        let rules = [
            FaultRule::latency(5),
            FaultRule::new(FaultAction::DropResponse).order_no("^C2"),
            FaultRule::new(FaultAction::RefundClose).order_no("^C"),
            FaultRule::new(FaultAction::Change).order_no("^X"),
        ];
        let mut engine = FaultEngine::new(&rules, 1).expect("valid rules");
        let taken = |e: &mut FaultEngine, o| e.select(&call(o, "R")).map(|f| f.index);
        assert_eq!(taken(&mut engine, "C1"), Some(0));
        assert_eq!(taken(&mut engine, "C2"), Some(0));
        assert_eq!(
            engine.select_end(&call("C2", "R")),
            Some(FaultAction::RefundClose)
        );
        assert_eq!(
            engine.select_end(&call("X1", "R")),
            Some(FaultAction::Change)
        );
        assert_eq!(engine.select_end(&call("N1", "R")), None);
    }

    #[test]
    fn rules_fire_only_for_their_operation_and_any_covers_refunds_and_queries() {
        let rules = [
            FaultRule::new(FaultAction::NotifyDrop),
            FaultRule::new(FaultAction::Reset).operation(Operation::Query),
            FaultRule::new(FaultAction::Http500).operation(Operation::Any),
        ];
        let mut engine = FaultEngine::new(&rules, 1).expect("valid rules");
        let mut fired = |operation| {
            let key = CallKey {
                operation,
                ..call("O", "R")
            };
            engine.select(&key).and_then(|f| f.action)
        };
        assert_eq!(fired(Operation::Refund), Some(FaultAction::Http500));
        assert_eq!(fired(Operation::Query), Some(FaultAction::Reset));
        assert_eq!(fired(Operation::Notify), Some(FaultAction::NotifyDrop));
    }
}
