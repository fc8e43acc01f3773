//! Job arrays: a workload whose spec lists `slurm.array_tasks` is one
//! `sbatch --array` job, a task per run, so that a sweep of many runs costs
//! the scheduler one submission. Each task runs its own command from a
//! `case` on `$SLURM_ARRAY_TASK_ID` and writes its stdout, stderr and exit
//! code to the directory a keyed exec of the same key would have
//! (`<exec root>/<job id>/<key hash>/`, made by the agent at create with the
//! key and the task's index beside them), so Exec or AttachExec by the
//! task's key follows it exactly as it follows a detached step, before,
//! while and after it runs, from this agent or a restarted one.
//!
//! slurmrestd lists an array as records: one per task that has started
//! (its own job id, `array_task_id`), and one for the tasks still pending
//! (`array_task_string`, e.g. `2-9%4`); [`ArrayTasks`] merges them.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use berth_proto::common::v1::{SlurmArrayTask, WorkloadSpec};

use super::detached::key_hash;
use crate::error::AgentError;

/// Most tasks of one array: SLURM's default `MaxArraySize` (1001) allows
/// indexes 0 to 1000; a cluster set lower refuses the submission, which is
/// then named.
pub const MAX_TASKS: usize = 1000;
/// Largest batch script: SLURM's default `max_script_size` (4 MB).
const MAX_SCRIPT_BYTES: usize = 4_000_000;
/// Longest exec key of a task.
const MAX_KEY_BYTES: usize = 256;

/// The index file beside a task's key: it tells a task's directory from a
/// detached step's.
pub const TASK_FILE: &str = "task";

/// Checks the spec's array: sizes bounded (the script's computed before it
/// is built), keys unique, commands given, env names a shell can export.
pub fn validate(spec: &WorkloadSpec, tasks: &[SlurmArrayTask]) -> Result<(), AgentError> {
    let invalid =
        |field: &'static str, reason: String| AgentError::InvalidArgument { field, reason };
    if tasks.is_empty() {
        return Ok(());
    }
    if !spec.command.is_empty() {
        return Err(invalid(
            "spec.command",
            "a job array runs the commands of its tasks: leave the spec's command empty".into(),
        ));
    }
    if tasks.len() > MAX_TASKS {
        return Err(invalid(
            "spec.slurm.array_tasks",
            format!("{} tasks are more than {MAX_TASKS}", tasks.len()),
        ));
    }
    let mut keys = HashSet::new();
    let mut script_bytes = 0usize;
    for (index, task) in tasks.iter().enumerate() {
        if task.exec_key.is_empty()
            || task.exec_key.len() > MAX_KEY_BYTES
            || task.exec_key.chars().any(char::is_control)
        {
            return Err(invalid(
                "spec.slurm.array_tasks.exec_key",
                format!(
                    "task {index}: 1 to {MAX_KEY_BYTES} bytes with no control characters, not `{}`",
                    task.exec_key.escape_debug()
                ),
            ));
        }
        if !keys.insert(task.exec_key.as_str()) {
            return Err(invalid(
                "spec.slurm.array_tasks.exec_key",
                format!("task {index}: `{}` is another task's key", task.exec_key),
            ));
        }
        if task.command.is_empty() {
            return Err(invalid(
                "spec.slurm.array_tasks.command",
                format!("task {index} (`{}`) has no command", task.exec_key),
            ));
        }
        if let Some(var) = task.env.iter().find(|var| !exportable(&var.name)) {
            return Err(invalid(
                "spec.slurm.array_tasks.env",
                format!(
                    "task {index}: `{}` is not a variable name a shell can export",
                    var.name.escape_debug()
                ),
            ));
        }
        // Quoting at most quadruples a byte (' → '\''); 64 per task for
        // the case line and directory.
        let text: usize = task.command.iter().map(String::len).sum::<usize>()
            + task
                .env
                .iter()
                .map(|v| v.name.len() + v.value.len())
                .sum::<usize>()
            + task.working_dir.len();
        script_bytes = script_bytes.saturating_add(text.saturating_mul(4) + 64);
        if script_bytes > MAX_SCRIPT_BYTES {
            return Err(invalid(
                "spec.slurm.array_tasks",
                format!(
                    "the tasks up to {index} make a batch script of more than SLURM's max_script_size ({MAX_SCRIPT_BYTES} bytes)"
                ),
            ));
        }
    }
    Ok(())
}

fn exportable(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `sbatch --array`'s value: every task, at most `parallelism` at once.
pub fn array_option(tasks: usize, parallelism: u32) -> String {
    let last = tasks.saturating_sub(1);
    if parallelism > 0 {
        format!("0-{last}%{parallelism}")
    } else {
        format!("0-{last}")
    }
}

/// The array's batch script: the task's command from a `case` on its index,
/// its output and exit code written where the agent follows them.
pub fn script(tasks: &[SlurmArrayTask], exec_root: &Path) -> String {
    let mut script = format!(
        "#!/bin/sh\n# berth: a job array, a run per task; each writes its output and exit code\n# where the agent follows it by the run's exec key\nroot={}/\"$SLURM_ARRAY_JOB_ID\"\ncase \"$SLURM_ARRAY_TASK_ID\" in\n",
        quote(&exec_root.display().to_string())
    );
    for (index, task) in tasks.iter().enumerate() {
        let mut line = format!("{index}) d=\"$root/{}\"", key_hash(&task.exec_key));
        if !task.working_dir.is_empty() {
            line.push_str(&format!(" && cd {}", quote(&task.working_dir)));
        }
        for var in &task.env {
            line.push_str(&format!(
                " && export {}",
                quote(&format!("{}={}", var.name, var.value))
            ));
        }
        let argv: Vec<String> = task.command.iter().map(|arg| quote(arg)).collect();
        line.push_str(&format!(" && set -- {} ;;\n", argv.join(" ")));
        script.push_str(&line);
    }
    script.push_str(
        "*) echo \"berth: the array has no task $SLURM_ARRAY_TASK_ID\" >&2; exit 1 ;;\nesac || exit 1\n\
         \"$@\" >\"$d/out\" 2>\"$d/err\"; echo $? >\"$d/exit.tmp\"; mv \"$d/exit.tmp\" \"$d/exit\"\n",
    );
    script
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Makes each task's directory under `<exec_root>/<job_id>/`, with its key
/// and index, before the array is released: an exec by a task's key finds
/// it from then on, whether the task has run or not.
pub fn make_task_dirs(
    exec_root: &Path,
    job_id: u64,
    tasks: &[SlurmArrayTask],
) -> std::io::Result<()> {
    let job_dir = exec_root.join(job_id.to_string());
    for (index, task) in tasks.iter().enumerate() {
        let dir = job_dir.join(key_hash(&task.exec_key));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(TASK_FILE), index.to_string())?;
        std::fs::write(dir.join("key"), &task.exec_key)?;
    }
    Ok(())
}

/// A job array's tasks as slurmrestd's records of it say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArrayTasks {
    /// Task index → its record's state, for each task that has started.
    pub started: BTreeMap<u32, String>,
    /// The state of the tasks not started yet (the array's own record),
    /// when there are any.
    pub rest: Option<String>,
}

impl ArrayTasks {
    /// How many tasks are in each state, for people: `3 COMPLETED, 1
    /// RUNNING, the rest PENDING`.
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for state in self.started.values() {
            *counts.entry(state.as_str()).or_default() += 1;
        }
        let mut parts: Vec<String> = counts
            .into_iter()
            .map(|(state, count)| format!("{count} {state}"))
            .collect();
        if let Some(rest) = &self.rest {
            parts.push(format!("the rest {rest}"));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use berth_proto::common::v1::EnvVar;

    use super::*;

    fn task(key: &str, command: &[&str]) -> SlurmArrayTask {
        SlurmArrayTask {
            exec_key: key.into(),
            command: command.iter().map(|s| (*s).to_string()).collect(),
            env: vec![EnvVar {
                name: "N".into(),
                value: "it's".into(),
            }],
            working_dir: String::new(),
        }
    }

    #[test]
    fn the_script_runs_each_task_s_command_and_keeps_its_exit() {
        let tasks = [
            task("r1/attempt-1", &["echo", "a b"]),
            task("r2/attempt-1", &["true"]),
        ];
        let script = script(&tasks, Path::new("/shared/.berth/exec"));
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("root='/shared/.berth/exec'/\"$SLURM_ARRAY_JOB_ID\""));
        let hash = key_hash("r1/attempt-1");
        assert!(
            script.contains(&format!(
                "0) d=\"$root/{hash}\" && export 'N=it'\\''s' && set -- 'echo' 'a b' ;;"
            )),
            "{script}"
        );
        assert!(script.contains("1) d="), "{script}");
        assert!(script.contains("echo $? >\"$d/exit.tmp\""));
        // The script is valid shell.
        let checked = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .status()
            .unwrap();
        assert!(checked.success(), "{script}");
        assert_eq!(array_option(2, 0), "0-1");
        assert_eq!(array_option(1000, 8), "0-999%8");
    }

    #[test]
    fn a_task_runs_from_the_script_as_slurm_would_start_it() {
        let root = tempfile::tempdir().unwrap();
        let tasks = [
            task(
                "r1/attempt-1",
                &["sh", "-c", "echo \"$N\"; echo err >&2; exit 3"],
            ),
            task("r2/attempt-1", &["true"]),
        ];
        make_task_dirs(root.path(), 42, &tasks).unwrap();
        let script = script(&tasks, root.path());
        let status = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("SLURM_ARRAY_JOB_ID", "42")
            .env("SLURM_ARRAY_TASK_ID", "0")
            .status()
            .unwrap();
        assert!(status.success());
        let dir = root.path().join("42").join(key_hash("r1/attempt-1"));
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(read("out"), "it's\n");
        assert_eq!(read("err"), "err\n");
        assert_eq!(read("exit"), "3\n");
        assert_eq!(read("key"), "r1/attempt-1");
        assert_eq!(read(TASK_FILE), "0");
        let unknown = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("SLURM_ARRAY_JOB_ID", "42")
            .env("SLURM_ARRAY_TASK_ID", "7")
            .status()
            .unwrap();
        assert!(!unknown.success(), "a task the array does not have fails");
    }

    #[test]
    fn bad_arrays_are_refused_naming_the_field() {
        let spec = WorkloadSpec::default();
        let refused = |tasks: &[SlurmArrayTask], spec: &WorkloadSpec| match validate(spec, tasks)
            .unwrap_err()
        {
            AgentError::InvalidArgument { field, reason } => format!("{field}: {reason}"),
            other => panic!("{other:?}"),
        };
        let with_command = WorkloadSpec {
            command: vec!["x".into()],
            ..Default::default()
        };
        assert!(refused(&[task("k", &["x"])], &with_command).starts_with("spec.command"));
        let twice = [task("k", &["x"]), task("k", &["y"])];
        assert!(refused(&twice, &spec).contains("another task's key"));
        assert!(refused(&[task("k", &[])], &spec).contains("has no command"));
        let mut bad_env = task("k", &["x"]);
        bad_env.env[0].name = "A B".into();
        assert!(refused(&[bad_env], &spec).starts_with("spec.slurm.array_tasks.env"));
        let many: Vec<SlurmArrayTask> = (0..=MAX_TASKS)
            .map(|i| task(&format!("k{i}"), &["x"]))
            .collect();
        assert!(refused(&many, &spec).contains("more than 1000"));
        let huge = [task("k", &[&"x".repeat(MAX_SCRIPT_BYTES)])];
        assert!(refused(&huge, &spec).contains("max_script_size"));
        assert!(validate(&spec, &[task("k", &["x"])]).is_ok());
    }

    #[test]
    fn the_summary_counts_tasks_by_state() {
        let tasks = ArrayTasks {
            started: BTreeMap::from([
                (0, "COMPLETED".to_string()),
                (1, "COMPLETED".to_string()),
                (2, "RUNNING".to_string()),
            ]),
            rest: Some("PENDING".into()),
        };
        assert_eq!(tasks.summary(), "2 COMPLETED, 1 RUNNING, the rest PENDING");
    }
}
