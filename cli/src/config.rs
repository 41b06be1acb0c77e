//! `serve --config FILE`: options from a TOML file.
//!
//! Each key is one of `serve`'s long flags without the dashes (`_` may stand for `-`), and each
//! value is what the flag would take: a string (`listen = "0.0.0.0:2575"`,
//! `idle-timeout = "5m"`), a number (`workers = 8`), a boolean for a flag without a value, or an
//! array for a flag that may repeat. Unknown keys, tables and wrong types are errors that name
//! the file and the key.
//!
//! The file is turned into flags placed *before* the command line's own, and `serve` takes the
//! last value of a flag given twice, so the command line overrides the file. The same parser
//! checks both, so a value means the same in the file as on the command line, and every flag
//! added to `serve` has a key at once.

use std::ffi::OsString;
use std::path::Path;

use clap::{ArgAction, CommandFactory, Parser};

use crate::Cli;

/// The `serve` flag that names the file; not a key of the file itself.
const CONFIG_FLAG: &str = "config";

/// Returns `args` with the options of `serve --config FILE` inserted before the command line's
/// own, or `args` unchanged when there is no `--config`.
///
/// # Errors
///
/// One line naming the file (and the key, where there is one) when the file cannot be read,
/// is not TOML, has an unknown key, or has a value the flag does not accept.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    if args.get(1).is_none_or(|a| a != "serve") {
        return Ok(args);
    }
    let Some(path) = config_path(&args[2..]) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let flags = flags_from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    // Check the file's flags on their own, so an error names the file.
    let mut alone = vec![args[0].clone(), args[1].clone()];
    alone.extend(flags.iter().cloned());
    if let Err(e) = Cli::try_parse_from(&alone) {
        return Err(format!(
            "{}: {}",
            path.display(),
            crate::one_line(&e)
                .unwrap_or_default()
                .trim_start_matches("error: ")
        ));
    }
    let mut out = Vec::with_capacity(args.len() + flags.len());
    out.extend_from_slice(&args[..2]);
    out.extend(flags);
    out.extend_from_slice(&args[2..]);
    Ok(out)
}

/// The value of `--config FILE` or `--config=FILE` among `serve`'s arguments (the last one).
fn config_path(args: &[OsString]) -> Option<std::path::PathBuf> {
    let mut found = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let Some(arg) = arg.to_str() else { continue };
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            found = iter.next().map(|p| Path::new(p).to_path_buf());
        } else if let Some(path) = arg.strip_prefix("--config=") {
            found = Some(Path::new(path).to_path_buf());
        }
    }
    found
}

/// Turns the TOML text into `--flag=value` arguments, in key order.
fn flags_from_toml(text: &str) -> Result<Vec<OsString>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim().to_owned();
        match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        }
    })?;
    let command = Cli::command();
    let serve = command
        .find_subcommand("serve")
        .expect("the serve subcommand is defined in main.rs");
    let mut flags = Vec::new();
    for (key, value) in &table {
        // `[forward.NAME]` tables: one destination each (see `forward::flags_from_table`).
        if let ("forward", toml::Value::Table(destinations)) = (key.as_str(), value) {
            flags.extend(crate::forward::flags_from_table(destinations)?);
            continue;
        }
        let name = key.replace('_', "-");
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()) && name != CONFIG_FLAG)
            .ok_or_else(|| {
                format!(
                    "unknown key `{key}` (keys are `serve` flags without `--`, e.g. \
                     max-message-size; see `mllp-reactor serve --help`)"
                )
            })?;
        let takes_value = !matches!(
            arg.get_action(),
            ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
        );
        let repeats = matches!(arg.get_action(), ArgAction::Append);
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) if repeats => items.iter().collect(),
            toml::Value::Array(_) => {
                return Err(format!("key `{key}` takes one value, not an array"));
            }
            other => vec![other],
        };
        for value in values {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Boolean(b) if !takes_value => {
                    if *b {
                        flags.push(OsString::from(format!("--{name}")));
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(format!(
                        "key `{key}` must be a string, a number or a boolean"
                    ));
                }
            };
            if !takes_value {
                return Err(format!("key `{key}` is a switch: write `{key} = true`"));
            }
            flags.push(OsString::from(format!("--{name}={text}")));
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn keys_become_flags() {
        let flags = flags_from_toml(
            "listen = \"0.0.0.0:2575\"\nworkers = 8\nidle_timeout = \"5m\"\nlog-format = \"json\"\n",
        )
        .unwrap();
        // Keys come in sorted order; each is a different flag, so order does not matter.
        assert_eq!(
            flags,
            os(&[
                "--idle-timeout=5m",
                "--listen=0.0.0.0:2575",
                "--log-format=json",
                "--workers=8",
            ])
        );
    }

    #[test]
    fn bad_files_name_the_key_or_line() {
        let e = flags_from_toml("listen = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(e.contains("unknown key `bogus`"), "{e}");
        let e = flags_from_toml("config = \"other.toml\"\n").unwrap_err();
        assert!(e.contains("unknown key `config`"), "{e}");
        let e = flags_from_toml("workers = [1, 2]\n").unwrap_err();
        assert!(e.contains("`workers` takes one value"), "{e}");
        let e = flags_from_toml("[serve]\nworkers = 1\n").unwrap_err();
        assert!(e.contains("unknown key `serve`"), "{e}");
        let e = flags_from_toml("workers = \n").unwrap_err();
        assert!(e.starts_with("line 1:"), "{e}");
    }

    #[test]
    fn command_line_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("mllp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serve.toml");
        std::fs::write(&path, "workers = 3\nmax-connections = 7\ngrace = \"0s\"\n").unwrap();
        let path = path.to_str().unwrap();
        let args = expand(os(&[
            "mllp-reactor",
            "serve",
            "--config",
            path,
            "--workers",
            "5",
        ]))
        .unwrap();
        let cli = Cli::try_parse_from(&args).unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(serve.workers, Some(5));
        assert_eq!(serve.max_connections, 7);
        assert_eq!(serve.grace.to_string(), "0s");

        std::fs::write(dir.join("bad.toml"), "workers = 0\n").unwrap();
        let bad = dir.join("bad.toml");
        let e = expand(os(&[
            "mllp-reactor",
            "serve",
            "--config",
            bad.to_str().unwrap(),
        ]))
        .unwrap_err();
        assert!(e.contains("bad.toml") && e.contains("--workers"), "{e}");
        let e = expand(os(&[
            "mllp-reactor",
            "serve",
            "--config=/nonexistent/x.toml",
        ]))
        .unwrap_err();
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let flags = flags_from_toml(include_str!("../../deploy/serve.toml")).unwrap();
        let mut args = os(&["mllp-reactor", "serve"]);
        args.extend(flags);
        assert!(Cli::try_parse_from(&args).is_ok());
    }

    #[test]
    fn other_subcommands_are_left_alone() {
        let args = os(&["mllp-reactor", "send", "--config", "x"]);
        assert_eq!(expand(args.clone()).unwrap(), args);
    }

    #[test]
    fn a_config_file_forward_table_reaches_serve() {
        let dir = std::env::temp_dir().join(format!("mllp-forward-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serve.toml");
        std::fs::write(
            &path,
            "forward-lanes = 2\n[forward.lab]\naddress = \"127.0.0.1:1\"\nack-timeout = \"5s\"\n",
        )
        .unwrap();
        let args: Vec<std::ffi::OsString> =
            ["mllp-reactor", "serve", "--config", path.to_str().unwrap()]
                .map(Into::into)
                .to_vec();
        let expanded = expand(args).unwrap();
        let text: Vec<String> = expanded
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            text.contains(&"--forward=lab=127.0.0.1:1".to_owned()),
            "{text:?}"
        );
        assert!(
            text.contains(&"--forward-set=lab.ack-timeout=5s".to_owned()),
            "{text:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
