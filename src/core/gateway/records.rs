//! The gateway's records: runs (in the store [`super::runstore`] picks) and deliveries (in the
//! key-value port), read and written as JSON
//! (records of another format version read as absent), and the enqueueing of a run's actions
//! as pending deliveries. I/O only; the keys are built in [`super::keys`].

use crate::core::context::Inner;
use crate::core::gateway::chain::{Action, Run};
use crate::core::gateway::keys::due_key;
use crate::core::gateway::keys::run_key;
use crate::core::gateway::outbox::{self, Delivery, DeliveryKind, DELIVERY_VERSION, PENDING};
use crate::core::gateway::runstore::runs;
use crate::core::gateway::state::{QueuePort, QUEUE_LEASE_MS};
use crate::core::ports::DeliveryQueue;
use crate::core::ports::StoreError;
use std::rc::Rc;

/// Run `id`, if stored.
pub(crate) async fn load_run(inner: &Inner, id: &str) -> Result<Option<Run>, StoreError> {
    Ok(runs(inner)
        .get(&run_key(id))
        .await?
        .and_then(|raw| serde_json::from_slice::<Run>(&raw).ok()))
}

/// Stores a run.
pub(crate) async fn save_run(inner: &Inner, run: &Run) -> Result<(), StoreError> {
    let raw = serde_json::to_vec(run).map_err(|e| StoreError(e.to_string()))?;
    runs(inner).put(&run_key(&run.id), &raw).await
}

/// The delivery stored at `key`, if any (of this format version).
pub(crate) async fn load_delivery(
    inner: &Inner,
    key: &str,
) -> Result<Option<Delivery>, StoreError> {
    Ok(inner
        .ports
        .kv
        .get(key)
        .await?
        .and_then(|raw| serde_json::from_slice::<Delivery>(&raw).ok())
        .filter(|d| d.v == DELIVERY_VERSION))
}

/// Stores a delivery under `prefix` ([`PENDING`] or [`outbox::DEAD`]).
pub(crate) async fn save_delivery(
    inner: &Inner,
    prefix: &str,
    d: &Delivery,
) -> Result<(), StoreError> {
    let raw = serde_json::to_vec(d).map_err(|e| StoreError(e.to_string()))?;
    inner.ports.kv.put(&format!("{prefix}{}", d.id), &raw).await
}

/// Persists a delivery for each action (once: an existing pending record is kept), and leases
/// each new one to the host's queue when it has one ([`hand_off`]).
pub(crate) async fn enqueue(
    inner: &Inner,
    run: &Run,
    actions: Vec<Action>,
) -> Result<(), StoreError> {
    let gw = &inner.settings.gateway;
    let now = inner.ports.clock.now_ms();
    for a in actions {
        let (what, kind) = match a {
            Action::Dispatch { stage, target } => (
                format!("dispatch/{stage}"),
                DeliveryKind::Dispatch { stage, target },
            ),
            Action::Prewarm { stage } => {
                (format!("prewarm/{stage}"), DeliveryKind::Prewarm { stage })
            }
            Action::Emit { event_type, stage } => {
                let Some(target) = gw.chain.events.clone() else {
                    continue;
                };
                let what = format!("event/{event_type}/{}", stage.as_deref().unwrap_or("-"));
                (
                    what,
                    DeliveryKind::Event {
                        target,
                        event_type: event_type.to_string(),
                        stage,
                    },
                )
            }
        };
        let id = outbox::delivery_id(&run.id, &what);
        if inner
            .ports
            .kv
            .get(&format!("{PENDING}{id}"))
            .await?
            .is_some()
        {
            continue;
        }
        let d = Delivery {
            v: DELIVERY_VERSION,
            id,
            run: run.id.clone(),
            kind,
            attempts: 0,
            next_ms: now,
            created_ms: now,
            last_error: None,
        };
        save_pending(inner, &d, None).await?;
        hand_off(inner, &d).await;
    }
    Ok(())
}

/// Persists a pending delivery and its index entry; `previous` is the `next_ms` it was
/// indexed under before, whose entry is removed once the new one and the record are stored.
pub(crate) async fn save_pending(
    inner: &Inner,
    d: &Delivery,
    previous: Option<u64>,
) -> Result<(), StoreError> {
    inner.ports.kv.put(&due_key(d.next_ms, &d.id), b"").await?;
    save_delivery(inner, PENDING, d).await?;
    if let Some(p) = previous.filter(|&p| p != d.next_ms) {
        inner.ports.kv.delete(&due_key(p, &d.id)).await?;
    }
    Ok(())
}

/// Removes a pending delivery and its index entry.
pub(crate) async fn remove_pending(inner: &Inner, d: &Delivery, indexed_at: u64) {
    let _ = inner.ports.kv.delete(&format!("{PENDING}{}", d.id)).await;
    let _ = inner.ports.kv.delete(&due_key(indexed_at, &d.id)).await;
}

fn queue_of(inner: &Inner) -> Option<Rc<dyn DeliveryQueue>> {
    inner.slots.get::<QueuePort>().0.borrow().clone()
}

/// Leases the pending delivery `d` (stored and indexed at its `next_ms`) to the host's queue;
/// false when there is no queue or it refused the message (the pump then sends it).
pub(crate) async fn hand_off(inner: &Inner, d: &Delivery) -> bool {
    let Some(queue) = queue_of(inner) else {
        return false;
    };
    let now = inner.ports.clock.now_ms();
    let mut leased = d.clone();
    leased.next_ms = d.next_ms.max(now).saturating_add(QUEUE_LEASE_MS);
    if save_pending(inner, &leased, Some(d.next_ms)).await.is_err() {
        return false;
    }
    match queue.send(&d.id, d.next_ms.saturating_sub(now)).await {
        Ok(()) => true,
        Err(_) => {
            // Due again for the pump (the lease entry goes once the original one is back).
            let _ = save_pending(inner, d, Some(leased.next_ms)).await;
            false
        }
    }
}
