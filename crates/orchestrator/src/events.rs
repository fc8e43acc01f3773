//! Live campaign events for WatchCampaign. Bounded per campaign; a watcher
//! that falls behind gets a fresh snapshot instead of the events it missed.

use std::collections::HashMap;
use std::sync::Mutex;

use berth_proto::orchestrator::v1::CampaignEvent;
use tokio::sync::broadcast;

const EVENTS_PER_CAMPAIGN: usize = 1024;

#[derive(Default)]
pub struct CampaignEvents {
    channels: Mutex<HashMap<String, broadcast::Sender<CampaignEvent>>>,
}

impl CampaignEvents {
    fn channels(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<CampaignEvent>>> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn subscribe(&self, campaign_id: &str) -> broadcast::Receiver<CampaignEvent> {
        self.channels()
            .entry(campaign_id.to_string())
            .or_insert_with(|| broadcast::channel(EVENTS_PER_CAMPAIGN).0)
            .subscribe()
    }

    /// Whether anyone watches the campaign: an event nobody receives is not
    /// worth its campaign snapshot (a count over all the campaign's runs).
    pub fn is_watched(&self, campaign_id: &str) -> bool {
        self.channels()
            .get(campaign_id)
            .is_some_and(|sender| sender.receiver_count() > 0)
    }

    pub fn publish(&self, campaign_id: &str, event: CampaignEvent) {
        let mut channels = self.channels();
        // Nobody is watching: drop the channel so idle campaigns cost nothing.
        if channels
            .get(campaign_id)
            .is_some_and(|sender| sender.send(event).is_err())
        {
            channels.remove(campaign_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_campaigns_with_a_live_watcher_are_watched() {
        let events = CampaignEvents::default();
        assert!(!events.is_watched("c1"));
        let watcher = events.subscribe("c1");
        assert!(events.is_watched("c1") && !events.is_watched("c2"));
        drop(watcher);
        assert!(!events.is_watched("c1"));
    }
}
