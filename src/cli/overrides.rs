//! One flag and one `CORRAL_*` variable for every key of a config table,
//! generated from the config struct itself, so that a new key can never lack
//! them (the struct in `src/config.rs` is the one definition).
//!
//! A key `limits.max_side_px` of the `[coordinator]` table becomes
//! `--limits-max-side-px` and `CORRAL_LIMITS_MAX_SIDE_PX`. Precedence:
//! defaults, then the file, then the variable, then the flag. Values are
//! parsed by the key's type (taken from the default value); keys whose
//! default is "none" take a TOML literal or, failing that, a string.

use clap::{Arg, ArgMatches, Command, FromArgMatches};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// The values given for one table's keys, by dotted key.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub values: Vec<(String, String)>,
}

/// One key of a table: its dotted path and its default.
struct Key {
    path: String,
    default: serde_json::Value,
}

fn keys_of<T: Serialize + Default>() -> Vec<Key> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<Key>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, v, out);
                }
            }
            other => out.push(Key {
                path: prefix.to_owned(),
                default: other.clone(),
            }),
        }
    }
    let v = serde_json::to_value(T::default()).expect("a config always serializes");
    let mut out = Vec::new();
    walk("", &v, &mut out);
    out
}

/// `limits.max_side_px` -> `limits-max-side-px`.
pub fn flag_name(path: &str) -> String {
    path.replace(['.', '_'], "-")
}

/// `limits.max_side_px` -> `CORRAL_LIMITS_MAX_SIDE_PX`.
pub fn env_name(path: &str) -> String {
    format!("CORRAL_{}", path.replace('.', "_").to_ascii_uppercase())
}

fn is_secret(path: &str) -> bool {
    path.ends_with("token") || path.ends_with("key") || path.ends_with("password")
}

/// Adds a flag for every key of `T` to `cmd`.
pub fn augment<T: Serialize + Default>(table: &str, mut cmd: Command) -> Command {
    for k in keys_of::<T>() {
        let shown = match &k.default {
            serde_json::Value::Null => "none".to_owned(),
            v if is_secret(&k.path) => {
                let _ = v;
                "none".to_owned()
            }
            v => v.to_string(),
        };
        let arg = Arg::new(k.path.clone())
            .long(flag_name(&k.path))
            .env(env_name(&k.path))
            .value_name("VALUE")
            .hide_env_values(is_secret(&k.path))
            .help(format!(
                "[{table}] {} in the config file (default: {shown})",
                k.path
            ))
            .help_heading("Config keys (src/config.rs documents each)");
        cmd = cmd.arg(arg);
    }
    cmd
}

/// The values given on the command line or in the environment.
pub fn collect<T: Serialize + Default>(m: &ArgMatches) -> Overrides {
    let values = keys_of::<T>()
        .into_iter()
        .filter_map(|k| {
            m.get_one::<String>(&k.path)
                .map(|v| (k.path.clone(), v.clone()))
        })
        .collect();
    Overrides { values }
}

/// Parses `raw` as the type of `default`.
fn parse_value(path: &str, raw: &str, default: &serde_json::Value) -> Result<toml::Value> {
    let bad = |what: &str| {
        Error::Config(format!(
            "--{} / {}: {raw:?} is not {what}",
            flag_name(path),
            env_name(path)
        ))
    };
    Ok(match default {
        serde_json::Value::Bool(_) => toml::Value::Boolean(match raw {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(bad("true or false")),
        }),
        serde_json::Value::Number(n) if n.is_f64() => {
            toml::Value::Float(raw.parse().map_err(|_| bad("a number"))?)
        }
        serde_json::Value::Number(_) => {
            toml::Value::Integer(raw.parse().map_err(|_| bad("an integer"))?)
        }
        serde_json::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        serde_json::Value::String(_) => toml::Value::String(raw.to_owned()),
        // No default to learn the type from: a TOML literal, else a string.
        _ => toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
    })
}

/// `base` (the file's table) with the overrides applied, as `T`.
pub fn apply<T: Serialize + DeserializeOwned + Default>(
    table: &str,
    base: &T,
    o: &Overrides,
) -> Result<T> {
    let keys = keys_of::<T>();
    let mut doc = toml::Table::try_from(base)
        .map_err(|e| Error::Internal(format!("config does not serialize: {e}")))?;
    for (path, raw) in &o.values {
        let default = keys
            .iter()
            .find(|k| &k.path == path)
            .map(|k| k.default.clone())
            .unwrap_or_default();
        let value = parse_value(path, raw, &default)?;
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().expect("paths are not empty");
        let mut t = &mut doc;
        for p in parts {
            t = t
                .entry(p)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| Error::Internal(format!("config key {p} is not a table")))?;
        }
        t.insert(last.to_owned(), value);
    }
    doc.try_into()
        .map_err(|e| Error::Config(format!("[{table}] (flags and CORRAL_* variables): {e}")))
}

/// Generated flags for the `[coordinator]` table.
#[derive(Clone, Debug, Default)]
pub struct CoordinatorKeys(pub Overrides);

/// Generated flags for the `[worker]` table.
#[derive(Clone, Debug, Default)]
pub struct WorkerKeys(pub Overrides);

macro_rules! keys_args {
    ($name:ident, $cfg:ty, $table:literal) => {
        impl FromArgMatches for $name {
            fn from_arg_matches(m: &ArgMatches) -> std::result::Result<Self, clap::Error> {
                Ok(Self(collect::<$cfg>(m)))
            }
            fn update_from_arg_matches(
                &mut self,
                m: &ArgMatches,
            ) -> std::result::Result<(), clap::Error> {
                self.0 = collect::<$cfg>(m);
                Ok(())
            }
        }

        impl clap::Args for $name {
            fn augment_args(cmd: Command) -> Command {
                augment::<$cfg>($table, cmd)
            }
            fn augment_args_for_update(cmd: Command) -> Command {
                augment::<$cfg>($table, cmd)
            }
        }
    };
}

keys_args!(
    CoordinatorKeys,
    crate::config::CoordinatorConfig,
    "coordinator"
);
keys_args!(WorkerKeys, crate::config::WorkerConfig, "worker");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CoordinatorConfig, WorkerConfig};

    /// A value of the same type as `default` that differs from it.
    fn other_value(path: &str, default: &serde_json::Value) -> String {
        match default {
            serde_json::Value::Bool(b) => (!b).to_string(),
            serde_json::Value::Number(n) if n.is_f64() => (n.as_f64().unwrap() + 1.5).to_string(),
            serde_json::Value::Number(n) => (n.as_u64().unwrap_or(0) + 3).to_string(),
            serde_json::Value::String(s) if s.contains("://") => "http://10.0.0.9:7000".into(),
            serde_json::Value::String(s) if s.parse::<std::net::SocketAddr>().is_ok() => {
                "10.0.0.9:7000".into()
            }
            serde_json::Value::String(s) if s == "onnx" => "synthetic".into(),
            serde_json::Value::String(s) if s == "cpu" => "cuda".into(),
            serde_json::Value::String(_) => format!("/tmp/{}", path.replace('.', "-")),
            serde_json::Value::Array(_) => "a,b".into(),
            _ if path.ends_with("listen") => "10.0.0.9:7001".into(),
            _ if path.ends_with("_s") || path.ends_with("_ms") || path.ends_with("bytes") => {
                "7".into()
            }
            _ => format!("/tmp/{}", path.replace('.', "-")),
        }
    }

    /// Every key of a table can be set by flag and by variable, and the
    /// value arrives in the resolved config.
    fn every_key_is_settable<T>(table: &str)
    where
        T: Serialize + DeserializeOwned + Default,
    {
        let keys = keys_of::<T>();
        assert!(keys.len() > 5, "{table}: keys found: {}", keys.len());
        for k in keys {
            // A key without a default has no type to learn from: one of
            // these values must be accepted and arrive.
            let candidates = match k.default {
                serde_json::Value::Null => vec![
                    other_value(&k.path, &k.default),
                    "true".into(),
                    "7".into(),
                    "10.0.0.9:7001".into(),
                ],
                _ => vec![other_value(&k.path, &k.default)],
            };
            let changed = candidates.iter().any(|raw| {
                let o = Overrides {
                    values: vec![(k.path.clone(), raw.clone())],
                };
                let Ok(cfg) = apply::<T>(table, &T::default(), &o) else {
                    return false;
                };
                let got = serde_json::to_value(&cfg).unwrap();
                let mut v = &got;
                for p in k.path.split('.') {
                    v = &v[p];
                }
                v != &k.default
            });
            assert!(
                changed,
                "{table}.{} cannot be set: tried {candidates:?}",
                k.path
            );
        }
    }

    #[test]
    fn every_coordinator_key_is_settable() {
        every_key_is_settable::<CoordinatorConfig>("coordinator");
    }

    #[test]
    fn every_worker_key_is_settable() {
        every_key_is_settable::<WorkerConfig>("worker");
    }

    #[test]
    fn flags_and_variables_are_generated_for_every_key() {
        let cmd = augment::<CoordinatorConfig>("coordinator", Command::new("t"));
        for k in keys_of::<CoordinatorConfig>() {
            let a = cmd
                .get_arguments()
                .find(|a| a.get_id().as_str() == k.path)
                .unwrap_or_else(|| panic!("no flag for {}", k.path));
            assert_eq!(a.get_long(), Some(flag_name(&k.path).as_str()));
            assert_eq!(
                a.get_env().and_then(|e| e.to_str()),
                Some(env_name(&k.path).as_str())
            );
        }
        assert!(keys_of::<CoordinatorConfig>()
            .iter()
            .any(|k| k.path == "limits.max_side_px"));
    }

    #[test]
    fn a_bad_value_names_the_flag_and_variable() {
        let o = Overrides {
            values: vec![("heartbeat_missed".into(), "three".into())],
        };
        let e = apply("coordinator", &CoordinatorConfig::default(), &o)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--heartbeat-missed") && e.contains("CORRAL_HEARTBEAT_MISSED"),
            "{e}"
        );
    }
}
