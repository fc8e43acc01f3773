//! deploy/install.sh into a temp root (`--root`): binaries, units, configs and secrets files land
//! where the units expect them, a second run changes nothing and keeps edited configs (writing
//! the new default beside them), and the units pass `systemd-analyze verify` where it exists.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use berth_tests::repo_root;

/// A fake bin dir: install.sh copies whatever is built; these tests need not build release.
fn fake_bins(dir: &Path) {
    for name in [
        "berth-agent",
        "berth-power-sampler",
        "berth-embedding",
        "berth-llm-proxy",
        "berth-orchestrator",
        "berth",
    ] {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho {name}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn install(root: &Path, bins: &Path, extra: &[&str]) -> String {
    let output = Command::new(repo_root().join("deploy/install.sh"))
        .arg("--root")
        .arg(root)
        .arg("--bin-dir")
        .arg(bins)
        .args(extra)
        .output()
        .expect("run deploy/install.sh");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "install.sh failed:\n{stderr}");
    stderr
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn installs_into_a_temp_root_and_is_safe_to_run_twice() {
    let root = tempfile::tempdir().unwrap();
    let bins = tempfile::tempdir().unwrap();
    fake_bins(bins.path());
    let r = root.path();

    let first = install(r, bins.path(), &[]);
    for svc in ["agent", "power-sampler", "embedding", "llm-proxy"] {
        let bin = if svc == "agent" {
            "berth-agent".to_string()
        } else {
            format!("berth-{svc}")
        };
        assert_eq!(mode(&r.join("usr/local/bin").join(&bin)), 0o755);
        let unit = r.join(format!("etc/systemd/system/berth-{svc}.service"));
        let text = std::fs::read_to_string(&unit).unwrap();
        for needed in [
            "Restart=always",
            "User=berth",
            "NoNewPrivileges=yes",
            "LimitNOFILE=65536",
            "ProtectSystem=",
            &format!("ExecStart=/usr/local/bin/{bin}"),
            &format!("BERTH_CONFIG=/etc/berth/{svc}.toml"),
        ] {
            assert!(text.contains(needed), "{}: no {needed}", unit.display());
        }
        assert_eq!(mode(&r.join(format!("etc/berth/{svc}.toml"))), 0o644);
    }
    assert!(
        !r.join("etc/systemd/system/berth-orchestrator.service")
            .exists(),
        "the orchestrator is not a default host service"
    );
    assert_eq!(
        mode(&r.join("etc/berth/llm-proxy.env")),
        0o600,
        "secrets file"
    );
    assert_eq!(mode(&r.join("etc/berth/agent.env")), 0o600);
    assert!(r.join("etc/berth/litellm_config.yaml").exists());
    assert!(r.join("usr/lib/sysusers.d/berth.conf").exists());
    assert!(r.join("usr/lib/tmpfiles.d/berth.conf").exists());
    assert!(r.join("usr/local/bin/berth").exists(), "the CLI too");
    assert!(first.contains("no user created"), "{first}");

    // Edit a config, change a "binary": the second run keeps the edit, replaces the binary.
    let config = r.join("etc/berth/agent.toml");
    std::fs::write(&config, "[agent]\nmax_concurrent_execs = 8\n").unwrap();
    std::fs::write(bins.path().join("berth-agent"), "#!/bin/sh\necho v2\n").unwrap();
    let second = install(r, bins.path(), &[]);
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[agent]\nmax_concurrent_execs = 8\n",
        "an edited config is kept"
    );
    assert!(r.join("etc/berth/agent.toml.new").exists(), "{second}");
    assert!(
        second.contains("kept your /etc/berth/agent.toml"),
        "{second}"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("usr/local/bin/berth-agent")).unwrap(),
        "#!/bin/sh\necho v2\n"
    );

    // A third run with nothing changed installs nothing.
    let third = install(r, bins.path(), &[]);
    assert!(
        !third.contains("installed /"),
        "nothing to do, yet:\n{third}"
    );
    let leftovers: Vec<_> = walk(r)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The orchestrator on request.
    install(r, bins.path(), &["--services", "orchestrator"]);
    assert!(
        r.join("etc/systemd/system/berth-orchestrator.service")
            .exists()
    );
}

#[test]
fn refuses_unknown_services_and_missing_binaries() {
    let root = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(repo_root().join("deploy/install.sh"))
        .args(["--root", root.path().to_str().unwrap()])
        .args(["--bin-dir", empty.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("berth-agent is not built"), "{stderr}");
    let output = Command::new(repo_root().join("deploy/install.sh"))
        .args(["--root", root.path().to_str().unwrap()])
        .args(["--services", "frobnicator"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown service frobnicator"));
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if berth_tests::require_part(berth_tests::Part::Systemd).is_none() {
        return;
    }
    // Verify copies whose ExecStart points at executables that exist (the fake binaries):
    // `--root` would need a whole systemd tree in the root.
    let bins = tempfile::tempdir().unwrap();
    fake_bins(bins.path());
    let units_dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("deploy/systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "service") {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("/usr/local/bin/", &format!("{}/", bins.path().display()));
            let copy = units_dir.path().join(path.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            units.push(copy);
        }
    }
    assert_eq!(units.len(), 5);
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unknown keys, bad values and missing executables are reported on stderr, naming our units.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("berth-")).collect();
    assert!(
        output.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
