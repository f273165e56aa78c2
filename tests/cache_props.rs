//! Property test of the disk cache against a model: random sequences of ensure (keeping the
//! pin or not), unpin, prefetch and restart over generated `file://` bundles. After every step:
//! the budget holds, pinned bundles are present, the index matches the directory, every
//! indexed bundle is intact, and the LRU victims are the ones the model predicts.

#[path = "cache_common/mod.rs"]
mod common;

use std::collections::HashMap;

use common::*;
use corral::error::Error;
use corral::types::{CacheTier, ModelId, ModelManifest};
use corral::worker::cache::{bundle_dir_name, DiskCache};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Ensure model i; keep the guard (a pin) when the flag is set.
    Ensure(usize, bool),
    /// Drop one guard of model i, if any.
    Unpin(usize),
    Prefetch(usize),
    /// Drop every guard and the cache, then reopen the directory.
    Restart,
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..n, any::<bool>()).prop_map(|(i, k)| Op::Ensure(i, k)),
        2 => (0..n).prop_map(Op::Unpin),
        1 => (0..n).prop_map(Op::Prefetch),
        1 => Just(Op::Restart),
    ]
}

/// The model: present bundles, least recently used first.
struct Model {
    lru: Vec<usize>,
    pins: HashMap<usize, usize>,
}

impl Model {
    fn used(&self, ms: &[ModelManifest]) -> u64 {
        self.lru.iter().map(|&i| ms[i].total_bytes()).sum()
    }

    fn pinned(&self, i: usize) -> bool {
        self.pins.get(&i).copied().unwrap_or(0) > 0
    }

    /// What ensure/prefetch of i should do: Some(victims) or None (refused).
    fn admit(&mut self, ms: &[ModelManifest], i: usize, budget: u64, touch: bool) -> Option<bool> {
        if let Some(pos) = self.lru.iter().position(|&x| x == i) {
            if touch {
                self.lru.remove(pos);
                self.lru.push(i);
            }
            return Some(true);
        }
        let need = ms[i].total_bytes();
        let pinned: u64 = self
            .lru
            .iter()
            .filter(|&&x| self.pinned(x))
            .map(|&x| ms[x].total_bytes())
            .sum();
        if pinned + need > budget {
            return None;
        }
        while self.used(ms) + need > budget {
            let pos = self.lru.iter().position(|&x| !self.pinned(x)).unwrap();
            self.lru.remove(pos);
        }
        self.lru.push(i);
        Some(false)
    }
}

async fn check(
    cache: &DiskCache,
    dir: &std::path::Path,
    ms: &[ModelManifest],
    model: &Model,
    budget: u64,
) {
    let r = cache.report();
    assert!(
        r.used_bytes + r.reserved_bytes <= budget,
        "over budget: {r:?}"
    );
    assert_eq!(r.reserved_bytes, 0);
    assert!(r.downloads.is_empty());
    let mut want: Vec<ModelId> = model.lru.iter().map(|&i| ms[i].id.clone()).collect();
    want.sort();
    let got: Vec<ModelId> = r.disk_models.iter().map(|d| d.model_id.clone()).collect();
    assert_eq!(got, want, "index differs from the model");
    assert_eq!(r.used_bytes, model.used(ms));
    let mut on_disk = vec![".corral-cache".to_string()];
    on_disk.extend(got.iter().map(bundle_dir_name));
    on_disk.sort();
    assert_eq!(listing(dir), on_disk, "index differs from the disk");
    for &i in &model.lru {
        assert_bundle(&dir.join(bundle_dir_name(&ms[i].id)), &ms[i]);
    }
}

async fn run(sizes: Vec<Vec<usize>>, budget_pct: u64, ops: Vec<Op>) {
    let src = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    let ms: Vec<ModelManifest> = sizes
        .iter()
        .enumerate()
        .map(|(i, files)| {
            let names: Vec<String> = (0..files.len())
                .map(|j| format!("d{}/f{j}.bin", j % 2))
                .collect();
            let spec: Vec<(&str, usize)> = names
                .iter()
                .map(String::as_str)
                .zip(files.iter().copied())
                .collect();
            local_bundle(src.path(), &format!("model-{i}"), &spec)
        })
        .collect();
    let biggest = ms.iter().map(|m| m.total_bytes()).max().unwrap();
    let all: u64 = ms.iter().map(|m| m.total_bytes()).sum();
    let budget = biggest + (all - biggest) * budget_pct / 100;
    let cfg = config(d.path(), budget, None);
    let mut cache = DiskCache::open(cfg.clone()).await.unwrap();
    let mut model = Model {
        lru: Vec::new(),
        pins: HashMap::new(),
    };
    let mut guards: HashMap<usize, Vec<corral::worker::cache::BundleGuard>> = HashMap::new();
    for op in ops {
        match op {
            Op::Ensure(i, keep) => {
                let expect = model.admit(&ms, i, budget, true);
                match (cache.ensure(&ms[i], &|_, _| {}).await, expect) {
                    (Ok((g, tier)), Some(was_present)) => {
                        let want = if was_present {
                            CacheTier::Disk
                        } else {
                            CacheTier::Download
                        };
                        assert_eq!(tier, want, "ensure {i}");
                        assert_bundle(g.path(), &ms[i]);
                        if keep {
                            *model.pins.entry(i).or_default() += 1;
                            guards.entry(i).or_default().push(g);
                        }
                    }
                    (Err(Error::ResourceExhausted(msg)), None) => {
                        assert!(msg.contains(ms[i].id.as_str()), "{msg}");
                    }
                    (got, want) => panic!(
                        "ensure {i}: got {:?}, model says {want:?}",
                        got.map(|x| x.1)
                    ),
                }
            }
            Op::Unpin(i) => {
                if guards.get_mut(&i).and_then(|v| v.pop()).is_some() {
                    *model.pins.get_mut(&i).unwrap() -= 1;
                }
            }
            Op::Prefetch(i) => {
                let expect = model.admit(&ms, i, budget, false);
                let got = cache.prefetch(ms[i].clone()).await.unwrap();
                assert_eq!(got.is_ok(), expect.is_some(), "prefetch {i}: {got:?}");
            }
            Op::Restart => {
                guards.clear();
                model.pins.clear();
                drop(cache);
                cache = DiskCache::open(cfg.clone()).await.unwrap();
            }
        }
        check(&cache, d.path(), &ms, &model, budget).await;
        for (i, gs) in &guards {
            for g in gs {
                assert!(g.path().exists(), "pinned bundle {i} was evicted");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cache_matches_model(
        sizes in prop::collection::vec(prop::collection::vec(1usize..3000, 1..4), 2..6),
        budget_pct in 0u64..100,
        ops in prop::collection::vec(op(6), 1..40),
    ) {
        let n = sizes.len();
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|o| match o {
                Op::Ensure(i, k) => Op::Ensure(i % n, k),
                Op::Unpin(i) => Op::Unpin(i % n),
                Op::Prefetch(i) => Op::Prefetch(i % n),
                Op::Restart => Op::Restart,
            })
            .collect();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(sizes, budget_pct, ops));
    }
}
