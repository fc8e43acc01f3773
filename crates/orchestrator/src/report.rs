//! `GET /campaigns/{id}/report` on the HTTP port: the page `berth report`
//! writes (berth_report renders both), read from the store directly. The
//! same bearer token as the gRPC API guards it, since the page shows what
//! that API guards (manifests, hosts, results); `/metrics` stays open.
//!
//! The work is bounded: at most [`MAX_RUNS`] runs and [`MAX_SERIES_SAMPLES`]
//! samples per plotted series are read and drawn (the page says what it
//! left out), on the blocking pool, at most `server.max_costly_requests`
//! requests at once with SubmitCampaign and Deploy (429 past it).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_report::{ReportData, series_runs};
use berth_server::ServiceError;
use berth_server::auth::RequireBearer;
use berth_server::budget::RequestBudget;

use crate::error::OrchestratorError;
use crate::hosts::HostRegistry;
use crate::results;
use crate::scheduler::Scheduler;
use crate::store::Store;

/// Runs read and drawn: the benchmark's 10,000-run campaign renders in
/// ~0.4 s (docs/benchmarks.md), so this keeps a page near 2 s of CPU and a
/// few hundred MB at most; past it `berth report` reads every run.
pub const MAX_RUNS: usize = 50_000;
/// Samples read of each plotted run's series: 20 minutes at 100 Hz. The
/// plot keeps min/max per pixel, so more would cost memory, not detail.
pub const MAX_SERIES_SAMPLES: usize = 120_000;

/// What the route reads from and how it is guarded.
pub struct ReportPages {
    pub store: Arc<dyn Store>,
    pub scheduler: Arc<Scheduler>,
    pub hosts: Arc<HostRegistry>,
    pub auth: RequireBearer,
    pub budget: RequestBudget,
}

/// The route, for the HTTP port's router.
pub fn router(pages: Arc<ReportPages>) -> axum::Router {
    axum::Router::new()
        .route("/campaigns/{id}/report", axum::routing::get(page))
        .with_state(pages)
}

async fn page(
    State(pages): State<Arc<ReportPages>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if let Err(refused) = pages.auth.check(authorization) {
        return failure(refused);
    }
    let reader = Arc::clone(&pages);
    match pages
        .budget
        .run(move || reader.read(&id).map(|data| berth_report::render(&data)))
        .await
    {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(error) => failure(error),
    }
}

/// An error as a plain-text answer with the status its code maps to
/// (unknown campaign: 404; missing or wrong token: 401; busy: 429).
fn failure<E: ServiceError>(error: E) -> Response {
    let status = error.error_code().http_status();
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(%error, "campaign report failed");
    }
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{error}\n"),
    )
        .into_response()
}

impl ReportPages {
    /// The campaign, its runs (as ListRuns gives them), the hosts they ran
    /// on and the plotted series, within the bounds.
    fn read(&self, id: &str) -> Result<ReportData, OrchestratorError> {
        let campaign = self.scheduler.snapshot(id)?;
        let mut runs = self.store.runs(id, None, None, MAX_RUNS + 1)?;
        let mut omitted = Vec::new();
        if runs.len() > MAX_RUNS {
            runs.truncate(MAX_RUNS);
            let total = campaign.runs.map_or(0, |c| c.total);
            omitted.push(format!(
                "This page shows the first {MAX_RUNS} of the campaign's {total} runs \
                 (the orchestrator's bound); `berth report` reads them all."
            ));
        }
        let runs: Vec<_> = runs
            .into_iter()
            .map(|run| results::with_derived(run, &campaign.work_metric))
            .collect();
        let mut series = Vec::new();
        for run in series_runs(&runs) {
            let mut samples =
                self.store
                    .power_series(&run.id, None, None, MAX_SERIES_SAMPLES + 1)?;
            if samples.len() > MAX_SERIES_SAMPLES {
                samples.truncate(MAX_SERIES_SAMPLES);
                omitted.push(format!(
                    "Run {}'s power series is cut to its first {MAX_SERIES_SAMPLES} samples.",
                    run.id
                ));
            }
            series.push((
                run.id.clone(),
                samples.into_iter().map(|(_, sample)| sample).collect(),
            ));
        }
        let mut data = ReportData::new(campaign, self.hosts.list(), runs, series);
        data.omitted = omitted;
        Ok(data)
    }
}
