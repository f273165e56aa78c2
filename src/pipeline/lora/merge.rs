//! Applying LoRAs to a loaded pipeline without reloading it.
//!
//! Owns: the name map (`<component>/name_map.json`, written by `scripts/name_map.py`: PyTorch
//! parameter -> ONNX initializer and layout), the set of weights a LoRA may patch (declared as
//! overridable graph inputs when the session is built: see `onnx_proto::with_overridable`), the
//! merge `W' = W + sum(weight * alpha / rank * up @ down)` into new tensors of the weight's type
//! on the session's device ([`PreparedLoras`]), and a small LRU of prepared sets within a byte
//! budget ([`LoraCache`]).
//!
//! Why inputs and not new sessions: a prepared set is bound as inputs of the same sessions, so a
//! switch costs the merge of the patched weights only, never a session build (measured against
//! `SessionBuilder::with_initializer` in `pipeline::bench` and docs/pipeline.md). Only linear
//! (2-D) and 1x1-conv weights are overridable by default on the CPU: ONNX Runtime cannot
//! pre-pack the NCHWc layout of a convolution whose weight is an input (+49% conv time
//! measured), so 3x3 conv LoRAs need `PipelineConfig::lora_conv` (the default on CUDA).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ndarray::{ArrayView2, ArrayViewMut2};
use ort::value::{DynTensor, TensorElementType};
use serde::Deserialize;

use super::{Component, Lora, LoraWeight};
use crate::pipeline::onnx_proto::{self, Scan, FLOAT16};
use crate::pipeline::tensors::float_tensor;
use crate::pipeline::PipelineError;

/// The name map's file name, beside each component's model.onnx.
pub const NAME_MAP: &str = "name_map.json";

#[derive(Deserialize)]
struct MapFile {
    format: String,
    weights: HashMap<String, MapEntry>,
}

#[derive(Deserialize)]
struct MapEntry {
    onnx: String,
    perm: Option<Vec<usize>>,
}

/// A weight a LoRA module may patch.
#[derive(Debug, Clone)]
struct Target {
    onnx: String,
    /// ONNX axis i holds PyTorch axis perm[i].
    perm: Vec<usize>,
    /// The PyTorch shape.
    torch_dims: Vec<usize>,
}

/// One component's patchable weights.
pub(crate) struct ComponentWeights {
    pub component: Component,
    scan: Scan,
    /// Module key (PyTorch module name with `_` for `.`) -> its weight.
    targets: HashMap<String, Target>,
    /// Module key -> why its weight cannot be patched on this device.
    refused: HashMap<String, String>,
}

impl ComponentWeights {
    /// Reads `<dir>/name_map.json` and scans `<dir>/model.onnx`; None without a name map.
    pub fn load(
        model: &Path,
        component: Component,
        conv: bool,
    ) -> Result<Option<ComponentWeights>, PipelineError> {
        let map_path = model.with_file_name(NAME_MAP);
        if !map_path.is_file() {
            return Ok(None);
        }
        let bad = |m: String| PipelineError::BadModel(format!("{}: {m}", map_path.display()));
        let text =
            std::fs::read_to_string(&map_path).map_err(|e| PipelineError::io(&map_path, e))?;
        let map: MapFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if map.format != "corral-name-map/1" {
            return Err(bad(format!(
                "format {:?} is not corral-name-map/1",
                map.format
            )));
        }
        let scan = onnx_proto::scan(model)?;
        let mut targets = HashMap::new();
        let mut refused = HashMap::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut ambiguous = HashSet::new();
        for (param, entry) in map.weights {
            let Some(module) = param.strip_suffix(".weight") else {
                continue;
            };
            let init = scan.initializers.get(&entry.onnx).ok_or_else(|| {
                bad(format!(
                    "{param} maps to {}, which {} does not hold (a stale map?)",
                    entry.onnx,
                    model.display()
                ))
            })?;
            let dims = &init.dims;
            let perm = entry.perm.unwrap_or_else(|| (0..dims.len()).collect());
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            if sorted != (0..dims.len()).collect::<Vec<_>>() {
                return Err(bad(format!("{param}: perm {perm:?} for dims {dims:?}")));
            }
            let mut torch_dims = vec![0; dims.len()];
            for (i, &p) in perm.iter().enumerate() {
                torch_dims[p] = dims[i];
            }
            let key = module.replace('.', "_");
            if let Some(other) = seen.insert(key.clone(), module.to_string()) {
                if other != module {
                    ambiguous.insert(key.clone());
                }
            }
            let spatial: usize = torch_dims.iter().skip(2).product();
            match torch_dims.len() {
                2 => {}
                4 if spatial == 1 || conv => {}
                4 => {
                    refused.insert(
                        key,
                        format!(
                            "{param} is a {}x{} convolution: conv LoRAs on the CPU need \
                             PipelineConfig::lora_conv (ONNX Runtime then keeps the weight \
                             unpacked, slower)",
                            torch_dims[2], torch_dims[3]
                        ),
                    );
                    continue;
                }
                _ => continue,
            }
            targets.insert(
                key,
                Target {
                    onnx: entry.onnx,
                    perm,
                    torch_dims,
                },
            );
        }
        for key in ambiguous {
            targets.remove(&key);
            refused.insert(
                key.clone(),
                format!("{key} names two modules of the name map"),
            );
        }
        Ok(Some(ComponentWeights {
            component,
            scan,
            targets,
            refused,
        }))
    }

    /// The component's model file.
    pub fn path(&self) -> &Path {
        &self.scan.path
    }

    /// The initializers to declare as overridable inputs when building the session.
    pub fn overridable(&self) -> Vec<String> {
        let mut v: Vec<String> = self.targets.values().map(|t| t.onnx.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Model bytes with the patchable weights declared as inputs.
    pub fn model_bytes(&self) -> Result<Vec<u8>, PipelineError> {
        onnx_proto::with_overridable(&self.scan, &self.overridable())
    }
}

/// Merged weights for one LoRA set, ready to bind: per component, (input name, tensor).
pub struct PreparedLoras {
    key: Vec<(String, u32)>,
    pub(crate) inputs: HashMap<Component, Vec<(String, DynTensor)>>,
    bytes: u64,
    /// Seconds the merge took (reading base weights, merging, creating the tensors).
    pub prepare_s: f64,
}

impl std::fmt::Debug for PreparedLoras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedLoras")
            .field("key", &self.key)
            .field("bytes", &self.bytes)
            .field("prepare_s", &self.prepare_s)
            .finish()
    }
}

impl PreparedLoras {
    /// Memory the merged weights take on the device.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Weights replaced, over all components.
    pub fn weights(&self) -> usize {
        self.inputs.values().map(Vec::len).sum()
    }

    pub(crate) fn for_component(&self, c: Component) -> &[(String, DynTensor)] {
        self.inputs.get(&c).map_or(&[], Vec::as_slice)
    }
}

/// The canonical identity of a LoRA set: (hash, weight bits) sorted, zero weights left out.
/// Sorting makes `[a, b]` and `[b, a]` the same set with bit-identical merged weights.
pub(crate) fn set_key(loras: &[LoraWeight]) -> Vec<(String, u32)> {
    let mut k: Vec<(String, u32)> = loras
        .iter()
        .filter(|l| l.weight != 0.0)
        .map(|l| (l.lora.hash().to_string(), l.weight.to_bits()))
        .collect();
    k.sort();
    k
}

/// Checks that every module of every LoRA (zero weights included) patches a weight of this
/// model; the error lists how many matched and which did not.
pub(crate) fn check(
    components: &[&ComponentWeights],
    loras: &[LoraWeight],
) -> Result<(), PipelineError> {
    for lw in loras {
        if !lw.weight.is_finite() || lw.weight.abs() > 100.0 {
            return Err(PipelineError::InvalidRequest(format!(
                "loras: weight {} of {} must be finite and within [-100, 100]",
                lw.weight,
                lw.lora.name()
            )));
        }
        check_one(components, &lw.lora)?;
    }
    Ok(())
}

fn check_one(components: &[&ComponentWeights], lora: &Lora) -> Result<(), PipelineError> {
    let mut missing = Vec::new();
    let mut refused = Vec::new();
    let total = lora.modules().len();
    for m in lora.modules() {
        let what = format!("{}/{}", m.component.dir(), m.name);
        let Some(cw) = components.iter().find(|c| c.component == m.component) else {
            missing.push(what);
            continue;
        };
        if let Some(why) = cw.refused.get(&m.key) {
            refused.push(why.clone());
            continue;
        }
        let Some(t) = cw.targets.get(&m.key) else {
            missing.push(what);
            continue;
        };
        let (out, rest) = delta_dims(m);
        let numel: usize = t.torch_dims.iter().product();
        if t.torch_dims[0] != out || numel != out * rest {
            return Err(PipelineError::InvalidRequest(format!(
                "loras: {} {what}: up {:?} x down {:?} does not fit the weight {:?}",
                lora.name(),
                m.up_shape,
                m.down_shape,
                t.torch_dims
            )));
        }
    }
    if missing.is_empty() && refused.is_empty() {
        return Ok(());
    }
    let n = missing.len();
    let mut msg = format!(
        "loras: {}: {} of {total} modules match a weight of this model",
        lora.name(),
        total - n - refused.len()
    );
    if n > 0 {
        let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
        msg.push_str(&format!("; no weight for {n}: {}", shown.join(", ")));
        if n > 8 {
            msg.push_str(&format!(" (and {} more)", n - 8));
        }
        if components.is_empty() {
            msg.push_str(" (this export has no name_map.json: see scripts/name_map.py)");
        }
    }
    if let Some(r) = refused.first() {
        msg.push_str(&format!("; {} refused: {r}", refused.len()));
    }
    Err(PipelineError::InvalidRequest(msg))
}

/// (out, in * kh * kw) of a module's update.
fn delta_dims(m: &super::LoraModule) -> (usize, usize) {
    (m.up_shape[0], m.down.len() / m.rank())
}

/// Merges a LoRA set into new weight tensors. `device` moves each tensor where the session
/// runs (identity on the CPU).
pub(crate) fn prepare(
    components: &[&ComponentWeights],
    loras: &[LoraWeight],
    device: &dyn Fn(DynTensor) -> Result<DynTensor, PipelineError>,
) -> Result<PreparedLoras, PipelineError> {
    let started = Instant::now();
    check(components, loras)?;
    let mut active: Vec<&LoraWeight> = loras.iter().filter(|l| l.weight != 0.0).collect();
    active.sort_by(|a, b| {
        (a.lora.hash(), a.weight.to_bits()).cmp(&(b.lora.hash(), b.weight.to_bits()))
    });
    let mut inputs = HashMap::new();
    let mut bytes = 0;
    for cw in components {
        // Contributions per patched weight, in the canonical order.
        let mut per_target: Vec<(&Target, Vec<(&super::LoraModule, f64)>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for lw in &active {
            for m in lw
                .lora
                .modules()
                .iter()
                .filter(|m| m.component == cw.component)
            {
                let t = &cw.targets[&m.key];
                let i = *index.entry(t.onnx.as_str()).or_insert_with(|| {
                    per_target.push((t, Vec::new()));
                    per_target.len() - 1
                });
                per_target[i].1.push((m, f64::from(lw.weight) * m.scale()));
            }
        }
        let mut tensors = Vec::with_capacity(per_target.len());
        for (t, mods) in per_target {
            let mut w = onnx_proto::read_floats(&cw.scan, &t.onnx)?;
            let out = t.torch_dims[0];
            let rest = w.len() / out;
            // In f64, so that the merged weight (rounded once to f32, then to the weight's type)
            // does not depend on the summation order of a matrix-multiply kernel.
            let mut delta = vec![0f64; w.len()];
            for (m, c) in mods {
                let r = m.rank();
                let up: Vec<f64> = m.up.iter().map(|&v| f64::from(v)).collect();
                let down: Vec<f64> = m.down.iter().map(|&v| f64::from(v)).collect();
                let up = ArrayView2::from_shape((out, r), &up).map_err(shape_err)?;
                let down = ArrayView2::from_shape((r, rest), &down).map_err(shape_err)?;
                let mut d =
                    ArrayViewMut2::from_shape((out, rest), &mut delta).map_err(shape_err)?;
                ndarray::linalg::general_mat_mul(c, &up, &down, 1.0, &mut d);
            }
            add_permuted(&mut w, &delta, &t.torch_dims, &t.perm);
            let init = &cw.scan.initializers[&t.onnx];
            let ty = if init.data_type == FLOAT16 {
                TensorElementType::Float16
            } else {
                TensorElementType::Float32
            };
            bytes += init.bytes();
            tensors.push((t.onnx.clone(), device(float_tensor(ty, &init.dims, &w)?)?));
        }
        inputs.insert(cw.component, tensors);
    }
    Ok(PreparedLoras {
        key: set_key(loras),
        inputs,
        bytes,
        prepare_s: started.elapsed().as_secs_f64(),
    })
}

fn shape_err(e: ndarray::ShapeError) -> PipelineError {
    PipelineError::BadModel(format!("LoRA shapes: {e}"))
}

/// `w += delta` (summed in f64, rounded once) where `w` is in the ONNX layout (axis i =
/// PyTorch axis `perm[i]`) and `delta` in the PyTorch layout `torch_dims`.
fn add_permuted(w: &mut [f32], delta: &[f64], torch_dims: &[usize], perm: &[usize]) {
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        for (a, d) in w.iter_mut().zip(delta) {
            *a = (f64::from(*a) + d) as f32;
        }
        return;
    }
    let n = torch_dims.len();
    let mut tstride = vec![1usize; n];
    for i in (0..n.saturating_sub(1)).rev() {
        tstride[i] = tstride[i + 1] * torch_dims[i + 1];
    }
    let odims: Vec<usize> = perm.iter().map(|&p| torch_dims[p]).collect();
    let ostride: Vec<usize> = perm.iter().map(|&p| tstride[p]).collect();
    let mut idx = vec![0usize; n];
    let mut src = 0usize;
    for a in w.iter_mut() {
        *a = (f64::from(*a) + delta[src]) as f32;
        // Odometer over the ONNX index, keeping the PyTorch offset in step.
        for k in (0..n).rev() {
            idx[k] += 1;
            src += ostride[k];
            if idx[k] < odims[k] {
                break;
            }
            src -= ostride[k] * odims[k];
            idx[k] = 0;
        }
    }
}

/// Prepared LoRA sets of one pipeline, least recently used first, within a byte budget.
pub(crate) struct LoraCache {
    budget: u64,
    sets: Mutex<Vec<Arc<PreparedLoras>>>,
}

impl LoraCache {
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            sets: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<PreparedLoras>>> {
        self.sets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A cached set, marked most recently used.
    pub fn get(&self, key: &[(String, u32)]) -> Option<Arc<PreparedLoras>> {
        let mut sets = self.lock();
        let i = sets.iter().position(|s| s.key == key)?;
        let s = sets.remove(i);
        sets.push(s.clone());
        Some(s)
    }

    /// Caches a set, evicting the least recently used ones beyond the budget. A set larger
    /// than the whole budget is not kept (it lives as long as the request that uses it).
    pub fn insert(&self, set: Arc<PreparedLoras>) {
        if set.bytes > self.budget {
            return;
        }
        let mut sets = self.lock();
        sets.retain(|s| s.key != set.key);
        sets.push(set);
        let mut total: u64 = sets.iter().map(|s| s.bytes).sum();
        while total > self.budget {
            total -= sets.remove(0).bytes;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.lock().iter().map(|s| s.bytes).sum()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permuted_add_matches_a_transpose() {
        // torch [2, 3] -> onnx [3, 2]
        let mut w = vec![0.0; 6];
        let delta = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        add_permuted(&mut w, &delta, &[2, 3], &[1, 0]);
        assert_eq!(w, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        // NCHW -> NHWC on [1, 2, 1, 2]
        let mut w = vec![0.0; 4];
        add_permuted(&mut w, &[1.0, 2.0, 3.0, 4.0], &[1, 2, 1, 2], &[0, 2, 3, 1]);
        assert_eq!(w, vec![1.0, 3.0, 2.0, 4.0]);
        let mut w = vec![1.0; 3];
        add_permuted(&mut w, &[1.0, 2.0, 3.0], &[3], &[0]);
        assert_eq!(w, vec![2.0, 3.0, 4.0]);
    }

    fn set(key: &str, bytes: u64) -> Arc<PreparedLoras> {
        Arc::new(PreparedLoras {
            key: vec![(key.into(), 0)],
            inputs: HashMap::new(),
            bytes,
            prepare_s: 0.0,
        })
    }

    #[test]
    fn cache_evicts_least_recently_used_within_budget() {
        let c = LoraCache::new(100);
        c.insert(set("a", 40));
        c.insert(set("b", 40));
        assert!(c.get(&[("a".into(), 0)]).is_some()); // a is now the most recent
        c.insert(set("c", 40));
        assert_eq!(c.len(), 2);
        assert!(
            c.get(&[("b".into(), 0)]).is_none(),
            "b was least recently used"
        );
        assert!(c.get(&[("a".into(), 0)]).is_some());
        assert_eq!(c.bytes(), 80);
        c.insert(set("huge", 101));
        assert_eq!(c.len(), 2, "a set over the budget is not cached");
    }
}
