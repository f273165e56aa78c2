//! The Stable Diffusion pipeline against the tiny fixtures and the golden vectors that
//! scripts/reference_sd.py (numpy + onnxruntime, diffusers' maths) wrote. Needs ONNX Runtime,
//! found through `pipeline::runtime::init()` (ORT_DYLIB_PATH, ./.ort/ or the Python package).

use std::path::{Path, PathBuf};

use corral::pipeline::noise::initial_noise;
use corral::pipeline::{Device, GenerateRequest, Pipeline, PipelineConfig, PipelineError};
use serde_json::Value;

const FIXTURES: [&str; 2] = ["tiny-sd", "tiny-sd-fp16"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn cfg() -> PipelineConfig {
    PipelineConfig {
        device: Device::Cpu,
        allow_cpu_fallback: false,
        intra_op_threads: Some(1),
        ..Default::default()
    }
}

fn load(name: &str) -> Pipeline {
    Pipeline::load(&root().join(name), &cfg()).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

struct Golden {
    meta: Value,
    dir: PathBuf,
}

impl Golden {
    fn new(fixture: &str) -> Self {
        let dir = root().join("golden").join(fixture);
        let meta =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        Self { meta, dir }
    }

    fn request(&self, scheduler: &str) -> GenerateRequest {
        let m = &self.meta;
        GenerateRequest {
            model_id: "tiny".into(),
            prompt: m["prompt"].as_str().unwrap().into(),
            negative_prompt: m["negative_prompt"].as_str().unwrap().into(),
            width: m["width"].as_u64().unwrap() as u32,
            height: m["height"].as_u64().unwrap() as u32,
            steps: m["steps"].as_u64().unwrap() as u32,
            guidance_scale: m["guidance_scale"].as_f64().unwrap() as f32,
            seed: m["seed"].as_u64().unwrap(),
            num_images: m["num_images"].as_u64().unwrap() as u32,
            scheduler: scheduler.into(),
            ..Default::default()
        }
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        self.meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }
}

/// Largest |a - b| / max(1, |b|).
fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

#[test]
fn runtime_is_found() {
    let path = corral::pipeline::runtime::init().expect("ONNX Runtime");
    assert!(
        path.to_string_lossy().contains("onnxruntime"),
        "{}",
        path.display()
    );
}

#[test]
fn tokenizer_matches_reference() {
    for fx in FIXTURES {
        let p = load(fx);
        let g = Golden::new(fx);
        let r = g.request("");
        assert_eq!(p.token_ids(&r.prompt).unwrap(), g.ids("cond_ids"), "{fx}");
        assert_eq!(
            p.token_ids(&r.negative_prompt).unwrap(),
            g.ids("uncond_ids"),
            "{fx}"
        );
        // Truncation keeps BOS ... EOS within 77.
        let long = p.token_ids(&"cat ".repeat(200)).unwrap();
        assert_eq!(long.len(), 77);
        assert_eq!(long[76], g.ids("cond_ids")[11], "EOS last");
    }
}

#[test]
fn initial_noise_matches_reference() {
    for fx in FIXTURES {
        let g = Golden::new(fx);
        let want = read_f32(&g.dir.join("noise.f32"));
        let r = g.request("");
        let got = initial_noise(
            r.seed,
            r.num_images as usize,
            want.len() / r.num_images as usize,
        );
        assert!(max_rel_err(&got, &want) <= 1e-6, "{fx}: noise differs");
    }
}

/// fp32: the Rust and numpy pipelines differ only in float rounding order; fp16: also in where
/// values are rounded to half precision, amplified by 8 guided steps.
fn tolerance(fixture: &str) -> f32 {
    if fixture.ends_with("fp16") {
        5e-3
    } else {
        1e-3
    }
}

#[test]
fn latents_match_golden_for_every_scheduler() {
    for fx in FIXTURES {
        let p = load(fx);
        let g = Golden::new(fx);
        let noise = read_f32(&g.dir.join("noise.f32"));
        for s in g.meta["schedulers"].as_array().unwrap() {
            let s = s.as_str().unwrap();
            let want = read_f32(&g.dir.join(format!("{s}.latents.f32")));
            let got = p.denoise(&g.request(s), &noise, &mut |_, _| true).unwrap();
            let err = max_rel_err(&got, &want);
            println!("{fx} {s}: max relative error {err:e}");
            assert!(err <= tolerance(fx), "{fx} {s}: max relative error {err}");
        }
    }
}

#[test]
fn decoded_image_matches_golden() {
    for fx in FIXTURES {
        let p = load(fx);
        let g = Golden::new(fx);
        let r = g.request("euler");
        let latents = read_f32(&g.dir.join("euler.latents.f32"));
        let want = read_f32(&g.dir.join("euler.image.f32"));
        let per = p.latent_len(r.width, r.height);
        let mut got = Vec::new();
        for lat in latents.chunks(per) {
            got.extend(p.decode(lat, r.width, r.height).unwrap());
        }
        let err = max_rel_err(&got, &want);
        println!("{fx} image: max error {err:e}");
        assert!(err <= tolerance(fx), "{fx}: image error {err}");
    }
}

fn small_request(seed: u64) -> GenerateRequest {
    GenerateRequest {
        model_id: "tiny-model".into(),
        prompt: "a red castle".into(),
        negative_prompt: "blurry".into(),
        width: 32,
        height: 24,
        steps: 4,
        guidance_scale: 5.0,
        seed,
        num_images: 2,
        scheduler: "euler_a".into(),
        ..Default::default()
    }
}

#[test]
fn same_seed_same_png_different_seed_differs() {
    let p = load("tiny-sd");
    let a = p.generate(&small_request(9), &mut |_, _| true).unwrap();
    let b = p.generate(&small_request(9), &mut |_, _| true).unwrap();
    let c = p.generate(&small_request(10), &mut |_, _| true).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.iter().map(|i| i.seed).collect::<Vec<_>>(), vec![9, 10]);
    assert_ne!(a[0].png, a[1].png, "images of one request differ");
    assert_ne!(a[0].png, c[0].png);
    // Image i of seed s is image 0 of seed s + i.
    let pixels = |png: &[u8]| {
        let mut r = png::Decoder::new(std::io::Cursor::new(png.to_vec()))
            .read_info()
            .unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        r.next_frame(&mut buf).unwrap();
        buf
    };
    assert_eq!(pixels(&a[1].png), pixels(&c[0].png));
}

#[test]
fn png_has_parameters_chunk() {
    let p = load("tiny-sd-fp16");
    let mut r = small_request(5);
    r.num_images = 1;
    r.scheduler = "dpmpp_2m_karras".into();
    let img = p.generate(&r, &mut |_, _| true).unwrap().remove(0);
    let reader = png::Decoder::new(std::io::Cursor::new(img.png))
        .read_info()
        .unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (32, 24));
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .expect("parameters chunk")
        .text
        .clone();
    assert_eq!(
        text,
        "a red castle\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 5, Size: 32x24, Model: tiny-model"
    );
}

#[test]
fn cancellation_stops_within_one_step() {
    let p = load("tiny-sd");
    let mut calls = Vec::new();
    let mut r = small_request(1);
    r.steps = 10;
    let res = p.generate(&r, &mut |done, total| {
        calls.push((done, total));
        done < 3
    });
    assert!(matches!(res, Err(PipelineError::Cancelled)), "{res:?}");
    assert_eq!(calls, vec![(1, 10), (2, 10), (3, 10)]);
}

#[test]
fn default_scheduler_comes_from_the_config() {
    use corral::pipeline::schedulers::SchedulerKind;
    assert_eq!(
        load("tiny-sd").default_scheduler(),
        SchedulerKind::DpmPp2m,
        "PNDMScheduler"
    );
    assert_eq!(
        load("tiny-sd-fp16").default_scheduler(),
        SchedulerKind::Euler
    );
}

#[test]
fn invalid_requests_are_rejected() {
    let p = load("tiny-sd");
    type Edit = fn(&mut GenerateRequest);
    let cases: [(Edit, &str); 5] = [
        (|r| r.width = 30, "width"),
        (|r| r.steps = 0, "steps"),
        (|r| r.num_images = 0, "num_images"),
        (|r| r.scheduler = "plms".into(), "scheduler"),
        (|r| r.guidance_scale = f32::NAN, "guidance_scale"),
    ];
    for (edit, field) in cases {
        let mut r = small_request(1);
        edit(&mut r);
        match p.generate(&r, &mut |_, _| true) {
            Err(PipelineError::InvalidRequest(m)) => assert!(m.contains(field), "{m}"),
            other => panic!("{field}: {other:?}"),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn broken(edit: impl FnOnce(&Path)) -> PipelineError {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&root().join("tiny-sd"), &dir);
    edit(&dir);
    match Pipeline::load(&dir, &cfg()) {
        Ok(_) => panic!("loaded a broken model"),
        Err(e) => e,
    }
}

#[test]
fn wrong_or_missing_files_give_clear_errors() {
    for (rel, needle) in [
        ("unet/model.onnx", "unet/model.onnx"),
        ("model_index.json", "model_index.json"),
        ("scheduler/scheduler_config.json", "scheduler_config.json"),
        ("tokenizer/merges.txt", "merges.txt"),
        ("vae_decoder/model.onnx", "vae_decoder/model.onnx"),
    ] {
        let e = broken(|d| std::fs::remove_file(d.join(rel)).unwrap());
        assert!(
            matches!(e, PipelineError::MissingFile { .. }),
            "{rel}: {e:?}"
        );
        assert!(e.to_string().contains(needle), "{rel}: {e}");
    }
    let e = broken(|d| std::fs::write(d.join("unet/model.onnx"), b"not a model").unwrap());
    assert!(matches!(e, PipelineError::BadModel(_)), "{e:?}");
    assert!(
        e.to_string().contains("unet/model.onnx: not an ONNX model"),
        "{e}"
    );
    // Without a name map the file goes to ONNX Runtime unread, which says the same.
    let e = broken(|d| {
        std::fs::remove_file(d.join("unet/name_map.json")).unwrap();
        std::fs::write(d.join("unet/model.onnx"), b"not a model").unwrap()
    });
    assert!(matches!(e, PipelineError::Runtime(_)), "{e:?}");
    assert!(e.to_string().contains("unet/model.onnx"), "{e}");
    let e = broken(|d| {
        std::fs::write(
            d.join("scheduler/scheduler_config.json"),
            r#"{"prediction_type":"sample"}"#,
        )
        .unwrap()
    });
    assert!(
        e.to_string().contains("scheduler_config.json")
            && e.to_string().contains("prediction_type"),
        "{e}"
    );
    let e = broken(|d| std::fs::write(d.join("model_index.json"), "{").unwrap());
    assert!(
        matches!(e, PipelineError::BadModel(_)) && e.to_string().contains("model_index.json"),
        "{e}"
    );
    // Swapped components: the UNet where the text encoder belongs.
    let e = broken(|d| {
        std::fs::copy(d.join("unet/model.onnx"), d.join("text_encoder/model.onnx"))
            .map(drop)
            .unwrap()
    });
    assert!(
        matches!(e, PipelineError::BadModel(_)) && e.to_string().contains("text_encoder"),
        "{e}"
    );
    // A text_encoder_2/ makes it SDXL, which needs the whole second encoder.
    let e = broken(|d| std::fs::create_dir(d.join("text_encoder_2")).unwrap());
    assert!(
        matches!(e, PipelineError::MissingFile { .. })
            && e.to_string().contains("text_encoder_2/model.onnx")
            && e.to_string().contains("SDXL's second text encoder"),
        "{e}"
    );
    let e = Pipeline::load(Path::new("/nonexistent/model"), &cfg())
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/model"), "{e}");
}

#[test]
fn cuda_request_without_support_is_clear_or_falls_back() {
    let dir = root().join("tiny-sd");
    let cuda = PipelineConfig {
        device: Device::Cuda { device_id: 0 },
        ..cfg()
    };
    match Pipeline::load(&dir, &cuda) {
        // A machine with the cuda feature and a CUDA-enabled ONNX Runtime loads it.
        Ok(p) => assert_eq!(p.device(), Device::Cuda { device_id: 0 }),
        Err(e) => {
            let m = e.to_string();
            println!("CUDA unavailable: {m}");
            assert!(m.contains("CUDA"), "{m}");
            if cfg!(not(feature = "cuda")) {
                assert!(m.contains("`cuda` feature"), "{m}");
            }
            let fallback = PipelineConfig {
                allow_cpu_fallback: true,
                ..cuda
            };
            let p = Pipeline::load(&dir, &fallback).unwrap();
            assert_eq!(p.device(), Device::Cpu);
        }
    }
}

#[test]
fn optimized_graph_cache_is_written_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = root().join("tiny-sd");
    let cache = tmp.path().join("opt");
    let a = Pipeline::load_with_cache(&dir, &cfg(), Some(&cache)).unwrap();
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // text encoder, UNet, VAE decoder and encoder.
    assert_eq!(files.len(), 4, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| !f.to_string_lossy().starts_with(".tmp-")),
        "{files:?}"
    );
    let b = Pipeline::load_with_cache(&dir, &cfg(), Some(&cache)).unwrap();
    let mut r = small_request(3);
    r.scheduler = "ddim".into();
    let plain = load("tiny-sd").generate(&r, &mut |_, _| true).unwrap();
    let first = a.generate(&r, &mut |_, _| true).unwrap();
    let second = b.generate(&r, &mut |_, _| true).unwrap();
    assert_eq!(first, second);
    assert_eq!(first, plain);
}

#[test]
fn guidance_off_runs_the_conditional_pass_only() {
    let p = load("tiny-sd");
    let mut r = small_request(4);
    r.guidance_scale = 1.0;
    r.negative_prompt = "ugly".into();
    let a = p.generate(&r, &mut |_, _| true).unwrap();
    r.negative_prompt = "something else".into();
    let b = p.generate(&r, &mut |_, _| true).unwrap();
    let strip = |imgs: &[corral::pipeline::Image]| {
        imgs.iter()
            .map(|i| {
                let mut rd = png::Decoder::new(std::io::Cursor::new(i.png.clone()))
                    .read_info()
                    .unwrap();
                let mut buf = vec![0; rd.output_buffer_size()];
                rd.next_frame(&mut buf).unwrap();
                buf
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(&a),
        strip(&b),
        "the negative prompt is unused without guidance"
    );
    assert!(p.resident_bytes() > 0);
}

#[test]
fn bench_reports_every_stage() {
    let r = corral::pipeline::bench::bench(&root().join("tiny-sd"), &cfg(), 3, 32, 32, 2).unwrap();
    assert_eq!(r.unet_step.samples, 6, "3 steps x 2 runs");
    assert_eq!(r.text_encoder.samples, 2);
    assert_eq!(r.total.samples, 2);
    assert!(r.model_bytes > 0);
    let table = r.to_string();
    for row in [
        "unet step",
        "vae decode",
        "cached optimized graphs",
        "read onnx files",
    ] {
        assert!(table.contains(row), "{table}");
    }
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["unet_step"]["mean_ms"].as_f64().is_some());
}

#[test]
fn pipeline_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pipeline>();
    let p = std::sync::Arc::new(load("tiny-sd"));
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let p = p.clone();
            std::thread::spawn(move || {
                p.generate(&small_request(i), &mut |_, _| true)
                    .map(|v| v.len())
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), 2);
    }
}

fn pixels(png: &[u8]) -> Vec<u8> {
    let mut r = png::Decoder::new(std::io::Cursor::new(png.to_vec()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    r.next_frame(&mut buf).unwrap();
    buf
}

#[test]
fn large_requests_are_split_into_bounded_unet_batches() {
    // 5 images with guidance: a batch of 10 latents, run as two UNet batches of 5.
    let p = load("tiny-sd");
    let mut r = small_request(100);
    r.num_images = 5;
    let many = p.generate(&r, &mut |_, _| true).unwrap();
    assert_eq!(many.len(), 5);
    for (i, img) in many.iter().enumerate() {
        let mut one = small_request(100 + i as u64);
        one.num_images = 1;
        let single = p.generate(&one, &mut |_, _| true).unwrap().remove(0);
        assert_eq!(img.seed, single.seed);
        assert_eq!(pixels(&img.png), pixels(&single.png), "image {i}");
    }
}

#[test]
fn other_io_conventions_give_the_same_latents() {
    // Scalar float timestep, int64 ids, a text encoder with a fixed batch of one: the same
    // weights as tiny-sd, so the integral-timestep samplers must reproduce its goldens.
    let g = Golden::new("tiny-sd");
    let noise = read_f32(&g.dir.join("noise.f32"));
    for (variant, target) in [
        ("unet-scalar-float-timestep.onnx", "unet/model.onnx"),
        ("text_encoder-int64-ids.onnx", "text_encoder/model.onnx"),
        ("text_encoder-static-batch1.onnx", "text_encoder/model.onnx"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        copy_dir(&root().join("tiny-sd"), &dir);
        std::fs::copy(root().join("variants").join(variant), dir.join(target)).unwrap();
        let p = Pipeline::load(&dir, &cfg()).unwrap_or_else(|e| panic!("{variant}: {e}"));
        for s in ["ddim", "dpmpp_2m"] {
            let want = read_f32(&g.dir.join(format!("{s}.latents.f32")));
            let got = p.denoise(&g.request(s), &noise, &mut |_, _| true).unwrap();
            let err = max_rel_err(&got, &want);
            assert!(err <= tolerance("tiny-sd"), "{variant} {s}: {err}");
        }
    }
}
