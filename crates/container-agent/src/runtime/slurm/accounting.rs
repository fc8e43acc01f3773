//! The cluster's own record of an exec, read with `sacct` (slurmdbd): the
//! energy SLURM's acct_gather_energy plugin counted for a job step or an
//! array task (`ConsumedEnergyRaw`, joules), kept beside berth's own
//! measurement of the same run. The record reaches slurmdbd a moment after
//! the step ends, so it is read again until it shows the step ended or the
//! caller's wait passes. A cluster without accounting, or without an energy
//! plugin, answers with a note saying so and no figure.

use std::time::{Duration, Instant};

use std::process::Stdio;

use berth_proto::agent::v1::ExecAccounting;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::exec::Clients;

/// How often sacct is asked again while the record is not there yet.
const REREAD_EVERY: Duration = Duration::from_millis(250);
/// How long one sacct call may take.
const SACCT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of sacct's output read (a job of 10,000 steps is ~1 MB).
const MAX_SACCT_BYTES: usize = 4 << 20;
/// The most of its error output read, for the note.
const MAX_SACCT_ERROR_BYTES: u64 = 4 << 10;

/// What an exec was to SLURM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accounted {
    /// A step named `name` in job `job_id` (runs in a long-running job).
    Step { job_id: u64, name: String },
    /// Task `task` of job array `job_id`.
    Task { job_id: u64, task: u32 },
}

impl Accounted {
    /// sacct's `-j` argument.
    fn job_arg(&self) -> String {
        match self {
            Self::Step { job_id, .. } => job_id.to_string(),
            Self::Task { job_id, task } => format!("{job_id}_{task}"),
        }
    }
}

/// What one read of sacct found.
#[derive(Debug, PartialEq)]
enum Found {
    /// The record, ended: its id and energy (None: no figure).
    Ended { id: String, energy_j: Option<f64> },
    /// Not there yet, or not ended yet (its state when listed).
    NotYet(Option<String>),
}

impl Clients {
    /// The accounting record of `what`, waiting up to `wait` for it to be
    /// in slurmdbd and ended.
    pub(super) async fn accounting(&self, what: &Accounted, wait: Duration) -> ExecAccounting {
        let deadline = Instant::now() + wait;
        loop {
            match self.sacct(what).await {
                Ok(Found::Ended { id, energy_j }) => {
                    let note = if energy_j.is_none() {
                        "no energy plugin counted it: sacct's ConsumedEnergy is 0 (AcctGatherEnergyType)"
                            .to_string()
                    } else {
                        String::new()
                    };
                    return ExecAccounting {
                        accounting_id: id,
                        consumed_energy_j: energy_j,
                        note,
                    };
                }
                Ok(Found::NotYet(state)) if Instant::now() < deadline => {
                    tracing::trace!(?what, ?state, "sacct: the record is not there yet");
                }
                Ok(Found::NotYet(state)) => {
                    let seen = state.map_or_else(
                        || "no record in slurmdbd".to_string(),
                        |state| format!("sacct still shows it {state}"),
                    );
                    return unrecorded(format!("{seen} after {wait:?}"));
                }
                Err(reason) => return unrecorded(reason),
            }
            tokio::time::sleep(REREAD_EVERY).await;
        }
    }

    /// One read of sacct for `what`: at most [`MAX_SACCT_BYTES`] of its
    /// output are read, however many steps the job has.
    async fn sacct(&self, what: &Accounted) -> Result<Found, String> {
        let program = self.sibling("sacct");
        let mut child = Command::new(&program)
            .args(["-n", "-P", "--noconvert", "-j", &what.job_arg()])
            .args(["-o", "JobID,JobName,State,ConsumedEnergyRaw"])
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("sacct ({}): {e}", program.display()))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err("sacct: no pipes to read".into());
        };
        let read = async {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (mut stdout, mut stderr) = (
                stdout.take(MAX_SACCT_BYTES as u64),
                stderr.take(MAX_SACCT_ERROR_BYTES),
            );
            let (read_out, read_err) =
                tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err),);
            read_out.and(read_err)?;
            // Past the cap, the rest is not waited for.
            if out.len() >= MAX_SACCT_BYTES {
                let _ = child.start_kill();
            }
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out, err))
        };
        let (status, out, err) = tokio::time::timeout(SACCT_TIMEOUT, read)
            .await
            .map_err(|_| format!("sacct did not answer in {SACCT_TIMEOUT:?}"))?
            .map_err(|e| format!("sacct: {e}"))?;
        if !status.success() && out.len() < MAX_SACCT_BYTES {
            return Err(format!("sacct: {}", String::from_utf8_lossy(&err).trim()));
        }
        Ok(find(what, &String::from_utf8_lossy(&out)))
    }
}

fn unrecorded(note: String) -> ExecAccounting {
    ExecAccounting {
        accounting_id: String::new(),
        consumed_energy_j: None,
        note,
    }
}

/// The record of `what` in sacct's `JobID|JobName|State|ConsumedEnergyRaw`
/// output: a step's line, found by its name; an array task's own line,
/// whose energy is its batch step's where slurmdbd leaves the task's
/// empty (the task's command runs in the batch script, not in a step).
fn find(what: &Accounted, listed: &str) -> Found {
    let mut seen = None;
    let mut ended = None;
    let mut batch_energy = None;
    for line in listed.lines() {
        let mut fields = line.split('|');
        let (Some(id), Some(name), Some(state), Some(energy)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let energy_j = joules(energy);
        let own = match what {
            Accounted::Step { job_id, name: step } => {
                name == step && id.strip_prefix(&format!("{job_id}.")).is_some()
            }
            Accounted::Task { .. } => {
                if id.strip_suffix(".batch") == Some(&what.job_arg()) {
                    batch_energy = energy_j;
                }
                id == what.job_arg()
            }
        };
        if !own {
            continue;
        }
        // "CANCELLED by 0": the state is the first word.
        let state = state.split_whitespace().next().unwrap_or_default();
        if still_going(state) {
            seen = Some(state.to_string());
        } else {
            ended = Some((id.to_string(), energy_j));
        }
    }
    match ended {
        Some((id, energy_j)) => Found::Ended {
            id,
            energy_j: energy_j.or(batch_energy),
        },
        None => Found::NotYet(seen),
    }
}

/// sacct's ConsumedEnergyRaw in joules; 0 or empty (no energy plugin) is
/// no figure.
fn joules(field: &str) -> Option<f64> {
    field
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|joules| *joules > 0)
        .map(|joules| joules as f64)
}

/// A state whose energy is not final yet.
fn still_going(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "COMPLETING"
            | "REQUEUED"
            | "RESIZING"
            | "SUSPENDED"
            | "CONFIGURING"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: &str = "berth-exec-c_1-0123456789abcdef";

    fn step() -> Accounted {
        Accounted::Step {
            job_id: 12,
            name: STEP.into(),
        }
    }

    #[test]
    fn a_step_is_found_by_its_name_once_it_ended() {
        let listed = format!(
            "12|alloc|RUNNING|\n12.batch|batch|RUNNING|\n12.0|other|COMPLETED|40\n12.1|{STEP}|COMPLETED|153\n"
        );
        assert_eq!(
            find(&step(), &listed),
            Found::Ended {
                id: "12.1".into(),
                energy_j: Some(153.0)
            }
        );
        let running = format!("12|alloc|RUNNING|\n12.1|{STEP}|RUNNING|\n");
        assert_eq!(
            find(&step(), &running),
            Found::NotYet(Some("RUNNING".into()))
        );
        assert_eq!(find(&step(), "12|alloc|RUNNING|\n"), Found::NotYet(None));
    }

    #[test]
    fn zero_or_empty_energy_is_no_figure() {
        for energy in ["0", "", "n/a"] {
            let listed = format!("12.1|{STEP}|CANCELLED by 0|{energy}\n");
            assert_eq!(
                find(&step(), &listed),
                Found::Ended {
                    id: "12.1".into(),
                    energy_j: None
                },
                "{energy:?}"
            );
        }
    }

    #[test]
    fn an_array_task_is_its_own_line_or_else_its_batch_step() {
        let task = Accounted::Task {
            job_id: 40,
            task: 7,
        };
        let listed =
            "40_7|arr|TIMEOUT|210\n40_7.batch|batch|CANCELLED|209\n40_70|arr|COMPLETED|1\n";
        assert_eq!(
            find(&task, listed),
            Found::Ended {
                id: "40_7".into(),
                energy_j: Some(210.0)
            }
        );
        // slurmdbd leaves the task's own figure empty: its batch step's.
        let listed = "40_7|arr|COMPLETED|\n40_7.batch|batch|COMPLETED|199\n40_7.extern|extern|COMPLETED|230\n";
        assert_eq!(
            find(&task, listed),
            Found::Ended {
                id: "40_7".into(),
                energy_j: Some(199.0)
            }
        );
        assert_eq!(
            find(&task, "40_7|arr|RUNNING|\n40_7.batch|batch|RUNNING|\n"),
            Found::NotYet(Some("RUNNING".into()))
        );
    }

    #[test]
    fn garbage_finds_nothing() {
        for listed in ["", "|||", "12.1", "\u{0}|\u{0}", &"x|".repeat(10_000)] {
            assert_eq!(find(&step(), listed), Found::NotYet(None));
        }
    }
}
