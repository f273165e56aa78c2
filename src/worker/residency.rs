//! Which models are loaded in VRAM: a byte- and count-budgeted LRU of loaded sessions.
//!
//! Generic over what a "loaded model" is (`T`: ONNX sessions in production, anything in
//! tests). An entry is in use while someone holds its `Arc<T>` beyond the one kept here, or
//! while it is explicitly pinned; only entries not in use are evicted. Each entry keeps the
//! [`BundleGuard`] it was loaded from, so its files stay on disk while it is resident.
//!
//! Synchronous (a std `Mutex`, never held while loading): callers run `get_or_load` in
//! `spawn_blocking`, since loading a model takes seconds of CPU and GPU time. Concurrent
//! loads of the same model wait for the first (a `Condvar`); loads of different models run
//! in parallel, each with its bytes reserved up front.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::types::ModelId;
use crate::worker::cache::BundleGuard;

struct Slot<T> {
    value: Arc<T>,
    bytes: u64,
    last_used: u64,
    pins: usize,
    _guard: Option<BundleGuard>,
}

impl<T> Slot<T> {
    fn in_use(&self) -> bool {
        self.pins > 0 || Arc::strong_count(&self.value) > 1
    }
}

struct State<T> {
    slots: HashMap<ModelId, Slot<T>>,
    /// Models being loaded now, and the bytes reserved for each.
    loading: HashMap<ModelId, u64>,
    tick: u64,
}

impl<T> State<T> {
    fn committed(&self) -> (u64, usize) {
        let bytes =
            self.slots.values().map(|s| s.bytes).sum::<u64>() + self.loading.values().sum::<u64>();
        (bytes, self.slots.len() + self.loading.len())
    }
}

pub struct Residency<T> {
    budget_bytes: u64,
    max_count: usize,
    state: Mutex<State<T>>,
    loaded: Condvar,
}

/// What `get_or_load` found.
pub type Loaded<T> = (Arc<T>, bool);

impl<T> Residency<T> {
    /// `budget_bytes`: VRAM for resident models; `max_count`: most models at once.
    pub fn new(budget_bytes: u64, max_count: usize) -> Self {
        Self {
            budget_bytes,
            max_count: max_count.max(1),
            state: Mutex::new(State {
                slots: HashMap::new(),
                loading: HashMap::new(),
                tick: 0,
            }),
            loaded: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The resident model `id`, or loads it with `load` after evicting least-recently-used
    /// models not in use until `bytes` fit. Returns the model and whether it was resident.
    /// `guard` pins the model's files on disk while it stays resident (dropped if it was
    /// already resident). Blocking: run it off the async runtime.
    pub fn get_or_load(
        &self,
        id: &ModelId,
        bytes: u64,
        guard: Option<BundleGuard>,
        load: impl FnOnce() -> Result<T>,
    ) -> Result<Loaded<T>> {
        let mut evicted = Vec::new();
        {
            let mut st = self.lock();
            loop {
                st.tick += 1;
                let tick = st.tick;
                if let Some(s) = st.slots.get_mut(id) {
                    s.last_used = tick;
                    return Ok((s.value.clone(), true));
                }
                if !st.loading.contains_key(id) {
                    break;
                }
                st = self.loaded.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            self.make_room(&mut st, id, bytes, &mut evicted)?;
            st.loading.insert(id.clone(), bytes);
        }
        // Free the evicted models' memory before loading the new one, outside the lock.
        drop(evicted);
        // A panicking loader must not leave waiters blocked on a load that never ends.
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load));
        let mut st = self.lock();
        let loaded = match loaded {
            Ok(r) => r,
            Err(panic) => {
                st.loading.remove(id);
                drop(st);
                self.loaded.notify_all();
                std::panic::resume_unwind(panic);
            }
        };
        st.loading.remove(id);
        let out = match loaded {
            Ok(v) => {
                st.tick += 1;
                let value = Arc::new(v);
                let slot = Slot {
                    value: value.clone(),
                    bytes,
                    last_used: st.tick,
                    pins: 0,
                    _guard: guard,
                };
                st.slots.insert(id.clone(), slot);
                Ok((value, false))
            }
            Err(e) => Err(e),
        };
        drop(st);
        self.loaded.notify_all();
        out
    }

    fn make_room(
        &self,
        st: &mut State<T>,
        id: &ModelId,
        bytes: u64,
        evicted: &mut Vec<Slot<T>>,
    ) -> Result<()> {
        let fits = |st: &State<T>| {
            let (b, n) = st.committed();
            b + bytes <= self.budget_bytes && n < self.max_count
        };
        let free_bytes: u64 = st
            .slots
            .values()
            .filter(|s| !s.in_use())
            .map(|s| s.bytes)
            .sum();
        let free_count = st.slots.values().filter(|s| !s.in_use()).count();
        let (b, n) = st.committed();
        if bytes > self.budget_bytes
            || b - free_bytes + bytes > self.budget_bytes
            || n - free_count >= self.max_count
        {
            let mut busy: Vec<_> = st
                .slots
                .iter()
                .filter(|(_, s)| s.in_use())
                .map(|(k, _)| k.to_string())
                .chain(st.loading.keys().map(|k| format!("{k} (loading)")))
                .collect();
            busy.sort();
            return Err(Error::ResourceExhausted(format!(
                "no VRAM for model {id} ({bytes} bytes): budget {} bytes / {} models, \
                 {b} bytes in {n} models; in use: [{}]",
                self.budget_bytes,
                self.max_count,
                busy.join(", ")
            )));
        }
        while !fits(st) {
            let victim = st
                .slots
                .iter()
                .filter(|(_, s)| !s.in_use())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
                .ok_or_else(|| Error::Internal("residency: no victim".into()))?;
            if let Some(s) = st.slots.remove(&victim) {
                evicted.push(s);
            }
        }
        Ok(())
    }

    /// Keeps `id` resident until `unpin`, even when nobody holds its `Arc`.
    pub fn pin(&self, id: &ModelId) -> bool {
        match self.lock().slots.get_mut(id) {
            Some(s) => {
                s.pins += 1;
                true
            }
            None => false,
        }
    }

    pub fn unpin(&self, id: &ModelId) {
        if let Some(s) = self.lock().slots.get_mut(id) {
            s.pins = s.pins.saturating_sub(1);
        }
    }

    /// Unloads `id` if it is not in use; returns whether it was unloaded.
    pub fn evict(&self, id: &ModelId) -> bool {
        let slot = {
            let mut st = self.lock();
            match st.slots.get(id) {
                Some(s) if !s.in_use() => st.slots.remove(id),
                _ => None,
            }
        };
        slot.is_some()
    }

    /// Resident models, most recently used first.
    pub fn resident(&self) -> Vec<ModelId> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .slots
            .iter()
            .map(|(k, s)| (s.last_used, k.clone()))
            .collect();
        v.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        v.into_iter().map(|(_, k)| k).collect()
    }

    /// Bytes of resident models.
    pub fn used_bytes(&self) -> u64 {
        self.lock().slots.values().map(|s| s.bytes).sum()
    }

    /// Models that cannot be evicted now.
    pub fn in_use(&self) -> HashSet<ModelId> {
        let st = self.lock();
        st.slots
            .iter()
            .filter(|(_, s)| s.in_use())
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn id(s: &str) -> ModelId {
        ModelId::from(s)
    }

    #[test]
    fn loads_once_then_hits() {
        let r: Residency<String> = Residency::new(100, 4);
        let loads = AtomicUsize::new(0);
        let load = || {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok("a".to_string())
        };
        let (v, was) = r.get_or_load(&id("a"), 10, None, load).unwrap();
        assert!(!was);
        assert_eq!(*v, "a");
        drop(v);
        let (_, was) = r
            .get_or_load(&id("a"), 10, None, || panic!("must not reload"))
            .unwrap();
        assert!(was);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn evicts_lru_not_in_use() {
        let r: Residency<u32> = Residency::new(30, 10);
        let (a, _) = r.get_or_load(&id("a"), 10, None, || Ok(1)).unwrap();
        r.get_or_load(&id("b"), 10, None, || Ok(2)).unwrap();
        r.get_or_load(&id("c"), 10, None, || Ok(3)).unwrap();
        // "a" is the LRU but held: "b" goes.
        r.get_or_load(&id("d"), 10, None, || Ok(4)).unwrap();
        let mut res = r.resident();
        res.sort();
        assert_eq!(res, vec![id("a"), id("c"), id("d")]);
        assert!(r.used_bytes() <= 30);
        drop(a);
        r.get_or_load(&id("e"), 10, None, || Ok(5)).unwrap();
        assert!(!r.resident().contains(&id("a")));
    }

    #[test]
    fn pins_and_count_limit() {
        let r: Residency<u32> = Residency::new(1000, 2);
        r.get_or_load(&id("a"), 1, None, || Ok(1)).unwrap();
        assert!(r.pin(&id("a")));
        let (b, _) = r.get_or_load(&id("b"), 1, None, || Ok(2)).unwrap();
        let e = r.get_or_load(&id("c"), 1, None, || Ok(3)).unwrap_err();
        assert!(
            matches!(e, Error::ResourceExhausted(ref m) if m.contains("model c")),
            "{e}"
        );
        drop(b);
        r.get_or_load(&id("c"), 1, None, || Ok(3)).unwrap();
        let mut res = r.resident();
        res.sort();
        assert_eq!(res, vec![id("a"), id("c")]);
        r.unpin(&id("a"));
        assert!(r.evict(&id("a")));
    }

    #[test]
    fn too_big_and_failed_loads_leave_nothing() {
        let r: Residency<u32> = Residency::new(10, 2);
        assert!(r.get_or_load(&id("x"), 11, None, || Ok(0)).is_err());
        let e = r
            .get_or_load(&id("y"), 5, None, || Err(Error::Pipeline("boom".into())))
            .unwrap_err();
        assert!(matches!(e, Error::Pipeline(_)));
        assert!(r.resident().is_empty());
        r.get_or_load(&id("z"), 10, None, || Ok(1)).unwrap();
    }

    #[test]
    fn a_panicking_loader_leaves_no_stuck_load() {
        let r: Residency<u32> = Residency::new(100, 4);
        let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            r.get_or_load(&id("p"), 10, None, || panic!("loader bug"))
        }));
        assert!(p.is_err());
        let (v, was) = r.get_or_load(&id("p"), 10, None, || Ok(9)).unwrap();
        assert_eq!((*v, was), (9, false));
    }

    #[test]
    fn concurrent_loads_of_one_model_load_once() {
        let r: Arc<Residency<u32>> = Arc::new(Residency::new(100, 4));
        let loads = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (r, loads) = (r.clone(), loads.clone());
                std::thread::spawn(move || {
                    r.get_or_load(&id("m"), 10, None, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                        Ok(7)
                    })
                    .map(|(v, _)| *v)
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap().unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }
}
