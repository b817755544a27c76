//! `--config keyward.toml`: every setting of `serve` and `worker` (and the
//! global ones) from a TOML file, under the flag's name with `_` for `-`
//! (`listen`, `database_url`, `aws_kms_max_attempts`, …).
//!
//! Precedence: flag > environment > file > default. The file does not get
//! a parser of its own: its settings become extra command-line arguments
//! for those the first parse took from a default, and clap parses again,
//! so a setting means exactly what its flag means and is validated by the
//! same value parser. Unknown keys and bad values are configuration errors
//! (exit status 64) naming the file and the key.

use std::{ffi::OsString, path::Path};

use clap::{parser::ValueSource, Arg, ArgAction, ArgMatches, Command};

use super::ConfigError;

/// The subcommands whose settings a file may hold (every other command
/// still reads the global ones, such as `database_url`).
pub const CONFIGURABLE_COMMANDS: [&str; 2] = ["serve", "worker"];

/// Arguments that are never settings.
const NOT_SETTINGS: [&str; 3] = ["help", "version", "config"];

/// Reads `path` and returns the arguments that carry its settings, for
/// those not already given by a flag or the environment.
pub fn arguments(
    command: &Command,
    matches: &ArgMatches,
    path: &Path,
) -> Result<Vec<OsString>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "cannot read configuration file {}: {e}",
            path.display()
        ))
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| ConfigError(format!("{}: invalid TOML: {e}", path.display())))?;
    let running = matches.subcommand();
    let mut args = Vec::new();
    for (key, value) in &table {
        let Some(arg) = settings(command).find(|a| a.get_id() == key.as_str()) else {
            return Err(unknown_key(command, path, key));
        };
        // Checked even where a flag overrides it or another command uses
        // it: a file with a wrong setting is wrong wherever it is read.
        let flags = values(arg, path, key, value)?;
        // A setting of another command (e.g. `listen` while running
        // `worker`): the file is shared, so it is not an error.
        let applies = is_global(command, key)
            || running.is_some_and(|(name, _)| {
                command
                    .find_subcommand(name)
                    .is_some_and(|sub| sub.get_arguments().any(|a| a.get_id() == key.as_str()))
            });
        if !applies || given_elsewhere(matches, key) {
            continue;
        }
        let Some(long) = arg.get_long() else {
            continue;
        };
        args.extend(flags.into_iter().map(|v| match v {
            Some(v) => OsString::from(format!("--{long}={v}")),
            None => OsString::from(format!("--{long}")),
        }));
    }
    Ok(args)
}

/// Every argument that is a setting: the global ones and those of the
/// configurable commands.
pub fn settings(command: &Command) -> impl Iterator<Item = &Arg> {
    command
        .get_arguments()
        .chain(
            CONFIGURABLE_COMMANDS
                .iter()
                .filter_map(|name| command.find_subcommand(name))
                .flat_map(Command::get_arguments),
        )
        .filter(|a| !NOT_SETTINGS.contains(&a.get_id().as_str()) && a.get_long().is_some())
}

fn is_global(command: &Command, key: &str) -> bool {
    command.get_arguments().any(|a| a.get_id() == key)
}

/// Whether the command line or the environment set `key` (in the
/// subcommand's matches, where global arguments are propagated too).
fn given_elsewhere(matches: &ArgMatches, key: &str) -> bool {
    // `value_source` wants an id the matches know; `try_get_raw` checks.
    let source = |m: &ArgMatches| m.try_get_raw(key).ok().and_then(|_| m.value_source(key));
    let explicit = |s: Option<ValueSource>| {
        matches!(
            s,
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
        )
    };
    explicit(source(matches))
        || matches
            .subcommand()
            .is_some_and(|(_, sub)| explicit(source(sub)))
}

/// The flag values a TOML value stands for (`None`: a bare switch),
/// checked with the flag's own value parser.
fn values(
    arg: &Arg,
    path: &Path,
    key: &str,
    value: &toml::Value,
) -> Result<Vec<Option<String>>, ConfigError> {
    let wrong = |why: String| ConfigError(format!("{}: setting `{key}`: {why}", path.display()));
    let switch = matches!(arg.get_action(), ArgAction::SetTrue);
    let text = match value {
        toml::Value::Boolean(on) if switch => {
            return Ok(if *on { vec![None] } else { Vec::new() });
        }
        _ if switch => return Err(wrong("expects true or false".into())),
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(_) | toml::Value::Table(_) | toml::Value::Datetime(_) => {
            return Err(wrong("expects a string, a number or a boolean".into()))
        }
    };
    // The flag's own value parser, alone (the full command would also
    // check unrelated rules, such as flags that require each other).
    let long = arg.get_long().unwrap_or(key);
    Command::new("keyward")
        .no_binary_name(true)
        .arg(
            Arg::new("value")
                .long(long.to_owned())
                .value_parser(arg.get_value_parser().clone()),
        )
        .try_get_matches_from([format!("--{long}={text}")])
        .map_err(|e| wrong(first_line(&e.to_string())))?;
    Ok(vec![Some(text)])
}

fn unknown_key(command: &Command, path: &Path, key: &str) -> ConfigError {
    let closest = settings(command)
        .map(|a| a.get_id().as_str())
        .map(|name| (strsim::jaro_winkler(key, name), name))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, name)| format!(" (did you mean `{name}`?)"))
        .unwrap_or_default();
    ConfigError(format!(
        "{}: unknown setting `{key}`{closest}; settings are the flags of `keyward serve --help` \
         and `keyward worker --help` with `_` for `-` (see keyward.example.toml)",
        path.display()
    ))
}

/// clap's message without its `error: ` prefix and usage hint.
fn first_line(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

/// A commented `keyward.toml` listing every setting with its default and
/// environment variable (`keyward config-example`; the repository's
/// keyward.example.toml is its output, checked by a test).
pub fn example(command: &Command) -> String {
    let mut out = String::from(
        "# keyward configuration: `keyward --config keyward.toml serve` (or worker).\n\
         #\n\
         # Every setting is a flag of `keyward serve` or `keyward worker` (or a\n\
         # global one) with `_` for `-`. Precedence: flag > environment > this\n\
         # file > default. Unknown keys and invalid values stop keyward with\n\
         # exit status 64. Secrets never go here: the master secret comes from\n\
         # ENCRYPTION_MASTER_KEY or master_key_file.\n\
         #\n\
         # Generated by `keyward config-example`; uncomment what you change.\n",
    );
    let mut sections: Vec<(&str, Vec<&Arg>)> = vec![("global", command.get_arguments().collect())];
    for name in CONFIGURABLE_COMMANDS {
        if let Some(sub) = command.find_subcommand(name) {
            sections.push((name, sub.get_arguments().collect()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (section, args) in sections {
        out.push_str(&format!("\n# ── {section} ──\n"));
        for arg in args {
            let id = arg.get_id().as_str();
            if NOT_SETTINGS.contains(&id) || arg.get_long().is_none() || !seen.insert(id) {
                continue;
            }
            out.push('\n');
            if let Some(help) = arg.get_help() {
                for line in wrap(&help.to_string(), 74) {
                    out.push_str(&format!("# {line}\n"));
                }
            }
            let choices: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|_| !matches!(arg.get_action(), ArgAction::SetTrue))
                .map(|v| v.get_name().to_owned())
                .collect();
            if !choices.is_empty() {
                out.push_str(&format!("# One of: {}\n", choices.join(", ")));
            }
            if let Some(env) = arg.get_env() {
                out.push_str(&format!("# Environment: {}\n", env.to_string_lossy()));
            }
            let default = arg.get_default_values().first();
            let switch = matches!(arg.get_action(), ArgAction::SetTrue);
            let value = match default {
                _ if switch => "false".to_owned(),
                Some(d) => toml_value(&d.to_string_lossy()),
                None => "…  (unset by default)".to_owned(),
            };
            out.push_str(&format!("# {id} = {value}\n"));
        }
    }
    out
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().map(|l| l.len()).unwrap_or_default();
        if line > 0 && line + 1 + word.len() > width {
            lines.push(String::new());
        }
        if let Some(line) = lines.last_mut() {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// A default as TOML: numbers bare, everything else quoted.
fn toml_value(default: &str) -> String {
    if default.parse::<i64>().is_ok() {
        default.to_owned()
    } else {
        toml::Value::String(default.to_owned()).to_string()
    }
}
