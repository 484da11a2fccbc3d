//! RabbitMQ: connection, topology and confirmed publishing.
//!
//! This module owns the broker side of the contracts: the `refunds` direct exchange and its
//! `refunds.requested` queue (dead-lettering into `refunds.dlx` → `refunds.dead`) for requests,
//! and the `refunds.events` topic exchange for outcomes. Declarations are idempotent, so every
//! process declares what it uses at start and after every reconnect. Publishing always waits
//! for the broker's confirm: a message is ours to forget only once the broker has it.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::AmqpConfig;

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the publish (nack)")]
    Nacked,
}

/// Connects to the broker.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    Ok(Connection::connect(url, props).await?)
}

/// Declares the whole topology (idempotent).
pub async fn declare_topology(channel: &Channel, cfg: &AmqpConfig) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            cfg.exchange.as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            cfg.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            cfg.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(cfg.queue_type.as_str().into()),
    );
    let dead_args = args.clone();
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(cfg.dead_letter_exchange.as_str().into()),
    );
    channel
        .queue_declare(cfg.queue.as_str().into(), queue_opts, args)
        .await?;
    channel
        .queue_bind(
            cfg.queue.as_str().into(),
            cfg.exchange.as_str().into(),
            cfg.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(cfg.dead_letter_queue.as_str().into(), queue_opts, dead_args)
        .await?;
    channel
        .queue_bind(
            cfg.dead_letter_queue.as_str().into(),
            cfg.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Deletes the queues and exchanges of `cfg` (tests and benchmarks clean up their own names);
/// best effort: what does not exist or cannot be deleted is left.
pub async fn delete_topology(channel: &Channel, cfg: &AmqpConfig) {
    for q in [&cfg.queue, &cfg.dead_letter_queue] {
        let _ = channel
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
    for x in [
        &cfg.exchange,
        &cfg.dead_letter_exchange,
        &cfg.events_exchange,
    ] {
        let _ = channel
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
}

/// Opens a channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Properties of a persistent JSON message.
pub fn json_properties(message_id: Option<&str>) -> BasicProperties {
    let p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    match message_id {
        Some(id) => p.with_message_id(id.to_owned().into()),
        None => p,
    }
}

/// Publishes and waits for the broker's confirm; a nack is an error.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), BrokerError> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await?
        .await?;
    if confirm.is_nack() {
        return Err(BrokerError::Nacked);
    }
    Ok(())
}
