//! Per-instance gateway state that lives in memory (never persisted): the host's delivery
//! queue, if any (see [`super::queue`]), the count of webhook bodies being held, and whether the persistent indexes were checked for records written
//! before they existed. One per core instance, on `Inner`; not shared across instances, so
//! the body cap is per process natively and per isolate on the edge hosts.

use crate::core::ports::DeliveryQueue;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// In-memory gateway state of one core instance.
#[derive(Default)]
pub(crate) struct GatewayState {
    /// Webhook bodies currently read or held.
    bodies: Rc<Cell<u32>>,
    /// The legacy-record indexing pass ran (or found its marker) on this instance.
    pub indexed: Cell<bool>,
}

/// A slot for one webhook body in memory; released when dropped.
pub(crate) struct BodyPermit(Rc<Cell<u32>>);

impl GatewayState {
    /// A slot for one more body, or None when `max` are already held.
    pub fn try_body(&self, max: u32) -> Option<BodyPermit> {
        let n = self.bodies.get();
        if n >= max {
            return None;
        }
        self.bodies.set(n + 1);
        Some(BodyPermit(self.bodies.clone()))
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// How long past its due time a delivery handed to the queue is left to the queue before the
/// pump may send it too.
pub const QUEUE_LEASE_MS: u64 = 15 * 60 * 1000;

/// The instance's queue, if its host has one (a typed slot on `Inner`).
#[derive(Default)]
pub(crate) struct QueuePort(pub RefCell<Option<Rc<dyn DeliveryQueue>>>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_slots_are_bounded_and_released_on_drop() {
        let s = GatewayState::default();
        let a = s.try_body(2);
        let b = s.try_body(2);
        assert!(a.is_some() && b.is_some());
        assert!(s.try_body(2).is_none());
        drop(a);
        assert!(s.try_body(2).is_some());
        drop(b);
    }
}
