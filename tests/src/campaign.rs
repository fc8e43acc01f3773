//! Waiting on a campaign: the one polling loop the end-to-end tests share
//! (GetCampaign until a condition holds, or a panic naming what never
//! happened, with the last answer).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_proto::orchestrator::v1::orchestrator_client::OrchestratorClient;
use berth_proto::orchestrator::v1::{
    Campaign, CampaignResults, CampaignState, GetCampaignRequest, GetResultsRequest, Host,
    ListCampaignsRequest, ListHostsRequest, ListRunsRequest, Run, RunState, SubmitCampaignRequest,
};
use berth_server::client::AuthChannel;

/// An orchestrator client over the tests' channel.
pub type Client = OrchestratorClient<AuthChannel>;

/// How often a wait asks again.
const POLL: Duration = Duration::from_millis(50);

/// Submits `manifest` twice, validate-only and for real, and returns the two
/// refusals (`why`: what the test expects refused, for the panic).
pub async fn refused_at_submit(
    client: &mut Client,
    manifest: &str,
    why: &str,
) -> Vec<tonic::Status> {
    let mut refusals = Vec::new();
    for validate_only in [true, false] {
        let status = client
            .submit_campaign(SubmitCampaignRequest {
                manifest_yaml: manifest.into(),
                validate_only,
                ..Default::default()
            })
            .await
            .expect_err(why);
        refusals.push(status);
    }
    refusals
}

/// Asserts the orchestrator lists no campaign (`why`: what should have kept
/// them out).
pub async fn assert_no_campaigns(client: &mut Client, why: &str) {
    let listed = client
        .list_campaigns(ListCampaignsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.campaigns.is_empty(), "{why}");
}

/// The campaign `id` now.
pub async fn get_campaign(client: &mut Client, id: &str) -> Campaign {
    client
        .get_campaign(GetCampaignRequest { id: id.into() })
        .await
        .expect("GetCampaign")
        .into_inner()
}

/// Polls campaign `id` until `done` says so; after `limit`, panics with
/// "campaign never became `what`" and the last answer.
pub async fn wait_campaign(
    client: &mut Client,
    id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Campaign) -> bool,
) -> Campaign {
    wait_campaign_or(client, id, limit, what, done, String::new).await
}

/// [`wait_campaign`], with `context()` (e.g. the events seen so far) added
/// to the panic.
pub async fn wait_campaign_or(
    client: &mut Client,
    id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Campaign) -> bool,
    context: impl Fn() -> String,
) -> Campaign {
    let deadline = Instant::now() + limit;
    loop {
        let campaign = get_campaign(client, id).await;
        if done(&campaign) {
            return campaign;
        }
        assert!(
            Instant::now() < deadline,
            "campaign never became {what}: {campaign:?}{}",
            context()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The campaign's state.
pub fn state(campaign: &Campaign) -> CampaignState {
    CampaignState::try_from(campaign.state).unwrap_or_default()
}

/// Succeeded, failed or cancelled: nothing more will happen to it.
pub fn ended(campaign: &Campaign) -> bool {
    matches!(
        state(campaign),
        CampaignState::Succeeded | CampaignState::Failed | CampaignState::Cancelled
    )
}

/// Waits until campaign `id` has ended (see [`ended`]).
pub async fn wait_ended(client: &mut Client, id: &str, limit: Duration) -> Campaign {
    wait_campaign(client, id, limit, "ended", ended).await
}

/// Waits until campaign `id` has succeeded with `runs` runs succeeded, by
/// `deadline` (one deadline may cover several campaigns).
pub async fn wait_succeeded(client: &mut Client, id: &str, runs: u64, deadline: Instant) {
    let limit = deadline.saturating_duration_since(Instant::now());
    let done = wait_campaign(client, id, limit, "succeeded", |c| {
        state(c) == CampaignState::Succeeded
    })
    .await;
    assert_eq!(done.runs.unwrap_or_default().succeeded, runs, "{done:?}");
}

/// Submits `manifest`; the campaign as accepted.
pub async fn submit(client: &mut Client, manifest: &str) -> Campaign {
    client
        .submit_campaign(SubmitCampaignRequest {
            manifest_yaml: manifest.to_string(),
            ..Default::default()
        })
        .await
        .expect("SubmitCampaign")
        .into_inner()
}

/// The campaign's results (GetResults).
pub async fn results_of(client: &mut Client, id: &str) -> CampaignResults {
    client
        .get_results(GetResultsRequest { id: id.to_string() })
        .await
        .expect("GetResults")
        .into_inner()
}

/// The registered hosts (ListHosts).
pub async fn hosts_of(client: &mut Client) -> Vec<Host> {
    client
        .list_hosts(ListHostsRequest::default())
        .await
        .expect("ListHosts")
        .into_inner()
        .hosts
}

/// The campaign's runs, every page.
pub async fn runs_of(client: &mut Client, id: &str) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_runs(ListRunsRequest {
                campaign_id: id.to_string(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("ListRuns")
            .into_inner();
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            return runs;
        }
        page_token = page.next_page_token;
    }
}

/// A campaign of 4 configs × 3 cycles whose runs take `seconds` (those of
/// `n=4` take `n4_seconds`) and append their id to `log` on the host when
/// they finish.
pub fn slow_campaign(name: &str, log: &Path, seconds: f64, n4_seconds: f64) -> String {
    r#"name: NAME
backends: [{name: b, runtime: process}]
grid: {params: {n: [1, 2, 3, 4]}}
cycles: 3
run:
  command:
    - sh
    - -c
    - |
      if [ {{n}} = 4 ]; then sleep N4_SECONDS; else sleep SECONDS; fi
      echo {{run_id}} >> LOG
      echo '{"n": {{n}}}'
"#
    .replace("NAME", name)
    .replace("N4_SECONDS", &n4_seconds.to_string())
    .replace("SECONDS", &seconds.to_string())
    .replace("LOG", &log.display().to_string())
}

/// Waits (at most `limit`) until `enough` runs succeeded and a run of
/// config `config` is running; returns that one.
pub async fn a_run_in_flight(
    client: &mut Client,
    campaign_id: &str,
    enough: usize,
    config: &str,
    limit: Duration,
) -> Run {
    let deadline = Instant::now() + limit;
    loop {
        let runs = client
            .list_runs(ListRunsRequest {
                campaign_id: campaign_id.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("ListRuns")
            .into_inner()
            .runs;
        let succeeded = runs
            .iter()
            .filter(|r| r.state == RunState::Succeeded as i32)
            .count();
        let running = runs
            .iter()
            .find(|r| r.state == RunState::Running as i32 && r.config == config);
        if let Some(running) = running.filter(|_| succeeded >= enough) {
            return running.clone();
        }
        assert!(Instant::now() < deadline, "no run in flight: {runs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every (config, cycle) of a finished campaign recorded once, succeeded,
/// with a result.
pub fn assert_each_recorded_once(runs: &[Run], expected: usize) {
    let mut per_config_cycle: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for run in runs {
        *per_config_cycle
            .entry((run.config.clone(), run.cycle))
            .or_default() += 1;
        assert_eq!(run.state, RunState::Succeeded as i32, "{run:?}");
        assert!(run.result_json.contains("\"n\""), "{run:?}");
    }
    assert_eq!(per_config_cycle.len(), expected, "{per_config_cycle:?}");
    assert!(
        per_config_cycle.values().all(|n| *n == 1),
        "every (config, cycle) recorded exactly once: {per_config_cycle:?}"
    );
}

/// The reason (`berth-error-code`) a follower gives a write: the wire
/// contract clients match on (berth_orchestrator::role::NOT_LEADER).
pub const NOT_LEADER: &str = "not_leader";

/// Whether the orchestrator takes writes: asked with one that changes
/// nothing (a validation), which a follower refuses as not the leader.
pub async fn leads(client: &mut Client) -> bool {
    let validation = SubmitCampaignRequest {
        manifest_yaml: "name: probe\nbackends: [{name: b, runtime: process}]\n\
                        configs: [{name: x, params: {n: 1}}]\nrun: {command: [true]}\n"
            .into(),
        validate_only: true,
        ..Default::default()
    };
    match client.submit_campaign(validation).await {
        Ok(_) => true,
        Err(status) if berth_server::error::has_reason(&status, NOT_LEADER) => false,
        Err(status) => panic!("neither validated nor refused as a follower: {status:?}"),
    }
}
