//! Publishing refund requests for `enqueue` and `dlq replay`: persistent, mandatory, with
//! publisher confirms.
//!
//! `mandatory` makes the broker hand back a message that no queue would receive (an exchange
//! without its binding), which a plain confirm would acknowledge as if it had been stored; such
//! a message counts as not published.

use std::time::Duration;

use anyhow::Context;
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation, Connection, PublisherConfirm};
use shared::config::Config;

/// How long connecting to the broker may take before the command gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one message is not known to be stored by the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not accept the message (nack)")]
    Nacked,
    #[error("the channel is not in confirm mode: the broker did not confirm")]
    NotConfirmed,
    #[error(
        "no queue is bound to exchange {exchange:?} with routing key {routing_key:?}: the message was returned"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
}

/// A confirm channel to the request exchange.
pub struct Publisher {
    conn: Connection,
    channel: Channel,
    exchange: String,
    routing_key: String,
}

impl Publisher {
    /// Connects, declares the topology (idempotent, the same declarations the worker makes)
    /// and opens a confirm channel.
    pub async fn connect(config: &Config, name: &str) -> anyhow::Result<Self> {
        let url = config.amqp_url_redacted();
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            shared::broker::connect(&config.amqp_url, name),
        )
        .await
        .map_err(|_| anyhow::anyhow!("RabbitMQ at {url} did not answer within 10 s"))?
        .with_context(|| format!("connecting to RabbitMQ at {url}"))?;
        // Declared on a channel of its own: a broker user without configure permission makes
        // the declaration fail and closes that channel, and publishing may still work (the
        // worker declares the same topology; `mandatory` catches a missing binding).
        let declare = conn.create_channel().await.context("opening a channel")?;
        if let Err(e) = shared::broker::declare_topology(&declare, &config.amqp).await {
            eprintln!(
                "refundctl: note: could not declare the broker topology ({e}); publishing to \
                 the existing exchange {:?}",
                config.amqp.exchange
            );
        }
        let _ = declare.close(200, "declared".into()).await;
        let channel = shared::broker::confirm_channel(&conn)
            .await
            .context("opening a confirm channel")?;
        Ok(Self {
            conn,
            channel,
            exchange: config.amqp.exchange.clone(),
            routing_key: config.amqp.routing_key.clone(),
        })
    }

    /// Sends one request; the returned confirm resolves when the broker has it (pipelining).
    pub async fn send(
        &self,
        body: &[u8],
        message_id: Option<&str>,
    ) -> Result<PendingConfirm, PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                shared::broker::json_properties(message_id),
            )
            .await?;
        Ok(PendingConfirm {
            confirm,
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
        })
    }

    /// Sends one request and waits for the broker's confirm.
    pub async fn publish(&self, body: &[u8], message_id: Option<&str>) -> Result<(), PublishError> {
        self.send(body, message_id).await?.wait().await
    }

    /// Whether the channel is still usable.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected() && self.conn.status().connected()
    }

    /// Closes the connection (after every confirm was awaited).
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// A published message whose confirm has not been awaited yet.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
}

impl PendingConfirm {
    /// Waits for the broker: stored, refused, or returned as unroutable.
    pub async fn wait(self) -> Result<(), PublishError> {
        match self.confirm.await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::NotRequested => Err(PublishError::NotConfirmed),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(PublishError::Unroutable {
                    exchange: self.exchange,
                    routing_key: self.routing_key,
                })
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked),
        }
    }
}
