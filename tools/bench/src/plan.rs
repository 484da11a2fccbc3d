//! What each scenario runs: its workload, the worker and simulator settings, and the sizing
//! rules (Little's law for S2) that turn one scenario's result into the next one's settings.

use super::*;

/// Concurrency for a provider latency by Little's law: in flight = rate × time in flight,
/// with the time in flight = latency + our own time per job (`own_ms`), and 25% headroom.
pub fn littles_law(rate: f64, latency_ms: u64, own_ms: f64) -> usize {
    (rate * (latency_ms as f64 + own_ms) / 1000.0 * 1.25).ceil() as usize
}

/// Our own time in flight per job, by Little's law from S1's maximum: with every slot busy,
/// a job holds its slot for concurrency / rate (claim, call and record, batching waits
/// included); 10 ms when S1 did not run.
pub fn own_time_ms(s1_rate: Option<f64>, concurrency: usize) -> f64 {
    match s1_rate {
        Some(r) if r > 0.0 => concurrency as f64 * 1000.0 / r,
        _ => 10.0,
    }
}

pub(crate) fn wupay_soap() -> (ProviderKind, Vec<String>) {
    (ProviderKind::Wupay, vec!["wu-soap11".into()])
}

pub(crate) fn shengpay() -> (ProviderKind, Vec<String>) {
    (
        ProviderKind::Shengpay,
        vec!["93751497".into(), "10000002".into()],
    )
}

/// Three equal transport faults adding up to `total` of the calls (rules are checked in
/// order, so each later rule's rate is raised for the calls the earlier ones left).
pub(crate) fn transport_faults(total: f64) -> Vec<FaultRule> {
    let each = total / 3.0;
    let mut left = 1.0;
    [
        FaultAction::Reset,
        FaultAction::Http500,
        FaultAction::DropResponse,
    ]
    .into_iter()
    .map(|a| {
        let r = (each / left).clamp(0.0, 1.0);
        left -= each;
        FaultRule::new(a).provider(Provider::ShengPay).rate(r)
    })
    .collect()
}

/// The scenario specs (S2's concurrency from S1's measured rate when there is one).
pub(crate) fn spec(opts: &Options, base: &Config, id: &str, s1_rate: Option<f64>) -> Option<Spec> {
    let jobs = opts.jobs;
    let conc = opts.concurrency.unwrap_or(base.worker.concurrency);
    let pre = opts.prefetch.unwrap_or(base.worker.prefetch);
    let paced = Phase::Paced {
        fraction: opts.load_fraction,
        secs: opts.paced_secs,
    };
    let configured = if opts.concurrency.is_some() {
        "--concurrency".to_owned()
    } else {
        "the config file's".to_owned()
    };
    let mk = |id: &str, title: &str, (provider, merchants): (ProviderKind, Vec<String>)| Spec {
        id: id.into(),
        title: title.into(),
        provider,
        merchants,
        rules: Vec::new(),
        provider_latency_ms: 0,
        unix_socket: false,
        concurrency: conc,
        prefetch: pre,
        sizing: configured.clone(),
        phases: vec![Phase::Max(jobs), paced.clone()],
    };
    Some(match id {
        "S1" => mk("S1", "WuPay SOAP 1.1, no added latency", wupay_soap()),
        "S1u" => Spec {
            unix_socket: true,
            ..mk(
                "S1u",
                "S1 with the worker on PostgreSQL's Unix socket (no TCP, no Nagle)",
                wupay_soap(),
            )
        },
        "S1s" => mk(
            "S1s",
            "ShengPay, RSA (SHA1) and RSA2 (SHA256) signed requests, verified responses",
            shengpay(),
        ),
        "S2" => {
            let target = s1_rate.unwrap_or(0.0).max(2_500.0);
            let (concurrency, sizing) = match opts.concurrency {
                Some(c) => (c, "--concurrency".to_owned()),
                None => {
                    let own = own_time_ms(s1_rate, conc);
                    let c = littles_law(target, opts.latency_ms, own).max(conc);
                    (
                        c,
                        format!(
                            "Little's law: {} refunds/s × ({} ms provider + {} ms own, from S1's \
                             maximum: concurrency / rate) × 1.25 headroom = {c} in flight",
                            num(target, 0),
                            opts.latency_ms,
                            num(own, 0)
                        ),
                    )
                }
            };
            let prefetch = opts
                .prefetch
                .unwrap_or_else(|| (concurrency * 2).clamp(pre as usize, u16::MAX as usize) as u16);
            Spec {
                rules: vec![FaultRule::latency(opts.latency_ms)],
                provider_latency_ms: opts.latency_ms,
                concurrency,
                prefetch,
                sizing,
                ..mk(
                    "S2",
                    &format!("WuPay SOAP 1.1, {} ms provider latency", opts.latency_ms),
                    wupay_soap(),
                )
            }
        }
        "S3" => Spec {
            phases: vec![Phase::Backlog(opts.backlog)],
            ..mk(
                "S3",
                &format!(
                    "drain of a {}-job backlog (WuPay SOAP 1.1)",
                    num(opts.backlog as f64, 0)
                ),
                wupay_soap(),
            )
        },
        "S4" => Spec {
            rules: transport_faults(opts.fault_rate),
            phases: vec![Phase::Max(jobs)],
            ..mk(
                "S4",
                &format!(
                    "ShengPay with {:.0}% transport faults (reset, HTTP 500, drop_response), \
                     idempotent merchants",
                    opts.fault_rate * 100.0
                ),
                shengpay(),
            )
        },
        _ => return None,
    })
}

/// "reset on 3.3% of shengpay calls, ..." for the setup notes.
pub(crate) fn describe_rules(rules: &[FaultRule]) -> String {
    rules
        .iter()
        .map(|r| {
            let what = match (r.action, r.latency_ms) {
                (Some(a), _) => a.as_str().to_owned(),
                (None, Some(ms)) => format!("{ms} ms latency"),
                (None, None) => "nothing".to_owned(),
            };
            let share = match r.rate {
                Some(p) if p < 1.0 => format!(" on {:.1}% of the remaining", p * 100.0),
                _ => " on all".to_owned(),
            };
            let provider = r.provider.map(|p| format!(" {p}")).unwrap_or_default();
            format!("{what}{share}{provider} calls")
        })
        .collect::<Vec<_>>()
        .join(", then ")
}
