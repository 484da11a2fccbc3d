//! The refund workflow's decision: what a provider outcome means for the job.
//!
//! This module owns the policy half of DESIGN §4–§5, as a pure function ([`decide`]) that the
//! worker applies after every call, so each rule — never retry a Declined, never resend a
//! maybe-delivered request to a non-idempotent merchant, give up after the configured attempts
//! or age — is stated once and tested without a database or a network. [`RetryPolicy`] computes
//! backoff delays: exponential, capped, with equal jitter (uniform in the upper half of the
//! window) so that a provider outage does not bring every job back at the same instant, while
//! a job's retries still last a known minimum (full jitter could spend them all in seconds).
//! A throttled call ("too many requests") is the provider's pacing, not a failure: its retry
//! is not counted against the budget ([`decide`]'s `spare`).

use std::time::Duration;

use rand::Rng;

use crate::config::RetryConfig;
use crate::provider::Outcome;
use crate::state::Cause;

/// Exponential backoff with equal jitter, bounded by attempts and age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    initial: Duration,
    cap: Duration,
    multiplier: u32,
    max_attempts: i32,
    max_age: Duration,
}

impl RetryPolicy {
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap,
            multiplier: 2,
            max_attempts: 8,
            max_age: Duration::from_secs(24 * 3600),
        }
    }

    pub fn multiplier(mut self, m: u32) -> Self {
        self.multiplier = m.max(1);
        self
    }

    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    pub fn from_config(c: &RetryConfig) -> Self {
        Self::new(
            Duration::from_millis(c.initial_delay_ms),
            Duration::from_millis(c.max_delay_ms),
        )
        .multiplier(c.multiplier)
        .max_attempts(c.max_attempts)
        .max_age(Duration::from_millis(c.max_age_ms))
    }

    /// The ceiling of the delay after `attempt` failed calls (1-based), before jitter.
    pub fn ceiling(&self, attempt: i32) -> Duration {
        let exp = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0);
        let factor = self.multiplier.checked_pow(exp).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.cap)
    }

    /// Equal jitter: uniform in `[ceiling / 2, ceiling]`.
    pub fn delay(&self, attempt: i32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(ms / 2..=ms))
    }

    /// The shortest and longest a job's counted retries can last: the sum of the waits between
    /// its `max_attempts` calls, each at its least and at its most.
    pub fn lifetime(&self) -> (Duration, Duration) {
        (1..self.max_attempts).fold((Duration::ZERO, Duration::ZERO), |(lo, hi), n| {
            let c = self.ceiling(n);
            let half = Duration::from_millis(u64::try_from(c.as_millis() / 2).unwrap_or(u64::MAX));
            (lo.saturating_add(half), hi.saturating_add(c))
        })
    }

    /// Counted calls at most.
    pub fn attempts(&self) -> i32 {
        self.max_attempts
    }

    /// Whether another call is allowed after `attempt` calls on a job of this age.
    pub fn may_retry(&self, attempt: i32, age: Duration) -> bool {
        attempt < self.max_attempts && age < self.max_age
    }
}

/// What earlier attempts of a job left behind that its next decision must respect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// An earlier attempt may have paid: its answer was maybe delivered, unrecognised or
    /// accepted (fenced included), or its lease ran out mid-call.
    pub maybe_paid: bool,
}

impl History {
    /// The history once `outcome` is added to it.
    pub fn after(self, outcome: &Outcome) -> History {
        History {
            maybe_paid: self.maybe_paid || outcome.may_have_paid(),
        }
    }
}

/// What the job does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Book it: `succeeded`, ledger entry, event.
    Succeed,
    /// The provider took it and its end follows (notify or status query, the first query
    /// after `first_query`): `accepted`, event, no ledger entry yet, never sent again.
    Accept { first_query: Duration },
    /// Definitive FAIL: `failed`, event; never called again.
    Fail,
    /// Try again after this delay (`retry_wait`); `counted` is false for a throttled call,
    /// which does not spend the job's retry budget.
    Retry { after: Duration, counted: bool },
    /// Stop: `dead` with this cause, for an operator.
    Dead { cause: Cause },
}

impl Decision {
    /// The decision for a provider whose acceptance is (or is not) the refund's end: ShengPay
    /// processes a refund after answering `SUCCESS` (unless its merchant is configured
    /// `final_on_accept`), so booking it then would say paid before the money moved.
    pub fn at_acceptance(self, final_on_accept: bool, first_query: Duration) -> Decision {
        match self {
            Decision::Succeed if !final_on_accept => Decision::Accept { first_query },
            other => other,
        }
    }
}

/// Decides the next step after a call with `outcome` as attempt number `attempt` of a job that
/// is `age` old at a merchant that is (or is not) idempotent on `refund_no`, given what the
/// job's earlier attempts left behind. With `spare`, the call was throttled and is not counted:
/// a retry it leads to is decided as if the call had not been made (the attempt limit is not
/// reached by it), and is marked uncounted. Sparing never makes a resend safe that was not:
/// a maybe-delivered call at a non-idempotent merchant is still `outcome_unknown`.
///
/// Two rules read the history, because the provider may already hold this refund from an
/// earlier attempt: a decline then cannot prove that nothing was paid (it may be the answer to
/// a second request for a refund the first one paid), so it is `dead`/`outcome_unknown` with
/// the order amount kept, not `failed`; and a job that dies for any reason after such an
/// attempt is `outcome_unknown`, so that nobody replays it or resolves it as failed as if no
/// attempt had reached the provider.
// Every argument is one fact of the rule table above, named at each call; a struct would only
// rename them.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    outcome: &Outcome,
    attempt: i32,
    age: Duration,
    idempotent: bool,
    history: History,
    spare: bool,
    policy: &RetryPolicy,
    rng: &mut impl Rng,
) -> Decision {
    let maybe_paid = history.after(outcome).maybe_paid;
    let dead = |cause| Decision::Dead {
        cause: if maybe_paid {
            Cause::OutcomeUnknown
        } else {
            cause
        },
    };
    let counted_attempt = if spare {
        attempt.saturating_sub(1).max(1)
    } else {
        attempt
    };
    let retry = |rng: &mut _| {
        if (spare && age < policy.max_age) || policy.may_retry(counted_attempt, age) {
            Decision::Retry {
                after: policy.delay(counted_attempt, rng),
                counted: !spare,
            }
        } else {
            dead(Cause::RetriesExhausted)
        }
    };
    match outcome {
        Outcome::Accepted { .. } => Decision::Succeed,
        Outcome::Declined { .. } if maybe_paid => dead(Cause::OutcomeUnknown),
        Outcome::Declined { .. } => Decision::Fail,
        Outcome::RequestRejected { .. } => dead(Cause::ProviderRejectedRequest),
        Outcome::Unrecognised { .. } => dead(Cause::OutcomeUnknown),
        Outcome::MaybeDelivered { .. } if !idempotent => dead(Cause::OutcomeUnknown),
        Outcome::RetryLater { .. } | Outcome::NotSent { .. } | Outcome::MaybeDelivered { .. } => {
            retry(rng)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(5))
            .max_attempts(4)
            .max_age(Duration::from_secs(60))
    }

    fn throttled() -> Outcome {
        Outcome::RetryLater {
            code: "FREQUENCY_LIMITED".into(),
            message: String::new(),
            raw: String::new(),
        }
    }

    fn maybe() -> Outcome {
        Outcome::MaybeDelivered {
            error: "timeout".into(),
            raw: None,
        }
    }

    #[test]
    fn a_declined_refund_is_failed_the_first_time_and_never_retried() {
        let o = Outcome::Declined {
            code: "NOTENOUGH".into(),
            message: String::new(),
            raw: String::new(),
        };
        let mut rng = StdRng::seed_from_u64(1);
        for attempt in 1..10 {
            assert_eq!(
                decide(
                    &o,
                    attempt,
                    Duration::ZERO,
                    true,
                    History::default(),
                    false,
                    &policy(),
                    &mut rng
                ),
                Decision::Fail
            );
        }
    }

    #[test]
    fn a_maybe_delivered_call_is_retried_only_at_an_idempotent_merchant() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(matches!(
            decide(
                &maybe(),
                1,
                Duration::ZERO,
                true,
                History::default(),
                false,
                &policy(),
                &mut rng
            ),
            Decision::Retry { .. }
        ));
        assert_eq!(
            decide(
                &maybe(),
                1,
                Duration::ZERO,
                false,
                History::default(),
                false,
                &policy(),
                &mut rng
            ),
            Decision::Dead {
                cause: Cause::OutcomeUnknown
            }
        );
    }

    #[test]
    fn not_sent_and_retry_later_are_retried_even_at_a_non_idempotent_merchant() {
        let mut rng = StdRng::seed_from_u64(1);
        for o in [
            Outcome::NotSent {
                error: "refused".into(),
            },
            Outcome::RetryLater {
                code: "SYSTEMERROR".into(),
                message: String::new(),
                raw: String::new(),
            },
        ] {
            assert!(matches!(
                decide(
                    &o,
                    1,
                    Duration::ZERO,
                    false,
                    History::default(),
                    false,
                    &policy(),
                    &mut rng
                ),
                Decision::Retry { .. }
            ));
        }
    }

    #[test]
    fn retries_stop_at_the_attempt_limit_and_at_the_age_limit() {
        let mut rng = StdRng::seed_from_u64(1);
        let dead = Decision::Dead {
            cause: Cause::RetriesExhausted,
        };
        let not_sent = Outcome::NotSent {
            error: "refused".into(),
        };
        let young = Duration::ZERO;
        let old = Duration::from_secs(61);
        assert_eq!(
            decide(
                &not_sent,
                4,
                young,
                true,
                History::default(),
                false,
                &policy(),
                &mut rng
            ),
            dead
        );
        assert_eq!(
            decide(
                &not_sent,
                1,
                old,
                true,
                History::default(),
                false,
                &policy(),
                &mut rng
            ),
            dead
        );
    }

    #[test]
    fn running_out_of_retries_after_a_maybe_delivered_call_is_outcome_unknown() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            decide(
                &maybe(),
                4,
                Duration::ZERO,
                true,
                History::default(),
                false,
                &policy(),
                &mut rng
            ),
            Decision::Dead {
                cause: Cause::OutcomeUnknown
            }
        );
    }

    fn declined() -> Outcome {
        Outcome::Declined {
            code: "NOTENOUGH".into(),
            message: String::new(),
            raw: String::new(),
        }
    }

    #[test]
    fn a_decline_after_an_attempt_that_may_have_paid_is_outcome_unknown_not_failed() {
        let mut rng = StdRng::seed_from_u64(1);
        let history = History { maybe_paid: true };
        assert_eq!(
            decide(
                &declined(),
                2,
                Duration::ZERO,
                true,
                history,
                false,
                &policy(),
                &mut rng
            ),
            Decision::Dead {
                cause: Cause::OutcomeUnknown
            }
        );
    }

    #[test]
    fn a_job_that_may_have_been_paid_never_dies_as_if_no_attempt_reached_the_provider() {
        let mut rng = StdRng::seed_from_u64(1);
        let history = History { maybe_paid: true };
        let rr = Outcome::RequestRejected {
            code: "SIGN_ERROR".into(),
            message: String::new(),
            raw: String::new(),
        };
        for o in [
            Outcome::NotSent {
                error: "refused".into(),
            },
            Outcome::RetryLater {
                code: "SYSTEMERROR".into(),
                message: String::new(),
                raw: String::new(),
            },
            rr,
        ] {
            assert_eq!(
                decide(
                    &o,
                    4,
                    Duration::ZERO,
                    true,
                    history,
                    false,
                    &policy(),
                    &mut rng
                ),
                Decision::Dead {
                    cause: Cause::OutcomeUnknown
                },
                "{o:?}"
            );
        }
    }

    #[test]
    fn an_acceptance_after_a_maybe_delivered_attempt_is_still_booked() {
        let mut rng = StdRng::seed_from_u64(1);
        let accepted = Outcome::Accepted {
            provider_refund_id: "P1".into(),
            refund_fee: 100,
            settlement_refund_fee: 100,
            coupon_refund_fee: 0,
            raw: String::new(),
        };
        let history = History { maybe_paid: true };
        assert_eq!(
            decide(
                &accepted,
                2,
                Duration::ZERO,
                true,
                history,
                false,
                &policy(),
                &mut rng
            ),
            Decision::Succeed
        );
    }

    #[test]
    fn outcomes_that_may_have_paid_are_remembered_and_definitive_ones_are_not() {
        assert!(History::default().after(&maybe()).maybe_paid);
        assert!(!History::default().after(&declined()).maybe_paid);
        let un = Outcome::Unrecognised {
            result: "PENDING".into(),
            raw: String::new(),
        };
        assert!(History::default().after(&un).maybe_paid);
        let seen = History { maybe_paid: true };
        assert!(seen.after(&declined()).maybe_paid);
    }

    #[test]
    fn backoff_grows_exponentially_to_its_cap_and_jitter_stays_in_the_upper_half() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(3), Duration::from_millis(400));
        assert_eq!(p.ceiling(30), Duration::from_secs(5));
        assert_eq!(p.ceiling(i32::MAX), Duration::from_secs(5));
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<_> = (0..200).map(|_| p.delay(3, &mut rng)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(200) && *d <= Duration::from_millis(400))
        );
        assert!(delays.iter().any(|d| *d < Duration::from_millis(300)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(300)));
    }

    #[test]
    fn request_rejected_and_unrecognised_results_go_to_an_operator() {
        let mut rng = StdRng::seed_from_u64(1);
        let rr = Outcome::RequestRejected {
            code: "SIGN_ERROR".into(),
            message: String::new(),
            raw: String::new(),
        };
        assert_eq!(
            decide(
                &rr,
                1,
                Duration::ZERO,
                true,
                History::default(),
                false,
                &policy(),
                &mut rng
            ),
            Decision::Dead {
                cause: Cause::ProviderRejectedRequest
            }
        );
        let un = Outcome::Unrecognised {
            result: "PENDING".into(),
            raw: String::new(),
        };
        assert_eq!(
            decide(
                &un,
                1,
                Duration::ZERO,
                true,
                History::default(),
                false,
                &policy(),
                &mut rng
            ),
            Decision::Dead {
                cause: Cause::OutcomeUnknown
            }
        );
    }

    #[test]
    fn an_acceptance_is_the_end_only_where_the_provider_settles_on_the_call() {
        let q = Duration::from_secs(60);
        assert_eq!(
            Decision::Succeed.at_acceptance(false, q),
            Decision::Accept { first_query: q }
        );
        assert_eq!(Decision::Succeed.at_acceptance(true, q), Decision::Succeed);
        let fail = Decision::Fail;
        assert_eq!(fail.clone().at_acceptance(false, q), fail);
    }

    #[test]
    fn the_default_policy_keeps_a_job_retrying_through_a_one_hour_outage() {
        let policy = RetryPolicy::from_config(&crate::config::RetryConfig::default());
        let (shortest, longest) = policy.lifetime();
        assert!(shortest >= Duration::from_secs(3600), "{shortest:?}");
        assert!(longest <= Duration::from_secs(3 * 3600), "{longest:?}");
        // The README's figures.
        assert_eq!(policy.attempts(), 24);
        assert_eq!(shortest.as_secs() / 60, 61);
        assert_eq!(longest.as_secs() / 60, 123);
    }

    #[test]
    fn every_delay_is_at_least_half_its_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        let p = policy();
        for attempt in 1..8 {
            for _ in 0..200 {
                let d = p.delay(attempt, &mut rng);
                assert!(d >= p.ceiling(attempt) / 2 && d <= p.ceiling(attempt));
            }
        }
    }

    #[test]
    fn a_throttled_call_is_retried_uncounted_even_on_the_last_attempt() {
        let mut rng = StdRng::seed_from_u64(1);
        let throttled = throttled();
        let last = policy().attempts();
        assert!(matches!(
            decide(
                &throttled,
                last,
                Duration::ZERO,
                false,
                History::default(),
                true,
                &policy(),
                &mut rng
            ),
            Decision::Retry { counted: false, .. }
        ));
        assert_eq!(
            decide(
                &throttled,
                last,
                Duration::ZERO,
                false,
                History::default(),
                false,
                &policy(),
                &mut rng
            ),
            Decision::Dead {
                cause: Cause::RetriesExhausted
            }
        );
    }

    #[test]
    fn sparing_never_resends_a_maybe_delivered_call_to_a_non_idempotent_merchant() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            decide(
                &maybe(),
                1,
                Duration::ZERO,
                false,
                History::default(),
                true,
                &policy(),
                &mut rng
            ),
            Decision::Dead {
                cause: Cause::OutcomeUnknown
            }
        );
    }

    #[test]
    fn a_throttled_call_past_the_age_limit_is_not_retried() {
        let mut rng = StdRng::seed_from_u64(1);
        let throttled = throttled();
        assert_eq!(
            decide(
                &throttled,
                1,
                Duration::from_secs(61),
                true,
                History::default(),
                true,
                &policy(),
                &mut rng
            ),
            Decision::Dead {
                cause: Cause::RetriesExhausted
            }
        );
    }
}
