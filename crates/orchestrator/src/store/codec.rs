//! How both stores write what is not a plain column: times as milliseconds
//! or nanoseconds, energy records as bytes, run counts read back per state,
//! and the words of a replica's transition. One encoding for both, so that
//! state moves between them as is (`store copy`).

use std::time::{SystemTime, UNIX_EPOCH};

use berth_proto::agent::v1::ExecAccounting;
use berth_proto::orchestrator::v1::{ReplicaState, RunCounts, RunEnergy, RunPowerSample, RunState};
use prost::Message;

use super::RunUpdate;
use super::deployments::ReplicaRecord;

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(super) fn timestamp(ms: Option<i64>) -> Option<prost_types::Timestamp> {
    ms.map(|ms| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

pub(super) fn timestamp_ms(ts: &Option<prost_types::Timestamp>) -> Option<i64> {
    ts.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// Seconds and nanoseconds (of a timestamp or a duration) as nanoseconds;
/// i64 holds them until the year 2262.
pub(super) fn to_nanos(seconds: i64, nanos: i32) -> i64 {
    seconds
        .saturating_mul(NANOS_PER_SECOND)
        .saturating_add(i64::from(nanos))
}

pub(super) fn from_nanos(total: i64) -> (i64, i32) {
    (
        total.div_euclid(NANOS_PER_SECOND),
        total.rem_euclid(NANOS_PER_SECOND) as i32,
    )
}

/// A power sample as stored: its times as nanoseconds.
pub(super) fn power_sample(
    device: String,
    time_ns: Option<i64>,
    elapsed_ns: Option<i64>,
    power_w: Option<f64>,
    energy_j: Option<f64>,
) -> RunPowerSample {
    RunPowerSample {
        device,
        time: time_ns.map(|ns| {
            let (seconds, nanos) = from_nanos(ns);
            prost_types::Timestamp { seconds, nanos }
        }),
        elapsed: elapsed_ns.map(|ns| {
            let (seconds, nanos) = from_nanos(ns);
            prost_types::Duration { seconds, nanos }
        }),
        power_w,
        energy_j,
    }
}

/// The method of the record that carries the cluster's own accounting of
/// the run (Run.cluster_accounting) in the energy column, after the
/// devices' records: written by the same transition as the run's result,
/// with no column of its own. Its device is the accounting id, its note the
/// one quality flag.
const CLUSTER_ACCOUNTING: &str = "cluster_accounting";

/// The energy column of `update`: its devices' records, then the cluster's
/// accounting, as length-delimited protobuf messages one after another;
/// None when it sets neither.
pub(super) fn encode_energy(update: &RunUpdate) -> Option<Vec<u8>> {
    if update.energy.is_none() && update.cluster_accounting.is_none() {
        return None;
    }
    let mut bytes = Vec::new();
    for record in update.energy.iter().flatten() {
        let _ = record.encode_length_delimited(&mut bytes);
    }
    if let Some(accounting) = &update.cluster_accounting {
        let record = RunEnergy {
            device: accounting.accounting_id.clone(),
            method: CLUSTER_ACCOUNTING.into(),
            energy_j: accounting.consumed_energy_j,
            quality_flags: (!accounting.note.is_empty())
                .then(|| accounting.note.clone())
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let _ = record.encode_length_delimited(&mut bytes);
    }
    Some(bytes)
}

/// The devices' energy records and the cluster's accounting, from the
/// energy column.
pub(super) fn decode_energy(mut bytes: &[u8]) -> (Vec<RunEnergy>, Option<ExecAccounting>) {
    let mut energy = Vec::new();
    let mut accounting = None;
    while !bytes.is_empty() {
        match RunEnergy::decode_length_delimited(&mut bytes) {
            Ok(record) if record.method == CLUSTER_ACCOUNTING => {
                accounting = Some(ExecAccounting {
                    accounting_id: record.device,
                    consumed_energy_j: record.energy_j,
                    note: record.quality_flags.into_iter().next().unwrap_or_default(),
                });
            }
            Ok(record) => energy.push(record),
            Err(_) => break,
        }
    }
    (energy, accounting)
}

/// Adds the `count` runs stored in `state` (as its number) to `counts`.
pub(super) fn count_state(counts: &mut RunCounts, state: i32, count: u64) {
    counts.total += count;
    match RunState::try_from(state).unwrap_or_default() {
        RunState::Pending => counts.pending = count,
        RunState::Dispatched => counts.dispatched = count,
        RunState::Running => counts.running = count,
        RunState::Succeeded => counts.succeeded = count,
        RunState::Failed => counts.failed = count,
        RunState::Cancelled => counts.cancelled = count,
        RunState::Unspecified => {}
    }
}

fn state_name(state: ReplicaState) -> &'static str {
    state.as_str_name().trim_start_matches("REPLICA_STATE_")
}

/// The transition recorded when a replica is written: `None` when its state
/// and reason are those it had (`before`, its state as a number and reason).
pub(super) fn replica_transition(
    before: Option<(i32, String)>,
    replica: &ReplicaRecord,
) -> Option<String> {
    let changed = before
        .is_none_or(|(state, reason)| state != replica.state as i32 || reason != replica.reason);
    if !changed {
        return None;
    }
    let host = if replica.host.is_empty() {
        String::new()
    } else {
        format!(" on `{}`", replica.host)
    };
    Some(format!(
        "replica {}{host}: {}: {}",
        replica.index,
        state_name(replica.state),
        replica.reason
    ))
}
