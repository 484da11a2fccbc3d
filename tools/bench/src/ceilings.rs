//! S0: this machine's own ceilings, measured in the same run as the scenarios.
//!
//! - **AMQP**: publish with confirms + consume + ack, no database, through a queue declared
//!   exactly as the worker's (durable, classic, dead-letter exchange), persistent messages of
//!   the scenarios' size, the worker's prefetch and intake batch. Once with one ack per delivery,
//!   once with one `multiple` ack per batch (what the worker does).
//! - **PostgreSQL**: the job's own transactions driven directly on the real schema with the
//!   store's own functions — `intake::take` in a transaction, `jobs::claim`, `jobs::record_outcome`
//!   with an accepted outcome (attempt row, transition with history, ledger entry, outbox event):
//!   three transactions per refund, from 16 concurrent tasks. Then the same writes batched
//!   50 refunds per transaction with the store's batch functions (`intake::take_batch`,
//!   `jobs::claim` of the batch, `jobs::record_outcomes`), as the worker runs them under load.
//! - **Signing**: ShengPay's RSA sign and verify with the development keys, single-threaded,
//!   the CPU floor of a ShengPay refund in the worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use shared::config::{SignType, WorkerConfig};
use shared::job::{ProviderKind, RefundRequest};
use shared::provider::{Admission, AttemptRecord, Outcome};
use shared::store::intake::{self, Incoming, IntakeResult};
use shared::store::jobs;
use shared::workflow::Decision;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use super::procs::{self, CpuUse, Watch};
use super::publish::{self, Msg};
use super::stats::{self, PgCounters};
use super::{Env, drop_db};

/// One ceiling measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub name: String,
    pub what: String,
    /// Refunds (or messages) completed.
    pub count: usize,
    pub seconds: f64,
    /// Refunds (or messages) per second.
    pub rate: f64,
    pub xacts_per_refund: Option<f64>,
    pub cpu: CpuUse,
    /// CPU µs per refund of the PostgreSQL backends of the database (PG ceilings) or of
    /// RabbitMQ (AMQP ceilings).
    pub server_cpu_us_per_refund: f64,
    /// CPU µs per refund of this process (the client side: sqlx or lapin).
    pub client_cpu_us_per_refund: f64,
    pub wal_bytes_per_refund: Option<f64>,
    pub wal_syncs_per_refund: Option<f64>,
}

impl Ceiling {
    pub fn bound_line(&self) -> String {
        format!(
            "machine {:.0}% busy ({:.2} of {} cores): {}",
            self.cpu.machine_busy_share() * 100.0,
            self.cpu.machine_busy_s / self.cpu.wall_s.max(1e-9),
            self.cpu.ncpu,
            self.cpu.breakdown()
        )
    }
}

/// The scenarios' message: a WuPay SOAP refund request (what S1 sends).
fn sample_messages(prefix: &str, n: usize) -> Vec<Msg> {
    publish::requests(prefix, n, ProviderKind::Wupay, &["wu-soap11"])
}

/// The AMQP ceiling: `n` messages published (confirms pipelined) while one consumer with the
/// worker's prefetch takes them in batches of up to `intake_batch` and acks them — one ack per
/// delivery, or one `multiple` ack per batch.
pub async fn amqp(
    env: &Env,
    n: usize,
    worker: &WorkerConfig,
    multiple: bool,
) -> anyhow::Result<Ceiling> {
    let amqp = testkit::test_amqp();
    let pub_conn = shared::broker::connect(&env.amqp_url, "refund-bench-s0-pub").await?;
    let pub_ch = shared::broker::confirm_channel(&pub_conn).await?;
    shared::broker::declare_topology(&pub_ch, &amqp).await?;
    let con_conn = shared::broker::connect(&env.amqp_url, "refund-bench-s0-con").await?;
    let con_ch = con_conn.create_channel().await?;
    con_ch
        .basic_qos(worker.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = con_ch
        .basic_consume(
            amqp.queue.as_str().into(),
            "refund-bench-s0".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let msgs = sample_messages("A", n);
    let batch_max = worker.intake_batch.max(1);
    let watch = Watch::default();
    let cpu0 = procs::sample(&watch);
    let t0 = Instant::now();
    let consume = tokio::spawn(async move {
        let mut acked = 0usize;
        while acked < n {
            let Some(first) = consumer.next().await else {
                bail!("the consumer was cancelled");
            };
            let mut batch = vec![first?];
            while batch.len() < batch_max {
                match consumer.next().now_or_never() {
                    Some(Some(d)) => batch.push(d?),
                    _ => break,
                }
            }
            if multiple {
                if let Some(last) = batch.last() {
                    last.acker.ack(BasicAckOptions { multiple: true }).await?;
                }
            } else {
                for d in &batch {
                    d.acker.ack(BasicAckOptions::default()).await?;
                }
            }
            acked += batch.len();
        }
        Ok::<_, anyhow::Error>(Instant::now())
    });
    publish::publish(&pub_ch, &amqp, &msgs, None).await?;
    let done = tokio::time::timeout(Duration::from_secs(600), consume)
        .await
        .context("the AMQP ceiling did not finish within 600 s")???;
    let cpu1 = procs::sample(&watch);
    let _ = con_conn.close(200, "done".into()).await;
    shared::broker::delete_topology(&pub_ch, &amqp).await;
    let _ = pub_conn.close(200, "done".into()).await;
    let seconds = done.duration_since(t0).as_secs_f64();
    let cpu = procs::delta(&cpu0, &cpu1);
    Ok(Ceiling {
        name: if multiple {
            "S0 amqp multiple-ack".into()
        } else {
            "S0 amqp".into()
        },
        what: format!(
            "{n} persistent messages, publish with confirms + consume (prefetch {}, batches of \
             up to {batch_max}) + {} through a durable classic queue with a dead-letter exchange",
            worker.prefetch,
            if multiple {
                "one multiple-ack per batch (as the worker)"
            } else {
                "one ack per delivery"
            }
        ),
        count: n,
        seconds,
        rate: n as f64 / seconds,
        xacts_per_refund: None,
        server_cpu_us_per_refund: cpu.rabbitmq_s * 1e6 / n as f64,
        client_cpu_us_per_refund: cpu.bench_s * 1e6 / n as f64,
        wal_bytes_per_refund: None,
        wal_syncs_per_refund: None,
        cpu,
    })
}

/// A representative accepted WuPay answer (what the worker stores as `raw`).
const RAW_RESPONSE: &str = r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema"><soap:Body><RefundResponse xmlns="http://tempuri.org/"><RefundResult>SUCCESS</RefundResult></RefundResponse></soap:Body></soap:Envelope>"#;

fn accepted(refund_no: &str, fee: i64, request: String) -> AttemptRecord {
    AttemptRecord {
        outcome: Outcome::Accepted {
            provider_refund_id: format!("WU{refund_no}"),
            refund_fee: fee,
            settlement_refund_fee: fee,
            coupon_refund_fee: 0,
            raw: RAW_RESPONSE.into(),
        },
        request_redacted: request,
        http_status: Some(200),
        latency: Duration::from_micros(900),
    }
}

async fn pool(url: &str, size: u32, generic_plans: bool) -> anyhow::Result<PgPool> {
    let mut options: PgConnectOptions = url.parse()?;
    if generic_plans {
        options = options.options([("plan_cache_mode", "force_generic_plan")]);
    }
    Ok(PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.application_name("refund-bench"))
        .await?)
}

/// The three transactions of one refund, as the worker runs them now.
async fn one_refund(pool: &PgPool, m: &Msg, tz: chrono_tz::Tz) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let known = |_: &RefundRequest| Ok(Admission { idempotent: true });
    let msg = Incoming {
        body: &m.body,
        message_id: None,
        redelivered: false,
    };
    let r = intake::take(&mut tx, &msg, &known, tz).await?;
    tx.commit().await?;
    if !matches!(r, IntakeResult::Created { .. }) {
        bail!("intake did not create {}: {r:?}", m.refund_no);
    }
    let lease = Duration::from_secs(30);
    let claimed = jobs::claim(
        pool,
        std::slice::from_ref(&m.refund_no),
        lease,
        "bench",
        jobs::ClaimToken::new(),
    )
    .await?
    .claimed;
    let Some(c) = claimed.into_iter().next() else {
        bail!("could not claim {}", m.refund_no);
    };
    let rec = accepted(
        &c.refund_no,
        c.request.refund_fee,
        c.request.canonical_json(),
    );
    jobs::record_outcome(pool, &c, &rec, &Decision::Succeed, "bench", tz).await?;
    Ok(())
}

/// The same writes for a batch of refunds, three transactions per batch, with the store's own
/// batch functions — what the worker's consumer and writer run under load.
async fn batch_of_refunds(pool: &PgPool, batch: &[&Msg], tz: chrono_tz::Tz) -> anyhow::Result<()> {
    let msgs: Vec<Incoming> = batch
        .iter()
        .map(|m| Incoming {
            body: &m.body,
            message_id: None,
            redelivered: false,
        })
        .collect();
    let known = |_: &RefundRequest| Ok(Admission { idempotent: true });
    let mut tx = pool.begin().await?;
    let results = intake::take_batch(&mut tx, &msgs, &known, tz).await?;
    tx.commit().await?;
    let created = results
        .iter()
        .filter(|r| matches!(r, IntakeResult::Created { .. }))
        .count();
    if created != batch.len() {
        bail!("intake created {created} of {} jobs", batch.len());
    }
    let nos: Vec<String> = batch.iter().map(|m| m.refund_no.clone()).collect();
    let claimed = jobs::claim(
        pool,
        &nos,
        Duration::from_secs(30),
        "bench",
        jobs::ClaimToken::new(),
    )
    .await?
    .claimed;
    if claimed.len() != nos.len() {
        bail!("claimed {} of {}", claimed.len(), nos.len());
    }
    let items: Vec<jobs::OutcomeToRecord> = claimed
        .into_iter()
        .map(|c| {
            let rec = accepted(
                &c.refund_no,
                c.request.refund_fee,
                c.request.canonical_json(),
            );
            jobs::OutcomeToRecord {
                claimed: c,
                rec,
                decision: Decision::Succeed,
            }
        })
        .collect();
    let refs: Vec<&jobs::OutcomeToRecord> = items.iter().collect();
    let recorded = jobs::record_outcomes(pool, &refs, "bench", tz).await?;
    let applied = recorded
        .iter()
        .filter(|r| matches!(r, jobs::Recorded::Applied(_)))
        .count();
    if applied != items.len() {
        bail!("recorded {applied} of {} outcomes", items.len());
    }
    Ok(())
}

/// How a PostgreSQL ceiling connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgVariant {
    /// TCP, as the worker connects.
    Tcp,
    /// The Unix socket: no TCP, so no Nagle (released sqlx 0.9.0 leaves it on; ours is patched).
    UnixSocket,
    /// TCP with `plan_cache_mode=force_generic_plan`: the store's CTE statements are planned
    /// once per connection instead of on every execution.
    GenericPlans,
}

/// The PostgreSQL ceiling: `n` refunds' writes from `clients` tasks, unbatched (`batch` 1,
/// the store's functions) or `batch` refunds per transaction.
pub async fn postgres(
    env: &Env,
    n: usize,
    clients: usize,
    batch: usize,
    variant: PgVariant,
) -> anyhow::Result<Ceiling> {
    let unix_socket = variant == PgVariant::UnixSocket;
    let db = testkit::test_db().await?;
    db.pool.close().await;
    let url = if unix_socket {
        super::unix_socket_url(&db.url, &env.pg_socket_dir)
    } else {
        db.url.clone()
    };
    let mut admin = PgConnection::connect(&env.admin_url).await?;
    let tz: chrono_tz::Tz = "Asia/Shanghai"
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let result = async {
        let pool = pool(&url, clients as u32, variant == PgVariant::GenericPlans).await?;
        let prefix = format!("P{batch}{variant:?}");
        let msgs = Arc::new(sample_messages(&prefix, n));
        let next = Arc::new(AtomicUsize::new(0));
        let c0 = stats::pg_counters(&mut admin, &db.name).await?;
        let watch = Watch {
            db_name: Some(db.name.clone()),
            ..Watch::default()
        };
        let cpu0 = procs::sample(&watch);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let pool = pool.clone();
            let msgs = msgs.clone();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let start = next.fetch_add(batch, Ordering::Relaxed);
                    if start >= msgs.len() {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let end = (start + batch).min(msgs.len());
                    if batch == 1 {
                        one_refund(&pool, &msgs[start], tz).await?;
                    } else {
                        let chunk: Vec<&Msg> = msgs[start..end].iter().collect();
                        batch_of_refunds(&pool, &chunk, tz).await?;
                    }
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let seconds = t0.elapsed().as_secs_f64();
        let cpu1 = procs::sample(&watch);
        pool.close().await;
        // Backends flush their statistics when they exit.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let c1 = stats::pg_counters(&mut admin, &db.name).await?;
        let d: PgCounters = c1.since(&c0);
        let cpu = procs::delta(&cpu0, &cpu1);
        let nf = n as f64;
        Ok::<_, anyhow::Error>(Ceiling {
            name: format!(
                "S0 pg {}{}",
                if batch == 1 {
                    "unbatched".to_owned()
                } else {
                    format!("batched x{batch}")
                },
                match variant {
                    PgVariant::Tcp => "",
                    PgVariant::UnixSocket => " (unix socket)",
                    PgVariant::GenericPlans => " (generic plans)",
                }
            ),
            what: if batch == 1 {
                format!(
                    "{n} refunds, {clients} tasks, each refund: intake::take in a transaction, \
                     jobs::claim, jobs::record_outcome (accepted: attempt, transition + \
                     history, ledger, outbox) — three transactions, as the worker writes a job alone{}",
                    if unix_socket {
                        ", over the Unix socket"
                    } else {
                        ", over TCP"
                    }
                )
            } else {
                format!(
                    "{n} refunds, {clients} tasks, {batch} refunds per transaction: \
                     intake::take_batch, jobs::claim of the batch, jobs::record_outcomes"
                )
            },
            count: n,
            seconds,
            rate: nf / seconds,
            xacts_per_refund: Some(d.xact_commit as f64 / nf),
            server_cpu_us_per_refund: cpu.pg_db_s * 1e6 / nf,
            client_cpu_us_per_refund: cpu.bench_s * 1e6 / nf,
            wal_bytes_per_refund: Some(d.wal_bytes / nf),
            wal_syncs_per_refund: Some(d.wal_sync as f64 / nf),
            cpu,
        })
    }
    .await;
    if !env.keep {
        drop_db(&mut admin, &db.name).await;
    }
    let _ = admin.close().await;
    result
}

/// CPU time of one RSA operation, microseconds (one thread).
#[derive(Debug, Clone, Serialize)]
pub struct Signing {
    pub sign_rsa_sha1_us: f64,
    pub sign_rsa2_sha256_us: f64,
    pub verify_rsa_sha1_us: f64,
    pub key_bits: u32,
}

/// Times the worker's own ShengPay signing and verification (OpenSSL through `shared`) with
/// the development keys, one thread.
pub fn signing(iterations: usize) -> anyhow::Result<Signing> {
    use shared::provider::keys::{private_key_from_file, public_key_from_file};
    use shared::provider::shengpay::{sign, verify};
    let root = testkit::workspace_root();
    let merchant = private_key_from_file(
        "bench",
        &root.join("keys/dev/shengpay_merchant_private.pem"),
    )?;
    let platform = private_key_from_file(
        "bench",
        &root.join("keys/dev/shengpay_platform_private.pem"),
    )?;
    let platform_pub =
        public_key_from_file("bench", &root.join("keys/dev/shengpay_platform_public.pem"))?;
    let text = "appId=djgeiq978y933&mchId=93751497&nonceStr=ZmTruYz2Tld2hIRRg4NfZmTruYz2Tld2\
                &notifyUrl=https://merchant.example/refund/notify&outRefundNo=S1s000000012345\
                &outTradeNo=OS1s000000012345&refundDesc=test refund&refundFee=345&signType=RSA\
                &totalFee=10000";
    // CPU time of this thread, not wall time: the machine may be busy with other work.
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        f()?;
        let wall = Instant::now();
        let cpu = procs::thread_cpu_seconds();
        for _ in 0..iterations {
            f()?;
        }
        let secs = match (cpu, procs::thread_cpu_seconds()) {
            (Some(a), Some(b)) if b > a => b - a,
            _ => wall.elapsed().as_secs_f64(),
        };
        Ok(secs * 1e6 / iterations as f64)
    };
    let sign_rsa_sha1_us = time(&mut || {
        sign(&merchant, SignType::Rsa, text)?;
        Ok(())
    })?;
    let sign_rsa2_sha256_us = time(&mut || {
        sign(&merchant, SignType::Rsa2, text)?;
        Ok(())
    })?;
    let response_sig = sign(&platform, SignType::Rsa, text)?;
    let verify_rsa_sha1_us = time(&mut || {
        if !verify(&platform_pub, SignType::Rsa, text, &response_sig) {
            bail!("the development keys do not verify");
        }
        Ok(())
    })?;
    Ok(Signing {
        sign_rsa_sha1_us,
        sign_rsa2_sha256_us,
        verify_rsa_sha1_us,
        key_bits: merchant.bits(),
    })
}
