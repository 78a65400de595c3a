//! Pushed events (`GET /v1/events`, `rbdsync events`): job and migration
//! state changes, job progress and disk changes (a resize), so
//! orchestrators need not poll.
//!
//! One broadcast channel per agent. A subscriber that falls behind by more
//! than [`BACKLOG`] events is told how many it missed (`lagged`) and goes
//! on with the newest; publishers never wait.

use serde_json::{json, Value};
use tokio::sync::broadcast;

/// Events kept for a slow subscriber.
pub const BACKLOG: usize = 1024;

/// The agent's event channel (cheap to clone).
#[derive(Debug, Clone)]
pub struct Events(broadcast::Sender<Value>);

impl Default for Events {
    fn default() -> Self {
        Self(broadcast::channel(BACKLOG).0)
    }
}

impl Events {
    /// Publishes `{"type": kind, "time": UNIX_MS, ...body}` to every subscriber.
    pub fn publish(&self, kind: &str, mut body: Value) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        if let Some(o) = body.as_object_mut() {
            o.insert("type".into(), json!(kind));
            o.insert("time_ms".into(), json!(u64::try_from(ms).unwrap_or(u64::MAX)));
        }
        let _ = self.0.send(body);
    }

    /// A new subscriber (sees events published from now on).
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.0.subscribe()
    }
}
