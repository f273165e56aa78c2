//! Finding and initialising ONNX Runtime, and building sessions on a device.
//!
//! `ort` is built with `load-dynamic`: the shared library is found at run time, in this order:
//! `ORT_DYLIB_PATH`, `$CORRAL_ORT_DIR`, `./.ort/`, then the Python `onnxruntime` package
//! (`python3 -c 'import onnxruntime'`, run once). [`init`] loads it once per process and creates
//! the single `ort` environment every session shares. Nothing here panics: `ort` itself would
//! panic on first use without a library, so every entry point calls [`init`] first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use super::{Device, PipelineConfig, PipelineError};

const HOW_TO_INSTALL: &str =
    "run scripts/install-onnxruntime.sh or set ORT_DYLIB_PATH to libonnxruntime.so.1.x";

struct Runtime {
    path: PathBuf,
    env: Environment,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// Finds ONNX Runtime, loads it and creates the process-wide environment (once).
/// Returns the library's path.
pub fn init() -> Result<PathBuf, PipelineError> {
    runtime().map(|r| r.path.clone())
}

pub(crate) fn environment() -> Result<&'static Environment, PipelineError> {
    runtime().map(|r| &r.env)
}

fn runtime() -> Result<&'static Runtime, PipelineError> {
    RUNTIME
        .get_or_init(load)
        .as_ref()
        .map_err(|e| PipelineError::RuntimeNotFound(e.clone()))
}

fn load() -> Result<Runtime, String> {
    let path = find_library()?;
    let builder = ort::init_from(&path).map_err(|e| format!("{e}; {HOW_TO_INSTALL}"))?;
    let env = builder
        .with_name("corral")
        .build()
        .map_err(|e| format!("creating the environment: {e}"))?;
    tracing::info!(path = %path.display(), "ONNX Runtime loaded");
    Ok(Runtime { path, env })
}

/// The library `init` would load, without loading it.
pub fn find_library() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "ORT_DYLIB_PATH={} does not exist; {HOW_TO_INSTALL}",
                p.display()
            ))
        };
    }
    let mut searched = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("CORRAL_ORT_DIR").filter(|p| !p.is_empty()) {
        dirs.push(d.into());
    }
    dirs.push(PathBuf::from(".ort"));
    for d in dirs.iter().cloned().chain(python_package_dir()) {
        if let Some(lib) = library_in(&d) {
            return Ok(std::fs::canonicalize(&lib).unwrap_or(lib));
        }
        searched.push(d.display().to_string());
    }
    Err(format!(
        "no libonnxruntime.so* in {} nor in the Python onnxruntime package; {HOW_TO_INSTALL}",
        searched.join(", ")
    ))
}

/// The newest-looking `libonnxruntime.so*` (or `.dylib`) directly inside `dir`.
fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (name.starts_with("libonnxruntime.so")
                || (name.starts_with("libonnxruntime") && name.ends_with(".dylib")))
                && !name.contains("providers")
                && p.is_file()
        })
        .collect();
    // Prefer the fully versioned name (libonnxruntime.so.1.32.0) over the bare link.
    found.sort_by_key(|p| p.as_os_str().len());
    found.pop()
}

fn python_package_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let p = PathBuf::from(s.trim());
    p.is_dir().then_some(p)
}

/// Where an optimized copy of a model is cached between loads, and under which name.
pub(crate) struct OptimizedCache<'a> {
    pub dir: &'a Path,
    pub key: String,
}

/// A model to build a session from: its file, and optionally replacement bytes for it (the
/// file rewritten with overridable weights); external data is still read beside the file.
#[derive(Clone, Copy)]
pub(crate) struct ModelSource<'a> {
    pub path: &'a Path,
    pub bytes: Option<&'a [u8]>,
}

/// Builds a session for `model` on the configured device. With a cache, the first load writes
/// the optimized graph (ONNX Runtime's `optimized_model_filepath`) to a temporary file renamed
/// into place, and later loads read it with optimization disabled.
pub(crate) fn build_session(
    model: ModelSource<'_>,
    cfg: &PipelineConfig,
    cache: Option<&OptimizedCache<'_>>,
) -> Result<Session, PipelineError> {
    let device = cfg.device;
    let quiet = model.bytes.is_some();
    if let Some(c) = cache {
        let cached = c.dir.join(format!("{}.onnx", c.key));
        if cached.is_file() {
            let from_cache = ModelSource {
                path: &cached,
                bytes: None,
            };
            match builder(
                cfg,
                device,
                GraphOptimizationLevel::Disable,
                from_cache,
                quiet,
            )
            .and_then(|mut b| commit(&mut b, from_cache))
            {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!(file = %cached.display(), error = %e, "cached optimized model unusable; rebuilding")
                }
            }
        }
        std::fs::create_dir_all(c.dir).map_err(|e| PipelineError::io(c.dir, e))?;
        let tmp = c
            .dir
            .join(format!(".tmp-{}-{}.onnx", c.key, std::process::id()));
        let mut b = builder(cfg, device, GraphOptimizationLevel::All, model, quiet)?
            .with_optimized_model_path(&tmp)
            .map_err(PipelineError::runtime)?;
        if has_external_data(model.path) {
            b = b
                .with_config_entry(
                    "session.optimized_model_external_initializers_file_name",
                    format!("{}.onnx_data", c.key),
                )
                .map_err(PipelineError::runtime)?;
        }
        let s = commit(&mut b, model)?;
        if let Err(e) = std::fs::rename(&tmp, &cached) {
            tracing::warn!(error = %e, "could not cache the optimized model");
            let _ = std::fs::remove_file(&tmp);
        }
        return Ok(s);
    }
    let mut b = builder(cfg, device, GraphOptimizationLevel::All, model, quiet)?;
    commit(&mut b, model)
}

/// A session for the unmodified `model` whose named initializers are replaced by `values`
/// (`SessionBuilder::with_initializer`): the session-rebuild way of switching LoRAs, which
/// `pipeline::bench` measures against the pipeline's own.
pub(crate) fn build_session_with_initializers(
    model: ModelSource<'_>,
    cfg: &PipelineConfig,
    values: Vec<(String, ort::value::DynTensor)>,
) -> Result<Session, PipelineError> {
    let mut b = builder(cfg, cfg.device, GraphOptimizationLevel::All, model, false)?;
    for (name, v) in values {
        b = b
            .with_initializer(name, v.into_dyn())
            .map_err(PipelineError::runtime)?;
    }
    commit(&mut b, model)
}

fn has_external_data(model: &Path) -> bool {
    model.with_extension("onnx_data").exists() || model.with_file_name("model.onnx_data").exists()
}

fn commit(b: &mut SessionBuilder, model: ModelSource<'_>) -> Result<Session, PipelineError> {
    let err =
        |e: ort::Error| PipelineError::Runtime(format!("loading {}: {e}", model.path.display()));
    match model.bytes {
        Some(bytes) => b.commit_from_memory(bytes).map_err(err),
        None => b.commit_from_file(model.path).map_err(err),
    }
}

fn builder(
    cfg: &PipelineConfig,
    device: Device,
    level: GraphOptimizationLevel,
    model: ModelSource<'_>,
    quiet: bool,
) -> Result<SessionBuilder, PipelineError> {
    let mut b = Session::builder(environment()?)
        .map_err(PipelineError::runtime)?
        .with_optimization_level(level)
        .map_err(PipelineError::runtime)?;
    if let Some(n) = cfg.intra_op_threads {
        b = b.with_intra_threads(n).map_err(PipelineError::runtime)?;
    }
    if model.bytes.is_some() {
        // From memory, ONNX Runtime resolves external data against this folder.
        let dir = model.path.parent().unwrap_or(Path::new("."));
        b = b
            .with_config_entry(
                "session.model_external_initializers_file_folder_path",
                dir.to_string_lossy(),
            )
            .map_err(PipelineError::runtime)?;
    }
    if quiet {
        // ONNX Runtime warns once per overridable initializer ("will not be treated as
        // constant"): by design here (LoRA weights), hundreds of lines on a real UNet.
        b = b
            .with_log_level(ort::logging::LogLevel::Error)
            .map_err(PipelineError::runtime)?;
    }
    match device {
        Device::Cpu => Ok(b),
        Device::Cuda { device_id } => with_cuda(b, device_id),
    }
}

#[cfg(feature = "cuda")]
fn with_cuda(b: SessionBuilder, device_id: i32) -> Result<SessionBuilder, PipelineError> {
    let ep = ort::ep::CUDA::default()
        .with_device_id(device_id)
        .build()
        .error_on_failure();
    b.with_execution_providers([ep]).map_err(|e| {
        PipelineError::Runtime(format!(
            "registering the CUDA execution provider on device {device_id}: {e} (needs ONNX Runtime \
             with the CUDA provider, e.g. ONNXRUNTIME_PACKAGE=onnxruntime-gpu \
             scripts/install-onnxruntime.sh, and the CUDA and cuDNN libraries on LD_LIBRARY_PATH)"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(_b: SessionBuilder, _device_id: i32) -> Result<SessionBuilder, PipelineError> {
    Err(PipelineError::Runtime(
        "CUDA was requested but corral was built without the `cuda` feature (cargo build --features cuda)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_versioned_library_not_a_provider() {
        let tmp = tempfile::tempdir().unwrap();
        for f in [
            "libonnxruntime.so",
            "libonnxruntime.so.1.32.0",
            "libonnxruntime_providers_cuda.so",
            "other.so",
        ] {
            std::fs::write(tmp.path().join(f), b"").unwrap();
        }
        assert_eq!(
            library_in(tmp.path()),
            Some(tmp.path().join("libonnxruntime.so.1.32.0"))
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(library_in(empty.path()), None);
        assert_eq!(library_in(&empty.path().join("missing")), None);
    }
}
