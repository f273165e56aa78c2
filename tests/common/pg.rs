//! PostgreSQL for tests: a real server, never a mock.
//!
//! `CORRAL_TEST_POSTGRES` names a server (a `postgres://` URL of a role
//! that may create databases). Unset, the first test that needs one starts
//! a throwaway cluster with `scripts/pg-test-cluster.sh` in the target
//! directory and every later test (each nextest process) reuses it. Each
//! test gets databases of its own.
//!
//! Without PostgreSQL installed the tests that need it say so loudly and
//! return, except under CI (`CI` set), where that is a failure.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Whether this test binary runs its coordinators on PostgreSQL: binaries
/// named `postgres_*` share the bodies of the embedded-store tests.
pub fn enabled() -> bool {
    env!("CARGO_CRATE_NAME").starts_with("postgres_")
}

fn server() -> Option<String> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(u) = std::env::var("CORRAL_TEST_POSTGRES") {
            if !u.is_empty() {
                return Some(u);
            }
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-test-cluster.sh");
        let dir = concat!(env!("CARGO_TARGET_TMPDIR"), "/pg-test-cluster");
        let out = std::process::Command::new("bash")
            .args([script, "start", dir, "--no-fsync"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("bash runs");
        if out.status.success() {
            return Some(String::from_utf8(out.stdout).unwrap().trim().to_owned());
        }
        let why = format!(
            "PostgreSQL tests need a server: install Debian's `postgresql` package \
             (scripts/pg-test-cluster.sh starts a throwaway one) or set \
             CORRAL_TEST_POSTGRES=postgres://user@host:port/db (exit {})",
            out.status
        );
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("\n*** SKIPPED: {why} ***\n");
        None
    })
    .clone()
}

/// `base` with its database replaced by `db`.
fn with_database(base: &str, db: &str) -> String {
    let mut u = url::Url::parse(base).expect("CORRAL_TEST_POSTGRES is a postgres:// URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

async fn create(base: &str, db: &str) {
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
    let task = tokio::spawn(conn);
    match client
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .await
    {
        Ok(()) => {}
        // Created already (a restart of the same test's coordinator).
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
        Err(e) => panic!("CREATE DATABASE {db}: {e}"),
    }
    drop(client);
    let _ = task.await;
}

/// A new database's URL (None: no PostgreSQL here, the test is skipped).
pub async fn fresh_database() -> Option<String> {
    let base = tokio::task::spawn_blocking(server).await.unwrap()?;
    let db = format!("corral_t_{}", uuid::Uuid::new_v4().simple());
    create(&base, &db).await;
    Some(with_database(&base, &db))
}

/// The database standing for the embedded store under `data_dir`: the same
/// one for every coordinator started on that directory, so that restarts
/// find their state. Callable from sync code and from async tests.
pub fn database_for(data_dir: &Path) -> Option<String> {
    static DBS: OnceLock<Mutex<HashMap<std::path::PathBuf, String>>> = OnceLock::new();
    let dbs = DBS.get_or_init(Default::default);
    if let Some(u) = dbs.lock().unwrap().get(data_dir) {
        return Some(u.clone());
    }
    // A thread of its own: the caller may be inside a runtime.
    let url = std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(fresh_database())
    })
    .join()
    .unwrap()?;
    dbs.lock()
        .unwrap()
        .insert(data_dir.to_path_buf(), url.clone());
    Some(url)
}

/// The store setting for a coordinator of this test on `data_dir`: none
/// (the embedded store) unless this binary runs on PostgreSQL.
pub fn store_for(data_dir: &Path) -> Option<corral::auth::Secret> {
    if !enabled() {
        return None;
    }
    let url = database_for(data_dir).unwrap_or_else(|| {
        panic!("this test runs on PostgreSQL and none is available (see the message above)")
    });
    Some(corral::auth::Secret::new(url))
}

/// A direct connection to `url`, for tests that look into the database.
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}
