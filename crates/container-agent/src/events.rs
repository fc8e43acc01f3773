//! The agent's event bus: lifecycle and health events of its workloads.
//! Bounded: a subscriber that falls too far behind loses the oldest events
//! and is told how many.

use berth_proto::agent::v1::{EventKind, WorkloadEvent};
use tokio::sync::broadcast;

const EVENT_BUFFER: usize = 1024;

#[derive(Debug, Clone)]
pub struct EventBus {
    sender: broadcast::Sender<WorkloadEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(EVENT_BUFFER).0,
        }
    }
}

impl EventBus {
    pub fn publish(
        &self,
        workload_id: &str,
        workload_name: &str,
        kind: EventKind,
        message: String,
    ) {
        self.publish_event(WorkloadEvent {
            time: Some(std::time::SystemTime::now().into()),
            workload_id: workload_id.to_string(),
            workload_name: workload_name.to_string(),
            kind: kind as i32,
            message,
            ..Default::default()
        });
    }

    pub fn publish_event(&self, event: WorkloadEvent) {
        // No subscriber is not an error: events are live, not stored.
        let _ = self.sender.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WorkloadEvent> {
        self.sender.subscribe()
    }
}
