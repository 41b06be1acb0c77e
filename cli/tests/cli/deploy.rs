//! Issue 18, "tried as a new user would": the shipped systemd deployment (`deploy/`) starts,
//! stores where it may write, and a start that fails says why and leaves nothing behind.

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mllp_reactor::ack::AckCode;
use mllp_reactor::client::{Client, ClientConfig};

use crate::util::{Serve, run, scratch, text, wait_output};

/// The repository's `deploy/` directory.
fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Whether a test that needs `what` can run; under `CI=true` a missing `what` fails the test
/// instead of skipping it.
#[track_caller]
fn available(ok: bool, what: &str) -> bool {
    if !ok {
        mllp_test_support::unavailable(what, "not found");
    }
    ok
}

/// The uid and gid of `nobody` (from `/etc/passwd`), when this test runs as root and may
/// therefore run the server as `nobody`.
#[track_caller]
fn nobody() -> Option<(u32, u32)> {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !available(root, "root (to run the server as nobody)") {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("a nobody user");
    let mut fields = line.split(':').skip(2).map(|f| f.parse().expect("an id"));
    Some((fields.next().expect("uid"), fields.next().expect("gid")))
}

/// A scratch directory `nobody` may enter, holding a copy of the binary `nobody` may run
/// (the build directory may sit under a home directory `nobody` cannot enter).
fn nobody_dir(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let binary = readable_copy(
        &dir,
        Path::new(env!("CARGO_BIN_EXE_mllp-reactor")),
        "mllp-reactor-bin",
        0o755,
    );
    (dir, binary)
}

/// The values of `key=` in the unit's `[Service]` section.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

/// Copies `from` into `dir` as `name` with `mode`.
fn readable_copy(dir: &Path, from: &Path, name: &str, mode: u32) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).expect("copied");
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).expect("chmod");
    to
}

#[test]
fn issue_18_the_unit_passes_systemd_analyze_verify() {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists());
    if !available(
        found && units.is_some(),
        "systemd-analyze (Debian package systemd)",
    ) {
        return;
    }
    // A root of our own: the unit where systemd looks for it, the binary where its ExecStart
    // says, and the system's own units (sysinit.target, …) that it depends on. Nothing of the
    // running system is touched, and no service manager needs to run.
    let root = scratch("verify");
    for dir in [
        "usr/local/bin",
        "etc/systemd/system",
        "usr/lib/systemd/system",
    ] {
        std::fs::create_dir_all(root.join(dir)).expect("created");
    }
    std::fs::copy(
        env!("CARGO_BIN_EXE_mllp-reactor"),
        root.join("usr/local/bin/mllp-reactor"),
    )
    .expect("binary copied");
    let unit = root.join("etc/systemd/system/mllp-reactor.service");
    std::fs::copy(deploy().join("mllp-reactor.service"), &unit).expect("unit copied");
    for entry in std::fs::read_dir(units.expect("checked")).expect("readable") {
        let entry = entry.expect("readable");
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(
                entry.path(),
                root.join("usr/lib/systemd/system").join(entry.file_name()),
            )
            .expect("copied");
        }
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    // `verify` exits 0 on unknown keys and bad values, and only says so: both must be clean.
    assert!(out.status.success(), "{said}");
    assert_eq!(said.trim(), "", "systemd-analyze verify complained");
    std::fs::remove_dir_all(root).ok();
}

/// The unit's `ExecStart`, run as `nobody` from `/` with the environment systemd gives it
/// (`STATE_DIRECTORY` a directory `nobody` owns): it starts, and stores there.
#[test]
fn issue_18_the_units_exec_start_runs_as_nobody_from_root_and_stores() {
    let Some((uid, gid)) = nobody() else { return };
    let unit = std::fs::read_to_string(deploy().join("mllp-reactor.service")).expect("unit");
    let exec = unit_values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart: {exec:?}");
    let mut words = exec[0].split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/mllp-reactor"));
    let config_dir = unit_values(&unit, "ConfigurationDirectory");
    let state_dir = unit_values(&unit, "StateDirectory");
    assert_eq!((config_dir.len(), state_dir.len()), (1, 1));
    assert!(
        unit_values(&unit, "Environment").is_empty(),
        "the test passes no other environment"
    );

    let (dir, binary) = nobody_dir("unit");
    let etc = format!("/etc/{}/", config_dir[0]);
    let config = readable_copy(&dir, &deploy().join("serve.toml"), "serve.toml", 0o644);
    // What systemd makes of StateDirectory=: a directory only the service's user may enter.
    let state = dir.join(&state_dir[0]);
    std::fs::create_dir_all(&state).expect("created");
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).expect("chown");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");

    let mut command = Command::new(&binary);
    for word in words {
        match word.strip_prefix(&etc) {
            Some("serve.toml") => command.arg(&config),
            Some(other) => panic!("the test knows only serve.toml, not {other}"),
            None => command.arg(word),
        };
    }
    // The shipped file binds fixed ports; the test must not.
    command
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .current_dir("/")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("STATE_DIRECTORY", &state)
        .env("CONFIGURATION_DIRECTORY", format!("/etc/{}", config_dir[0]))
        .uid(uid)
        .gid(gid);
    let mut serve = Serve::spawn(command, true);
    let store = state.join("mllp-reactor.db");
    let storing = format!("storing to {}", store.display());
    assert!(
        serve.stdout_lines().contains(&storing),
        "{:?}",
        serve.stdout_lines()
    );
    let mut client = Client::connect(serve.addr, ClientConfig::default()).expect("connects");
    let ack = client
        .send(crate::util::message("UNIT1").replace('\n', "\r").as_bytes())
        .expect("an ACK");
    assert_eq!(ack.code, AckCode::AA);
    drop(client);
    let (out, _) = serve.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&store).expect("stored").uid(), uid);
    let exported = run(&["export", store.to_str().expect("utf-8")], b"");
    assert!(text(&exported.stdout).contains("\"control_id\":\"UNIT1\""));
    std::fs::remove_dir_all(dir).ok();
}

/// A directory the server's user cannot write: "permission denied", exit 1, no file.
#[test]
fn issue_18_an_unwritable_store_directory_says_permission_denied() {
    let Some((uid, gid)) = nobody() else { return };
    let (dir, binary) = nobody_dir("unwritable");
    for (args, env) in [
        (vec!["--store", "s.db"], vec![("STATE_DIRECTORY", &dir)]),
        (vec!["--store", "s.db"], vec![]),
    ] {
        let mut command = Command::new(&binary);
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .current_dir(&dir)
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .uid(uid)
            .gid(gid);
        let out = wait_output(command.spawn().expect("starts"));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.to_lowercase().contains("permission denied"),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!dir.join("s.db").exists());
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A start that fails, early (a bad flag) or late (the port is taken), leaves no store file.
#[test]
fn issue_18_a_failed_start_leaves_no_store_file() {
    let dir = scratch("failed-start");
    let store = dir.join("s.db");
    let store = store.to_str().expect("utf-8");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    for (args, code) in [
        (vec!["--workers", "0"], 2),
        (vec!["--reactors", "0"], 2),
        (vec!["--max-memory", "0"], 2),
        (vec!["--max-memory", "1000"], 2),
        (vec!["--log-level", "verbose"], 2),
        (vec!["--proxy-source", "10.0.0.0/8"], 2),
        (vec!["--allow-async-commit"], 2),
        (
            vec![
                "--tls-cert",
                "/nonexistent.pem",
                "--tls-key",
                "/nonexistent.pem",
            ],
            1,
        ),
        (vec!["--listen", &taken], 1),
    ] {
        let mut all = vec!["serve", "--listen", "127.0.0.1:0", "--store", store];
        all.extend(&args);
        let out = run(&all, b"");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("readable")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
    std::fs::remove_dir_all(dir).ok();
}
