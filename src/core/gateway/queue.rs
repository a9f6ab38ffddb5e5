//! The outbox on a host's queue ([`DeliveryQueue`]: Cloudflare Queues on Workers). With a
//! queue, a new pending delivery is *leased* to it: its id goes to the queue, the queue's
//! consumer hands it back ([`deliver`]), and the retry delays and the dead-letter queue are the
//! queue's. Without one (native, Spin, or a Workers deployment without the binding) nothing
//! here runs and the pump ([`super::pump`]) sends every delivery, as before.
//!
//! The records stay where they are (`outbox/pending/<id>` and its due-index entry), so the
//! pump remains the fallback. A leased delivery's `next_ms` is its due time plus
//! [`QUEUE_LEASE_MS`]: the pump sends it only if the queue has not settled it by then (a lost
//! message, a consumer that never runs), and a delivery the queue could not take stays due
//! for the pump at once. The lease is written *before* the message is sent, so a consumer that
//! settles the delivery at once is never undone by it.
//!
//! The hand-off itself ([`super::records`]'s `hand_off`, when a new delivery is stored or a
//! dead letter replayed) and the port's slot ([`super::state::QueuePort`]) live where the
//! records are written; this file is the consumer's side.
//!
//! Decisions are the pump's: [`settle`] with the `[gateway]` retry policy. A failure is
//! recorded on the delivery and the run exactly as the pump records it, and becomes
//! [`QueueVerdict::Retry`] with the backoff delay; the last allowed failure becomes
//! [`QueueVerdict::DeadLetter`], and the consumer of the dead-letter queue — which also
//! receives messages the queue itself gave up on after its own `max_retries` — writes the
//! dead-letter record ([`dead_letter`]) that the admin API lists and replays.
//!
//! Delivery stays at-least-once: a delivery whose lease ran out while its message was still
//! queued can be sent by both. Ids are stable, so targets dedup on them.

use crate::core::context::Inner;
use crate::core::gateway::outbox::{DeliveryKind, DEAD, PENDING};
use crate::core::gateway::pump::execute;
use crate::core::gateway::records::{
    enqueue, load_delivery, load_run, remove_pending, save_delivery, save_pending, save_run,
};
use crate::core::gateway::settle::{settle, RetryPolicy, Settlement};
use crate::core::gateway::state::QUEUE_LEASE_MS;
use crate::core::metrics::inc;
use crate::core::ports::{QueueVerdict, StoreError};
use std::rc::Rc;

/// Attempts the pending delivery `id` for the queue's consumer and says what to do with the
/// message. Nothing pending under `id` (delivered, dead-lettered, replaced by a replay) is
/// [`QueueVerdict::Ack`]; a message early for its delivery's due time is handed back for the
/// rest of the wait.
pub(crate) async fn deliver(inner: &Rc<Inner>, id: &str) -> Result<QueueVerdict, StoreError> {
    let Some(d) = load_delivery(inner, &format!("{PENDING}{id}")).await? else {
        return Ok(QueueVerdict::Ack);
    };
    let now = inner.ports.clock.now_ms();
    let due = d.next_ms.saturating_sub(QUEUE_LEASE_MS);
    if due > now {
        return Ok(QueueVerdict::Retry {
            delay_ms: due - now,
        });
    }
    let Some(run) = load_run(inner, &d.run).await? else {
        remove_pending(inner, &d, d.next_ms).await;
        return Ok(QueueVerdict::Ack);
    };
    let result = execute(inner, &d, &run).await;
    let now = inner.ports.clock.now_ms();
    let settlement = settle(&d, result, now, &RetryPolicy::of(&inner.settings.gateway));
    let _guard = inner.run_lock.lock().await;
    let mut run = match load_run(inner, &d.run).await {
        Ok(Some(r)) => r,
        _ => run,
    };
    let (verdict, actions) = match settlement {
        Settlement::Done { .. } => {
            let actions = settlement.apply_to_run(&d, &mut run, now);
            remove_pending(inner, &d, d.next_ms).await;
            (QueueVerdict::Ack, actions)
        }
        Settlement::Retry { at_ms, .. } => {
            inc(&inner.metrics.upstream_errors);
            let actions = settlement.apply_to_run(&d, &mut run, now);
            let mut record = settlement.record(&d);
            record.next_ms = at_ms.saturating_add(QUEUE_LEASE_MS);
            save_pending(inner, &record, Some(d.next_ms)).await?;
            let delay_ms = at_ms.saturating_sub(now);
            (QueueVerdict::Retry { delay_ms }, actions)
        }
        Settlement::Dead { error, .. } => {
            // Recorded like any failed attempt; the stage fails when the dead-letter queue's
            // consumer writes the dead letter. Until then the record stays pending under a
            // lease, so a dead-letter message that never arrives still ends with the pump.
            inc(&inner.metrics.upstream_errors);
            let failed = Settlement::Retry {
                at_ms: now,
                error: error.clone(),
            };
            let actions = failed.apply_to_run(&d, &mut run, now);
            let mut record = failed.record(&d);
            record.next_ms = now.saturating_add(QUEUE_LEASE_MS);
            save_pending(inner, &record, Some(d.next_ms)).await?;
            (QueueVerdict::DeadLetter { error }, actions)
        }
    };
    save_run(inner, &run).await?;
    enqueue(inner, &run, actions).await?;
    Ok(verdict)
}

/// Writes the dead-letter record of the pending delivery `id` (what the pump writes after the
/// last attempt) for the dead-letter queue's consumer, and fails the delivery's stage. `why`
/// is kept when no attempt recorded an error. False when nothing was pending under `id`.
pub(crate) async fn dead_letter(
    inner: &Rc<Inner>,
    id: &str,
    why: &str,
) -> Result<bool, StoreError> {
    let Some(mut d) = load_delivery(inner, &format!("{PENDING}{id}")).await? else {
        return Ok(false);
    };
    let indexed_at = d.next_ms;
    let error = d.last_error.get_or_insert_with(|| why.to_string()).clone();
    save_delivery(inner, DEAD, &d).await?;
    remove_pending(inner, &d, indexed_at).await;
    let _guard = inner.run_lock.lock().await;
    let Some(mut run) = load_run(inner, &d.run).await? else {
        return Ok(true);
    };
    let (Some(stage), false) = (d.stage(), matches!(d.kind, DeliveryKind::Event { .. })) else {
        return Ok(true);
    };
    let now = inner.ports.clock.now_ms();
    let reason = format!(
        "delivery dead-lettered after {} attempts: {error}",
        d.attempts
    );
    let actions = run
        .complete(stage, false, Some(reason), now)
        .unwrap_or_default();
    save_run(inner, &run).await?;
    enqueue(inner, &run, actions).await?;
    Ok(true)
}
