//! The shipped deployment examples stay true: the replica config in
//! `deploy/tollgate.toml` and the one embedded in `deploy/kubernetes.yaml`
//! pass `tollgate check-config`.

use std::path::Path;
use std::process::Command;

/// Runs `tollgate check-config` on `config`, with the image's pricing path
/// pointed at the repository's copy and the secrets the file names set.
fn check_config(name: &str, config: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let config = config.replace(
        "/app/config/pricing.toml",
        &format!("{root}/config/pricing.toml"),
    );
    assert!(
        config.contains(&format!("{root}/config/pricing.toml")),
        "{name} names the pricing file shipped in the image"
    );
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", path.to_str().unwrap()])
        .env("TOLLGATE_ADMIN_TOKEN", "example-token")
        .env(
            "TOLLGATE_LEDGER_URL",
            "postgres://tollgate:secret@127.0.0.1:5432/tollgate",
        )
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{name}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_compose_replica_config_is_valid() {
    let config =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tollgate.toml"))
            .unwrap();
    assert!(config.contains("backend = \"redis\""));
    assert!(config.contains("backend = \"postgres\""));
    check_config("compose.toml", &config);
}

#[test]
fn the_kubernetes_configmap_config_is_valid() {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes.yaml"),
    )
    .unwrap();
    // The block scalar under `tollgate.toml: |`, indented four spaces.
    let start = manifest
        .find("tollgate.toml: |\n")
        .expect("the ConfigMap holds tollgate.toml")
        + "tollgate.toml: |\n".len();
    let block: String = manifest[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(block.contains("[state]"), "{block}");
    check_config("kubernetes.toml", &block);
}
