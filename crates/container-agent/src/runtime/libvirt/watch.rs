//! Events for what happens to the agent's domains without the agent: a
//! guest that powers itself off or crashes, a `virsh destroy`, `start` or
//! `undefine`. The agent publishes events for its own actions itself; this
//! loop compares libvirt's states with the last ones it knew whenever
//! libvirt reports a lifecycle event (virConnectDomainEventRegisterAny, on
//! the event loop thread ffi.rs runs), and makes sure the consoles of
//! running VMs are followed. An event only wakes the loop: comparing whole
//! states keeps one path for what events say, what a reconnect finds and
//! what polling sees. Polling every `libvirt.poll_interval` is the fallback
//! while events cannot be subscribed to; a closed connection wakes the loop
//! to subscribe again on a new one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use berth_proto::agent::v1::EventKind;
use tokio::sync::Notify;

use super::ffi::{DomainState, Subscription, shutoff_reason};
use super::{DomainView, Inner, LibvirtRuntime};
use crate::error::AgentError;

/// The last known activity of each of the agent's domains.
#[derive(Debug, Default)]
pub struct Seen {
    /// Bumped by every change the agent makes, so that a poll that raced
    /// with one is dropped instead of reporting the agent's own action.
    generation: u64,
    domains: HashMap<String, Known>,
    /// Domains the agent is acting on right now.
    busy: HashSet<String>,
}

#[derive(Debug)]
struct Known {
    name: String,
    active: bool,
}

/// One event the poll found.
#[derive(Debug, PartialEq)]
struct Change {
    uuid: String,
    name: String,
    kind: EventKind,
    message: &'static str,
}

impl Seen {
    /// Records the state the agent just brought a domain to.
    pub fn note(&mut self, uuid: &str, name: &str, active: bool) {
        self.generation += 1;
        self.domains.insert(
            uuid.to_string(),
            Known {
                name: name.to_string(),
                active,
            },
        );
    }

    /// The agent removed the domain.
    pub fn forget(&mut self, uuid: &str) {
        self.generation += 1;
        self.domains.remove(uuid);
    }

    /// Compares a poll's domains with what was known, and learns them.
    fn changes(&mut self, views: &[DomainView]) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut present = HashSet::new();
        for view in views {
            present.insert(view.uuid.as_str());
            if self.busy.contains(&view.uuid) {
                continue;
            }
            let before = self.domains.get(&view.uuid).map(|k| k.active);
            if let Some((kind, message)) =
                transition(before, Some((view.info.state, view.info.reason)))
            {
                changes.push(Change {
                    uuid: view.uuid.clone(),
                    name: view.name.clone(),
                    kind,
                    message,
                });
            }
            self.domains.insert(
                view.uuid.clone(),
                Known {
                    name: view.name.clone(),
                    active: view.active(),
                },
            );
        }
        let busy = &self.busy;
        self.domains.retain(|uuid, known| {
            if present.contains(uuid.as_str()) || busy.contains(uuid) {
                return true;
            }
            if let Some((kind, message)) = transition(Some(known.active), None) {
                changes.push(Change {
                    uuid: uuid.clone(),
                    name: known.name.clone(),
                    kind,
                    message,
                });
            }
            false
        });
        changes
    }
}

/// The event for a domain that was `before` (active or not; `None` when
/// first seen) and is `now` (state and reason; `None` when gone).
fn transition(
    before: Option<bool>,
    now: Option<(DomainState, i32)>,
) -> Option<(EventKind, &'static str)> {
    let before = before?;
    let Some((state, reason)) = now else {
        return Some((EventKind::Removed, "libvirt domain undefined outside berth"));
    };
    match (before, state.is_active()) {
        (false, true) => Some((EventKind::Started, "libvirt domain started outside berth")),
        (true, false)
            if state == DomainState::Crashed
                || matches!(reason, shutoff_reason::CRASHED | shutoff_reason::FAILED) =>
        {
            Some((EventKind::Died, "libvirt domain crashed"))
        }
        (true, false) => Some((
            EventKind::Stopped,
            "libvirt domain stopped outside berth (guest power-off or virsh)",
        )),
        _ => None,
    }
}

/// Marks a domain as being acted on by the agent until dropped.
pub struct Busy {
    inner: Arc<Inner>,
    uuid: String,
}

impl Busy {
    pub fn new(inner: &Arc<Inner>, uuid: &str) -> Self {
        let mut seen = inner.seen();
        seen.generation += 1;
        seen.busy.insert(uuid.to_string());
        drop(seen);
        Self {
            inner: inner.clone(),
            uuid: uuid.to_string(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut seen = self.inner.seen();
        seen.generation += 1;
        seen.busy.remove(&self.uuid);
    }
}

/// Looks at the domains once now, then on every libvirt lifecycle event
/// (and when the connection closes) until the runtime is dropped; every
/// `interval` instead while events cannot be subscribed to (no event loop,
/// a driver without events, the daemon gone).
pub fn spawn(inner: Weak<Inner>, interval: Duration) {
    tokio::spawn(async move {
        let wake = Arc::new(Notify::new());
        let mut subscription: Option<Subscription> = None;
        let mut fallback_said = false;
        loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let runtime = LibvirtRuntime { inner: strong };
            if subscription.as_ref().is_none_or(|s| !s.is_alive()) {
                subscription = None;
                match runtime.subscribe(wake.clone()).await {
                    Ok(subscribed) => {
                        subscription = Some(subscribed);
                        fallback_said = false;
                    }
                    Err(error) if !fallback_said => {
                        tracing::info!(%error, ?interval, "no libvirt events: polling the domains");
                        fallback_said = true;
                    }
                    Err(error) => tracing::debug!(%error, "still no libvirt events"),
                }
            }
            // A look that raced with the agent's own action is taken again
            // after `interval`, not at the next event.
            let again = !look(&runtime).await;
            drop(runtime);
            if subscription.is_some() && !again {
                wake.notified().await;
            } else {
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = wake.notified() => {}
                }
            }
        }
    });
}

impl LibvirtRuntime {
    /// libvirt's lifecycle events and the connection's close, each waking
    /// `wake`.
    async fn subscribe(&self, wake: Arc<Notify>) -> Result<Subscription, AgentError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let connection = inner.connect()?;
            connection
                .subscribe(Arc::new(move || wake.notify_one()))
                .map_err(|e| inner.unavailable(format!("cannot subscribe to events: {e}")))
        })
        .await
        .map_err(|e| AgentError::Internal(format!("libvirt call panicked: {e}")))?
    }
}

/// Compares libvirt's domains with what was known and publishes the
/// changes; false when the agent acted meanwhile (the look is dropped, to be
/// taken again).
async fn look(runtime: &LibvirtRuntime) -> bool {
    let generation = runtime.inner.seen().generation;
    let views = match runtime.owned_domains().await {
        Ok(views) => views,
        Err(error) => {
            tracing::debug!(%error, "could not look at the libvirt domains");
            return true;
        }
    };
    // Consoles of running VMs are followed even when nobody asked for their
    // logs yet, so that their lines are dated as they come.
    for view in views.iter().filter(|view| view.active()) {
        runtime.inner.console(view);
    }
    let changes = {
        let mut seen = runtime.inner.seen();
        if seen.generation != generation {
            return false;
        }
        seen.changes(&views)
    };
    for change in changes {
        if change.kind == EventKind::Removed {
            runtime.inner.consoles.remove(&change.uuid);
            runtime.inner.exec_lanes.remove(&change.uuid);
        }
        runtime.inner.events.publish(
            &change.uuid,
            &change.name,
            change.kind,
            change.message.to_string(),
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::libvirt::ffi::DomainInfo;

    fn view(uuid: &str, state: DomainState, reason: i32) -> DomainView {
        DomainView {
            uuid: uuid.to_string(),
            name: format!("vm-{uuid}"),
            metadata: Default::default(),
            info: DomainInfo {
                state,
                reason,
                max_memory_kib: 65536,
                vcpus: 1,
            },
            started_at: None,
        }
    }

    #[test]
    fn polls_report_only_what_the_agent_did_not_do() {
        let mut seen = Seen::default();
        // The agent started `a`; the poll agrees: nothing to report.
        seen.note("a", "vm-a", true);
        assert_eq!(seen.changes(&[view("a", DomainState::Running, 1)]), []);
        // The guest powered itself off.
        let changes = seen.changes(&[view("a", DomainState::Shutoff, 1)]);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].kind, changes[0].name.as_str()),
            (EventKind::Stopped, "vm-a")
        );
        // While the agent acts on `a`, polls leave it alone, even when gone.
        seen.busy.insert("a".to_string());
        assert_eq!(seen.changes(&[]), []);
        seen.busy.remove("a");
        // Undefined outside berth.
        let changes = seen.changes(&[]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, EventKind::Removed);
        assert_eq!(seen.changes(&[]), []);
    }

    #[test]
    fn transitions_become_events() {
        use DomainState::{Crashed, Running, Shutoff};
        assert_eq!(transition(None, Some((Running, 1))), None, "first sight");
        assert_eq!(transition(Some(true), Some((Running, 1))), None);
        let kind = |before, now| transition(Some(before), now).map(|(kind, _)| kind);
        assert_eq!(kind(false, Some((Running, 1))), Some(EventKind::Started));
        assert_eq!(kind(true, Some((Shutoff, 1))), Some(EventKind::Stopped));
        assert_eq!(
            kind(true, Some((Shutoff, shutoff_reason::CRASHED))),
            Some(EventKind::Died)
        );
        assert_eq!(kind(true, Some((Crashed, 0))), Some(EventKind::Died));
        assert_eq!(kind(false, None), Some(EventKind::Removed));
    }
}
