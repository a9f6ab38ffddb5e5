//! The gateway's outbox on Cloudflare Queues: [`WorkerQueue`] is the core's
//! [`DeliveryQueue`] port over the producer binding `PULLGATE_OUTBOX`, and the worker's `queue`
//! handler is its consumer. A new delivery's id is sent to the queue (the record stays in the
//! key-value port; a message holds no secret); the consumer hands each message to
//! [`App::deliver_queued`], which attempts the delivery, and carries out its verdict:
//! acknowledge, `retry` with `delaySeconds` set to the core's backoff delay, or move the message
//! to the dead-letter queue (through the producer binding `PULLGATE_OUTBOX_DLQ`). The
//! dead-letter queue's consumer — the same handler, told apart by the queue's name — writes
//! the gateway's dead-letter record ([`App::dead_letter_queued`]), which `GET
//! /chain/dead-letters` lists and `POST /chain/dead-letters/<id>/replay` re-drives (through the
//! queue again). The queue's own `max_retries` and `dead_letter_queue` (`wrangler.toml`)
//! catch a message whose handling keeps failing before `[gateway] max_attempts` is reached: it
//! lands in the same dead-letter queue and is recorded the same way.
//!
//! Without the producer binding the core is built without a queue and the outbox pump does
//! everything (requests, the Cron Trigger). With it, the pump is the fallback: it sends a
//! delivery the queue refused at once, and one the queue has not settled 15 minutes after it
//! fell due (see `core::gateway::queue`).
//!
//! Every message logs one line:
//! `event=queue queue=<name> delivery=<id> outcome=ack|retry|dead-letter|dead-lettered|error …`.
//!
//! # Limitations
//! - Cloudflare caps a message's delay at 12 hours: a longer backoff (`retry_max`) is served
//!   in 12-hour steps (the core hands an early message back for the rest).
//! - Delivery is at-least-once (as with the pump): a message redelivered by the queue finds
//!   nothing pending once the delivery succeeded, but one attempted while its lease ran out
//!   can also be sent by the pump. Targets dedup on the delivery id.
//! - `max_retries` in `wrangler.toml` should stay at or above `[gateway] max_attempts − 1`, or
//!   the queue gives up first (the delivery is then dead-lettered with fewer attempts).

use super::{app, next_invocation, Gated, Keeper, WithRequest};
use crate::core::app::App;
use crate::core::ports::{DeliveryQueue, QueueVerdict, StoreError};
use serde::{Deserialize, Serialize};
use std::rc::Rc;
use worker::{
    event, Context, Env, MessageBatch, MessageBuilder, MessageExt, QueueRetryOptionsBuilder,
};

/// The producer binding of the outbox queue.
pub const OUTBOX_BINDING: &str = "PULLGATE_OUTBOX";
/// The producer binding of the dead-letter queue (the outbox consumer's `dead_letter_queue`).
pub const DEAD_LETTER_BINDING: &str = "PULLGATE_OUTBOX_DLQ";
/// The variable naming the dead-letter queue, so the consumer can tell its batches apart.
pub const DEAD_LETTER_NAME_VAR: &str = "PULLGATE_DEAD_LETTER_QUEUE";
/// The dead-letter queue's name when [`DEAD_LETTER_NAME_VAR`] is unset.
pub const DEFAULT_DEAD_LETTER_NAME: &str = "pullgate-outbox-dead";
/// The longest delay Cloudflare Queues take (12 hours), in seconds.
pub const MAX_DELAY_SECONDS: u64 = 12 * 60 * 60;

/// A message on either queue.
#[derive(Debug, Serialize, Deserialize)]
pub struct OutboxMessage {
    /// Format version.
    pub v: u32,
    /// The delivery's id (`outbox/pending/<id>`).
    pub delivery: String,
}

/// Message format version.
const MESSAGE_VERSION: u32 = 1;

/// A delay in whole seconds, rounded up (a retry never runs early), capped at the queue's limit.
fn delay_seconds(delay_ms: u64) -> u32 {
    let s = delay_ms.div_ceil(1000).min(MAX_DELAY_SECONDS);
    u32::try_from(s).unwrap_or(u32::MAX)
}

/// The core's delivery queue over a Queues producer binding.
pub struct WorkerQueue {
    queue: worker::Queue,
}

#[async_trait::async_trait(?Send)]
impl DeliveryQueue for WorkerQueue {
    async fn send(&self, id: &str, delay_ms: u64) -> Result<(), StoreError> {
        send(&self.queue, id, delay_ms)
            .await
            .map_err(|e| StoreError(format!("queue {OUTBOX_BINDING}: {e}")))
    }
}

async fn send(queue: &worker::Queue, id: &str, delay_ms: u64) -> worker::Result<()> {
    let message = OutboxMessage {
        v: MESSAGE_VERSION,
        delivery: id.to_string(),
    };
    let mut builder = MessageBuilder::new(message);
    let delay = delay_seconds(delay_ms);
    if delay > 0 {
        builder = builder.delay_seconds(delay);
    }
    queue.send(builder.build()).await
}

/// `app` with the outbox queue when the worker has the producer binding; `app` as it was
/// otherwise (the pump then sends every delivery).
pub(crate) fn attach(app: App, env: &Env) -> App {
    match env.queue(OUTBOX_BINDING) {
        Ok(queue) => app.with_delivery_queue(Rc::new(WorkerQueue { queue })),
        Err(_) => app,
    }
}

fn dead_letter_name(env: &Env) -> String {
    env.var(DEAD_LETTER_NAME_VAR)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| DEFAULT_DEAD_LETTER_NAME.to_string())
}

/// What happened to one message, for its log line.
enum Outcome {
    Acked,
    Retried(u32),
    Forwarded(String),
    Recorded(bool),
    Failed(String),
}

/// Carries out the core's verdict on one message of the outbox queue.
async fn on_outbox_message(app: &App, env: &Env, id: &str, message: &impl MessageExt) -> Outcome {
    match app.deliver_queued(id).await {
        Ok(QueueVerdict::Ack) => {
            message.ack();
            Outcome::Acked
        }
        Ok(QueueVerdict::Retry { delay_ms }) => {
            let delay = delay_seconds(delay_ms);
            message.retry_with_options(
                &QueueRetryOptionsBuilder::new()
                    .with_delay_seconds(delay)
                    .build(),
            );
            Outcome::Retried(delay)
        }
        Ok(QueueVerdict::DeadLetter { error }) => {
            let forwarded = match env.queue(DEAD_LETTER_BINDING) {
                Ok(dlq) => send(&dlq, id, 0).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = forwarded {
                // No dead-letter queue to take it: record the dead letter here.
                if let Err(store) = app.dead_letter_queued(id, &error).await {
                    message.retry();
                    return Outcome::Failed(format!("{DEAD_LETTER_BINDING}: {e}; {store}"));
                }
            }
            message.ack();
            Outcome::Forwarded(error)
        }
        Err(e) => {
            message.retry();
            Outcome::Failed(e.to_string())
        }
    }
}

/// Records one message of the dead-letter queue as a dead letter.
async fn on_dead_letter(app: &App, id: &str, message: &impl MessageExt) -> Outcome {
    match app
        .dead_letter_queued(id, "the queue gave up after its max_retries")
        .await
    {
        Ok(recorded) => {
            message.ack();
            Outcome::Recorded(recorded)
        }
        Err(e) => {
            message.retry();
            Outcome::Failed(e.to_string())
        }
    }
}

async fn consume(batch: MessageBatch<serde_json::Value>, env: Env) {
    let queue = batch.queue();
    let app = match app(&env) {
        Ok(app) => app,
        Err(e) => {
            worker::console_error!(
                "event=queue queue={queue} error={:?}",
                format!("pullgate cannot start: {e}")
            );
            batch.retry_all();
            return;
        }
    };
    let dead = queue == dead_letter_name(&env);
    for message in batch.iter() {
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                worker::console_error!("event=queue queue={queue} error={:?}", e.to_string());
                continue;
            }
        };
        let parsed = serde_json::from_value::<OutboxMessage>(message.body().clone())
            .ok()
            .filter(|m| m.v == MESSAGE_VERSION);
        let Some(OutboxMessage { delivery: id, .. }) = parsed else {
            // Not ours (or of a format this build does not know): nothing to retry.
            message.ack();
            worker::console_error!(
                "event=queue queue={queue} outcome=ack error=\"not an outbox message\""
            );
            continue;
        };
        let outcome = if dead {
            on_dead_letter(&app, &id, &message).await
        } else {
            on_outbox_message(&app, &env, &id, &message).await
        };
        let line = format!("event=queue queue={queue} delivery={id}");
        match outcome {
            Outcome::Acked => worker::console_log!("{line} outcome=ack"),
            Outcome::Retried(s) => worker::console_log!("{line} outcome=retry delay_s={s}"),
            Outcome::Forwarded(e) => {
                worker::console_log!("{line} outcome=dead-letter error={e:?}")
            }
            Outcome::Recorded(new) => {
                worker::console_log!("{line} outcome=dead-lettered new={new}")
            }
            Outcome::Failed(e) => worker::console_error!("{line} outcome=error error={e:?}"),
        }
    }
}

/// The worker's `queue` handler: the consumer of the outbox queue and of its dead-letter
/// queue.
#[event(queue)]
pub async fn queue(
    batch: MessageBatch<serde_json::Value>,
    env: Env,
    ctx: Context,
) -> worker::Result<()> {
    let id = next_invocation();
    WithRequest {
        id,
        ctx: Keeper::Queue(Rc::new(ctx)),
        inner: Box::pin(Gated::new(id, consume(batch, env))),
    }
    .await;
    Ok(())
}
