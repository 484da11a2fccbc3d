//! The job state machine of DESIGN §4, as data.
//!
//! This module owns which transitions exist and who may make them. The store executes them
//! (one conditional `UPDATE … WHERE state = expected` plus a history row, in one transaction);
//! this module is the single list it checks against, so a transition that is not in
//! [`TRANSITIONS`] cannot be written by any path — worker, sweeper, replay or operator.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Received,
    InFlight,
    /// The provider took the refund and has not said how it ended (its notify or status
    /// query will): nothing is sent to the refund API again.
    Accepted,
    RetryWait,
    Succeeded,
    Failed,
    Rejected,
    Dead,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Received,
        State::InFlight,
        State::Accepted,
        State::RetryWait,
        State::Succeeded,
        State::Failed,
        State::Rejected,
        State::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Received => "received",
            State::InFlight => "in_flight",
            State::Accepted => "accepted",
            State::RetryWait => "retry_wait",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Rejected => "rejected",
            State::Dead => "dead",
        }
    }

    /// Final states never see another provider call, whatever arrives later.
    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Rejected)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// Why a job is dead. Stored as text; these are the causes the system itself writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Transport failures or RetryLater until attempts or age ran out.
    RetriesExhausted,
    /// The provider may have paid and may not be asked again blindly.
    OutcomeUnknown,
    /// The provider refused the request itself: configuration needs an operator.
    ProviderRejectedRequest,
    /// No client is configured any more for the job's merchant.
    MerchantNotConfigured,
    /// The stored job cannot be read back into a request (a corrupt or foreign row): it was
    /// never sent from that row, and an operator must look at it.
    UnreadableJob,
    /// The provider says the refund did not complete normally (ShengPay `CHANGE`: the card
    /// could not be credited), or never said how it ended within the query schedule: the money
    /// needs another route or a look at the provider's side.
    RefundAbnormal,
}

impl Cause {
    /// Every cause.
    pub const ALL: [Cause; 6] = [
        Cause::RetriesExhausted,
        Cause::OutcomeUnknown,
        Cause::ProviderRejectedRequest,
        Cause::MerchantNotConfigured,
        Cause::UnreadableJob,
        Cause::RefundAbnormal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::RetriesExhausted => "retries_exhausted",
            Cause::OutcomeUnknown => "outcome_unknown",
            Cause::ProviderRejectedRequest => "provider_rejected_request",
            Cause::MerchantNotConfigured => "merchant_not_configured",
            Cause::UnreadableJob => "unreadable_job",
            Cause::RefundAbnormal => "refund_abnormal",
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What makes a transition happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A valid message was stored.
    Intake,
    /// A worker took the job to call the provider (increments the attempt).
    Claim,
    /// The provider answered the refund call with an acceptance (its end follows, or this
    /// answer is the end).
    ProviderAccepted,
    /// The provider said how the refund ended, or that it holds it, by its notify or its
    /// status query: evidence, so it may settle a job in any state that is not final.
    ProviderStatus,
    /// The provider's status query says it has no refund of this number: the job may be sent
    /// again with the same number (its retry budget restarts, as at a replay).
    NotAtProvider,
    /// A definitive business FAIL.
    Declined,
    /// Transport failure or RetryLater with attempts left.
    RetryScheduled,
    /// The job cannot go on without an operator.
    Died,
    /// The lease ran out (the worker died or stalled): back to waiting, or dead when the
    /// provider is not idempotent.
    LeaseExpired,
    /// A claimed job gave its claim back before sending (lease too short to send safely).
    Released,
    /// An operator re-enqueued a dead job.
    Replay,
    /// An operator settled a dead job by hand after checking with the provider.
    Resolve,
    /// An operator corrected a final job that was booked wrongly (the provider paid a refund
    /// we hold failed, did not pay one we hold succeeded, or paid another settlement). No
    /// provider call follows: the correction only changes what we booked.
    Correct,
}

/// One allowed transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub trigger: Trigger,
}

const fn t(from: State, to: State, trigger: Trigger) -> Transition {
    Transition { from, to, trigger }
}

use State::*;
use Trigger::*;

/// Every allowed transition (intake creates jobs in `received`; there is no row before it).
pub const TRANSITIONS: &[Transition] = &[
    t(Received, InFlight, Claim),
    t(RetryWait, InFlight, Claim),
    t(InFlight, Succeeded, ProviderAccepted),
    t(InFlight, Accepted, ProviderAccepted),
    // The provider's word on how the refund ended. From in_flight and retry_wait too: a notify
    // can overtake the answer to the call it is about, and a maybe-delivered call's refund may
    // have been processed after all.
    t(Accepted, Succeeded, ProviderStatus),
    t(Accepted, Failed, ProviderStatus),
    t(Accepted, Dead, ProviderStatus),
    t(InFlight, Succeeded, ProviderStatus),
    t(InFlight, Failed, ProviderStatus),
    t(InFlight, Dead, ProviderStatus),
    t(RetryWait, Succeeded, ProviderStatus),
    t(RetryWait, Failed, ProviderStatus),
    t(RetryWait, Dead, ProviderStatus),
    t(RetryWait, Accepted, ProviderStatus),
    t(Dead, Succeeded, ProviderStatus),
    t(Dead, Failed, ProviderStatus),
    t(Dead, Dead, ProviderStatus),
    t(Dead, Accepted, ProviderStatus),
    t(Dead, Received, NotAtProvider),
    // A job sent again (replayed, or resent after the provider said it had no such refund)
    // whose earlier attempt's end arrives before the new claim.
    t(Received, Succeeded, ProviderStatus),
    t(Received, Failed, ProviderStatus),
    t(Received, Dead, ProviderStatus),
    // The query schedule ran out with no end from the provider.
    t(Accepted, Dead, Died),
    t(InFlight, Failed, Declined),
    t(InFlight, RetryWait, RetryScheduled),
    t(InFlight, Dead, Died),
    t(InFlight, RetryWait, LeaseExpired),
    t(InFlight, Dead, LeaseExpired),
    t(InFlight, RetryWait, Released),
    t(Received, Dead, Died),
    t(RetryWait, Dead, Died),
    t(Dead, Received, Replay),
    t(Dead, Succeeded, Resolve),
    t(Dead, Failed, Resolve),
    // The only way out of a final state, and never towards one that calls the provider.
    t(Failed, Succeeded, Correct),
    t(Succeeded, Failed, Correct),
    t(Succeeded, Succeeded, Correct),
];

/// The states a trigger may start from towards `to`.
pub fn sources(trigger: Trigger, to: State) -> Vec<State> {
    TRANSITIONS
        .iter()
        .filter(|tr| tr.trigger == trigger && tr.to == to)
        .map(|tr| tr.from)
        .collect()
}

/// Whether `from → to` by `trigger` is allowed.
pub fn allowed(from: State, to: State, trigger: Trigger) -> bool {
    TRANSITIONS
        .iter()
        .any(|tr| tr.from == from && tr.to == to && tr.trigger == trigger)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_operators_correction_leaves_a_final_state_and_only_for_another_final_one() {
        for tr in TRANSITIONS.iter().filter(|tr| tr.from.is_final()) {
            assert_eq!(tr.trigger, Correct, "{tr:?} leaves a final state");
            assert!(tr.to.is_final(), "{tr:?}");
        }
        for tr in TRANSITIONS.iter().filter(|tr| tr.trigger == Correct) {
            assert!(tr.from.is_final() && tr.to.is_final(), "{tr:?}");
            assert!(
                tr.from != Rejected && tr.to != Rejected,
                "a rejected request never reached a provider: nothing to correct ({tr:?})"
            );
        }
    }

    #[test]
    fn only_a_claim_enters_in_flight() {
        for tr in TRANSITIONS.iter().filter(|tr| tr.to == InFlight) {
            assert_eq!(tr.trigger, Claim);
        }
    }

    #[test]
    fn dead_is_left_only_by_an_operator_or_the_providers_evidence() {
        for tr in TRANSITIONS.iter().filter(|tr| tr.from == Dead) {
            assert!(
                matches!(
                    tr.trigger,
                    Replay | Resolve | ProviderStatus | NotAtProvider
                ),
                "{tr:?}"
            );
        }
    }

    #[test]
    fn an_accepted_job_ends_only_by_the_providers_word_or_the_end_of_its_schedule() {
        for tr in TRANSITIONS.iter().filter(|tr| tr.from == Accepted) {
            assert!(
                tr.trigger == ProviderStatus || (tr.trigger == Died && tr.to == Dead),
                "{tr:?}"
            );
        }
        assert!(
            !TRANSITIONS
                .iter()
                .any(|tr| tr.from == Accepted && tr.to == InFlight),
            "an accepted refund is never sent again"
        );
    }

    #[test]
    fn states_round_trip_through_text() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>().unwrap(), s);
        }
    }
}
