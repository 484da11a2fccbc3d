//! The simulated ShengPay status query: `POST {query_path}` with `appId`, `mchId`,
//! `outRefundNo`, `nonceStr`, `signType` and `sign`, answered with the notify's fields
//! (DESIGN.md §5), signed by the platform key like a refund answer.
//!
//! A request is checked like a refund call (unknown account: `returnCode FAIL MCH_NOT_FOUND`,
//! bad signature: `SIGN_ERROR`). A refund number the simulator holds no refund of for that
//! merchant is `resultCode FAIL REFUNDNOTEXIST`, still naming the refund, account and app it
//! answers, because a client resends a refund on that answer and must be sure it is about
//! this one.

use super::lifecycle::RefundStatus;
use super::{Responder, SpRequest, authenticate};
use crate::calls::Outcome;
use crate::faults::{FaultAction, Fired, fault_code};
use crate::server::{Reply, SimState, lock};

/// Handles one status query after fault selection; of the rule that fired, only retry_later
/// and bad_signature matter here (transport faults were applied before).
pub(crate) fn process_query(
    state: &SimState,
    req: &Result<SpRequest, String>,
    merchant: Option<usize>,
    fired: Option<&Fired>,
) -> Reply {
    let mut r = Responder::new(state, fired);
    let (req, account) =
        match authenticate(&mut r, req, merchant, &["mchId", "appId", "outRefundNo"]) {
            Ok(found) => found,
            Err(reply) => return *reply,
        };
    for key in ["outRefundNo", "nonceStr"] {
        if req.text(key).is_none() {
            return r.result_fail("LACK_PARAMS", &format!("missing {key}"), Outcome::Rejected);
        }
    }
    if let Some(fired) = fired.filter(|f| f.action == Some(FaultAction::RetryLater)) {
        let (code, msg) = fault_code(fired);
        let mut reply = r.result_fail(&code, &msg, Outcome::RetryLater);
        reply.detail = Some("retry_later".into());
        return reply;
    }
    let refund_no = req.text("outRefundNo").unwrap_or("");
    let found = lock(&state.refunds).get(&account.name, refund_no).cloned();
    let Some(tracked) = found else {
        let mut reply = r.result_fail("REFUNDNOTEXIST", "refund does not exist", Outcome::Declined);
        reply.detail = Some("not_found".into());
        return reply;
    };
    let status = tracked.view.status;
    let mut b = r.builder();
    b.str("returnCode", "SUCCESS")
        .str("returnMsg", "OK")
        .str("resultCode", "SUCCESS");
    tracked.report_fields(
        &mut b,
        (&account.mch_id, &account.app_id, &tracked.view.refund_no),
        status,
    );
    let outcome = match status {
        RefundStatus::Success => Outcome::Paid,
        RefundStatus::RefundClose | RefundStatus::Change => Outcome::Declined,
        RefundStatus::Processing => Outcome::None,
    };
    let mut reply = r.reply(b, outcome, "");
    reply.detail = Some(status.as_str().to_owned());
    reply
}
