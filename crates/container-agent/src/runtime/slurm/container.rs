//! Images on a cluster: a slurm workload with an `image` runs its command
//! (a job's, each step's, each array task's) wrapped in the container
//! runtime the site has on its nodes, as HPC sites run containers:
//! `apptainer exec` (or `singularity exec`), or `podman run --rm`. Which one
//! is the agent's `slurm.container_runtime`; `off` (the default) refuses an
//! image, since nothing says what the nodes can run it with. The job's own
//! environment reaches the command (Apptainer passes it through; podman is
//! told each variable's name), binds are the spec's mounts, GPUs the
//! runtime's own switch.

use berth_proto::common::v1::WorkloadSpec;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

/// Longest image reference.
const MAX_IMAGE_BYTES: usize = 1024;

/// The program the nodes run images with.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContainerRuntime {
    /// Images are refused.
    #[default]
    Off,
    Apptainer,
    Singularity,
    Podman,
}

impl ContainerRuntime {
    fn program(self) -> &'static str {
        match self {
            Self::Off => "",
            Self::Apptainer => "apptainer",
            Self::Singularity => "singularity",
            Self::Podman => "podman",
        }
    }

    /// Checks the spec's image and mounts against what this runtime can do.
    pub fn validate(self, spec: &WorkloadSpec) -> Result<(), AgentError> {
        let invalid =
            |field: &'static str, reason: String| AgentError::InvalidArgument { field, reason };
        if spec.image.is_empty() {
            if !spec.mounts.is_empty() {
                return Err(invalid(
                    "spec.mounts",
                    "a job sees the nodes' files as they are: binds are for a job run in an image"
                        .into(),
                ));
            }
            return Ok(());
        }
        if self == Self::Off {
            return Err(AgentError::Unsupported {
                field: "spec.image",
                reason: "this agent's slurm.container_runtime is off: set it to the program the nodes run images with (apptainer, singularity or podman)".into(),
            });
        }
        if spec.image.len() > MAX_IMAGE_BYTES || spec.image.chars().any(char::is_control) {
            return Err(invalid(
                "spec.image",
                format!("at most {MAX_IMAGE_BYTES} bytes with no control characters"),
            ));
        }
        for mount in &spec.mounts {
            if mount.volume {
                return Err(invalid(
                    "spec.mounts.volume",
                    format!(
                        "`{}` is a named volume: a cluster's jobs bind the nodes' paths",
                        mount.source
                    ),
                ));
            }
            let plain = |path: &str| {
                path.starts_with('/') && !path.contains(':') && !path.chars().any(char::is_control)
            };
            if !plain(&mount.source) || !plain(&mount.target) {
                return Err(invalid(
                    "spec.mounts",
                    format!(
                        "`{}` → `{}`: absolute paths without `:` or control characters",
                        mount.source, mount.target
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `command` as run in the spec's image (as it is without one): with
    /// the spec's binds and GPUs, and for podman the names of the variables
    /// the job's environment gives it (`env_names`).
    pub fn wrap<'a>(
        self,
        spec: &WorkloadSpec,
        command: &[String],
        env_names: impl IntoIterator<Item = &'a str>,
    ) -> Vec<String> {
        if spec.image.is_empty() || self == Self::Off {
            return command.to_vec();
        }
        let gpus = spec.gpus.as_ref().is_some_and(|g| g.count != 0)
            || spec.slurm.as_ref().is_some_and(|s| s.gres.contains("gpu"));
        let binds = spec.mounts.iter().map(|m| {
            let mode = if m.read_only { ":ro" } else { "" };
            format!("{}:{}{mode}", m.source, m.target)
        });
        let mut argv = vec![self.program().to_string()];
        match self {
            Self::Off => {}
            Self::Apptainer | Self::Singularity => {
                argv.push("exec".into());
                if gpus {
                    argv.push("--nv".into());
                }
                for bind in binds {
                    argv.extend(["--bind".into(), bind]);
                }
            }
            Self::Podman => {
                // The job's network and the node's devices, as a job has.
                argv.extend(["run", "--rm", "--network=host"].map(String::from));
                for bind in binds {
                    argv.extend(["-v".into(), bind]);
                }
                for name in env_names {
                    argv.extend(["-e".into(), name.to_string()]);
                }
                if gpus {
                    argv.extend(["--device".into(), "nvidia.com/gpu=all".into()]);
                }
            }
        }
        argv.push(spec.image.clone());
        argv.extend(command.iter().cloned());
        argv
    }
}

#[cfg(test)]
mod tests {
    use berth_proto::common::v1::{GpuRequest, Mount};

    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            image: "/images/vllm.sif".into(),
            mounts: vec![Mount {
                source: "/scratch/models".into(),
                target: "/models".into(),
                read_only: true,
                volume: false,
            }],
            gpus: Some(GpuRequest {
                count: 1,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_command_is_wrapped_in_the_site_s_runtime() {
        let command = ["python3".to_string(), "-m".into(), "x".into()];
        assert_eq!(
            ContainerRuntime::Apptainer.wrap(&spec(), &command, ["HOME"]),
            [
                "apptainer",
                "exec",
                "--nv",
                "--bind",
                "/scratch/models:/models:ro",
                "/images/vllm.sif",
                "python3",
                "-m",
                "x"
            ]
        );
        assert_eq!(
            ContainerRuntime::Podman.wrap(&spec(), &command, ["A", "B"]),
            [
                "podman",
                "run",
                "--rm",
                "--network=host",
                "-v",
                "/scratch/models:/models:ro",
                "-e",
                "A",
                "-e",
                "B",
                "--device",
                "nvidia.com/gpu=all",
                "/images/vllm.sif",
                "python3",
                "-m",
                "x"
            ]
        );
        let plain = WorkloadSpec::default();
        assert_eq!(ContainerRuntime::Podman.wrap(&plain, &command, []), command);
    }

    #[test]
    fn what_a_runtime_cannot_run_is_named() {
        let field = |runtime: ContainerRuntime, spec: &WorkloadSpec| match runtime
            .validate(spec)
            .unwrap_err()
        {
            AgentError::InvalidArgument { field, .. } | AgentError::Unsupported { field, .. } => {
                field
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(field(ContainerRuntime::Off, &spec()), "spec.image");
        let mut volume = spec();
        volume.mounts[0].volume = true;
        assert_eq!(
            field(ContainerRuntime::Podman, &volume),
            "spec.mounts.volume"
        );
        let mut colon = spec();
        colon.mounts[0].target = "/a:b".into();
        assert_eq!(field(ContainerRuntime::Apptainer, &colon), "spec.mounts");
        let mut no_image = spec();
        no_image.image.clear();
        assert_eq!(field(ContainerRuntime::Apptainer, &no_image), "spec.mounts");
        assert!(ContainerRuntime::Apptainer.validate(&spec()).is_ok());
    }
}
