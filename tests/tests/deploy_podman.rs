//! compose.yaml with podman-compose 1.0.x against rootful podman: the images built with
//! `scripts/deploy/build-images.sh --engine podman` (busybox /bin/sh in each, because
//! podman-compose wraps every health check in `/bin/sh -c`), `up -d`, every health check passing
//! (run with `podman healthcheck run`: podman schedules them with systemd timers, and there is
//! no systemd here), gRPC health + reflection on each service, a campaign through the agent's
//! socket volume, and `down -v` plus the network podman-compose 1.0.3 leaves behind.
//!
//! Needs podman and podman-compose (berth_tests::parts: a missing one skips the test, or fails
//! it on CI).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_tests::compose::{
    SERVICES, assert_grpc_services_answer, assert_succeeded, build_images_command,
    campaign_through_agent, ensure_images as ensure_images_with, free_ports, leftovers,
    nofile_limit, run, text,
};
use berth_tests::{Part, repo_root, require};

/// podman's settings for this test, in a file of its own (CONTAINERS_CONF) so that nothing
/// system-wide is changed: on a host without systemd, the cgroupfs manager and the file events
/// logger; runc where it is installed (crun 1.8 refuses cgroup v1/hybrid hosts).
fn containers_conf() -> &'static Path {
    static CONF: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CONF.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("berth-deploy-podman-{}.conf", std::process::id()));
        let mut text = String::from("[engine]\n");
        if !Path::new("/run/systemd/system").exists() {
            text.push_str("cgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n");
        }
        if Command::new("runc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            text.push_str("runtime = \"runc\"\n");
        }
        std::fs::write(&path, text).expect("write containers.conf");
        path
    })
}

/// `podman` or `podman-compose` with this test's containers.conf.
fn podman_command(program: &str) -> Command {
    let mut command = Command::new(program);
    command.env("CONTAINERS_CONF", containers_conf());
    command
}

/// Whether podman and podman-compose answer (else the test skips, or fails on CI).
fn podman_present() -> bool {
    [
        (Part::Podman, "podman", "info"),
        (Part::PodmanCompose, "podman-compose", "version"),
    ]
    .into_iter()
    .all(|(part, tool, arg)| {
        let answered = match podman_command(tool).arg(arg).output() {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!("`{tool} {arg}` failed: {}", text(&output))),
            Err(e) => Err(format!("{tool}: {e}")),
        };
        require(part, answered).is_some()
    })
}

/// The engine socket the agent mounts: podman's own API service, started if not running.
struct PodmanService(Option<Child>, PathBuf);

impl PodmanService {
    fn start(dir: &Path) -> Self {
        let system = PathBuf::from("/run/podman/podman.sock");
        if system.exists() {
            return Self(None, system);
        }
        let socket = dir.join("podman.sock");
        let child = podman_command("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman system service");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "podman system service never made its socket"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self(Some(child), socket)
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ensure_images() {
    ensure_images_with(
        "podman",
        |image| {
            run(podman_command("podman").args(["image", "exists", image]))
                .status
                .success()
        },
        || {
            let mut build = build_images_command();
            build
                .env("CONTAINERS_CONF", containers_conf())
                .args(["--engine", "podman"]);
            build
        },
    );
}

struct Project {
    name: String,
    env: BTreeMap<String, String>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Output {
        run(podman_command("podman-compose")
            .current_dir(repo_root())
            .args(["-p", &self.name, "-f", "compose.yaml"])
            .args(args)
            .envs(&self.env))
    }

    fn container(&self, service: &str) -> String {
        // podman-compose 1.0.3 names containers <project>_<service>_1.
        format!("{}_{}_1", self.name, service)
    }

    fn leftovers(&self) -> Vec<String> {
        leftovers(
            || podman_command("podman"),
            &format!("label=io.podman.compose.project={}", self.name),
            &[
                &["ps", "-a", "--format", "{{.Names}}", "--filter"],
                &["volume", "ls", "--format", "{{.Name}}", "--filter"],
                &["network", "ls", "--format", "{{.Name}}", "--filter"],
                &["pod", "ls", "--format", "{{.Name}}", "--filter"],
            ],
        )
    }

    fn remove_network(&self) {
        // podman-compose 1.0.3's `down` leaves the project network behind.
        let _ = run(podman_command("podman").args([
            "network",
            "rm",
            "-f",
            &format!("{}_default", self.name),
        ]));
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        self.compose(&["down", "-v"]);
        self.remove_network();
    }
}

const CAMPAIGN: &str = r#"
name: podman-compose-smoke
backends:
  - name: agent-container
    runtime: process
configs:
  - name: sha256
    params: {tool: sha256sum}
run:
  command: [sh, -c, "head -c 1048576 /dev/zero | {{tool}} >/dev/null && echo '{\"ok\": 1}'"]
  timeout: 30s
cycles: 2
"#;

#[tokio::test(flavor = "multi_thread")]
async fn podman_compose_stack_is_healthy_and_runs_a_campaign() {
    if !podman_present() {
        return;
    }
    ensure_images();
    let dir = tempfile::tempdir().unwrap();
    let service = PodmanService::start(dir.path());
    let (ports, mut env) = free_ports();
    let models = berth_tests::model_cache();
    let nofile = nofile_limit();
    for (key, value) in [
        ("BERTH_ENGINE_SOCKET", service.1.to_str().unwrap()),
        ("BERTH_ENGINE_GID", "0"),
        ("BERTH_NOFILE", nofile.as_str()),
        ("LITELLM_MASTER_KEY", "sk-podman-test"),
        ("BERTH_MODEL_CACHE", models.to_str().unwrap()),
        // podman 4.3 has no `host-gateway`: an address (podman's default bridge gateway).
        ("BERTH_HOST_GATEWAY", "10.88.0.1"),
    ] {
        env.insert(key.to_string(), value.to_string());
    }
    let project = Project {
        name: format!("berthpod{}", std::process::id()),
        env,
    };
    project.compose(&["down", "-v"]);
    project.remove_network();

    let started = Instant::now();
    let up = project.compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "podman-compose up failed:\n{}",
        text(&up)
    );

    // No systemd here: run each health check ourselves until it passes.
    let deadline = Instant::now() + Duration::from_secs(120);
    for svc in SERVICES {
        loop {
            let check =
                run(podman_command("podman").args(["healthcheck", "run", &project.container(svc)]));
            if check.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{svc} never healthy: {}\n{}\nits state: {}\npodman-compose up said:\n{}",
                text(&check),
                text(&run(
                    podman_command("podman").args(["logs", &project.container(svc)])
                )),
                // A container that never started (a port it could not
                // bind, say) has no logs: its state says why.
                text(&run(podman_command("podman").args([
                    "inspect",
                    "--format",
                    "{{.State.Status}} exit {{.State.ExitCode}} {{.State.Error}}",
                    &project.container(svc)
                ]))),
                text(&up)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let status = run(podman_command("podman").args([
            "inspect",
            "-f",
            "{{.State.Health.Status}}",
            &project.container(svc),
        ]));
        assert_eq!(
            String::from_utf8_lossy(&status.stdout).trim(),
            "healthy",
            "{svc}"
        );
    }
    eprintln!(
        "podman-compose up → all 5 healthy in {:.1?}",
        started.elapsed()
    );

    assert_grpc_services_answer(&ports, false).await;

    let (_, finished) = campaign_through_agent(
        ports["BERTH_PORT_ORCHESTRATOR"],
        "podman-agent",
        CAMPAIGN,
        "podman.yaml",
        Duration::from_secs(90),
    )
    .await;
    assert_succeeded(&finished);
    assert_eq!(finished.runs.unwrap_or_default().succeeded, 2);

    let down = project.compose(&["down", "-v"]);
    assert!(down.status.success(), "{}", text(&down));
    project.remove_network();
    let left = project.leftovers();
    assert!(left.is_empty(), "down -v left: {left:?}");
    drop(project);
    drop(service);
    let _ = std::fs::remove_file(containers_conf());
}
