//! The Dockerfile and fly.toml agree with the binary: ports, signals, the
//! health check, and every command and environment variable they use.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tenantd");

fn repo_file(name: &str) -> String {
    std::fs::read_to_string(format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn parses(args: &[&str]) -> bool {
    Command::new(BIN)
        .args(args)
        .arg("--help")
        .output()
        .unwrap()
        .status
        .success()
}

fn serve_help() -> String {
    String::from_utf8(
        Command::new(BIN)
            .args(["serve", "--help"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

/// The builder stage sees the whole workspace: every crate's manifest
/// (cargo refuses a workspace with a member missing) and its sources.
#[test]
fn dockerfile_copies_every_workspace_crate() {
    let docker = repo_file("Dockerfile");
    assert!(
        docker.contains("COPY crates ./crates"),
        "the crates' sources"
    );
    let crates = std::fs::read_dir(format!("{}/crates", env!("CARGO_MANIFEST_DIR"))).unwrap();
    for entry in crates {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let manifest = format!("COPY crates/{name}/Cargo.toml crates/{name}/");
        assert!(docker.contains(&manifest), "missing: {manifest}");
    }
}

#[test]
fn dockerfile_builds_in_one_stage_and_runs_the_binary_as_non_root_in_another() {
    let docker = repo_file("Dockerfile");
    let froms: Vec<&str> = docker.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {froms:?}");
    assert!(froms[0].contains(" AS builder") && froms[1].contains(" AS runtime"));
    let runtime = &docker[docker.find(froms[1]).unwrap()..];
    assert!(
        runtime.contains("COPY --from=builder /src/target/release/tenantd /usr/local/bin/tenantd")
    );
    assert!(
        runtime.contains("ca-certificates"),
        "TLS to the bucket needs CA certificates"
    );
    let user = runtime
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.ends_with(" 0"), "{user}");
    let entrypoint = runtime
        .lines()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .unwrap();
    assert!(
        entrypoint.contains("\"/usr/local/bin/tenantd\""),
        "{entrypoint}"
    );
    let cmd = runtime.lines().find(|l| l.starts_with("CMD")).unwrap();
    let words: Vec<String> = serde_json::from_str(cmd.trim_start_matches("CMD").trim()).unwrap();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    assert!(parses(&words), "CMD {words:?} is not a tenantd command");
    let exposed = runtime.lines().find(|l| l.starts_with("EXPOSE")).unwrap();
    assert!(exposed.ends_with("3000"));
}

#[test]
fn fly_toml_matches_the_binary() {
    let fly: toml::Table = repo_file("fly.toml").parse().unwrap();
    let service = fly["http_service"].as_table().unwrap();
    let help = serve_help();
    assert!(
        help.contains("[default: 0.0.0.0:3000]"),
        "the default listen port changed"
    );
    assert_eq!(service["internal_port"].as_integer(), Some(3000));
    // Per-customer groups: autostop would stop the standbys first, and a
    // holder lost for good would then leave its tenant down (issue 13).
    let per_customer = fly["processes"]
        .as_table()
        .unwrap()
        .values()
        .any(|c| c.as_str().unwrap().contains("--customer-id"));
    if per_customer {
        assert_eq!(service["auto_stop_machines"].as_str(), Some("off"));
    }
    let http_options = service.get("http_options");
    assert!(
        http_options.is_none_or(|o| o.get("replay_cache").is_none()),
        "replay_cache drops fly-replay-src and replays to stale holders"
    );
    if let Some(max_body) = fly["env"].get("TENANTD_MAX_BODY") {
        let bytes: usize = max_body.as_str().unwrap().parse().unwrap();
        assert!(
            bytes <= 1024 * 1024,
            "Fly Proxy cannot replay bodies over 1 MB"
        );
    }
    assert_eq!(service["auto_start_machines"].as_bool(), Some(true));
    assert!(service.contains_key("min_machines_running"));
    let signal = fly["kill_signal"].as_str().unwrap();
    assert!(
        ["SIGINT", "SIGTERM"].contains(&signal),
        "tenantd drains on SIGINT and SIGTERM, not {signal}"
    );
    let env = fly["env"].as_table().unwrap();
    if let Some(listen) = env.get("TENANTD_LISTEN") {
        let listen: std::net::SocketAddr = listen.as_str().unwrap().parse().unwrap();
        assert_eq!(
            listen.ip(),
            std::net::Ipv6Addr::UNSPECIFIED,
            "listen on [::]: the 6PN network is IPv6"
        );
        assert_eq!(
            Some(listen.port() as i64),
            service["internal_port"].as_integer()
        );
    }
    let check = &service["checks"].as_array().unwrap()[0];
    assert_eq!(check["path"].as_str(), Some("/healthz"));

    let processes = fly["processes"].as_table().unwrap();
    let served: Vec<&str> = service["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!processes.is_empty());
    for (name, command) in processes {
        let words: Vec<&str> = command.as_str().unwrap().split_whitespace().collect();
        assert!(
            parses(&words),
            "process {name}: {words:?} is not a tenantd command"
        );
        assert!(
            served.contains(&name.as_str()),
            "process {name} gets no HTTP service"
        );
        // `tenantd fly provision` and DNS routing name a tenant's group
        // `customer<ID>`.
        if let Some(at) = words.iter().position(|w| *w == "--customer-id") {
            assert_eq!(
                name.as_str(),
                format!("customer{}", words[at + 1]),
                "process group of customer {}",
                words[at + 1]
            );
        }
    }
    for key in fly["env"].as_table().unwrap().keys() {
        assert!(
            key == "RUST_LOG" || help.contains(&format!("[env: {key}=")),
            "[env] {key} is not read by tenantd serve"
        );
    }
}

/// `"10s"`, or an integer number of seconds.
fn toml_duration(value: &toml::Value) -> std::time::Duration {
    match value {
        toml::Value::Integer(secs) => std::time::Duration::from_secs(*secs as u64),
        toml::Value::String(text) => humantime::parse_duration(text).unwrap(),
        other => panic!("not a duration: {other}"),
    }
}

/// The value in `[default: ...]` of a `serve --help` flag.
fn help_default(help: &str, flag: &str) -> String {
    let at = help
        .find(flag)
        .unwrap_or_else(|| panic!("{flag} not in help"));
    let rest = &help[at..];
    let start = rest.find("[default: ").unwrap() + "[default: ".len();
    rest[start..start + rest[start..].find(']').unwrap()].to_string()
}

#[test]
fn the_drain_ends_before_fly_kills_the_machine() {
    let fly: toml::Table = repo_file("fly.toml").parse().unwrap();
    // Fly's default kill_timeout is 5 s, its maximum 300 s.
    let kill_timeout = fly
        .get("kill_timeout")
        .map(toml_duration)
        .unwrap_or(std::time::Duration::from_secs(5));
    assert!(kill_timeout <= std::time::Duration::from_secs(300));
    let help = serve_help();
    let drain = match fly["env"].get("TENANTD_DRAIN_TIMEOUT") {
        Some(value) => toml_duration(value),
        None => humantime::parse_duration(&help_default(&help, "--drain-timeout")).unwrap(),
    };
    // A second for the signal to arrive and the process to exit.
    assert!(
        drain + std::time::Duration::from_secs(1) <= kill_timeout,
        "drain timeout {drain:?} does not end a second before kill_timeout {kill_timeout:?}"
    );
}

#[tokio::test]
async fn the_health_check_path_answers() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store"])
        .arg(format!("file://{}", dir.path().display()))
        .arg("--data-dir")
        .arg(dir.path().join("local"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await {
            status = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(status, Some(200));
}
