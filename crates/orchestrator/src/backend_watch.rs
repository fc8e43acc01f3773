//! Watches a placed backend between its runs: its agent's event stream for
//! the workload says when it died, was OOM-killed, stopped, was removed or
//! turned unhealthy, so the backend is started again before its next run
//! (and during a gap) rather than found dead by that run's exec.

use berth_proto::agent::v1::{EventKind, EventsRequest, Health, WorkloadEvent};
use berth_server::CancellationToken;
use tokio::sync::watch;

use crate::hosts::AgentClient;

/// Ends the watch when dropped.
pub struct BackendWatch {
    down: watch::Receiver<Option<String>>,
    stop: CancellationToken,
}

impl Drop for BackendWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl BackendWatch {
    /// Starts watching workload `workload_id` (backend `backend` on `host`).
    pub fn start(mut client: AgentClient, host: &str, backend: &str, workload_id: &str) -> Self {
        let (sender, down) = watch::channel(None);
        let stop = CancellationToken::new();
        let what = format!("backend `{backend}` on host `{host}`");
        let request = EventsRequest {
            workload_id: workload_id.to_string(),
        };
        let stopped = stop.clone();
        tokio::spawn(async move {
            let follow = async {
                // An agent that cannot stream events leaves the backend to be
                // found down by its next run, as without a watch.
                let Ok(stream) = client.events(request).await else {
                    return;
                };
                let mut stream = stream.into_inner();
                while let Ok(Some(event)) = stream.message().await {
                    if let Some(why) = went_down(&event) {
                        let _ = sender.send(Some(format!("{what} {why}")));
                    }
                }
            };
            tokio::select! {
                () = follow => {}
                () = stopped.cancelled() => {}
            }
        });
        Self { down, stop }
    }

    /// Why the backend went down, if it did since the watch began.
    pub fn down(&self) -> Option<String> {
        self.down.borrow().clone()
    }

    /// Resolves once the backend goes down (never, if the watch ended).
    pub async fn went_down(&mut self) -> String {
        let why = (self.down.wait_for(Option::is_some).await).map_or(None, |why| why.clone());
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }
}

/// What an event says happened, when it means the backend cannot serve runs.
fn went_down(event: &WorkloadEvent) -> Option<String> {
    let why = match EventKind::try_from(event.kind).unwrap_or_default() {
        EventKind::Died => match event.exit_code {
            Some(code) => format!("died (exit code {code})"),
            None => "died".to_string(),
        },
        EventKind::OomKilled => "was OOM-killed".to_string(),
        EventKind::Stopped => "stopped".to_string(),
        EventKind::Removed => "was removed".to_string(),
        EventKind::HealthChanged if event.health == Health::Unhealthy as i32 => {
            "turned unhealthy".to_string()
        }
        _ => return None,
    };
    Some(if event.message.is_empty() {
        why
    } else {
        format!("{why}: {}", event.message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind) -> WorkloadEvent {
        WorkloadEvent {
            kind: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn only_events_that_leave_the_backend_unable_to_serve_count() {
        let died = WorkloadEvent {
            exit_code: Some(137),
            message: "killed".into(),
            ..event(EventKind::Died)
        };
        assert_eq!(
            went_down(&died).as_deref(),
            Some("died (exit code 137): killed")
        );
        assert!(went_down(&event(EventKind::OomKilled)).is_some());
        assert!(went_down(&event(EventKind::Stopped)).is_some());
        assert!(went_down(&event(EventKind::Removed)).is_some());
        for kind in [EventKind::Created, EventKind::Started, EventKind::Restarted] {
            assert_eq!(went_down(&event(kind)), None, "{kind:?}");
        }
        let health = |health: Health| WorkloadEvent {
            health: health as i32,
            ..event(EventKind::HealthChanged)
        };
        assert!(went_down(&health(Health::Unhealthy)).is_some());
        assert_eq!(went_down(&health(Health::Healthy)), None);
    }
}
