//! The harness of the agent's container tests (tests/agent_containers.rs):
//! an agent of the test's own owner on the engine under test (docker, or
//! podman with `BERTH_TEST_ENGINE=podman`), with busybox imported, and the
//! calls the tests make through it and around it (the engine's own API, as
//! an operator's curl sees it). Dropping an [`Agent`] removes every container
//! of its owner, so a failed test leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::*;
use berth_proto::common::v1::{Runtime, WorkloadSpec};
use berth_server::client::AuthChannel;

use crate::{Part, Process, busybox_rootfs, free_port, require, target_tmpdir, wait_for};

pub type Client = ContainerAgentClient<AuthChannel>;
/// GPUs every agent of these tests declares (`agent.declared_gpus`), which
/// `Info` reports in place of what NVML finds.
pub const DECLARED_GPUS: &str = r#"[{index = 0, uuid = "GPU-berth-test-0", name = "Declared GPU", memory_bytes = 85899345920}]"#;
/// One way to break a spec, for the bad-input cases.
pub type SpecChange = Box<dyn Fn(&mut WorkloadSpec)>;

pub struct Engine {
    pub runtime: Runtime,
    pub socket: PathBuf,
}

/// The engine under test (docker, or podman with BERTH_TEST_ENGINE=podman),
/// or None: the test skips, or fails on CI.
pub fn engine() -> Option<Engine> {
    let podman = std::env::var("BERTH_TEST_ENGINE").is_ok_and(|e| e == "podman");
    let socket = std::env::var("BERTH_TEST_ENGINE_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/run/docker.sock"));
    let found = if socket.exists() {
        Ok(())
    } else {
        Err(format!(
            "no engine socket at {} (set BERTH_TEST_ENGINE_SOCKET)",
            socket.display()
        ))
    };
    require(if podman { Part::Podman } else { Part::Docker }, found)?;
    Some(Engine {
        runtime: if podman {
            Runtime::Podman
        } else {
            Runtime::Docker
        },
        socket,
    })
}

pub struct Agent {
    pub client: Client,
    pub process: Option<Process>,
    pub owner: String,
    pub image: String,
    pub engine: Engine,
    pub dir: tempfile::TempDir,
    /// Settings beyond the usual ones, for every life of the agent.
    pub settings: Vec<(&'static str, String)>,
}

impl Agent {
    /// An agent of its own owner on the engine, with busybox imported.
    pub async fn start(test: &str) -> Option<Self> {
        Self::start_with(test, Vec::new()).await
    }

    /// Same, with extra `BERTH_…` settings.
    pub async fn start_with(test: &str, settings: Vec<(&'static str, String)>) -> Option<Self> {
        let engine = engine()?;
        let tar = busybox_rootfs(&target_tmpdir().join("images"))?;
        let owner = format!("t{}-{}", std::process::id(), test.replace('_', "-"));
        let dir = tempfile::tempdir().unwrap();
        let (process, client) =
            spawn_agent(&dir, &engine, &engine.socket, &owner, "adopt", &settings).await;
        let mut agent = Self {
            client,
            process: Some(process),
            image: format!("berth-test-{owner}:bb"),
            owner,
            engine,
            dir,
            settings,
        };
        // A layer of its own, so that its image id is its own: tests that
        // import the same rootfs share an id, and podman's forced removal of
        // one test's image by id takes every test's name with it.
        let own = agent.dir.path().join("rootfs.tar");
        std::fs::copy(&tar, &own).expect("copy of the rootfs");
        std::fs::write(agent.dir.path().join("berth-test-owner"), &agent.owner)
            .expect("the owner file");
        let appended = Command::new("tar")
            .arg("-rf")
            .arg(&own)
            .arg("-C")
            .arg(agent.dir.path())
            .arg("berth-test-owner")
            .status()
            .expect("tar");
        assert!(appended.success(), "tar -rf failed");
        agent.import(&own, false).await;
        Some(agent)
    }

    /// A new life of the agent (after a kill), on `socket`.
    pub async fn spawn(&mut self, socket: &Path, leftovers: &str) {
        let (process, client) = spawn_agent(
            &self.dir,
            &self.engine,
            socket,
            &self.owner,
            leftovers,
            &self.settings,
        )
        .await;
        self.process = Some(process);
        self.client = client;
    }

    /// Imports a busybox rootfs tar, or a `docker save` archive, as the
    /// test's image.
    pub async fn import(&mut self, tar: &Path, saved_archive: bool) {
        let data = std::fs::read(tar).unwrap();
        let mut chunks = vec![ImportImageChunk {
            chunk: Some(import_image_chunk::Chunk::Metadata(ImportImageMetadata {
                reference: self.image.clone(),
                runtime: self.engine.runtime as i32,
                saved_archive,
                command: if saved_archive {
                    Vec::new()
                } else {
                    vec!["/bin/sh".into()]
                },
            })),
        }];
        chunks.extend(data.chunks(256 * 1024).map(|c| ImportImageChunk {
            chunk: Some(import_image_chunk::Chunk::Data(c.to_vec())),
        }));
        let image = self
            .client
            .import_image(tokio_stream::iter(chunks))
            .await
            .expect("import busybox")
            .into_inner();
        assert!(
            image.references.iter().any(|r| r.ends_with(&self.image)),
            "{image:?}"
        );
    }

    pub async fn assert_image_listed(&mut self) {
        let images = self
            .client
            .list_images(ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            images
                .images
                .iter()
                .any(|i| i.references.iter().any(|r| r.ends_with(&self.image))),
            "{images:?}"
        );
    }

    pub fn spec(&self, command: &[&str]) -> WorkloadSpec {
        WorkloadSpec {
            runtime: self.engine.runtime as i32,
            image: self.image.clone(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.owner)
    }

    pub async fn create(
        &mut self,
        suffix: &str,
        spec: WorkloadSpec,
    ) -> Result<Workload, tonic::Status> {
        let name = self.name(suffix);
        self.client
            .create_workload(CreateWorkloadRequest {
                name,
                spec: Some(spec),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn run(&mut self, suffix: &str, spec: WorkloadSpec) -> Workload {
        let created = self.create(suffix, spec).await.expect("create");
        self.client
            .start_workload(WorkloadRef { id: created.id })
            .await
            .expect("start")
            .into_inner()
    }

    pub async fn inspect(&mut self, id: &str) -> Workload {
        self.client
            .inspect_workload(WorkloadRef { id: id.into() })
            .await
            .expect("inspect")
            .into_inner()
    }

    pub async fn exec(
        &mut self,
        id: &str,
        command: &[&str],
        timeout: Option<Duration>,
    ) -> Result<(Vec<u8>, Vec<u8>, ExitStatus), tonic::Status> {
        let stream = self
            .client
            .exec(ExecRequest {
                workload_id: id.into(),
                command: command.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.map(|t| t.try_into().unwrap()),
                ..Default::default()
            })
            .await?
            .into_inner();
        collect_exec(stream).await
    }

    /// The output stream of `command` exec'd in workload `id`, as it comes.
    pub async fn exec_stream(
        &mut self,
        id: &str,
        command: &[&str],
    ) -> tonic::Streaming<ExecOutput> {
        self.client
            .exec(ExecRequest {
                workload_id: id.into(),
                command: command.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until no process in workload `id` has `pattern` in its command line.
    pub async fn wait_gone(&mut self, id: &str, pattern: &str, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (out, _, _) = self.exec(id, &["ps", "-o", "args"], None).await.unwrap();
            let ps = String::from_utf8_lossy(&out).to_string();
            if !ps.contains(pattern) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "exec'd processes survived {why}:\n{ps}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Events of `id` until `want` returns true for one (or the time runs out).
    pub async fn wait_event(
        events: &mut tonic::Streaming<WorkloadEvent>,
        limit: Duration,
        want: impl Fn(&WorkloadEvent) -> bool,
    ) -> WorkloadEvent {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, events.message()).await {
                Ok(Ok(Some(event))) if want(&event) => return event,
                Ok(Ok(Some(_))) => continue,
                other => panic!("wanted event never came: {other:?}"),
            }
        }
    }

    pub async fn events(&mut self, id: &str) -> tonic::Streaming<WorkloadEvent> {
        self.client
            .events(EventsRequest {
                workload_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// The engine's own JSON about a container (as an operator's curl would see it).
    pub fn engine_get(&self, path: &str) -> (u16, String) {
        let output = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&self.engine.socket)
            .arg(format!("http://engine/v1.41{path}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn engine_post(&self, path: &str, body: &str) -> String {
        let output = Command::new("curl")
            .args([
                "-s",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
                "--unix-socket",
            ])
            .arg(&self.engine.socket)
            .arg(format!("http://engine/v1.41{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&output.stdout).to_string()
    }

    pub fn engine_delete(&self, path: &str) {
        let _ = Command::new("curl")
            .args(["-s", "-X", "DELETE", "--unix-socket"])
            .arg(&self.engine.socket)
            .arg(format!("http://engine/v1.41{path}"))
            .output();
    }

    /// Removes what the test made: its workloads, then its image.
    pub async fn cleanup(mut self) {
        let listed = self
            .client
            .list_workloads(ListWorkloadsRequest::default())
            .await
            .unwrap()
            .into_inner();
        for workload in listed.workloads {
            let _ = self
                .client
                .remove_workload(RemoveWorkloadRequest {
                    id: workload.id,
                    force: true,
                })
                .await;
        }
        let removed = self
            .client
            .remove_image(RemoveImageRequest {
                image: self.image.clone(),
                runtime: self.engine.runtime as i32,
            })
            .await;
        assert!(removed.is_ok(), "{removed:?}");
    }
}

impl Drop for Agent {
    /// A failed test still leaves no containers behind.
    fn drop(&mut self) {
        let filter = format!(r#"{{"label":["berth.owner={}"]}}"#, self.owner);
        let output = Command::new("curl")
            .args([
                "-s",
                "-G",
                "--data-urlencode",
                &format!("filters={filter}"),
                "--data",
                "all=1",
                "--unix-socket",
            ])
            .arg(&self.engine.socket)
            .arg("http://engine/v1.41/containers/json")
            .output();
        let listed = output
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        for part in listed.split("\"Id\":\"").skip(1) {
            if let Some(id) = part.split('"').next() {
                self.engine_delete(&format!("/containers/{id}?force=1"));
            }
        }
    }
}

/// stdout, stderr and the exit status of an exec's whole stream.
pub async fn collect_exec(
    mut stream: tonic::Streaming<ExecOutput>,
) -> Result<(Vec<u8>, Vec<u8>, ExitStatus), tonic::Status> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(message) = stream.message().await? {
        match message.output.unwrap() {
            exec_output::Output::Stdout(d) => out.extend(d),
            exec_output::Output::Stderr(d) => err.extend(d),
            exec_output::Output::Exit(exit) => return Ok((out, err, exit)),
            exec_output::Output::DroppedBytes(n) => panic!("{n} output bytes dropped"),
        }
    }
    panic!("exec stream ended without an exit status");
}

pub async fn spawn_agent(
    dir: &tempfile::TempDir,
    engine: &Engine,
    socket: &Path,
    owner: &str,
    leftovers: &str,
    settings: &[(&'static str, String)],
) -> (Process, Client) {
    let listen = format!("unix://{}", dir.path().join("agent.sock").display());
    let http = format!("127.0.0.1:{}", free_port());
    let (docker, podman) = match engine.runtime {
        Runtime::Podman => ("off".to_string(), socket.display().to_string()),
        _ => (socket.display().to_string(), "off".to_string()),
    };
    let state = dir.path().join("state").display().to_string();
    let mut env = vec![
        ("BERTH_SERVER__LISTEN", listen.as_str()),
        ("BERTH_SERVER__HTTP_LISTEN", &http),
        ("BERTH_ENGINES__DOCKER", &docker),
        ("BERTH_ENGINES__PODMAN", &podman),
        ("BERTH_ENGINES__OWNER", owner),
        ("BERTH_ENGINES__LEFTOVERS", leftovers),
        ("BERTH_ENGINES__STATE_DIR", &state),
        ("BERTH_AGENT__DECLARED_GPUS", DECLARED_GPUS),
    ];
    env.extend(settings.iter().map(|(k, v)| (*k, v.as_str())));
    let process = Process::spawn("berth-agent", &[], &env);
    (process, ContainerAgentClient::new(wait_for(&listen).await))
}

/// The value of `key` in flat JSON text (an engine's answer), unquoted.
pub fn json_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}
