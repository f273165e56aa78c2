//! Credentials never reach an error or a log line.
//!
//! A coordinator and a worker run as real processes (JSON logs, `corral` at debug level);
//! models come from an HTTP server in this test whose sources carry a pre-signed query and
//! userinfo, and from `az://` with a worker-local `AZURE_STORAGE_SAS_TOKEN`. Some downloads
//! fail (404, connection refused), some succeed; the CLI fails to read a signed manifest URL.
//! Then every byte of output (both processes' stderr, the CLI's stdout and stderr, every
//! job's client-visible error) is searched for each secret.

#[path = "cache_common/mod.rs"]
mod cache_common;
mod common;

use std::path::Path;

use cache_common::{content, file_entry, TestServer};
use common::procs::{coordinator, Proc};
use common::{register, spec, submit, wait_state};
use corral::pb;
use corral::types::{ModelId, ModelKind, ModelManifest};

/// Every secret in this test; none may appear in any output.
const AMZ_SIGNATURE: &str = "5ec12e7a11ce0ffee0123456789abcdefdeadbeef";
const AMZ_CREDENTIAL: &str = "AKIASECRETKEYID7777";
const PASSWORD: &str = "hunter2-basic-auth-pw";
const SAS_SIG: &str = "SaSsIgNaTuRe0123456789zzzz";
const CLI_SIGNATURE: &str = "c11519a7e0000000000000000000000000000042";

fn sas_token() -> String {
    format!("sv=2022-11-02&sp=r&sig={SAS_SIG}")
}

fn signed_query(sig: &str) -> String {
    format!(
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={AMZ_CREDENTIAL}%2F20250101%2Fus-east-1\
         %2Fs3%2Faws4_request&X-Amz-Signature={sig}"
    )
}

const FILES: &[(&str, usize)] = &[("model_index.json", 100), ("unet/model.onnx", 50_000)];

/// Publishes a bundle at `dir/` on the server (without registering it).
fn publish_at(srv: &TestServer, dir: &str, id: &str) -> Vec<corral::types::ModelFile> {
    let mut files = Vec::new();
    for (p, n) in FILES {
        let bytes = content(&format!("{id}/{p}"), *n);
        files.push(file_entry(p, &bytes));
        srv.put(&format!("{dir}/{p}"), bytes);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

fn manifest(id: &str, source: String, files: Vec<corral::types::ModelFile>) -> ModelManifest {
    ModelManifest {
        family: String::new(),
        format: String::new(),
        id: ModelId::from(id),
        kind: ModelKind::Checkpoint,
        source,
        files,
    }
}

fn start_worker(logs: &Path, url: &str, cache: &Path, blob_endpoint: &str) -> Proc {
    Proc::start(
        logs,
        "worker",
        &[
            "worker",
            "--coordinator",
            url,
            "--worker-id",
            "w1",
            "--engine",
            "synthetic",
            "--synthetic-step-ms",
            "1",
            "--shutdown-grace-s",
            "1",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        &[
            ("RUST_LOG", "info,corral=debug"),
            ("AZURE_STORAGE_SAS_TOKEN", &sas_token()),
            ("AZURE_STORAGE_BLOB_ENDPOINT", blob_endpoint),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_an_error_or_a_log() {
    let srv = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let (mut coord, addr) = coordinator(
        &logs,
        "127.0.0.1:0",
        &dir.path().join("data"),
        &[
            "--heartbeat-interval-s",
            "0.2",
            "--max-attempts",
            "1",
            "--insecure-no-auth",
        ],
    );
    let url = format!("http://{addr}");
    let blob_endpoint = format!("http://{}/devacct", srv.addr);
    let mut worker = start_worker(&logs, &url, &dir.path().join("cache"), &blob_endpoint);
    worker.wait_log("connected", 30);
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    // (model, source, should it complete?)
    let good_files = publish_at(&srv, "good", "good");
    let az_files = publish_at(&srv, "devacct/models/azgood", "azgood");
    let signed = |path: &str| {
        format!(
            "http://reader:{PASSWORD}@{}/{path}?{}",
            srv.addr,
            signed_query(AMZ_SIGNATURE)
        )
    };
    let cases = [
        ("http-good", signed("good"), good_files.clone(), true),
        // Nothing at that prefix: HTTP 404.
        ("http-404", signed("missing"), good_files.clone(), false),
        // Nobody listening: a transport error, retried, then given up.
        (
            "http-refused",
            format!(
                "http://reader:{PASSWORD}@127.0.0.1:{closed_port}/m?{}",
                signed_query(AMZ_SIGNATURE)
            ),
            good_files.clone(),
            false,
        ),
        (
            "az-good",
            "az://devacct/models/azgood".into(),
            az_files,
            true,
        ),
        (
            "az-404",
            "az://devacct/models/nothing".into(),
            good_files,
            false,
        ),
    ];
    let mut errors = Vec::new();
    for (i, (id, source, files, completes)) in cases.into_iter().enumerate() {
        register(&url, &manifest(id, source, files)).await;
        let job = submit(&url, spec(id, i as u64)).await;
        let want = if completes {
            pb::JobState::Completed
        } else {
            pb::JobState::Failed
        };
        let j = wait_state(&url, &job.id, want, 60).await;
        if !completes {
            assert!(!j.error.is_empty(), "{id}: a failed job without an error");
        }
        errors.push(format!("{id}: {}", j.error));
    }
    // The secrets were in use: the server saw the signature and the SAS token.
    let queries: Vec<String> = srv
        .state
        .queries
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, q)| q.clone())
        .collect();
    assert!(
        queries.iter().any(|q| q.contains(AMZ_SIGNATURE)),
        "{queries:?}"
    );
    assert!(queries.iter().any(|q| q.contains(SAS_SIG)), "{queries:?}");

    // The CLI, reading a manifest from a signed URL that answers 404.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_corral"))
        .args(["models", "add", "cli-model", "--source"])
        .arg(format!(
            "http://{}/nothing-here?{}",
            srv.addr,
            signed_query(CLI_SIGNATURE)
        ))
        .args(["--coordinator", &url])
        .env_remove("CORRAL_TOKEN")
        .output()
        .unwrap();
    assert!(!cli.status.success());
    let cli_out = format!(
        "{}{}",
        String::from_utf8_lossy(&cli.stdout),
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(
        cli_out.contains("404"),
        "the CLI did not say why: {cli_out}"
    );

    worker.kill();
    coord.kill();
    let mut outputs = vec![
        ("job errors".to_owned(), errors.join("\n")),
        ("cli".to_owned(), cli_out),
    ];
    for p in [&worker, &coord] {
        outputs.push((p.stderr.display().to_string(), p.log()));
    }
    for secret in [
        AMZ_SIGNATURE,
        AMZ_CREDENTIAL,
        PASSWORD,
        SAS_SIG,
        CLI_SIGNATURE,
    ] {
        for (name, text) in &outputs {
            if let Some(line) = text.lines().find(|l| l.contains(secret)) {
                panic!("{secret:?} appears in {name}:\n{line}");
            }
        }
    }
    // Not vacuous: the failures were logged and reported, with the URLs redacted.
    let worker_log = &outputs[2].1;
    assert!(worker_log.contains("download failed"), "{worker_log}");
    assert!(worker_log.contains("REDACTED"), "{worker_log}");
    assert!(outputs[0].1.contains("HTTP 404"), "{}", outputs[0].1);
}
