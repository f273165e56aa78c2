//! TLS to PostgreSQL against a real server: a throwaway cluster that takes
//! TCP connections over TLS only (`scripts/pg-test-cluster.sh --ssl`: a
//! self-signed CA, a server certificate for `localhost`, `db.corral.test`
//! and 127.0.0.1, `hostssl`-only pg_hba.conf). Each libpq `sslmode` the
//! store honours is checked for what it lets through and what it refuses,
//! and every failure is checked to say why without printing the password.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use corral::coordinator::store::*;
use corral::types::*;

/// Sent in every URL below; the cluster trusts the role, so it is never
/// checked, but it must never show up in an error either.
const PASSWORD: &str = "hunter2-pg-tls-secret";

/// The TLS-only cluster: its directory (the CA is `ssl/ca.crt`, the unix
/// socket is in it) and port. None: no PostgreSQL here, the test is skipped
/// (a failure under CI).
fn cluster() -> Option<(PathBuf, u16)> {
    static C: OnceLock<Option<(PathBuf, u16)>> = OnceLock::new();
    C.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-test-cluster.sh");
        let dir = PathBuf::from(concat!(env!("CARGO_TARGET_TMPDIR"), "/pg-test-cluster-ssl"));
        // Every nextest process asks; the script starts the cluster once
        // and prints the running one's URL to the others.
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg("start")
            .arg(&dir)
            .args(["--no-fsync", "--ssl"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("bash runs");
        if !out.status.success() {
            let why = format!(
                "the PostgreSQL TLS tests need Debian's `postgresql` package and `openssl` \
                 (scripts/pg-test-cluster.sh --ssl exited {})",
                out.status
            );
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("\n*** SKIPPED: {why} ***\n");
            return None;
        }
        let port = std::fs::read_to_string(dir.join("port")).unwrap();
        Some((dir, port.trim().parse().unwrap()))
    })
    .clone()
}

/// A client over the cluster's unix socket (trusted without TLS), for
/// setting up and looking in.
async fn admin(dir: &std::path::Path, port: u16, db: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::Config::new()
        .host_path(dir)
        .port(port)
        .user("corral")
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the TLS test cluster over its socket: {e}"));
    tokio::spawn(conn);
    c
}

/// A fresh database on the TLS cluster: (its name, the CA file, the port).
async fn fresh() -> Option<(String, String, u16)> {
    let (dir, port) = tokio::task::spawn_blocking(cluster).await.unwrap()?;
    let db = format!("corral_tls_{}", uuid::Uuid::new_v4().simple());
    admin(&dir, port, "postgres")
        .await
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .await
        .unwrap();
    let ca = dir.join("ssl/ca.crt").to_str().unwrap().to_owned();
    Some((db, ca, port))
}

fn opts(url: String) -> PgOptions {
    PgOptions {
        url,
        advertise_url: "http://a:7700".into(),
        lease: Duration::from_secs(30),
    }
}

/// Opens a store on `url` and checks it works end to end: it leads, a
/// write commits and reads back.
async fn open_and_use(url: String) -> Store {
    let (s, _) = match Store::open_postgres(&opts(url)).await {
        Ok(s) => s,
        Err(e) => panic!("the store does not open: {e}"),
    };
    assert!(s.failed().is_none(), "the only coordinator leads");
    let mut j = StoredJob {
        id: JobId("tls-1".into()),
        client: String::new(),
        spec: JobSpec::for_model(ModelId("m".into())),
        state: JobState::Queued,
        attempt: 0,
        failures: 0,
        worker: None,
        tier: None,
        created_ms: 1,
        updated_ms: 1,
        error: String::new(),
        result: None,
        last_worker: None,
    };
    j.spec.prompt = "over TLS".into();
    s.commit(vec![Op::PutJob(Box::new(j.clone()))])
        .await
        .unwrap();
    assert_eq!(s.get(&j.id).await.unwrap(), Some(j));
    s
}

/// The error opening a store on `url` must give; it never holds the password.
async fn open_error(url: String) -> String {
    let e = match Store::open_postgres(&opts(url)).await {
        Ok(_) => panic!("the store opened, and should not have"),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains(PASSWORD), "the error prints the password: {e}");
    eprintln!("refused as it should be: {e}");
    e
}

/// Another CA, which signed nothing the server shows.
fn wrong_ca() -> tempfile::NamedTempFile {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), ca.pem()).unwrap();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_every_connection_and_the_store_works() {
    let Some((db, _, port)) = fresh().await else {
        return;
    };
    let s = open_and_use(format!(
        "postgres://corral:{PASSWORD}@127.0.0.1:{port}/{db}?sslmode=require"
    ))
    .await;
    // The store's connections as the server sees them: the lease session,
    // the writer and the read pool, each over TLS.
    let (dir, _) = cluster().unwrap();
    let rows = admin(&dir, port, "postgres")
        .await
        .query(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid \
             WHERE a.datname = $1 AND a.application_name = 'corral-coordinator'",
            &[&db],
        )
        .await
        .unwrap();
    let ssl: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
    assert!(ssl.len() >= 3, "lease, writer and a reader: {ssl:?}");
    assert!(
        ssl.iter().all(|&on| on),
        "a connection without TLS: {ssl:?}"
    );
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_and_host_connects() {
    let Some((db, ca, port)) = fresh().await else {
        return;
    };
    // By IP address (the certificate names 127.0.0.1).
    let s = open_and_use(format!(
        "postgres://corral:{PASSWORD}@127.0.0.1:{port}/{db}?sslmode=verify-full&sslrootcert={ca}"
    ))
    .await;
    s.close().await.unwrap();
    // By name, the key=value form: `host` is the name checked, `hostaddr`
    // where to connect.
    let s = open_and_use(format!(
        "host=db.corral.test hostaddr=127.0.0.1 port={port} user=corral password={PASSWORD} \
         dbname={db} sslmode=verify-full sslrootcert='{ca}'"
    ))
    .await;
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_not_trusted() {
    let Some((db, _, port)) = fresh().await else {
        return;
    };
    let other = wrong_ca();
    let other = other.path().to_str().unwrap();
    for mode in ["verify-full", "verify-ca", "require"] {
        // require with a root certificate checks the chain (libpq).
        let e = open_error(format!(
            "postgres://corral:{PASSWORD}@127.0.0.1:{port}/{db}?sslmode={mode}&sslrootcert={other}"
        ))
        .await;
        assert!(
            e.contains("not trusted") && e.contains("unknown issuer") && e.contains(other),
            "{mode}: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_host_name_the_certificate_does_not_name() {
    let Some((db, ca, port)) = fresh().await else {
        return;
    };
    let url = |mode: &str| {
        format!(
            "host=elsewhere.corral.test hostaddr=127.0.0.1 port={port} user=corral \
             password={PASSWORD} dbname={db} sslmode={mode} sslrootcert={ca}"
        )
    };
    let e = open_error(url("verify-full")).await;
    assert!(
        e.contains("host name mismatch")
            && e.contains("elsewhere.corral.test")
            && e.contains("db.corral.test"),
        "{e}"
    );
    // verify-ca checks the chain only: the same server is accepted.
    open_and_use(url("verify-ca")).await.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_a_tls_only_server_fails_clearly() {
    let Some((db, _, port)) = fresh().await else {
        return;
    };
    let e = open_error(format!(
        "postgres://corral:{PASSWORD}@127.0.0.1:{port}/{db}?sslmode=disable"
    ))
    .await;
    assert!(
        e.contains("no encryption") && e.contains("the server requires TLS"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_fails_clearly() {
    // The plaintext test cluster every other PostgreSQL test uses.
    let Some(url) = common::pg::fresh_database().await else {
        return;
    };
    if std::env::var_os("CORRAL_TEST_POSTGRES").is_some() {
        // A server named from outside may well support TLS.
        return;
    }
    let mut u = url::Url::parse(&url).unwrap();
    u.set_password(Some(PASSWORD)).unwrap();
    u.set_query(Some("sslmode=require"));
    let e = open_error(u.to_string()).await;
    assert!(e.contains("server does not support TLS"), "{e}");
    // prefer falls back to plaintext, as libpq does.
    u.set_query(Some("sslmode=prefer"));
    open_and_use(u.to_string()).await.close().await.unwrap();
}
