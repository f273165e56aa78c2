//! The PostgreSQL store against a real server: the same semantics as the
//! embedded store (each check runs on both), migrations, leadership and
//! fencing between two stores sharing one database.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::pg;
use corral::coordinator::store::*;
use corral::types::*;

fn job(id: &str, client: &str, created_ms: u64, state: JobState) -> StoredJob {
    StoredJob {
        id: JobId(id.into()),
        client: client.into(),
        spec: JobSpec::for_model(ModelId("m".into())),
        state,
        attempt: 0,
        failures: 0,
        worker: None,
        tier: None,
        created_ms,
        updated_ms: created_ms,
        error: String::new(),
        result: None,
        last_worker: None,
    }
}

fn opts(url: &str, me: &str, lease_s: f64) -> PgOptions {
    PgOptions {
        url: url.to_owned(),
        advertise_url: format!("http://{me}:7700"),
        lease: Duration::from_secs_f64(lease_s),
    }
}

/// A PostgreSQL store on a fresh database, and one embedded store: the
/// checks below run on both. None when PostgreSQL is not available.
async fn both() -> Option<(Vec<(&'static str, Store)>, String, tempfile::TempDir)> {
    let url = pg::fresh_database().await?;
    let (p, loaded) = Store::open_postgres(&opts(&url, "a", 30.0)).await.unwrap();
    assert!(loaded.unfinished.is_empty() && loaded.models.is_empty());
    assert!(p.failed().is_none(), "the only coordinator leads");
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = Store::open(dir.path()).unwrap();
    Some((vec![("postgres", p), ("redb", r)], url, dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_run_after_commit_in_order() {
    let Some((stores, _, _d)) = both().await else {
        return;
    };
    for (name, s) in &stores {
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..200u64 {
            let seen = seen.clone();
            let j = job(&format!("j{i}"), "", i, JobState::Queued);
            s.write(
                vec![Op::PutJob(Box::new(j))],
                Some(Box::new(move |r| {
                    r.unwrap();
                    seen.lock().unwrap().push(i);
                })),
            );
        }
        s.barrier().await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            (0..200).collect::<Vec<_>>(),
            "{name}"
        );
        let j7 = s.get(&JobId("j7".into())).await.unwrap().unwrap();
        assert_eq!(j7.created_ms, 7, "{name}");
        assert_eq!(j7, job("j7", "", 7, JobState::Queued), "{name}");
        assert!(s.get(&JobId("nope".into())).await.unwrap().is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_images_and_the_retention_sweep() {
    let Some((stores, _, _d)) = both().await else {
        return;
    };
    let png = Bytes::from_static(b"\x89PNG\r\n\x1a\nxx");
    for (name, s) in &stores {
        let mut keyed = job("a", "acme", 1, JobState::Queued);
        keyed.spec.idempotency_key = "k1".into();
        // Whatever a client sends must store, NUL included.
        keyed.spec.prompt = "a \u{0} in the prompt".into();
        s.commit(vec![Op::PutJob(Box::new(keyed.clone()))])
            .await
            .unwrap();
        let mut done = keyed.clone();
        done.state = JobState::Completed;
        done.updated_ms = 10;
        done.result = Some(StoredResult {
            images: 2,
            timings: Timings::default(),
            worker_id: WorkerId("w".into()),
        });
        s.commit(vec![
            Op::PutJob(Box::new(done)),
            Op::PutImages {
                job: JobId("a".into()),
                images: vec![png.clone(), Bytes::from_static(b"second")],
            },
        ])
        .await
        .unwrap();
        let key = scoped_key("acme", "k1").unwrap();
        assert_eq!(
            s.find_key(&key).await.unwrap(),
            Some(JobId("a".into())),
            "{name}"
        );
        assert!(
            s.find_key("k1").await.unwrap().is_none(),
            "{name}: per client"
        );
        assert_eq!(
            s.images(&JobId("a".into()), 2).await.unwrap(),
            vec![png.clone(), Bytes::from_static(b"second")],
            "{name}"
        );
        assert!(s.images(&JobId("a".into()), 3).await.is_err(), "{name}");
        assert!(s.finished_before(9, 10).await.unwrap().is_empty(), "{name}");
        assert_eq!(s.finished_before(10, 10).await.unwrap().len(), 1, "{name}");
        s.commit(vec![Op::DeleteJob {
            job: JobId("a".into()),
            key: Some(key.clone()),
        }])
        .await
        .unwrap();
        assert!(s.get(&JobId("a".into())).await.unwrap().is_none(), "{name}");
        assert!(s.find_key(&key).await.unwrap().is_none(), "{name}");
        assert!(s.images(&JobId("a".into()), 1).await.is_err(), "{name}");
        let (page, next) = s
            .list(&ListQuery {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.is_empty() && next.is_none(), "{name}");
    }
}

/// Every job once, in creation order, with and without filters and with a
/// scan limit that forces short pages: the same pages from both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_alike_on_both_stores() {
    let Some((stores, _, _d)) = both().await else {
        return;
    };
    let mut pages_by_store = Vec::new();
    for (name, s) in &stores {
        let mut ops = Vec::new();
        for i in 0..60u64 {
            let state = [JobState::Failed, JobState::Queued, JobState::Completed][i as usize % 3];
            let client = if i % 2 == 0 { "a" } else { "b" };
            // Ids repeat (a record replaced), with the same creation time.
            let mut j = job(&format!("j{:02}", i % 50), client, (i % 50) / 2, state);
            if i % 5 == 0 {
                j.spec.model_id = ModelId("other".into());
            }
            ops.push(Op::PutJob(Box::new(j)));
        }
        s.commit(ops).await.unwrap();
        let queries = [
            ListQuery::default(),
            ListQuery {
                state: Some(JobState::Failed),
                client: Some("a".into()),
                max_scanned: 4,
                ..Default::default()
            },
            ListQuery {
                model: Some(ModelId("other".into())),
                ..Default::default()
            },
            ListQuery {
                client: Some("b".into()),
                max_scanned: 3,
                ..Default::default()
            },
        ];
        let mut pages = Vec::new();
        for base in queries {
            for limit in [1usize, 7, 100] {
                let mut after = None;
                let mut seen = Vec::new();
                loop {
                    let q = ListQuery {
                        after: after.clone(),
                        limit,
                        ..base.clone()
                    };
                    let (page, next) = s.list(&q).await.unwrap();
                    assert!(page.len() <= limit, "{name}");
                    seen.push(
                        page.iter()
                            .map(|j| (j.created_ms, j.id.0.clone()))
                            .collect::<Vec<_>>(),
                    );
                    match next {
                        Some(c) => after = Some(Cursor::parse(&c.token()).unwrap()),
                        None => break,
                    }
                }
                pages.push(seen);
            }
        }
        // Unfiltered, in pages of 7: every job once, in (created_ms, id) order.
        let flat: Vec<_> = pages[1].iter().flatten().cloned().collect();
        let mut sorted = flat.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(flat, sorted, "{name}");
        assert_eq!(flat.len(), 50, "{name}");
        pages_by_store.push(pages);
    }
    assert_eq!(
        pages_by_store[0], pages_by_store[1],
        "postgres and redb page alike"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_unfinished_jobs_and_the_catalogue_and_migrates_once() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let m = ModelManifest {
        id: ModelId("m".into()),
        kind: ModelKind::Checkpoint,
        source: "file:///m".into(),
        files: vec![],
        family: "sd1".into(),
        format: String::new(),
    };
    {
        let (s, _) = Store::open_postgres(&opts(&url, "a", 30.0)).await.unwrap();
        s.commit(vec![
            Op::PutModel(Box::new(m.clone())),
            Op::PutJob(Box::new(job("q2", "", 2, JobState::Queued))),
            Op::PutJob(Box::new(job("r1", "", 1, JobState::Running))),
            Op::PutJob(Box::new(job("done", "", 0, JobState::Completed))),
        ])
        .await
        .unwrap();
        s.close().await.unwrap();
    }
    let (s, loaded) = Store::open_postgres(&opts(&url, "b", 30.0)).await.unwrap();
    assert!(s.failed().is_none(), "a closed leader gave up its lease");
    let ids: Vec<_> = loaded.unfinished.iter().map(|j| j.id.0.as_str()).collect();
    assert_eq!(ids, vec!["r1", "q2"], "unfinished, by creation");
    assert_eq!(loaded.models, vec![m]);
    let db = pg::client(&url).await;
    let versions: Vec<i32> = db
        .query(
            "SELECT version FROM corral_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![1], "each migration applied once");
    // A database migrated by a newer Corral is refused, not written.
    db.execute(
        "INSERT INTO corral_migrations (version, name) VALUES (99, 'future')",
        &[],
    )
    .await
    .unwrap();
    let err = Store::open_postgres(&opts(&url, "c", 30.0))
        .await
        .err()
        .expect("a newer schema is refused");
    assert!(err.to_string().contains("schema version 99"), "{err}");
    s.close().await.unwrap();
}

/// Two coordinators' stores on one database: one leads, the other
/// follows and names the leader; when the leader closes, the follower
/// takes over and loads what the leader committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_store_leads_and_the_other_follows_then_takes_over() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let (a, _) = Store::open_postgres(&opts(&url, "a", 30.0)).await.unwrap();
    let (b, loaded) = Store::open_postgres(&opts(&url, "b", 2.0)).await.unwrap();
    assert!(a.failed().is_none());
    assert!(loaded.unfinished.is_empty());
    let why = b.failed().expect("b does not lead");
    assert!(why.contains("the leader is http://a:7700"), "{why}");
    assert_eq!(b.other_leader().as_deref(), Some("http://a:7700"));
    assert!(b.following());
    let err = b
        .commit(vec![Op::PutJob(Box::new(job(
            "x",
            "",
            1,
            JobState::Queued,
        )))])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not the leader"), "{err}");
    a.commit(vec![Op::PutJob(Box::new(job(
        "y",
        "",
        1,
        JobState::Queued,
    )))])
    .await
    .unwrap();
    let b = Arc::new(b);
    let b2 = b.clone();
    let campaign = tokio::spawn(async move { b2.reopen().await });
    // Still following while a leads.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !campaign.is_finished(),
        "b took the lead from a live leader"
    );
    a.close().await.unwrap();
    let loaded = tokio::time::timeout(Duration::from_secs(10), campaign)
        .await
        .expect("b takes over within 10 s of a giving up")
        .unwrap()
        .unwrap();
    let ids: Vec<_> = loaded.unfinished.iter().map(|j| j.id.0.as_str()).collect();
    assert_eq!(
        ids,
        vec!["y"],
        "what a committed; nothing of b's refused write"
    );
    assert!(b.failed().is_none());
    b.commit(vec![Op::PutJob(Box::new(job(
        "z",
        "",
        2,
        JobState::Queued,
    )))])
    .await
    .unwrap();
    b.close().await.unwrap();
}

/// The fence: a leader whose lease another coordinator took over (here the
/// lease is expired by hand, as if the leader had been paused past it)
/// cannot commit, even though its own deadline has not passed yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leaders_writes_are_refused_by_the_epoch() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let (a, _) = Store::open_postgres(&opts(&url, "a", 60.0)).await.unwrap();
    a.commit(vec![Op::PutJob(Box::new(job(
        "j",
        "",
        1,
        JobState::Queued,
    )))])
    .await
    .unwrap();
    let db = pg::client(&url).await;
    db.execute(
        "UPDATE corral_leader SET expires_at = now() - interval '1 second'",
        &[],
    )
    .await
    .unwrap();
    let (b, loaded) = Store::open_postgres(&opts(&url, "b", 60.0)).await.unwrap();
    assert!(b.failed().is_none(), "b took over the expired lease");
    assert_eq!(loaded.unfinished.len(), 1);
    assert_eq!(a.fenced_writes(), 0);
    // a still believes it leads (its 60 s deadline is far off) and writes.
    let mut stale = job("j", "", 1, JobState::Completed);
    stale.error = "written by the stale leader".into();
    let err = a
        .commit(vec![Op::PutJob(Box::new(stale))])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lost the lead"), "{err}");
    assert_eq!(a.fenced_writes(), 1, "the refusal is counted");
    let why = a.failed().expect("a knows it does not lead");
    assert!(why.contains("the leader is http://b:7700"), "{why}");
    assert_eq!(
        b.get(&JobId("j".into())).await.unwrap().unwrap().state,
        JobState::Queued,
        "the stale write left nothing"
    );
    let epoch: i64 = db
        .query_one("SELECT epoch FROM corral_leader", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(epoch, 2);
    // b keeps writing.
    b.commit(vec![Op::PutJob(Box::new(job(
        "k",
        "",
        2,
        JobState::Queued,
    )))])
    .await
    .unwrap();
    b.close().await.unwrap();
    a.close().await.unwrap();
}

/// A leader whose process died (its lease session gone) is replaced at
/// once, not after its lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_session_hands_over_at_once() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let (a, _) = Store::open_postgres(&opts(&url, "a", 60.0)).await.unwrap();
    let (b, _) = Store::open_postgres(&opts(&url, "b", 60.0)).await.unwrap();
    assert!(b.failed().is_some());
    // Every session of a ends, as when its process is killed.
    let db = pg::client(&url).await;
    db.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND pid IN (SELECT pid FROM corral_leader)",
        &[],
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), b.reopen())
        .await
        .expect("b takes over well before the 60 s lease expires")
        .unwrap();
    println!(
        "takeover after the leader's session ended: {} ms",
        started.elapsed().as_millis()
    );
    // a learns it lost the lead (its lease session is gone).
    common::wait_until(10, "a to step down", || async { a.failed().is_some() }).await;
    b.close().await.unwrap();
}

/// A failed commit (injected) puts the PostgreSQL store in the failed
/// state; `reopen` takes the lead back and loads, as with redb.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_needs_a_reopen() {
    let Some(url) = pg::fresh_database().await else {
        return;
    };
    let (s, _) = Store::open_postgres(&opts(&url, "a", 30.0)).await.unwrap();
    s.commit(vec![Op::PutJob(Box::new(job(
        "a",
        "",
        1,
        JobState::Queued,
    )))])
    .await
    .unwrap();
    s.fail_next_commit();
    assert!(s
        .commit(vec![Op::PutJob(Box::new(job(
            "b",
            "",
            2,
            JobState::Queued
        )))])
        .await
        .is_err());
    assert!(s.failed().is_some());
    assert!(
        s.commit(vec![Op::PutJob(Box::new(job(
            "c",
            "",
            3,
            JobState::Queued
        )))])
        .await
        .is_err(),
        "later writes fail until reopened"
    );
    let loaded = s.reopen().await.unwrap();
    assert!(s.failed().is_none());
    let ids: Vec<_> = loaded.unfinished.iter().map(|j| j.id.0.as_str()).collect();
    assert_eq!(ids, vec!["a"], "nothing of the failed batch, nor after it");
    s.close().await.unwrap();
}
