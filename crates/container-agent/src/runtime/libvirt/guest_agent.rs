//! Exec through the qemu guest agent, the fallback for images that run no
//! berth-exec-shim: qemu-ga's `guest-exec` starts the command and
//! `guest-exec-status` is asked until it exited, both through libvirt
//! (virDomainQemuAgentCommand) over the virtio-serial port [`PORT`] whose
//! host side is [`SOCKET`] in the VM's files directory. What that costs
//! against the shim: every status question is a libvirt round trip, the
//! output comes all at once at the end (qemu-ga keeps it until the command
//! exits, and only its first 16 MiB, its limit), a working directory needs
//! a `/bin/sh` in the guest, and a timeout or cancel kills the command
//! with the guest's `kill` (qemu-ga has no kill of its own), not its whole
//! process group. The command runs on, owned by qemu-ga, when the agent
//! goes away.

use std::time::{Duration, Instant};

use base64::Engine as _;
use berth_proto::agent::v1::{ExecOutput, ExitReason, ExitStatus, exec_output};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::exec::BROKEN;
use super::{DomainView, LibvirtRuntime, failed};
use crate::error::AgentError;
use crate::process_group::{EXEC_BUFFER, send_output};
use crate::runtime::ExecCommand;

/// The guest agent's virtio-serial port, where qemu-ga looks for it.
pub const PORT: &str = "org.qemu.guest_agent.0";
/// The port's host side, in the VM's files directory.
pub const SOCKET: &str = "qga.sock";
/// How long libvirt waits for the guest agent to answer one command.
const ANSWER_WAIT_S: i32 = 10;
/// The first pause between status questions; it doubles up to
/// [`MAX_STATUS_PAUSE`], so short commands end fast and long ones cost
/// few questions.
const FIRST_STATUS_PAUSE: Duration = Duration::from_millis(1);
const MAX_STATUS_PAUSE: Duration = Duration::from_millis(100);
/// The search path of a command given an environment: qemu-ga starts it
/// with exactly the environment asked for.
const GUEST_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `guest-exec` command for `exec`.
fn start_command(exec: &ExecCommand) -> Value {
    let command = &exec.command;
    let mut argv = command.argv.clone();
    if let Some(dir) = &command.working_dir {
        // qemu-ga (before QEMU 8.2) has no working directory: a shell
        // changes to it, then becomes the command.
        let shell = ["/bin/sh", "-c", "cd \"$0\" && exec \"$@\""].map(String::from);
        argv.splice(0..0, shell.into_iter().chain([dir.display().to_string()]));
    }
    let mut arguments = json!({"path": argv[0], "arg": argv[1..], "capture-output": true});
    if !command.env.is_empty() {
        let env: Vec<String> = std::iter::once(GUEST_PATH.to_string())
            .chain(command.env.iter().map(|(k, v)| format!("{k}={v}")))
            .collect();
        arguments["env"] = json!(env);
    }
    json!({"execute": "guest-exec", "arguments": arguments})
}

/// What the guest agent said, or why it could not be asked.
async fn ask(
    runtime: &LibvirtRuntime,
    view: &DomainView,
    command: Value,
) -> Result<Value, AgentError> {
    let (uuid, name) = (view.uuid.clone(), view.name.clone());
    let answer = runtime
        .with_connection(move |connection| {
            let domain = connection
                .lookup_by_uuid(&uuid)
                .map_err(failed("look up"))?
                .ok_or_else(|| AgentError::WorkloadNotFound(name.clone()))?;
            domain
                .guest_agent(&command.to_string(), ANSWER_WAIT_S)
                .map_err(|error| AgentError::EngineUnavailable {
                    engine: "libvirt",
                    socket: PORT.to_string(),
                    reason: format!("VM `{name}`: the qemu guest agent: {error}"),
                })
        })
        .await?;
    let answer: Value = serde_json::from_str(&answer).map_err(|e| {
        AgentError::Internal(format!("the qemu guest agent's answer is not JSON: {e}"))
    })?;
    Ok(answer["return"].clone())
}

/// Runs `exec` in the guest of `view` through its qemu guest agent.
pub async fn run(
    runtime: LibvirtRuntime,
    view: DomainView,
    exec: ExecCommand,
    permit: OwnedSemaphorePermit,
) -> Result<mpsc::Receiver<ExecOutput>, AgentError> {
    let started = Instant::now();
    let pid = ask(&runtime, &view, start_command(&exec)).await?["pid"]
        .as_i64()
        .ok_or_else(|| AgentError::Internal("guest-exec answered no pid".to_string()))?;
    let (tx, rx) = mpsc::channel(EXEC_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        let deadline = exec.timeout.map(|timeout| started + timeout);
        let mut pause = FIRST_STATUS_PAUSE;
        let status = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
        let exit = loop {
            let ended = tokio::select! {
                ended = ask(&runtime, &view, status.clone()) => ended,
                () = tx.closed() => {
                    kill(&runtime, &view, pid).await;
                    return;
                }
            };
            match ended {
                Ok(ended) if ended["exited"] == true => {
                    for (field, stdout) in [("out-data", true), ("err-data", false)] {
                        let Some(data) = ended[field].as_str() else {
                            continue;
                        };
                        let data = base64::engine::general_purpose::STANDARD
                            .decode(data)
                            .unwrap_or_else(|e| format!("(undecodable output: {e})").into_bytes());
                        if !send_output(&tx, &data, stdout).await {
                            return;
                        }
                    }
                    break match ended["signal"].as_i64() {
                        Some(signal) => (128 + signal as i32, ExitReason::Signaled),
                        None => (
                            ended["exitcode"].as_i64().unwrap_or(-1) as i32,
                            ExitReason::Exited,
                        ),
                    };
                }
                Ok(_) => {}
                Err(error) => {
                    // The VM went down, or its guest agent: exec::explained
                    // says which.
                    tracing::debug!(vm = %view.name, %error, "the guest agent stopped answering");
                    break (BROKEN, ExitReason::Exited);
                }
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                kill(&runtime, &view, pid).await;
                break (137, ExitReason::TimedOut);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_STATUS_PAUSE);
        };
        let (exit_code, reason) = exit;
        let exit = ExitStatus {
            exit_code,
            reason: reason as i32,
            duration: prost_types::Duration::try_from(started.elapsed()).ok(),
        };
        let _ = tx
            .send(ExecOutput {
                output: Some(exec_output::Output::Exit(exit)),
            })
            .await;
    });
    Ok(rx)
}

/// Kills the command with the guest's `kill`; a failure is logged, the
/// exec ends anyway.
async fn kill(runtime: &LibvirtRuntime, view: &DomainView, pid: i64) {
    let command = json!({"execute": "guest-exec", "arguments": {
        "path": "/bin/kill", "arg": ["-KILL", pid.to_string()]}});
    if let Err(error) = ask(runtime, view, command).await {
        tracing::warn!(vm = %view.name, pid, %error, "could not kill a guest agent exec");
    }
}

/// The names of the domain's virtio-serial ports a guest has open (libvirt's
/// live XML says `state='connected'`): which way an exec can go.
pub fn connected_ports(xml: &str) -> Vec<String> {
    let Ok(document) = roxmltree::Document::parse(xml) else {
        return Vec::new();
    };
    document
        .descendants()
        .filter(|node| node.has_tag_name("channel"))
        .filter_map(|channel| channel.children().find(|c| c.has_tag_name("target")))
        .filter(|target| target.attribute("state") == Some("connected"))
        .filter_map(|target| target.attribute("name").map(String::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process_group::HostCommand;

    #[test]
    fn a_working_directory_goes_through_a_shell() {
        let exec = ExecCommand {
            command: HostCommand {
                argv: vec!["pwd".into()],
                env: vec![("A".into(), "1".into())],
                working_dir: Some("/tmp".into()),
            },
            timeout: None,
            key: None,
        };
        let command = start_command(&exec);
        assert_eq!(command["arguments"]["path"], "/bin/sh");
        assert_eq!(command["arguments"]["arg"][2], "/tmp");
        assert_eq!(command["arguments"]["arg"][3], "pwd");
        assert_eq!(command["arguments"]["env"][1], "A=1");
    }

    #[test]
    fn connected_ports_are_read_from_the_live_xml() {
        let xml = "<domain><devices>\
            <channel type='unix'><target type='virtio' name='dev.berth.shim' state='disconnected'/></channel>\
            <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>\
            </devices></domain>";
        assert_eq!(connected_ports(xml), [PORT]);
    }
}
