//! The engine's event stream for this owner's containers, translated into
//! workload events. Reconnects (with backoff) whenever the engine goes away.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use berth_proto::agent::v1::{EventKind, Health, WorkloadEvent};
use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use futures::StreamExt;

use super::ContainerRuntime;
use super::inspect::{LABEL_NAME, LABEL_OWNER, health};

const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

pub fn spawn(runtime: ContainerRuntime) {
    tokio::spawn(async move {
        let mut pause = RECONNECT_MIN;
        loop {
            match runtime.engine().client().await {
                Ok(docker) => {
                    let filters = HashMap::from([
                        ("type", vec!["container".to_string()]),
                        (
                            "label",
                            vec![format!("{LABEL_OWNER}={}", runtime.inner.owner)],
                        ),
                    ]);
                    let options = EventsOptionsBuilder::new().filters(&filters).build();
                    let mut events = docker.events(Some(options));
                    while let Some(event) = events.next().await {
                        match event {
                            Ok(event) => {
                                pause = RECONNECT_MIN;
                                runtime.on_engine_event(event).await;
                            }
                            Err(error) => {
                                tracing::warn!(engine = runtime.engine().name(), %error, "engine event stream broke");
                                break;
                            }
                        }
                    }
                    // The stream ending means the engine went away (or restarted):
                    // make the next call connect and negotiate again.
                    runtime.engine().reset().await;
                }
                Err(error) => tracing::debug!(%error, "engine unavailable; retrying"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RECONNECT_MAX);
        }
    });
}

/// An engine action as a workload event kind (and health, for health events).
/// Docker says `die` and `health_status: healthy`; podman says `died` and may
/// say a bare `health_status` with the status in the attributes.
pub fn translate(
    action: &str,
    attributes: &HashMap<String, String>,
) -> Option<(EventKind, Health)> {
    let kind = match action {
        "create" => EventKind::Created,
        "start" => EventKind::Started,
        "restart" => EventKind::Restarted,
        "die" | "died" => EventKind::Died,
        "stop" => EventKind::Stopped,
        "destroy" | "remove" => EventKind::Removed,
        health_event if health_event.starts_with("health_status") => {
            let status = health_event
                .split_once(':')
                .map(|(_, s)| s.to_string())
                .or_else(|| attributes.get("health_status").cloned())
                .unwrap_or_default();
            return Some((EventKind::HealthChanged, health(&status)));
        }
        // `oom` is docker-only; OOM kills are read from State.OOMKilled at death.
        _ => return None,
    };
    Some((kind, Health::Unspecified))
}

impl ContainerRuntime {
    async fn on_engine_event(&self, event: EventMessage) {
        let Some(actor) = event.actor else { return };
        let (Some(id), attributes) = (actor.id, actor.attributes.unwrap_or_default()) else {
            return;
        };
        let Some((kind, new_health)) =
            translate(event.action.as_deref().unwrap_or_default(), &attributes)
        else {
            return;
        };
        let name = attributes
            .get(LABEL_NAME)
            .or_else(|| attributes.get("name"))
            .cloned()
            .unwrap_or_default();
        let time = event
            .time_nano
            .map(|nanos| {
                SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
            })
            .unwrap_or_else(SystemTime::now);
        let mut base = WorkloadEvent {
            time: Some(time.into()),
            workload_id: id.clone(),
            workload_name: name.clone(),
            kind: kind as i32,
            message: format!(
                "{} engine: {}",
                self.engine().name(),
                event.action.unwrap_or_default()
            ),
            ..Default::default()
        };
        match kind {
            EventKind::HealthChanged => {
                // The agent's own health loop speaks for workloads with a check.
                if self.owned().get(&id).is_some_and(|o| o.health.is_some()) {
                    return;
                }
                base.health = new_health as i32;
            }
            EventKind::Died => {
                base.exit_code = attributes.get("exitCode").and_then(|c| c.parse().ok());
                let oom = matches!(self.details(&id).await, Ok(Some(d)) if d.state.oom_killed);
                self.publish(base.clone());
                if oom {
                    base.kind = EventKind::OomKilled as i32;
                    base.message = "killed for exceeding its memory limit (State.OOMKilled)".into();
                    self.publish(base);
                }
                return;
            }
            EventKind::Removed => {
                self.owned().remove(&id);
            }
            _ => {}
        }
        self.publish(base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventMessage;

    /// Recorded from podman 4.3.1's compat API (`/v1.41/events`).
    const PODMAN_DIE: &str = r#"{"status":"die","id":"b124","from":"localhost/bb:test","Type":"container","Action":"die",
      "Actor":{"ID":"b124","Attributes":{"berth.owner":"o","containerExitCode":"137","exitCode":"137","image":"localhost/bb:test","name":"t3","podId":""}},
      "scope":"local","time":1795410150,"timeNano":1795410150485643157}"#;

    fn parse(json: &str) -> (String, HashMap<String, String>) {
        let event: EventMessage = serde_json::from_str(json).unwrap();
        let actor = event.actor.unwrap();
        (event.action.unwrap(), actor.attributes.unwrap())
    }

    #[test]
    fn podman_events_translate() {
        let (action, attributes) = parse(PODMAN_DIE);
        assert_eq!(
            translate(&action, &attributes),
            Some((EventKind::Died, Health::Unspecified))
        );
        assert_eq!(attributes["exitCode"], "137");
        // Older podman names the death `died`.
        assert_eq!(
            translate("died", &attributes).map(|t| t.0),
            Some(EventKind::Died)
        );
    }

    #[test]
    fn health_status_bare_or_with_value() {
        let none = HashMap::new();
        assert_eq!(
            translate("health_status: healthy", &none),
            Some((EventKind::HealthChanged, Health::Healthy))
        );
        let podman = HashMap::from([("health_status".to_string(), "unhealthy".to_string())]);
        assert_eq!(
            translate("health_status", &podman),
            Some((EventKind::HealthChanged, Health::Unhealthy))
        );
        assert_eq!(translate("oom", &none), None);
        assert_eq!(translate("exec_start: sh", &none), None);
    }
}
