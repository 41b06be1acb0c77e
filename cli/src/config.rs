//! `serve --config FILE`: options from a TOML file.
//!
//! Each key is one of `serve`'s long flags without the dashes (`_` may stand for `-`), and each
//! value is what the flag would take: a string (`listen = "0.0.0.0:2575"`,
//! `idle-timeout = "5m"`), a number (`workers = 8`), a boolean for a flag without a value, or an
//! array for a flag that may repeat. Unknown keys, tables and wrong types are errors that name
//! the file and the key.
//!
//! The file is turned into flags placed *before* the command line's own, and `serve` takes the
//! last value of a flag given twice, so the command line overrides the file. A flag that may
//! repeat (`allow`, `proxy-source`) is replaced the same way: when the command line gives it,
//! the file's values for it are dropped, not merged. The same parser
//! checks both, so a value means the same in the file as on the command line, and every flag
//! added to `serve` has a key at once.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, CommandFactory, Parser};

use crate::args::Cli;
use crate::error::{CliError, ConfigFileError};

/// The `serve` flag that names the file; not a key of the file itself.
const CONFIG_FLAG: &str = "config";

/// Returns `args` with the options of `serve --config FILE` inserted before the command line's
/// own, or `args` unchanged when there is no `--config`.
///
/// # Errors
///
/// [`CliError::ConfigFile`], naming the file (and the key, where there is one), when the file
/// cannot be read, is not TOML, has an unknown key, or has a value the flag does not accept.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>, CliError> {
    if args.get(1).is_none_or(|a| a != "serve") {
        return Ok(args);
    }
    let Some(path) = config_path(&args[2..]) else {
        return Ok(args);
    };
    let error = |problem| CliError::ConfigFile {
        path: path.clone(),
        problem,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| error(ConfigFileError::Read(e)))?;
    let flags = flags_from_toml(&text).map_err(error)?;
    // Check the file's flags on their own, so an error names the file.
    let mut alone = vec![args[0].clone(), args[1].clone()];
    alone.extend(flags.iter().map(|(_, flag)| flag.clone()));
    if let Err(e) = Cli::try_parse_from(&alone) {
        return Err(error(ConfigFileError::Value(e)));
    }
    let overridden = overridden_keys(&given_flags(&args[2..]));
    let mut out = Vec::with_capacity(args.len() + flags.len());
    out.extend_from_slice(&args[..2]);
    out.extend(
        flags
            .into_iter()
            .filter(|(name, _)| !overridden.contains(name))
            .map(|(_, flag)| flag),
    );
    out.extend_from_slice(&args[2..]);
    Ok(out)
}

/// The long names of the flags on the command line (`--allow X` and `--allow=X` give
/// `allow`), up to `--`.
fn given_flags(args: &[OsString]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.to_str())
        .take_while(|a| *a != "--")
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split_once('=').map_or(a, |(name, _)| name).to_owned())
        .collect()
}

/// Repeatable flags whose values the command line adds to the file's instead of replacing
/// them: forwarding destinations, which are merged by name (a name given again takes the
/// command line's address or setting).
const MERGED_BY_NAME: [&str; 2] = ["forward", "forward-set"];

/// The file's keys the command line overrides: the flags it gives, and those they conflict
/// with (`--no-store` overrides the file's `store`).
fn overridden_keys(given: &[String]) -> Vec<String> {
    let command = Cli::command();
    let serve = command
        .find_subcommand("serve")
        .expect("the serve subcommand is defined in args.rs");
    let mut keys: Vec<String> = given
        .iter()
        .filter(|g| !MERGED_BY_NAME.contains(&g.as_str()))
        .cloned()
        .collect();
    for arg in serve
        .get_arguments()
        .filter(|a| a.get_long().is_some_and(|l| given.iter().any(|g| g == l)))
    {
        keys.extend(
            serve
                .get_arg_conflicts_with(arg)
                .into_iter()
                .filter_map(|c| c.get_long().map(str::to_owned)),
        );
    }
    keys
}

/// The value of `--config FILE` or `--config=FILE` among `serve`'s arguments (the last one).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
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

/// Turns the TOML text into `--flag=value` arguments, in key order, each with the flag's
/// long name.
fn flags_from_toml(text: &str) -> Result<Vec<(String, OsString)>, ConfigFileError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        ConfigFileError::Syntax {
            line,
            message: e.message().trim().to_owned(),
        }
    })?;
    let command = Cli::command();
    let serve = command
        .find_subcommand("serve")
        .expect("the serve subcommand is defined in args.rs");
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
            .ok_or_else(|| ConfigFileError::UnknownKey(key.clone()))?;
        let takes_value = !matches!(
            arg.get_action(),
            ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
        );
        let repeats = matches!(arg.get_action(), ArgAction::Append);
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) if repeats => items.iter().collect(),
            toml::Value::Array(_) => return Err(ConfigFileError::NotOneValue(key.clone())),
            other => vec![other],
        };
        for value in values {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Boolean(b) if !takes_value => {
                    if *b {
                        flags.push((name.clone(), OsString::from(format!("--{name}"))));
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                _ => return Err(ConfigFileError::WrongType(key.clone())),
            };
            if !takes_value {
                return Err(ConfigFileError::Switch(key.clone()));
            }
            flags.push((name.clone(), OsString::from(format!("--{name}={text}"))));
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Command;

    fn flags(text: &str) -> Vec<OsString> {
        flags_from_toml(text)
            .unwrap()
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    fn problem(text: &str) -> String {
        flags_from_toml(text).unwrap_err().to_string()
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn keys_become_flags() {
        let flags = flags(
            "listen = \"0.0.0.0:2575\"\nworkers = 8\nidle_timeout = \"5m\"\nlog-format = \"json\"\n",
        );
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
        let e = problem("listen = \"x\"\nbogus = 1\n");
        assert!(e.contains("unknown key `bogus`"), "{e}");
        let e = problem("config = \"other.toml\"\n");
        assert!(e.contains("unknown key `config`"), "{e}");
        let e = problem("workers = [1, 2]\n");
        assert!(e.contains("`workers` takes one value"), "{e}");
        let e = problem("[serve]\nworkers = 1\n");
        assert!(e.contains("unknown key `serve`"), "{e}");
        let e = problem("workers = \n");
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
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad.toml") && e.contains("--workers"), "{e}");
        let e = expand(os(&[
            "mllp-reactor",
            "serve",
            "--config=/nonexistent/x.toml",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let mut args = os(&["mllp-reactor", "serve"]);
        args.extend(flags(include_str!("../../deploy/serve.toml")));
        assert!(Cli::try_parse_from(&args).is_ok());
    }

    /// Issue 18 ("smaller"): `--allow` on the command line replaces the file's list.
    #[test]
    fn issue_18_repeated_flags_replace_the_files_values() {
        let dir = std::env::temp_dir().join(format!("mllp-config-allow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serve.toml");
        std::fs::write(&path, "allow = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\n").unwrap();
        let path = path.to_str().unwrap();
        let parse = |extra: &[&str]| {
            let mut args = os(&["mllp-reactor", "serve", "--config", path]);
            args.extend(os(extra));
            let Command::Serve(serve) = Cli::try_parse_from(expand(args).unwrap()).unwrap().command
            else {
                panic!("not serve")
            };
            serve
                .allow
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(parse(&[]), ["10.0.0.0/8", "192.168.0.0/16"]);
        assert_eq!(parse(&["--allow", "127.0.0.1/32"]), ["127.0.0.1/32"]);
        assert_eq!(parse(&["--allow=::1/128"]), ["::1/128"]);
        // A switch overrides the file's key it conflicts with.
        std::fs::write(dir.join("serve.toml"), "store = \"x.db\"\n").unwrap();
        let args = os(&["mllp-reactor", "serve", "--config", path, "--no-store"]);
        let Command::Serve(serve) = Cli::try_parse_from(expand(args).unwrap()).unwrap().command
        else {
            panic!("not serve")
        };
        assert!(serve.no_store);
        std::fs::remove_dir_all(&dir).unwrap();
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
