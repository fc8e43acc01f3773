//! The Orchestrator gRPC service.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::orchestrator::v1::orchestrator_server::Orchestrator;
use berth_proto::orchestrator::v1::*;
use berth_server::budget::{self, BudgetError, RequestBudget};
use berth_server::{CancellationToken, GrpcStream};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::deployment::Deployments;
use crate::error::OrchestratorError;
use crate::hosts::HostRegistry;
use crate::manifest::{self, ManifestLimits, Plan};
use crate::placement;
use crate::results;
use crate::role::{Parts, Role};
use crate::store::{HostRecord, Store, StoreError, StoreResult, campaign_is_terminal};

const WATCH_BUFFER: usize = 64;
const MAX_LABELS: usize = 64;

/// How often a follower's WatchCampaign and WatchDeployment read the store
/// for changes: it has none of the leader's events. Each watch costs one
/// snapshot read per interval, on the store's bounded pool.
const FOLLOWER_WATCH_INTERVAL: Duration = Duration::from_millis(500);

pub struct OrchestratorService {
    pub(crate) store: Arc<dyn Store>,
    /// Leading (writes served with its parts) or following (reads only).
    pub(crate) role: Arc<Role>,
    pub(crate) config: Arc<Config>,
    pub(crate) shutdown: CancellationToken,
    /// SubmitCampaign's and Deploy's parsing, validation and expansion run
    /// within it (`server.request_cpu_budget`, `server.max_costly_requests`).
    pub(crate) budget: RequestBudget,
}

fn page_token<T: std::str::FromStr>(token: &str) -> Result<Option<T>, OrchestratorError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse()
        .map(Some)
        .map_err(|_| OrchestratorError::InvalidArgument {
            field: "page_token",
            reason: format!("`{token}` is not a token this orchestrator gave"),
        })
}

/// Gives the campaigns recorded before results layouts were stored theirs,
/// from their manifests: once, when the orchestrator starts, so that results
/// never parse a manifest. A manifest that no longer parses (limits lowered
/// since) leaves its campaign without one, and GetResults says so.
pub(crate) fn store_missing_results_layouts(
    store: &dyn Store,
    limits: &ManifestLimits,
) -> StoreResult<()> {
    for (id, manifest_yaml) in store.campaigns_without_results_layout()? {
        match manifest::plan_within("manifest", &manifest_yaml, limits) {
            Ok(plan) => store.set_results_layout(
                &id,
                plan.manifest.power.work_metric(),
                &plan.results_layout().to_json(),
            )?,
            Err(error) => {
                tracing::warn!(campaign = %id, %error, "no results layout: its manifest does not parse");
            }
        }
    }
    Ok(())
}

/// Trims `rows` (fetched with one more than `limit`) to the page and gives
/// the token of the next: the cursor of the page's last row, empty when no
/// row was left over.
fn next_page<T, C: ToString>(rows: &mut Vec<T>, limit: usize, cursor: impl Fn(&T) -> C) -> String {
    if rows.len() <= limit {
        return String::new();
    }
    rows.truncate(limit);
    rows.last()
        .map(|row| cursor(row).to_string())
        .unwrap_or_default()
}

/// What SubmitCampaign needs to work out a submission off the async
/// workers, within the request's budget.
struct SubmissionPlanner {
    deployments: Arc<Deployments>,
    hosts: Arc<HostRegistry>,
    limits: ManifestLimits,
}

/// A manifest's plan, checked against the deployments and hosts, and its
/// runs as they will be stored (none for a validation); the text and its
/// name handed back.
struct Submission {
    plan: Plan,
    runs: Vec<Run>,
    manifest_yaml: String,
    source: String,
}

impl SubmissionPlanner {
    /// The costly part of SubmitCampaign: parse, validate and expand the
    /// manifest (the walk and the expansion check the budget), check it
    /// against the deployments and hosts, and build the runs of campaign
    /// `runs_for`.
    fn plan(
        &self,
        source: String,
        manifest_yaml: String,
        runs_for: Option<&str>,
    ) -> Result<Submission, OrchestratorError> {
        let plan = manifest::plan_within(&source, &manifest_yaml, &self.limits)?;
        let endpoint_ports = plan.manifest.run.endpoint_ports();
        for backend in plan
            .manifest
            .backends
            .iter()
            .filter(|b| !b.deployment.is_empty())
        {
            self.deployments.check_measurable(
                &backend.name,
                &backend.deployment,
                &endpoint_ports,
            )?;
        }
        placement::check_placeable(&plan, &self.hosts.views())?;
        let runs = match runs_for {
            Some(id) => pending_runs(id, &plan)?,
            None => Vec::new(),
        };
        Ok(Submission {
            plan,
            runs,
            manifest_yaml,
            source,
        })
    }
}

/// The plan's runs as campaign `id` stores them, each costing the budget.
/// Configurations are looked up by name in a map: a search per run is
/// quadratic (10^11 comparisons for 100 000 configurations and 1M runs).
fn pending_runs(id: &str, plan: &Plan) -> Result<Vec<Run>, BudgetError> {
    let params: HashMap<&str, &[(String, String)]> = plan
        .configs
        .iter()
        .map(|config| (config.name.as_str(), config.params.as_slice()))
        .collect();
    plan.runs
        .iter()
        .map(|planned| {
            budget::check()?;
            Ok(Run {
                id: planned.id(id),
                campaign_id: id.to_string(),
                config: planned.config.clone(),
                params: params
                    .get(planned.config.as_str())
                    .map(|params| params.iter().cloned().collect())
                    .unwrap_or_default(),
                backend: planned.backend.clone(),
                cycle: planned.cycle,
                warmup: planned.warmup,
                state: RunState::Pending as i32,
                sequence: planned.sequence,
                ..Default::default()
            })
        })
        .collect()
}

fn is_terminal(campaign: &Campaign) -> bool {
    campaign_is_terminal(CampaignState::try_from(campaign.state).unwrap_or_default())
}

impl OrchestratorService {
    /// The parts to read through: the leader's own, or on a follower ones
    /// assembled (not started) over the hosts stored now, so that what the
    /// leader registered since is seen.
    fn reading(&self) -> Result<Arc<Parts>, OrchestratorError> {
        match self.role.started() {
            Some(parts) => Ok(Arc::clone(parts)),
            None => Ok(Arc::new(Parts::assemble(
                &self.store,
                &self.config,
                &self.shutdown,
            )?)),
        }
    }
}

#[tonic::async_trait]
impl Orchestrator for OrchestratorService {
    async fn register_host(
        &self,
        request: Request<RegisterHostRequest>,
    ) -> Result<Response<Host>, Status> {
        let request = request.into_inner();
        if request.labels.len() > MAX_LABELS {
            return Err(OrchestratorError::InvalidArgument {
                field: "labels",
                reason: format!("at most {MAX_LABELS}"),
            }
            .into());
        }
        let record = HostRecord {
            name: request.name,
            address: request.address,
            token: request.token,
            labels: request.labels.into_iter().collect(),
            power_sampler: request.power_sampler,
        };
        let hosts = Arc::clone(&self.role.leading()?.hosts);
        Ok(Response::new(hosts.register(record).await?))
    }

    async fn deregister_host(
        &self,
        request: Request<DeregisterHostRequest>,
    ) -> Result<Response<DeregisterHostResponse>, Status> {
        self.role
            .leading()?
            .hosts
            .deregister(&request.get_ref().name)?;
        Ok(Response::new(DeregisterHostResponse {}))
    }

    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        let request = request.into_inner();
        let hosts = match self.role.started() {
            Some(parts) => parts.hosts.list(),
            None => followed_hosts(&self.reading()?.hosts),
        };
        let (hosts, next_page_token) =
            berth_server::paging::page(&hosts, request.page_size, &request.page_token).map_err(
                |e| OrchestratorError::InvalidArgument {
                    field: "page_token",
                    reason: e.to_string(),
                },
            )?;
        Ok(Response::new(ListHostsResponse {
            hosts,
            next_page_token,
        }))
    }

    async fn submit_campaign(
        &self,
        request: Request<SubmitCampaignRequest>,
    ) -> Result<Response<Campaign>, Status> {
        let parts = Arc::clone(self.role.leading()?);
        let request = request.into_inner();
        let source = if request.source_name.is_empty() {
            "manifest".to_string()
        } else {
            request.source_name
        };
        let id = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let planner = SubmissionPlanner {
            deployments: Arc::clone(&parts.deployments),
            hosts: Arc::clone(&parts.hosts),
            limits: self.config.manifest.clone(),
        };
        let validate_only = request.validate_only;
        let runs_for = (!validate_only).then(|| id.clone());
        let manifest_yaml = request.manifest_yaml;
        let Submission {
            plan,
            runs,
            manifest_yaml,
            source,
        } = self
            .budget
            .run(move || planner.plan(source, manifest_yaml, runs_for.as_deref()))
            .await?;
        let total = plan.runs.len() as u64;
        let work_metric = plan.manifest.power.work_metric().to_string();
        if validate_only {
            return Ok(Response::new(Campaign {
                name: plan.manifest.name,
                work_metric,
                runs: Some(RunCounts {
                    pending: total,
                    total,
                    ..Default::default()
                }),
                manifest_yaml,
                ..Default::default()
            }));
        }
        let campaign = Campaign {
            id: id.clone(),
            name: plan.manifest.name.clone(),
            state: CampaignState::Pending as i32,
            status_message: "waiting to be scheduled".into(),
            created_at: Some(std::time::SystemTime::now().into()),
            manifest_yaml,
            work_metric,
            ..Default::default()
        };
        self.store
            .insert_campaign(&campaign, &source, &plan.results_layout().to_json(), &runs)
            .map_err(OrchestratorError::from)?;
        tracing::info!(campaign = %id, name = %campaign.name, runs = runs.len(), "campaign submitted");
        parts.scheduler.launch(id.clone());
        Ok(Response::new(parts.scheduler.snapshot(&id)?))
    }

    async fn get_campaign(
        &self,
        request: Request<GetCampaignRequest>,
    ) -> Result<Response<Campaign>, Status> {
        Ok(Response::new(
            self.reading()?.scheduler.snapshot(&request.get_ref().id)?,
        ))
    }

    async fn list_campaigns(
        &self,
        request: Request<ListCampaignsRequest>,
    ) -> Result<Response<ListCampaignsResponse>, Status> {
        let request = request.into_inner();
        let limit = berth_server::paging::page_size(request.page_size);
        let before = page_token::<i64>(&request.page_token)?;
        let mut rows = self
            .store
            .list_campaigns(before, limit + 1)
            .map_err(OrchestratorError::from)?;
        let next_page_token = next_page(&mut rows, limit, |(seq, _)| *seq);
        let mut campaigns = Vec::with_capacity(limit);
        for (_, mut campaign) in rows {
            campaign.runs = Some(
                self.store
                    .run_counts(&campaign.id)
                    .map_err(OrchestratorError::from)?,
            );
            campaign.manifest_yaml.clear();
            campaigns.push(campaign);
        }
        Ok(Response::new(ListCampaignsResponse {
            campaigns,
            next_page_token,
        }))
    }

    type WatchCampaignStream = GrpcStream<CampaignEvent>;

    async fn watch_campaign(
        &self,
        request: Request<WatchCampaignRequest>,
    ) -> Result<Response<Self::WatchCampaignStream>, Status> {
        let id = request.into_inner().id;
        let parts = self.reading()?;
        let scheduler = Arc::clone(&parts.scheduler);
        let event = |campaign: Campaign, message: String| CampaignEvent {
            time: Some(std::time::SystemTime::now().into()),
            campaign: Some(campaign),
            message,
            ..Default::default()
        };
        if self.role.started().is_none() {
            let first = scheduler.snapshot(&id)?;
            return Ok(Response::new(poll_changes(
                first,
                move || scheduler.snapshot(&id),
                is_terminal,
                event,
                self.shutdown.clone(),
            )));
        }
        // Subscribe before the snapshot so that nothing falls between them.
        let events = parts.events.subscribe(&id);
        let first = scheduler.snapshot(&id)?;
        Ok(Response::new(forward_events(
            event(first, "current state".into()),
            events,
            |e: &CampaignEvent| e.campaign.as_ref().is_some_and(is_terminal),
            move |message| scheduler.snapshot(&id).ok().map(|c| event(c, message)),
            self.shutdown.clone(),
        )))
    }

    async fn cancel_campaign(
        &self,
        request: Request<CancelCampaignRequest>,
    ) -> Result<Response<Campaign>, Status> {
        Ok(Response::new(
            self.role
                .leading()?
                .scheduler
                .cancel(&request.get_ref().id)?,
        ))
    }

    async fn resume_campaign(
        &self,
        request: Request<ResumeCampaignRequest>,
    ) -> Result<Response<Campaign>, Status> {
        Ok(Response::new(
            self.role
                .leading()?
                .scheduler
                .resume(&request.get_ref().id)?,
        ))
    }

    async fn get_results(
        &self,
        request: Request<GetResultsRequest>,
    ) -> Result<Response<CampaignResults>, Status> {
        let id = request.into_inner().id;
        let campaign = self.reading()?.scheduler.snapshot(&id)?;
        let layout = self
            .store
            .results_layout(&id)
            .map_err(OrchestratorError::from)?
            .unwrap_or_default();
        let layout = results::ResultsLayout::from_json(&layout).map_err(|e| {
            OrchestratorError::from(StoreError::Corrupt(format!(
                "campaign `{id}` has no readable results layout ({e}): its manifest did not parse when the orchestrator started"
            )))
        })?;
        let mut runs = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .runs(&id, None, after, 10_000)
                .map_err(OrchestratorError::from)?;
            let Some(last) = page.last() else { break };
            after = Some(last.sequence);
            runs.extend(page);
        }
        let results = results::aggregate(&layout, &campaign.work_metric, &runs);
        Ok(Response::new(CampaignResults {
            campaign: Some(campaign),
            results,
            provenance_differences: crate::provenance::differences(&runs),
        }))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let request = request.into_inner();
        let campaign = self.reading()?.scheduler.snapshot(&request.campaign_id)?;
        let limit = berth_server::paging::page_size(request.page_size);
        let after = page_token::<u32>(&request.page_token)?;
        let state = RunState::try_from(request.state)
            .ok()
            .filter(|s| *s != RunState::Unspecified);
        let mut runs = self
            .store
            .runs(&request.campaign_id, state, after, limit + 1)
            .map_err(OrchestratorError::from)?;
        let next_page_token = next_page(&mut runs, limit, |run| run.sequence);
        let runs = runs
            .into_iter()
            .map(|run| results::with_derived(run, &campaign.work_metric))
            .collect();
        Ok(Response::new(ListRunsResponse {
            runs,
            next_page_token,
        }))
    }

    async fn get_run_power_series(
        &self,
        request: Request<GetRunPowerSeriesRequest>,
    ) -> Result<Response<GetRunPowerSeriesResponse>, Status> {
        let request = request.into_inner();
        if self
            .store
            .run(&request.run_id)
            .map_err(OrchestratorError::from)?
            .is_none()
        {
            return Err(OrchestratorError::RunNotFound(request.run_id).into());
        }
        let limit = berth_server::paging::page_size(request.page_size);
        let after = page_token::<u64>(&request.page_token)?;
        let device = Some(request.device.as_str()).filter(|d| !d.is_empty());
        let mut rows = self
            .store
            .power_series(&request.run_id, device, after, limit + 1)
            .map_err(OrchestratorError::from)?;
        let next_page_token = next_page(&mut rows, limit, |(position, _)| *position);
        Ok(Response::new(GetRunPowerSeriesResponse {
            samples: rows.into_iter().map(|(_, sample)| sample).collect(),
            next_page_token,
        }))
    }

    async fn deploy(
        &self,
        request: Request<DeployRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let deployments = Arc::clone(&self.role.leading()?.deployments);
        let request = request.into_inner();
        // The recipe is parsed and validated inside `deploy`; its YAML walk
        // checks the budget, and nothing is stored before it has passed.
        let deployment = self
            .budget
            .run(move || {
                deployments.deploy(
                    &request.source_name,
                    &request.recipe_yaml,
                    request.update,
                    request.validate_only,
                )
            })
            .await?;
        Ok(Response::new(deployment))
    }

    async fn get_deployment(
        &self,
        request: Request<GetDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        Ok(Response::new(
            self.reading()?
                .deployments
                .snapshot(&request.get_ref().name)?,
        ))
    }

    type WatchDeploymentStream = GrpcStream<DeploymentEvent>;

    async fn watch_deployment(
        &self,
        request: Request<WatchDeploymentRequest>,
    ) -> Result<Response<Self::WatchDeploymentStream>, Status> {
        let name = request.into_inner().name;
        let deployments = Arc::clone(&self.reading()?.deployments);
        let event = |deployment: Deployment, message: String| DeploymentEvent {
            time: Some(std::time::SystemTime::now().into()),
            deployment: Some(deployment),
            replica: None,
            message,
        };
        if self.role.started().is_none() {
            let first = deployments.snapshot(&name)?;
            return Ok(Response::new(poll_changes(
                first,
                move || deployments.snapshot(&name),
                deployment_ended,
                event,
                self.shutdown.clone(),
            )));
        }
        // Subscribe before the snapshot so that nothing falls between them.
        let events = deployments.subscribe(&name);
        let first = deployments.snapshot(&name)?;
        Ok(Response::new(forward_events(
            event(first, "current state".into()),
            events,
            |e: &DeploymentEvent| e.deployment.as_ref().is_some_and(deployment_ended),
            move |message| deployments.snapshot(&name).ok().map(|d| event(d, message)),
            self.shutdown.clone(),
        )))
    }

    async fn scale_deployment(
        &self,
        request: Request<ScaleDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.role
                .leading()?
                .deployments
                .scale(&request.name, request.replicas)?,
        ))
    }

    async fn stop_deployment(
        &self,
        request: Request<StopDeploymentRequest>,
    ) -> Result<Response<Deployment>, Status> {
        Ok(Response::new(
            self.role
                .leading()?
                .deployments
                .stop(&request.get_ref().name)?,
        ))
    }

    async fn list_deployments(
        &self,
        request: Request<ListDeploymentsRequest>,
    ) -> Result<Response<ListDeploymentsResponse>, Status> {
        let request = request.into_inner();
        let limit = berth_server::paging::page_size(request.page_size);
        let before = page_token::<i64>(&request.page_token)?;
        let mut rows = self.reading()?.deployments.list(before, limit + 1)?;
        let next_page_token = next_page(&mut rows, limit, |(seq, _)| *seq);
        Ok(Response::new(ListDeploymentsResponse {
            deployments: rows.into_iter().map(|(_, d)| d).collect(),
            next_page_token,
        }))
    }

    type LogsStream = GrpcStream<DeploymentLogLine>;

    async fn logs(
        &self,
        request: Request<DeploymentLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let deployments = Arc::clone(&self.reading()?.deployments);
        Ok(Response::new(
            deployments
                .logs(&request.name, request.replica, request.tail, request.follow)
                .await?,
        ))
    }
}

/// A watch: `first`, then every event published until one that `ends` it
/// (or the caller hangs up, or the service stops). A watcher that falls
/// behind gets `current(why)`, a fresh snapshot, instead of what it missed.
fn forward_events<E: Clone + Send + 'static>(
    first: E,
    mut events: broadcast::Receiver<E>,
    ends: impl Fn(&E) -> bool + Send + 'static,
    current: impl Fn(String) -> Option<E> + Send + 'static,
    shutdown: CancellationToken,
) -> GrpcStream<E> {
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(async move {
        let mut next = Some(first);
        while let Some(event) = next.take() {
            let ended = ends(&event);
            if tx.send(Ok(event)).await.is_err() || ended {
                return;
            }
            let received = tokio::select! {
                received = events.recv() => received,
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
            };
            next = match received {
                Ok(event) => Some(event),
                Err(broadcast::error::RecvError::Lagged(missed)) => current(format!(
                    "watcher fell behind: {missed} events skipped; this is the current state"
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            };
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// A follower's watch: `first`, then the value read every
/// FOLLOWER_WATCH_INTERVAL whenever it changed, until one that `ends` it
/// (or the caller hangs up, the service stops, or the store cannot be
/// read: the stream ends with that error).
fn poll_changes<T, E>(
    first: T,
    read: impl Fn() -> Result<T, OrchestratorError> + Send + 'static,
    ends: impl Fn(&T) -> bool + Send + 'static,
    event: impl Fn(T, String) -> E + Send + 'static,
    shutdown: CancellationToken,
) -> GrpcStream<E>
where
    T: Clone + PartialEq + Send + 'static,
    E: Send + 'static,
{
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(async move {
        let mut last = first.clone();
        let mut next = Some(event(first, "current state".into()));
        loop {
            if let Some(sent) = next.take()
                && tx.send(Ok(sent)).await.is_err()
            {
                return;
            }
            if ends(&last) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOWER_WATCH_INTERVAL) => {}
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
            }
            match read() {
                Ok(now) if now != last => {
                    last = now.clone();
                    next = Some(event(now, "changed (read from the store)".into()));
                }
                Ok(_) => {}
                Err(error) => {
                    let _ = tx.send(Err(error.into())).await;
                    return;
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// The hosts as a follower shows them: it does not contact them (the
/// leader does), so their status is unknown here and says where to look.
fn followed_hosts(hosts: &HostRegistry) -> Vec<Host> {
    hosts
        .list()
        .into_iter()
        .map(|host| Host {
            status: HostStatus::Unknown as i32,
            status_message: "this orchestrator follows: the leader contacts the hosts".into(),
            ..host
        })
        .collect()
}

fn deployment_ended(deployment: &Deployment) -> bool {
    crate::store::deployments::deployment_is_terminal(
        DeploymentState::try_from(deployment.state).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[test]
    fn campaigns_stored_without_a_results_layout_get_one_from_their_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let yaml = "name: t\nbackends: [{name: b, runtime: process}, {name: a, runtime: process}]\n\
                    configs: [{name: x, params: {n: 1}}]\nrun: {command: [true]}\n\
                    power: {enabled: true, work_metric: items}\n";
        let old = |id: &str, manifest_yaml: &str| Campaign {
            id: id.into(),
            name: "t".into(),
            manifest_yaml: manifest_yaml.into(),
            ..Default::default()
        };
        store
            .insert_campaign(&old("c1", yaml), "m", "", &[])
            .unwrap();
        store
            .insert_campaign(&old("c2", "not: [a manifest"), "m", "", &[])
            .unwrap();
        store_missing_results_layouts(&store, &ManifestLimits::default()).unwrap();

        assert_eq!(store.campaign("c1").unwrap().unwrap().work_metric, "items");
        let layout =
            results::ResultsLayout::from_json(&store.results_layout("c1").unwrap().unwrap())
                .unwrap();
        assert_eq!(layout, manifest::plan("m", yaml).unwrap().results_layout());
        assert!(layout.measures_power);
        assert_eq!(layout.backends, ["b", "a"]);
        // One whose manifest does not parse is left as it was.
        assert_eq!(
            store.campaigns_without_results_layout().unwrap(),
            [("c2".to_string(), "not: [a manifest".to_string())]
        );
    }
}
