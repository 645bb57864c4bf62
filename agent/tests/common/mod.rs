//! What the agent's process tests share: a site's config file.

use std::path::{Path, PathBuf};

/// Writes `agent.toml` in `dir`: a coordinator on 127.0.0.1:7443, PKI files `ca.crt`,
/// `site.crt`, `site.key`, data `train.jsonl`, base model `base/`, budget epsilon 8 at
/// delta 1e-5, state in `state/`; `tail` is appended (more of `[agent]`, then other
/// sections).
pub fn write_config(dir: &Path, tail: &str) -> PathBuf {
    let config = dir.join("agent.toml");
    let text = r#"[coordinator]
address = "127.0.0.1:7443"
server_name = "coordinator.test"
[tls]
ca_cert = "ca.crt"
cert = "site.crt"
key = "site.key"
[data]
train = "train.jsonl"
[model]
base = "base"
[budget]
max_epsilon = 8.0
delta = 1e-5
[agent]
state_dir = "state"
"#;
    std::fs::write(&config, format!("{text}{tail}")).unwrap();
    config
}
