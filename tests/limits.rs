//! Limits that protect the coordinator: worker streams, unfinished jobs,
//! connections (a cap, handshake and idle deadlines, running out of file
//! descriptors) and the length of what workers report (per-client limits
//! are in tests/auth.rs; request fields in control_plane.rs).
//!
//! Figures: `cargo nextest run -E 'binary(limits)' --no-capture`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs;
use common::raw::RawWorker;
use common::*;
use corral::config::{CoordinatorConfig, JobLimits};
use corral::pb;
use tokio::net::TcpStream;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_streams_are_limited() {
    let c = coordinator(CoordinatorConfig {
        max_worker_streams: 1,
        ..fast_config()
    })
    .await;
    let first = RawWorker::connect(&c.url, "w1", vec![]).await;
    first.heartbeat(vec![]);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(pb::Hello {
            worker_id: "w2".into(),
            max_concurrent_jobs: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let refused = pb::workers_client::WorkersClient::new(channel(&c.url).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("max_worker_streams"),
        "{refused:?}"
    );
    // The same worker reconnecting after its stream ended is not a new
    // stream (a second live stream for one id is refused: control_plane).
    drop(first);
    let url = c.url.clone();
    wait_until(10, "w1 to reconnect", || {
        let url = url.clone();
        async move { try_hello(&url, "w1").await.is_ok() }
    })
    .await;
    drop(tx);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_jobs_are_limited_in_total() {
    let c = coordinator(CoordinatorConfig {
        limits: JobLimits {
            max_unfinished_jobs: 2,
            ..JobLimits::default()
        },
        ..fast_config()
    })
    .await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    submit(&c.url, spec("sd-a", 1)).await;
    submit(&c.url, spec("sd-a", 2)).await;
    let third = jobs(&c.url)
        .await
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec("sd-a", 3)),
        })
        .await
        .unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
    assert!(third.message().contains("max_unfinished_jobs"), "{third:?}");
    c.stop().await;
}

/// Says Hello as `id`; the stream is dropped at once.
async fn try_hello(url: &str, id: &str) -> Result<(), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(pb::Hello {
            worker_id: id.into(),
            max_concurrent_jobs: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    pb::workers_client::WorkersClient::new(channel(url).await)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|_| ())
}

// ---- connections -------------------------------------------------------------

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// Health within 2 s (a connection the coordinator cannot serve yet
/// waits in its listen queue).
async fn healthy(url: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), health(url)).await,
        Ok(Ok(1))
    )
}

/// Reads until the peer closes; what it sent is dropped.
async fn until_closed(mut s: TcpStream) {
    let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
}

/// 300 sockets that never send the HTTP/2 preface are closed after the
/// handshake timeout, and a real client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_closed_after_the_handshake_timeout() {
    let (c, http) = coordinator_with_http(CoordinatorConfig {
        handshake_timeout_s: 1.0,
        ..fast_config()
    })
    .await;
    let url = c.url.clone();
    wait_until(10, "the coordinator to serve", || healthy(&url)).await;
    let addr = addr_of(&c.url);
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    let served = Instant::now();
    assert_eq!(
        worker_count(&c.url).await,
        0,
        "a client is served meanwhile"
    );
    let served_in = served.elapsed();
    let closed = futures::future::join_all(silent.into_iter().map(until_closed));
    tokio::time::timeout(Duration::from_secs(30), closed)
        .await
        .expect("the coordinator closes every silent socket");
    let took = started.elapsed();
    let timed_out = scrape(
        &http,
        "corral_connections_closed_total{port=\"grpc\",reason=\"handshake_timeout\"}",
    )
    .await;
    assert!(timed_out >= 300.0, "{timed_out}");
    println!(
        "connections: 300 silent sockets all closed {:.2} s after they opened \
         (handshake_timeout_s = 1); a client call meanwhile took {:.0} ms",
        took.as_secs_f64(),
        served_in.as_secs_f64() * 1e3
    );
    c.stop().await;
}

/// With `max_connections` open, one more is closed at once (and counted);
/// when some close, clients get through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds() {
    let (c, http) = coordinator_with_http(CoordinatorConfig {
        max_connections: Some(8),
        handshake_timeout_s: 120.0,
        ..fast_config()
    })
    .await;
    let url = c.url.clone();
    wait_until(10, "the coordinator to serve", || healthy(&url)).await;
    let open = "corral_connections_open{port=\"grpc\"}";
    let h = http.clone();
    wait_until(10, "the health check's connection to close", || {
        let h = h.clone();
        async move { scrape(&h, open).await == 0.0 }
    })
    .await;
    let addr = addr_of(&c.url);
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    wait_until(10, "8 connections open", || {
        let h = h.clone();
        async move { scrape(&h, open).await == 8.0 }
    })
    .await;
    let refused = "corral_connections_refused_total{port=\"grpc\"}";
    let refused0 = scrape(&http, refused).await;
    // The ninth is closed as soon as it is accepted.
    let ninth = TcpStream::connect(&addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), until_closed(ninth))
        .await
        .expect("a connection over the cap is closed at once");
    assert!(!healthy(&c.url).await, "a client over the cap is refused");
    assert!(scrape(&http, refused).await >= refused0 + 2.0);
    assert_eq!(scrape(&http, open).await, 8.0);
    // Room again once some close.
    silent.truncate(4);
    wait_until(10, "a client to get through", || healthy(&url)).await;
    drop(silent);
    c.stop().await;
}

/// A connection with no call in progress for `idle_timeout_s` is closed; one
/// carrying a long call (a WatchJob stream) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_calls_in_progress_are_not() {
    let (c, http) = coordinator_with_http(CoordinatorConfig {
        idle_timeout_s: 1.0,
        ..fast_config()
    })
    .await;
    let models = tmp();
    register(&c.url, &make_model(models.path(), "sd-a")).await;
    let job = submit(&c.url, spec("sd-a", 1)).await;
    // No worker yet: the watch stays open past the idle timeout.
    let mut watcher = jobs(&c.url).await;
    let mut events = watcher
        .watch_job(pb::WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // One call, then nothing, on another connection.
    let idle = channel(&c.url).await;
    let mut admin = pb::admin_client::AdminClient::new(idle);
    admin.list_workers(pb::ListWorkersRequest {}).await.unwrap();
    let closed = "corral_connections_closed_total{port=\"grpc\",reason=\"idle_timeout\"}";
    let h = http.clone();
    wait_until(15, "the idle connection to be closed", || {
        let h = h.clone();
        async move { scrape(&h, closed).await >= 1.0 }
    })
    .await;
    // The idle connection closed after 1 s without a call, so the watch,
    // older, has run past the idle timeout: it must still deliver.
    let cache = tmp();
    let w = worker("w1", worker_config(&c.url, cache.path())).await;
    let completed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = events.message().await.expect("the watch stream stays open") {
            if let Some(pb::job_event::Event::Completed(_)) = ev.event {
                return true;
            }
        }
        false
    })
    .await
    .expect("the job completes");
    assert!(completed, "the watch ended without the completion");
    // The client whose idle connection was closed reconnects on its own.
    admin.list_workers(pb::ListWorkersRequest {}).await.unwrap();
    w.stop().await;
    c.stop().await;
}

/// Out of file descriptors: the accept loop logs the error and backs off
/// (it does not spin), and recovers once the silent sockets time out.
#[test]
fn out_of_file_descriptors_backs_off_and_recovers() {
    let dir = tmp();
    let logs = dir.path().join("logs");
    // A cap above the limit, so that accept itself fails.
    let (mut p, addr) = procs::coordinator_with_files(
        &logs,
        Some(96),
        "127.0.0.1:0",
        &dir.path().join("data"),
        &[
            "--insecure-no-auth",
            "--max-connections",
            "10000",
            "--handshake-timeout-s",
            "2",
        ],
    );
    let held: Vec<std::net::TcpStream> = (0..150)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let line = p.wait_log("accept failed", 20);
    assert!(line.contains("os error 24"), "{line}");
    assert!(line.contains("WARN"), "{line}");
    let (cpu0, t0) = (p.cpu_s(), Instant::now());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://{addr}");
    rt.block_on(wait_until(60, "a client to get through", || healthy(&url)));
    let (cpu, wall) = (p.cpu_s() - cpu0, t0.elapsed().as_secs_f64());
    let errors = p.log().matches("accept failed").count();
    println!(
        "open files: ulimit -n 96, 150 silent sockets: accept failed (EMFILE), {errors} WARN \
         lines; {cpu:.2} CPU s over the {wall:.1} s until a client got through ({:.0}% of a core)",
        100.0 * cpu / wall
    );
    // A busy accept loop burns a core; backing off costs next to nothing.
    assert!(cpu / wall < 0.25, "{cpu} CPU s in {wall} s");
    drop(held);
}

/// Under a low open-file limit the default cap leaves room: sockets over it
/// are refused at once (and logged), accept never fails, and clients get
/// through once the silent sockets time out.
#[test]
fn the_default_cap_follows_the_open_file_limit() {
    let dir = tmp();
    let logs = dir.path().join("logs");
    let (mut p, addr) = procs::coordinator_with_files(
        &logs,
        Some(96),
        "127.0.0.1:0",
        &dir.path().join("data"),
        &["--insecure-no-auth", "--handshake-timeout-s", "2"],
    );
    let listening = p.wait_log("coordinator listening", 10);
    assert!(listening.contains("\"max_connections\":32"), "{listening}");
    let held: Vec<std::net::TcpStream> = (0..150)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    p.wait_log("connection refused: max_connections are open", 20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://{addr}");
    rt.block_on(wait_until(60, "a client to get through", || healthy(&url)));
    assert!(!p.log().contains("accept failed"), "{}", p.log());
    drop(held);
}

// ---- what workers report ----------------------------------------------------------

fn disk_models(n: usize) -> Vec<pb::DiskModel> {
    (0..n)
        .map(|i| pb::DiskModel {
            model_id: format!("model-{i:07}"),
            bytes: 1 << 30,
            preloaded: false,
        })
        .collect()
}

/// Opens a Connect stream with `hello`; the call's answer.
async fn connect_with(
    url: &str,
    hello: pb::Hello,
) -> (
    tokio::sync::mpsc::Sender<pb::WorkerMessage>,
    Result<tonic::Streaming<pb::CoordinatorMessage>, tonic::Status>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let r = pb::workers_client::WorkersClient::new(channel(url).await)
        .max_encoding_message_size(64 << 20)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner());
    (tx, r)
}

fn hello(id: &str, state: pb::Heartbeat) -> pb::Hello {
    pb::Hello {
        worker_id: id.into(),
        max_concurrent_jobs: 1,
        state: Some(state),
        ..Default::default()
    }
}

/// The stream's end: the status it ended with, skipping messages.
async fn stream_end(rx: &mut tonic::Streaming<pb::CoordinatorMessage>) -> tonic::Status {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Status::ok("ended"),
                Err(s) => return s,
            }
        }
    })
    .await
    .expect("the stream ends")
}

/// Reports longer than `limits.*` allow are refused with RESOURCE_EXHAUSTED
/// naming the setting: a Hello at once, a Heartbeat by closing the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_worker_reports_are_refused() {
    let c = coordinator(CoordinatorConfig {
        limits: JobLimits {
            max_worker_models: 100,
            ..JobLimits::default()
        },
        ..fast_config()
    })
    .await;
    let state = |n| pb::Heartbeat {
        disk_models: disk_models(n),
        ..Default::default()
    };
    let (_tx, refused) = connect_with(&c.url, hello("w1", state(101))).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("limits.max_worker_models")
            && refused.message().contains("disk_models"),
        "{refused:?}"
    );
    // At the limit: welcome. One model more in a heartbeat: the stream ends.
    let (tx, rx) = connect_with(&c.url, hello("w1", state(100))).await;
    let mut rx = rx.unwrap();
    wait_workers(&c.url, 1).await;
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Heartbeat(pb::Heartbeat {
            vram_models: (0..101).map(|i| format!("m{i}")).collect(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let end = stream_end(&mut rx).await;
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(end.message().contains("vram_models"), "{end:?}");
    wait_workers(&c.url, 0).await;
    c.stop().await;
}

/// The case: one heartbeat listing 10^6 models (under the 64 MiB
/// message limit) cost 620 MB and stalled the scheduler 3.3 s. It is now
/// refused before anything is built from it; the figures are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_listing_a_million_models_is_refused() {
    let c = coordinator(fast_config()).await;
    let (tx, rx) = connect_with(&c.url, hello("w1", pb::Heartbeat::default())).await;
    let mut rx = rx.unwrap();
    let huge = pb::Heartbeat {
        disk_models: disk_models(1_000_000),
        ..Default::default()
    };
    let bytes = prost::Message::encoded_len(&huge);
    let sent = Instant::now();
    tx.send(pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Heartbeat(huge)),
    })
    .await
    .unwrap();
    let end = stream_end(&mut rx).await;
    let refused_in = sent.elapsed();
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(end.message().contains("1000000"), "{end:?}");
    let asked = Instant::now();
    worker_count(&c.url).await;
    println!(
        "reports: a heartbeat of 10^6 models ({:.1} MB) refused {:.0} ms after it was sent \
         (encoding, transfer and decoding included); the next call took {:.1} ms",
        bytes as f64 / 1e6,
        refused_in.as_secs_f64() * 1e3,
        asked.elapsed().as_secs_f64() * 1e3
    );
    c.stop().await;
}

/// With TLS: a socket that stalls inside the TLS handshake, and one that
/// completes it but never sends the HTTP/2 preface, are both closed after
/// the handshake timeout; a TLS client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_closed() {
    use tokio::io::AsyncWriteExt;
    use tokio_rustls::rustls;

    let certs = tmp();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key, ca) = (
        certs.path().join("cert.pem"),
        certs.path().join("key.pem"),
        certs.path().join("ca.pem"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let c = coordinator(CoordinatorConfig {
        tls_cert: Some(cert),
        tls_key: Some(key),
        handshake_timeout_s: 1.0,
        ..fast_config()
    })
    .await;
    let addr = addr_of(&c.url);
    let https = c.url.replace("http://", "https://");
    let served = || async {
        let ch = corral::auth::connect(&https, Some(&ca), None).await;
        match ch {
            Ok(ch) => pb::admin_client::AdminClient::new(ch)
                .list_workers(pb::ListWorkersRequest {})
                .await
                .is_ok(),
            Err(_) => false,
        }
    };
    wait_until(10, "a TLS client to be served", served).await;
    let started = Instant::now();
    // Stalls inside the TLS handshake: a ClientHello record header that
    // announces more bytes than ever come.
    let mut partial = TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .await
        .unwrap();
    // Completes the TLS handshake, then sends nothing.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut quiet = connector
        .connect(name, TcpStream::connect(&addr).await.unwrap())
        .await
        .expect("the TLS handshake completes");
    assert!(served().await, "a TLS client is served meanwhile");
    let closed = async {
        until_closed(partial).await;
        let _ = tokio::io::copy(&mut quiet, &mut tokio::io::sink()).await;
    };
    tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .expect("both stalled connections are closed");
    println!(
        "connections (TLS): a stalled TLS handshake and a TLS connection without the HTTP/2 \
         preface closed {:.2} s after they opened (handshake_timeout_s = 1)",
        started.elapsed().as_secs_f64()
    );
    c.stop().await;
}
