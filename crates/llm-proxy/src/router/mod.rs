//! Routing a model name to one of its deployments: the strategy picks among
//! deployments that are not cooling down and are under their rpm/tpm, and
//! each deployment keeps the live numbers strategies need (requests in
//! flight, latency). Retries and fallbacks are driven by the gateway, which
//! asks the router again after each failure.

pub(crate) mod budget;
mod cooldown;
mod strategy;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::settings::{RouterSettings, Strategy};

use crate::error::ProxyError;
use crate::gen_ai::DeploymentSpans;
use crate::limits::MinuteWindow;
use crate::litellm_config::DeploymentConfig;
use budget::PeriodBudget;
use cooldown::Cooldown;

/// A deployment and what the router knows about it right now.
#[derive(Debug)]
pub struct Deployment {
    pub config: DeploymentConfig,
    /// What every try's span says of it.
    pub spans: DeploymentSpans,
    in_flight: AtomicU64,
    /// Exponentially weighted time to first byte, in µs; 0 until measured.
    latency_micros: AtomicU64,
    cooldown: Cooldown,
    minute: MinuteWindow,
    budget: Option<PeriodBudget>,
}

impl Deployment {
    fn new(config: DeploymentConfig) -> Self {
        let budget = config
            .budget
            .map(|limit| PeriodBudget::new(limit, Instant::now()));
        Self {
            spans: DeploymentSpans::new(&config),
            config,
            in_flight: AtomicU64::new(0),
            latency_micros: AtomicU64::new(0),
            cooldown: Cooldown::default(),
            minute: MinuteWindow::default(),
            budget,
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn latency_micros(&self) -> u64 {
        self.latency_micros.load(Ordering::Relaxed)
    }

    /// Requests and tokens in the last minute (for usage-based routing).
    pub fn used(&self, now: Instant) -> (u64, u64) {
        self.minute.used(now)
    }

    /// Marks a request as in flight until the guard is dropped, with the
    /// most it can cost (`worst`, asked only of a deployment with a
    /// budget; None: unbounded) reserved from the deployment's own budget.
    pub fn start(
        self: &Arc<Self>,
        worst: impl FnOnce() -> Option<f64>,
    ) -> Result<InFlight, ProxyError> {
        let reserved = match &self.budget {
            None => 0.0,
            Some(budget) => budget.reserve(worst(), Instant::now()).map_err(|refusal| {
                let (why, retry_after) = refusal.explain(budget.max_usd());
                ProxyError::DeploymentBudget {
                    deployment: self.config.id.clone(),
                    why,
                    retry_after,
                }
            })?,
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight {
            deployment: self.clone(),
            reserved,
        })
    }

    pub fn record_latency(&self, latency: Duration) {
        let sample = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        // A lost update under a race only skews one sample of an average.
        let old = self.latency_micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 7 + sample) / 8
        };
        self.latency_micros.store(new, Ordering::Relaxed);
    }

    pub fn record_tokens(&self, tokens: u64) {
        self.minute.add_tokens(Instant::now(), tokens);
    }

    /// Counts a failure; true when the deployment starts cooling down.
    pub fn record_failure(&self, settings: &RouterSettings) -> bool {
        let cooling = self.cooldown.record_failure(
            Instant::now(),
            settings.allowed_fails,
            settings.cooldown_time,
        );
        if cooling {
            tracing::warn!(deployment = %self.config.id, cooldown = ?settings.cooldown_time, "deployment cooling down after repeated failures");
        }
        cooling
    }
}

/// A request in flight on a deployment (for least-busy), holding what it
/// reserved of the deployment's budget; ends on drop, so a cancelled or
/// abandoned request ends too (its reservation given back, nothing spent).
#[derive(Debug)]
pub struct InFlight {
    deployment: Arc<Deployment>,
    reserved: f64,
}

impl InFlight {
    pub fn deployment(&self) -> &Arc<Deployment> {
        &self.deployment
    }

    /// Charges the attempt's cost to the deployment's budget (None: the
    /// upstream did not say what it used: what was reserved is spent, so
    /// an answer without usage cannot pass the budget unseen).
    pub fn charge(&mut self, cost: Option<f64>) {
        if let Some(budget) = &self.deployment.budget {
            let reserved = std::mem::take(&mut self.reserved);
            budget.settle(reserved, cost.unwrap_or(reserved), Instant::now());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.deployment.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(budget) = &self.deployment.budget
            && self.reserved > 0.0
        {
            budget.settle(self.reserved, 0.0, Instant::now());
        }
    }
}

#[derive(Debug)]
pub struct Router {
    settings: RouterSettings,
    /// Model names in config order, for listings.
    names: Vec<String>,
    groups: HashMap<String, Vec<Arc<Deployment>>>,
}

impl Router {
    pub fn new(deployments: Vec<DeploymentConfig>, settings: RouterSettings) -> Self {
        let mut names = Vec::new();
        let mut groups: HashMap<String, Vec<Arc<Deployment>>> = HashMap::new();
        for config in deployments {
            if !groups.contains_key(&config.model_name) {
                names.push(config.model_name.clone());
            }
            groups
                .entry(config.model_name.clone())
                .or_default()
                .push(Arc::new(Deployment::new(config)));
        }
        Self {
            settings,
            names,
            groups,
        }
    }

    pub fn settings(&self) -> &RouterSettings {
        &self.settings
    }

    /// Model names with their number of deployments, in config order.
    pub fn models(&self) -> impl Iterator<Item = (&str, usize)> {
        self.names
            .iter()
            .map(|name| (name.as_str(), self.groups[name].len()))
    }

    /// Models with a deployment that has no cost per token configured: what
    /// it serves adds nothing to a key's spend, so no budget holds it back.
    pub fn unpriced_models(&self) -> impl Iterator<Item = &str> {
        self.names
            .iter()
            .filter(|name| {
                self.groups[*name].iter().any(|d| {
                    d.config.input_cost_per_token <= 0.0 && d.config.output_cost_per_token <= 0.0
                })
            })
            .map(String::as_str)
    }

    pub fn has_model(&self, model: &str) -> bool {
        self.groups.contains_key(model)
    }

    /// Whether every deployment of `model` serves the Responses API itself
    /// (see `DeploymentConfig::responses_api`); false for an unknown model.
    pub fn serves_responses(&self, model: &str) -> bool {
        self.groups
            .get(model)
            .is_some_and(|group| group.iter().all(|d| d.config.responses_api))
    }

    /// The model groups to try for `model`: itself, then its fallbacks.
    pub fn groups_for<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a str> {
        let fallbacks = self
            .settings
            .fallbacks
            .iter()
            .filter(move |(from, _)| from == model)
            .flat_map(|(_, to)| to.iter().map(String::as_str));
        std::iter::once(model).chain(fallbacks)
    }

    /// Picks a deployment of `model` and counts the request against its rpm.
    /// Deployments in `tried` are avoided while others are available.
    pub fn pick(
        &self,
        model: &str,
        tried: &[Arc<Deployment>],
    ) -> Result<Arc<Deployment>, ProxyError> {
        let group = self
            .groups
            .get(model)
            .ok_or_else(|| ProxyError::UnknownModel(model.to_string()))?;
        let now = Instant::now();
        let mut soonest = self.settings.cooldown_time;
        let mut available = Vec::with_capacity(group.len());
        for deployment in group {
            let config = &deployment.config;
            let wait = deployment
                .cooldown
                .remaining(now)
                .or_else(|| {
                    deployment
                        .minute
                        .check(now, config.rpm, config.tpm)
                        .err()
                        .map(|e| e.retry_after())
                })
                .or_else(|| deployment.budget.as_ref()?.spent_for(now));
            match wait {
                Some(wait) => soonest = soonest.min(wait),
                None => available.push(deployment.as_ref()),
            }
        }
        let untried: Vec<&Deployment> = available
            .iter()
            .copied()
            .filter(|d| !tried.iter().any(|t| std::ptr::eq(t.as_ref(), *d)))
            .collect();
        let candidates = if untried.is_empty() {
            available
        } else {
            untried
        };
        if candidates.is_empty() {
            return Err(ProxyError::NoDeployment {
                model: model.to_string(),
                retry_after: soonest,
            });
        }
        let picked = self.settings.strategy.pick(&candidates, &mut rand::rng());
        // Counted at pick time, as LiteLLM does; a race past the limit by a
        // few concurrent requests is accepted rather than serialising picks.
        let _ = picked
            .minute
            .admit(now, picked.config.rpm, picked.config.tpm);
        let picked = group
            .iter()
            .find(|d| std::ptr::eq(d.as_ref(), picked))
            .cloned();
        picked.ok_or_else(|| ProxyError::UnknownModel(model.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::settings::ProviderKind;

    pub(crate) fn deployment(model_name: &str, id: &str) -> DeploymentConfig {
        DeploymentConfig {
            id: id.into(),
            model_name: model_name.into(),
            provider: ProviderKind::OpenAi,
            upstream_model: "m".into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key: None,
            rpm: None,
            tpm: None,
            weight: 1.0,
            timeout: None,
            stream_timeout: None,
            input_cost_per_token: 0.0,
            output_cost_per_token: 0.0,
            drop_params: Vec::new(),
            budget: None,
            responses_api: false,
        }
    }

    #[test]
    fn a_model_serves_the_responses_api_when_all_its_deployments_do() {
        let mut native = deployment("native", "a");
        native.responses_api = true;
        let mut mixed = native.clone();
        mixed.model_name = "mixed".into();
        mixed.id = "b".into();
        let router = router(
            Strategy::SimpleShuffle,
            vec![native, mixed, deployment("mixed", "c")],
        );
        assert!(router.serves_responses("native"));
        assert!(!router.serves_responses("mixed"));
        assert!(!router.serves_responses("unknown"));
    }

    #[test]
    fn models_with_an_unpriced_deployment() {
        let mut priced = deployment("priced", "a");
        priced.output_cost_per_token = 0.002;
        let mut half_priced = deployment("mixed", "b");
        half_priced.input_cost_per_token = 0.001;
        let router = router(
            Strategy::SimpleShuffle,
            vec![
                priced,
                half_priced,
                deployment("mixed", "c"),
                deployment("free", "d"),
            ],
        );
        assert_eq!(
            router.unpriced_models().collect::<Vec<_>>(),
            ["mixed", "free"]
        );
    }

    fn router(strategy: Strategy, configs: Vec<DeploymentConfig>) -> Router {
        Router::new(
            configs,
            RouterSettings {
                strategy,
                allowed_fails: 0,
                ..RouterSettings::default()
            },
        )
    }

    #[test]
    fn least_busy_prefers_idle_deployment() {
        let router = router(
            Strategy::LeastBusy,
            vec![deployment("m", "a"), deployment("m", "b")],
        );
        let first = router.pick("m", &[]).unwrap();
        let _busy = first.start(|| None).unwrap();
        for _ in 0..20 {
            assert_ne!(router.pick("m", &[]).unwrap().config.id, first.config.id);
        }
    }

    #[test]
    fn latency_based_prefers_fast_then_unmeasured() {
        let router = router(
            Strategy::LatencyBased,
            vec![deployment("m", "a"), deployment("m", "b")],
        );
        let a = router.pick("m", &[]).unwrap();
        a.record_latency(Duration::from_millis(5));
        // b is unmeasured: tried next.
        let b = router.pick("m", &[]).unwrap();
        assert_ne!(a.config.id, b.config.id);
        b.record_latency(Duration::from_millis(50));
        for _ in 0..20 {
            assert_eq!(router.pick("m", &[]).unwrap().config.id, a.config.id);
        }
    }

    #[test]
    fn usage_based_prefers_fewest_tokens_then_fewest_requests() {
        let router = router(
            Strategy::UsageBased,
            vec![deployment("m", "a"), deployment("m", "b")],
        );
        let [a, b] = [0, 1].map(|i| router.groups["m"][i].clone());
        // Each pick counts a request: with no tokens yet, picks alternate.
        let first = router.pick("m", &[]).unwrap();
        let second = router.pick("m", &[]).unwrap();
        assert_ne!(first.config.id, second.config.id);
        a.record_tokens(500);
        b.record_tokens(100);
        for _ in 0..5 {
            assert_eq!(router.pick("m", &[]).unwrap().config.id, "b");
        }
        // b has now taken 6 requests to a's 1, but fewer tokens still wins.
        assert_eq!(b.used(Instant::now()), (6, 100));
        b.record_tokens(1000);
        assert_eq!(router.pick("m", &[]).unwrap().config.id, "a");
    }

    #[test]
    fn cost_based_prefers_the_cheapest_per_token() {
        let mut dear = deployment("m", "dear");
        dear.input_cost_per_token = 0.000_01;
        dear.output_cost_per_token = 0.000_03;
        let mut cheap = deployment("m", "cheap");
        // Dearer output, cheaper in sum: the sum decides, as in LiteLLM.
        cheap.input_cost_per_token = 0.000_001;
        cheap.output_cost_per_token = 0.000_035;
        let mut cheap_twin = cheap.clone();
        cheap_twin.id = "cheap-twin".into();
        let router = router(Strategy::CostBased, vec![dear, cheap, cheap_twin]);
        let picks: Vec<String> = (0..200)
            .map(|_| router.pick("m", &[]).unwrap().config.id.clone())
            .collect();
        assert!(!picks.iter().any(|id| id == "dear"));
        // Equal costs share the load.
        let twin = picks.iter().filter(|id| *id == "cheap-twin").count();
        assert!((50..150).contains(&twin), "{twin}");
        // Once the cheap ones are tried, a retry goes to the dear one.
        let tried = [router.groups["m"][1].clone(), router.groups["m"][2].clone()];
        assert_eq!(router.pick("m", &tried).unwrap().config.id, "dear");
    }

    #[test]
    fn shuffle_follows_weights() {
        let mut heavy = deployment("m", "heavy");
        heavy.weight = 9.0;
        let router = router(
            Strategy::SimpleShuffle,
            vec![heavy, deployment("m", "light")],
        );
        let heavy_picks = (0..2000)
            .filter(|_| router.pick("m", &[]).unwrap().config.id == "heavy")
            .count();
        assert!((1600..1990).contains(&heavy_picks), "{heavy_picks}");
    }

    #[test]
    fn cooled_down_and_rpm_capped_deployments_are_skipped() {
        let mut capped = deployment("m", "capped");
        capped.rpm = Some(1);
        let router = router(Strategy::SimpleShuffle, vec![capped, deployment("m", "ok")]);
        let ok = router.groups["m"][1].clone();
        assert!(ok.record_failure(router.settings()));
        // Only "capped" is left, once; then nothing until the minute ends.
        assert_eq!(router.pick("m", &[]).unwrap().config.id, "capped");
        match router.pick("m", &[]) {
            Err(ProxyError::NoDeployment { retry_after, .. }) => {
                assert!(retry_after <= Duration::from_secs(5))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retries_avoid_tried_deployments_and_fallbacks_follow() {
        let settings = RouterSettings {
            fallbacks: vec![("m".into(), vec!["n".into()])],
            ..RouterSettings::default()
        };
        let router = Router::new(
            vec![
                deployment("m", "a"),
                deployment("m", "b"),
                deployment("n", "c"),
            ],
            settings,
        );
        let first = router.pick("m", &[]).unwrap();
        let second = router.pick("m", std::slice::from_ref(&first)).unwrap();
        assert_ne!(first.config.id, second.config.id);
        assert_eq!(router.groups_for("m").collect::<Vec<_>>(), ["m", "n"]);
        assert!(matches!(
            router.pick("x", &[]),
            Err(ProxyError::UnknownModel(_))
        ));
    }
}
