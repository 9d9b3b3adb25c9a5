//! Configuration as an operator meets it, through the binary: the printed defaults, a
//! file, `WSCHAT_*` variables and flags (each overriding the one before), and a bad file
//! stopping the server with the key and the file named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_wschat");

/// Run the binary with only the given `WSCHAT_*` variables set.
fn wschat(dir: &Path, args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(dir).env_remove("RUST_LOG");
    for (name, _) in std::env::vars() {
        if name.starts_with("WSCHAT_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_BACKTRACE", "0");
    for (name, value) in env {
        cmd.env(name, value);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    // A server that starts by mistake must not hang the suite.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// `key = value` lines of a printed settings file; `# key = (unset)` as `None`.
fn settings_lines(text: &str) -> BTreeMap<String, Option<String>> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some((key, "(unset)")) = rest.split_once(" = ") {
                map.insert(key.to_owned(), None);
            }
        } else if let Some((key, value)) = line.split_once(" = ") {
            map.insert(key.to_owned(), Some(value.to_owned()));
        }
    }
    map
}

#[test]
fn printed_defaults_are_complete_commented_and_read_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let out = wschat(dir.path(), &["config", "defaults"], &[]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let defaults = settings_lines(&text);
    for key in [
        "listen",
        "database",
        "broker",
        "nats_subject",
        "history_limit",
    ] {
        assert!(defaults.contains_key(key), "{key} missing:\n{text}");
    }
    assert_eq!(defaults["listen"].as_deref(), Some("\"127.0.0.1:56412\""));
    assert_eq!(defaults["admin_token"], None, "no admin token by default");
    // Every setting has a description right above it.
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let is_setting =
            line.contains(" = ") && (!line.starts_with('#') || line.ends_with("(unset)"));
        if is_setting {
            assert!(
                i > 0 && lines[i - 1].starts_with("# "),
                "no description above {line}"
            );
        }
    }
    let file = dir.path().join("wschat.toml");
    std::fs::write(&file, &text).unwrap();
    let out = wschat(
        dir.path(),
        &["config", "check", "--config", file.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(settings_lines(&stdout(&out)), defaults);
}

/// A value unlike the default, for each kind of default.
fn other_value(key: &str, default: Option<&str>) -> (String, String) {
    match (key, default) {
        ("listen", _) => ("127.0.0.1:4567".into(), "\"127.0.0.1:4567\"".into()),
        ("broker", _) => ("local".into(), "\"local\"".into()),
        ("database", _) => ("sqlite://other.db".into(), "\"sqlite://other.db\"".into()),
        ("allowed_origins", _) => (
            r#"["https://chat.example"]"#.into(),
            r#"["https://chat.example"]"#.into(),
        ),
        ("frame_ancestors", _) => (
            r#"["https://app.example"]"#.into(),
            r#"["https://app.example"]"#.into(),
        ),
        ("trusted_proxies", _) => (r#"["10.0.0.0/8"]"#.into(), r#"["10.0.0.0/8"]"#.into()),
        ("proxy_header", _) => ("forwarded".into(), "\"forwarded\"".into()),
        // An all-digit token with a leading zero stays a string, as written.
        (_, None) => ("01234567890123456".into(), "\"********\"".into()),
        (_, Some("true")) => ("false".into(), "false".into()),
        (_, Some("false")) => ("true".into(), "true".into()),
        (_, Some(v)) if v.starts_with('"') => {
            let s = format!("other-{key}");
            (s.clone(), format!("\"{s}\""))
        }
        (_, Some(v)) => {
            let n: u64 = v
                .parse()
                .unwrap_or_else(|_| panic!("{key} = {v}: add a case"));
            ((n + 7).to_string(), (n + 7).to_string())
        }
    }
}

#[test]
fn every_setting_can_be_set_by_its_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let defaults = settings_lines(&stdout(&wschat(dir.path(), &["config", "defaults"], &[])));
    let mut env = Vec::new();
    let mut expected = BTreeMap::new();
    // A real pair: `config check` reads the TLS files.
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key_pair)
        .unwrap();
    let tls_file = |key: &str, pem: String| {
        let path = dir.path().join(format!("{key}.pem"));
        std::fs::write(&path, pem).unwrap();
        let path = path.to_str().unwrap().to_owned();
        let printed = format!("{path:?}");
        (path, printed)
    };
    for (key, default) in &defaults {
        let (value, printed) = match key.as_str() {
            "tls_cert" => tls_file(key, cert.pem()),
            "tls_key" => tls_file(key, key_pair.serialize_pem()),
            _ => other_value(key, default.as_deref()),
        };
        env.push((format!("WSCHAT_{}", key.to_uppercase()), value));
        expected.insert(key.clone(), Some(printed));
    }
    let out = wschat(dir.path(), &["config", "check"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(settings_lines(&stdout(&out)), expected);
}

#[test]
fn flags_override_the_environment_which_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wschat.toml");
    std::fs::write(&file, "history_limit = 5\nmax_commit_batch = 50\n").unwrap();
    let config = file.to_str().unwrap();
    let check = |env: &[(String, String)], flags: &[&str]| {
        let mut args = vec!["config", "check", "--config", config];
        args.extend_from_slice(flags);
        let out = wschat(dir.path(), &args, env);
        assert!(out.status.success(), "{}", stderr(&out));
        let lines = settings_lines(&stdout(&out));
        (
            lines["history_limit"].clone().unwrap(),
            lines["max_commit_batch"].clone().unwrap(),
        )
    };
    let env = [("WSCHAT_HISTORY_LIMIT".to_owned(), "6".to_owned())];
    assert_eq!(check(&[], &[]), ("5".into(), "50".into()));
    assert_eq!(check(&env, &[]), ("6".into(), "50".into()));
    assert_eq!(
        check(&env, &["--history-limit", "7", "--max-commit-batch", "9"]),
        ("7".into(), "9".into())
    );
    // A flag turns a file's `true` off; alone, a boolean flag means true.
    let lines = |flags: &[&str]| {
        let mut args = vec!["config", "check", "--config", config];
        args.extend_from_slice(flags);
        let out = wschat(dir.path(), &args, &[]);
        assert!(out.status.success(), "{flags:?}: {}", stderr(&out));
        settings_lines(&stdout(&out))
    };
    std::fs::write(
        &file,
        "require_origin = true\nallowed_origins = [\"https://x\"]\nno_migrate = true\n",
    )
    .unwrap();
    let got = lines(&["--require-origin=false", "--no-migrate=false"]);
    assert_eq!(got["require_origin"].as_deref(), Some("false"));
    assert_eq!(got["no_migrate"].as_deref(), Some("false"));
    std::fs::write(&file, "allowed_origins = [\"https://x\"]\n").unwrap();
    let got = lines(&["--no-migrate", "--require-origin"]);
    assert_eq!(got["no_migrate"].as_deref(), Some("true"));
    assert_eq!(got["require_origin"].as_deref(), Some("true"));
    // A flag completes a file's half TLS pair: the check goes on to read the files.
    std::fs::write(&file, "tls_key = \"/nonexistent/k.pem\"\n").unwrap();
    let out = wschat(
        dir.path(),
        &[
            "config",
            "check",
            "--config",
            config,
            "--tls-cert",
            "/nonexistent/c.pem",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/c.pem"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&file, "history_limit = 5\nmax_commit_batch = 50\n").unwrap();
    // WSCHAT_CONFIG names the file too.
    let out = wschat(
        dir.path(),
        &["config", "check"],
        &[("WSCHAT_CONFIG".into(), config.into())],
    );
    assert_eq!(
        settings_lines(&stdout(&out))["history_limit"].as_deref(),
        Some("5")
    );
}

/// `config check` reads the TLS files as `serve` does at start: one that is missing or
/// not a certificate fails the check.
#[test]
fn config_check_reads_the_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let cert = dir.path().join("cert.pem");
    std::fs::write(&key, "not a key\n").unwrap();
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let file = dir.path().join("wschat.toml");
    std::fs::write(
        &file,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = wschat(
        dir.path(),
        &["config", "check", "--config", file.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("cert.pem"), "{}", stderr(&out));
}

#[test]
fn a_bad_file_stops_the_server_at_start_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown.toml", "histroy_limit = 7\n", "histroy_limit"),
        (
            "badtype.toml",
            "history_limit = \"many\"\n",
            "history_limit",
        ),
        ("badbool.toml", "demo_session = \"yes\"\n", "demo_session"),
        (
            "shorttoken.toml",
            "admin_token = \"short\"\n",
            "admin_token",
        ),
        ("idle.toml", "idle_timeout_secs = 10\n", "idle_timeout_secs"),
    ];
    for (name, content, key) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, content).unwrap();
        let out = wschat(
            dir.path(),
            &[
                "serve",
                "--config",
                file.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--database",
                "sqlite://never.db",
            ],
            &[],
        );
        assert!(!out.status.success(), "{name}: the server must not start");
        let err = stderr(&out);
        assert!(err.contains(key), "{name}: key not named: {err}");
        assert!(
            err.contains(file.to_str().unwrap()),
            "{name}: file not named: {err}"
        );
        assert!(
            !dir.path().join("never.db").exists(),
            "{name}: stopped before opening the database"
        );
    }
    // A missing file, and a bad variable, are named too.
    let out = wschat(dir.path(), &["serve", "--config", "nope.toml"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope.toml"), "{}", stderr(&out));
    let out = wschat(
        dir.path(),
        &["serve", "--database", "sqlite://never.db"],
        &[("WSCHAT_MAX_COMMIT_BATCH".into(), "lots".into())],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("WSCHAT_MAX_COMMIT_BATCH"),
        "{}",
        stderr(&out)
    );
}
