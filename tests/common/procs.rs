//! Real `corral` processes for crash tests: started with their logs in
//! files, killed with SIGKILL, restarted on the same port and data dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `corral` child process and the files holding its output.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub stderr: PathBuf,
}

impl Proc {
    /// Starts `corral ARGS` with JSON logs in `logs/NAME-N.stderr`.
    pub fn start(logs: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(logs).unwrap();
        let mut n = 0;
        let stderr = loop {
            let p = logs.join(format!("{name}-{n}.stderr"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corral"));
        cmd.args(args)
            .env("CORRAL_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("CORRAL_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Self {
            name: name.to_owned(),
            child,
            stderr,
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before logging {needle:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needle:?} within {secs} s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a coordinator; returns it and its address (from its log, so
/// that `listen` may be port 0 the first time). In a `postgres_*` test
/// binary its store is the PostgreSQL database standing for `data_dir`.
pub fn coordinator(logs: &Path, listen: &str, data_dir: &Path, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "coordinator",
        "--listen",
        listen,
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    let store = super::pg::store_for(data_dir);
    if let Some(url) = &store {
        args.extend(["--store", url.expose()]);
    }
    args.extend_from_slice(extra);
    let mut p = Proc::start(logs, "coordinator", &args, &[]);
    let line = p.wait_log("coordinator listening", 30);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = v["fields"]["addr"].as_str().unwrap().to_owned();
    (p, addr)
}

/// Lines of any log under `logs` that mention a panic.
pub fn panics(logs: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(logs).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for l in text.lines().filter(|l| l.contains("panicked")) {
            out.push(format!("{}: {l}", e.file_name().to_string_lossy()));
        }
    }
    out
}
