use std::sync::{Arc, Mutex};

use super::*;

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

fn completed(id: &str, created_ms: u64, n: usize) -> StoredJob {
    let mut j = job(id, "", created_ms, JobState::Completed);
    j.result = Some(StoredResult {
        images: n,
        timings: Timings::default(),
        worker_id: WorkerId("w".into()),
    });
    j
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    rt().block_on(f)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn callbacks_run_after_commit_in_order() {
    let (s, _) = Store::memory().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    for i in 0..50u64 {
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
    block(s.barrier()).unwrap();
    assert_eq!(*seen.lock().unwrap(), (0..50).collect::<Vec<_>>());
    assert_eq!(
        block(s.get(&JobId("j7".into())))
            .unwrap()
            .unwrap()
            .created_ms,
        7
    );
}

#[test]
fn keys_images_and_the_retention_sweep() {
    let (s, _) = Store::memory().unwrap();
    let mut keyed = job("a", "acme", 1, JobState::Queued);
    keyed.spec.idempotency_key = "k1".into();
    let png = Bytes::from_static(b"\x89PNG\r\n\x1a\nxx");
    block(async {
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
                images: vec![png.clone(), png.clone()],
            },
        ])
        .await
        .unwrap();
    });
    let key = scoped_key("acme", "k1").unwrap();
    assert_eq!(block(s.find_key(&key)).unwrap(), Some(JobId("a".into())));
    assert_eq!(
        scoped_key("", "k1").unwrap(),
        "k1",
        "anonymous keys stay bare"
    );
    assert!(
        block(s.find_key("k1")).unwrap().is_none(),
        "keys are per client"
    );
    assert_eq!(
        block(s.images(&JobId("a".into()), 2)).unwrap(),
        vec![png.clone(), png]
    );
    assert!(block(s.finished_before(9, 10)).unwrap().is_empty());
    let old = block(s.finished_before(10, 10)).unwrap();
    assert_eq!(old.len(), 1);
    block(s.commit(vec![Op::DeleteJob {
        job: JobId("a".into()),
        key: Some(key.clone()),
    }]))
    .unwrap();
    assert!(block(s.get(&JobId("a".into()))).unwrap().is_none());
    assert!(block(s.find_key(&key)).unwrap().is_none());
    assert!(block(s.images(&JobId("a".into()), 1)).is_err());
    assert!(block(s.list(&ListQuery {
        limit: 10,
        ..Default::default()
    }))
    .unwrap()
    .0
    .is_empty());
}

#[test]
fn listing_pages_through_every_job_once_with_filters() {
    let (s, _) = Store::memory().unwrap();
    let mut ops = Vec::new();
    for i in 0..30u64 {
        let state = if i % 3 == 0 {
            JobState::Failed
        } else {
            JobState::Queued
        };
        let client = if i % 2 == 0 { "a" } else { "b" };
        ops.push(Op::PutJob(Box::new(job(
            &format!("j{i:02}"),
            client,
            i,
            state,
        ))));
    }
    block(s.commit(ops)).unwrap();
    // Every job exactly once, in creation order, across pages of 7.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = block(s.list(&ListQuery {
            after: after.clone(),
            limit: 7,
            ..Default::default()
        }))
        .unwrap();
        assert!(page.len() <= 7);
        seen.extend(page.into_iter().map(|j| j.created_ms));
        match next {
            Some(c) => after = Some(Cursor::parse(&c.token()).unwrap()),
            None => break,
        }
    }
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
    // Filters, with a scan limit that forces short pages.
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = block(s.list(&ListQuery {
            state: Some(JobState::Failed),
            client: Some("a".into()),
            after: after.clone(),
            limit: 100,
            max_scanned: 4,
            ..Default::default()
        }))
        .unwrap();
        got.extend(page.into_iter().map(|j| j.created_ms));
        match next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(got, vec![0, 6, 12, 18, 24]);
    for bad in ["", "x", "12", "a.j1", ".j1", "5."] {
        assert!(Cursor::parse(bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn only_unfinished_jobs_are_loaded_and_a_failed_commit_needs_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = rt();
    {
        let (s, loaded) = Store::open(dir.path()).unwrap();
        assert!(loaded.unfinished.is_empty());
        runtime
            .block_on(s.commit(vec![
                Op::PutJob(Box::new(job("q", "", 1, JobState::Queued))),
                Op::PutJob(Box::new(completed("c", 2, 0))),
            ]))
            .unwrap();
        s.fail_next_commit();
        let err = runtime
            .block_on(s.commit(vec![Op::PutJob(Box::new(job(
                "lost",
                "",
                3,
                JobState::Queued,
            )))]))
            .unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
        assert!(s.failed().is_some());
        // Later writes fail at once, until the store is reopened.
        let err = runtime
            .block_on(s.commit(vec![Op::PutJob(Box::new(job(
                "x",
                "",
                4,
                JobState::Queued,
            )))]))
            .unwrap_err();
        assert!(err.to_string().contains("earlier commit failed"), "{err}");
        assert!(
            block(s.get(&JobId("q".into()))).is_err(),
            "reads fail while failed"
        );
        let loaded = runtime.block_on(s.reopen()).unwrap();
        assert!(s.failed().is_none());
        let ids: Vec<_> = loaded.unfinished.iter().map(|j| j.id.0.as_str()).collect();
        assert_eq!(ids, vec!["q"]);
        runtime
            .block_on(s.commit(vec![Op::PutJob(Box::new(job(
                "y",
                "",
                5,
                JobState::Queued,
            )))]))
            .unwrap();
        runtime.block_on(s.close()).unwrap();
    }
    let (s, loaded) = Store::open(dir.path()).unwrap();
    let ids: Vec<_> = loaded.unfinished.iter().map(|j| j.id.0.as_str()).collect();
    assert_eq!(ids, vec!["q", "y"]);
    assert_eq!(
        block(s.get(&JobId("c".into()))).unwrap().unwrap().state,
        JobState::Completed
    );
    assert!(block(s.get(&JobId("lost".into()))).unwrap().is_none());
}

/// A data dir written by Corral 0.1: a redb 2 file and result images as
/// files. It opens with everything in it, and the files move into the store.
#[test]
fn a_store_written_by_corral_0_1_opens_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.redb");
    const OLD_JOBS: redb2::TableDefinition<&str, &[u8]> = redb2::TableDefinition::new("jobs");
    const OLD_KEYS: redb2::TableDefinition<&str, &str> = redb2::TableDefinition::new("idempotency");
    const OLD_MODELS: redb2::TableDefinition<&str, &[u8]> = redb2::TableDefinition::new("models");
    let mut queued = job("q", "", 1, JobState::Queued);
    queued.spec.idempotency_key = "key".into();
    let done = completed("done", 2, 2);
    let lost = completed("lost", 3, 1);
    let model = ModelManifest {
        family: String::new(),
        format: String::new(),
        id: ModelId("m".into()),
        kind: ModelKind::Checkpoint,
        source: "file:///x".into(),
        files: vec![],
    };
    {
        let db = redb2::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut t = w.open_table(OLD_JOBS).unwrap();
            for j in [&queued, &done, &lost] {
                let v = serde_json::to_vec(j).unwrap();
                t.insert(j.id.0.as_str(), v.as_slice()).unwrap();
            }
            w.open_table(OLD_KEYS).unwrap().insert("key", "q").unwrap();
            let m = serde_json::to_vec(&model).unwrap();
            w.open_table(OLD_MODELS)
                .unwrap()
                .insert("m", m.as_slice())
                .unwrap();
        }
        w.commit().unwrap();
    }
    let images = dir.path().join("results").join("done");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("0.png"), b"first").unwrap();
    std::fs::write(images.join("1.png"), b"second").unwrap();

    let (s, loaded) = Store::open(dir.path()).unwrap();
    assert_eq!(loaded.models, vec![model]);
    assert_eq!(loaded.unfinished.len(), 1);
    assert_eq!(loaded.unfinished[0], queued);
    assert_eq!(block(s.find_key("key")).unwrap(), Some(JobId("q".into())));
    assert_eq!(
        block(s.images(&JobId("done".into()), 2)).unwrap(),
        vec![Bytes::from_static(b"first"), Bytes::from_static(b"second")]
    );
    let l = block(s.get(&JobId("lost".into()))).unwrap().unwrap();
    assert_eq!(l.state, JobState::Failed);
    assert!(l.error.contains("lost"), "{}", l.error);
    assert!(!dir.path().join("results").exists());
    let (all, _) = block(s.list(&ListQuery {
        limit: 10,
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(all.len(), 3);
    // Opening again changes nothing.
    block(s.close()).unwrap();
    drop(s);
    let (s, loaded) = Store::open(dir.path()).unwrap();
    assert_eq!(loaded.unfinished.len(), 1);
    assert_eq!(block(s.images(&JobId("done".into()), 2)).unwrap().len(), 2);
}
