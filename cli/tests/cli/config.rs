//! Issue 11 item 11: `serve --config FILE`.

use crate::util::{Serve, run, scratch, text};

#[test]
fn the_file_sets_options_and_flags_override_it() {
    let dir = scratch("config");
    let file = dir.join("serve.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nlog-format = \"json\"\ngrace = \"0s\"\nworkers = 2\n",
    )
    .expect("writable");
    let file = file.to_str().expect("utf-8").to_owned();

    let serve = Serve::start(&["--config", &file], &[]);
    let (out, _) = serve.stop();
    let started = crate::util::start_line(&text(&out.stderr));
    assert_eq!(started["grace"], "0s");
    assert_eq!(started["workers"], 2);
    assert_eq!(started["config"], file.as_str());

    let serve = Serve::start(
        &["--config", &file, "--log-format", "human", "--workers", "3"],
        &[],
    );
    let (out, _) = serve.stop();
    let stderr = text(&out.stderr);
    let started = stderr
        .lines()
        .find(|l| l.contains("server started"))
        .expect("a start line");
    assert!(started.contains(" INFO mllp::server: ") && started.contains("workers=3"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_files_are_one_line_naming_the_file_and_key() {
    let dir = scratch("badconfig");
    let cases = [
        (
            "unknown.toml",
            "listen = \"127.0.0.1:0\"\nworkerz = 2\n",
            "unknown key `workerz`",
        ),
        ("range.toml", "workers = 100000\n", "--workers"),
        ("syntax.toml", "workers = \n", "line 1:"),
        (
            "type.toml",
            "workers = { n = 1 }\n",
            "`workers` must be a string, a number or a boolean",
        ),
    ];
    for (name, content, needle) in cases {
        let path = dir.join(name);
        std::fs::write(&path, content).expect("writable");
        let path = path.to_str().expect("utf-8");
        let out = run(&["serve", "--config", path], b"");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("error: {path}: ")) && stderr.contains(needle),
            "{name}: {stderr}"
        );
        assert_eq!(text(&out.stdout), "");
    }
    let out = run(&["serve", "--config", "/nonexistent/serve.toml"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/serve.toml"));
    std::fs::remove_dir_all(dir).ok();
}
