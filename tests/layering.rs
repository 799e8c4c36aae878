//! The workspace's layering (docs/architecture.md), read from the
//! manifests: the core depends on no other workspace crate, on no CLI
//! parser and on no DNS server, and paused clocks (tokio's `test-util`)
//! reach no normal dependency of the core or of the binary.

fn manifest(path: &str) -> toml::Table {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    text.parse().unwrap()
}

fn dependencies(manifest: &toml::Table) -> &toml::Table {
    manifest["dependencies"].as_table().unwrap()
}

/// The features a manifest's normal dependency on `name` asks for, with
/// those the workspace declares for it.
fn features(manifest: &toml::Table, name: &str) -> Vec<String> {
    let workspace = self::manifest("Cargo.toml");
    let declared = &workspace["workspace"]["dependencies"][name];
    let own = &dependencies(manifest)[name];
    [declared, own]
        .iter()
        .filter_map(|d| d.get("features").and_then(|f| f.as_array()))
        .flatten()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_core_depends_on_no_tool_no_cli_parser_and_no_dns_server() {
    let core = manifest("crates/tenantd-core/Cargo.toml");
    for name in dependencies(&core).keys() {
        assert!(
            !name.starts_with("tenantd") && name != "clap" && name != "hickory-server",
            "tenantd-core depends on {name}"
        );
    }
}

#[test]
fn paused_clocks_stay_out_of_the_core_and_the_binary() {
    for path in ["Cargo.toml", "crates/tenantd-core/Cargo.toml"] {
        let manifest = manifest(path);
        let tokio = features(&manifest, "tokio");
        assert!(!tokio.iter().any(|f| f == "test-util"), "{path}: {tokio:?}");
        assert!(
            !dependencies(&manifest).contains_key("tenantd-sim"),
            "{path}: the simulations are a dev-dependency only"
        );
    }
}
