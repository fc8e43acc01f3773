//! `berth report <campaign>`: the page berth_report renders, from what the
//! orchestrator's gRPC API says (GetCampaign, ListRuns, ListHosts,
//! GetRunPowerSeries): the report sees a campaign as any client does.

use berth_proto::orchestrator::v1::ListHostsRequest;
use berth_report::compare::compare;
use berth_report::metrics::Groups;
use berth_report::{ReportData, series_runs};

use crate::compare::groups;
use crate::{CliError, Client};

/// Reads the campaign, its runs, its hosts and the chosen power series;
/// with `against`, that campaign's runs too, to compare with.
pub async fn fetch(
    client: &mut Client,
    id: &str,
    against: Option<&str>,
) -> Result<ReportData, CliError> {
    let campaign = crate::get_campaign(client, id).await?;
    let runs = crate::export::fetch_runs(client, id).await?;
    let hosts = client
        .list_hosts(ListHostsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .hosts;
    let mut series = Vec::new();
    for run in series_runs(&runs) {
        let samples = crate::series::fetch_series(client, &run.id, "").await?;
        series.push((run.id.clone(), samples));
    }
    let mut data = ReportData::new(campaign, hosts, runs, series);
    if let Some(a) = against {
        let mine = Groups::of(&data.runs, &data.campaign.work_metric);
        data.against = Some((a.to_string(), compare(&groups(client, a).await?, &mine)));
    }
    Ok(data)
}
