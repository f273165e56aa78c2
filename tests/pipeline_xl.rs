//! SDXL, image-to-image, separate VAEs and upscalers against the tiny fixtures and the golden
//! vectors of scripts/reference_sd.py (numpy + onnxruntime, diffusers' StableDiffusionXLPipeline
//! and img2img semantics).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use corral::pipeline::image::{self, RgbImage};
use corral::pipeline::upscale::Upscaler;
use corral::pipeline::vae::VaeModel;
use corral::pipeline::{
    Device, GenerateRequest, ModelFamily, Pipeline, PipelineConfig, PipelineError,
};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn cfg() -> PipelineConfig {
    PipelineConfig {
        device: Device::Cpu,
        intra_op_threads: Some(1),
        ..Default::default()
    }
}

fn load(name: &str) -> Pipeline {
    Pipeline::load(&root().join(name), &cfg()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn golden(fixture: &str) -> (Value, PathBuf) {
    let dir = root().join("golden").join(fixture);
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap());
    (meta.unwrap(), dir)
}

fn request(m: &Value, scheduler: &str) -> GenerateRequest {
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

fn img2img(m: &Value, scheduler: &str) -> GenerateRequest {
    let i = &m["img2img"];
    GenerateRequest {
        init_image: Some(std::fs::read(root().join(i["init_image"].as_str().unwrap())).unwrap()),
        strength: i["strength"].as_f64().unwrap() as f32,
        ..request(m, scheduler)
    }
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// The fp32 tolerance of the SD 1.x goldens (tests/pipeline.rs).
const TOL: f32 = 1e-3;

fn schedulers(m: &Value) -> Vec<String> {
    m["schedulers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sdxl_loads_unchanged_and_matches_golden_for_every_scheduler() {
    let p = load("tiny-sdxl");
    assert!(p.is_xl());
    assert_eq!(
        p.default_size(),
        1024,
        "unet/config.json sample_size 128 x 8"
    );
    assert_eq!(
        p.family(),
        ModelFamily::Other {
            cross_attention_dim: 80
        }
    );
    let (m, dir) = golden("tiny-sdxl");
    let noise = read_f32(&dir.join("noise.f32"));
    for s in schedulers(&m) {
        let got = p
            .denoise(&request(&m, &s), &noise, &mut |_, _| true)
            .unwrap();
        let err = max_rel_err(&got, &read_f32(&dir.join(format!("{s}.latents.f32"))));
        println!("sdxl {s}: max relative error {err:e}");
        assert!(err <= TOL, "sdxl {s}: {err}");
    }
    // An empty negative prompt is zeros (force_zeros_for_empty_prompt), not the encoded "".
    let mut r = request(&m, "euler");
    r.negative_prompt.clear();
    let got = p.denoise(&r, &noise, &mut |_, _| true).unwrap();
    let want = read_f32(&dir.join("no-negative.euler.latents.f32"));
    assert!(max_rel_err(&got, &want) <= TOL);
    assert!(max_rel_err(&got, &read_f32(&dir.join("euler.latents.f32"))) > 100.0 * TOL);
    // Decoding with the SDXL VAE (scaling factor 0.13025).
    let per = p.latent_len(r.width, r.height);
    let lat = read_f32(&dir.join("euler.latents.f32"));
    let img = p.decode(&lat[..per], r.width, r.height).unwrap();
    let want = read_f32(&dir.join("euler.image.f32"));
    assert!(max_rel_err(&img, &want[..img.len()]) <= TOL);
}

#[test]
fn sdxl_png_at_the_default_size_is_1024() {
    let p = load("tiny-sdxl");
    let req = GenerateRequest {
        prompt: "a red castle".into(),
        width: 0,
        height: 0,
        steps: 1,
        ..Default::default()
    };
    let img = p.generate(&req, &mut |_, _| true).unwrap().remove(0);
    let reader = png::Decoder::new(std::io::Cursor::new(img.png))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (1024, 1024));
}

#[test]
fn img2img_matches_golden_for_sd_and_sdxl() {
    for fx in ["tiny-sd", "tiny-sdxl"] {
        let p = load(fx);
        let (m, dir) = golden(fx);
        let r = img2img(&m, "euler");
        let per = p.latent_len(r.width, r.height);
        let noise = corral::pipeline::noise::initial_noise(r.seed, r.num_images as usize, per);
        for s in schedulers(&m) {
            let mut steps = Vec::new();
            let got = p
                .denoise(&img2img(&m, &s), &noise, &mut |d, t| {
                    steps.push((d, t));
                    true
                })
                .unwrap();
            // strength 0.6 of 8 steps: int(4.8) = 4 steps run.
            assert_eq!(steps, vec![(1, 4), (2, 4), (3, 4), (4, 4)], "{fx} {s}");
            let err = max_rel_err(
                &got,
                &read_f32(&dir.join(format!("img2img.{s}.latents.f32"))),
            );
            println!("{fx} img2img {s}: max relative error {err:e}");
            assert!(err <= TOL, "{fx} img2img {s}: {err}");
        }
    }
}

#[test]
fn jpeg_input_decodes_and_runs_like_the_png() {
    let png_img = image::decode(
        &std::fs::read(root().join("images/init-48x64.png")).unwrap(),
        "init_image",
    )
    .unwrap();
    let jpg_bytes = std::fs::read(root().join("images/init-48x64.jpg")).unwrap();
    let jpg = image::decode(&jpg_bytes, "init_image").unwrap();
    assert_eq!((jpg.width, jpg.height), (48, 64));
    let worst = png_img
        .rgb
        .iter()
        .zip(&jpg.rgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 24, "quality-95 JPEG of the same picture: {worst}");
    let p = load("tiny-sd");
    let req = GenerateRequest {
        prompt: "a red castle".into(),
        width: 0,
        height: 0,
        steps: 4,
        strength: 0.5,
        init_image: Some(jpg_bytes),
        ..Default::default()
    };
    let (images, t) = p.generate_timed(&req, &mut |_, _| true).unwrap();
    assert!(t.vae_encode_s > 0.0 && t.denoise_s > 0.0);
    let reader = png::Decoder::new(std::io::Cursor::new(images[0].png.clone()))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (48, 64));
    let text = &reader.info().uncompressed_latin1_text[0].text;
    assert!(text.contains("Denoising strength: 0.5"), "{text}");
}

fn invalid(r: Result<impl std::fmt::Debug, PipelineError>) -> String {
    match r {
        Err(PipelineError::InvalidRequest(m)) => m,
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
}

#[test]
fn bad_img2img_requests_name_the_field() {
    let p = load("tiny-sd");
    let png = std::fs::read(root().join("images/init-48x64.png")).unwrap();
    let base = GenerateRequest {
        prompt: "x".into(),
        width: 0,
        height: 0,
        steps: 8,
        init_image: Some(png.clone()),
        ..Default::default()
    };
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                init_image: Some(b"GIF89a....".to_vec()),
                ..base.clone()
            },
            "init_image: not a PNG or JPEG",
        ),
        (
            GenerateRequest {
                init_image: Some(png[..60].to_vec()),
                ..base.clone()
            },
            "init_image: undecodable PNG",
        ),
        (
            GenerateRequest {
                width: 512,
                height: 512,
                ..base.clone()
            },
            "init_image is 48x64, the request asks for 512x512",
        ),
        (
            GenerateRequest {
                strength: 1.5,
                ..base.clone()
            },
            "strength 1.5 must be in (0, 1]",
        ),
        (
            GenerateRequest {
                strength: 0.1,
                ..base.clone()
            },
            "leaves no denoising step",
        ),
    ];
    for (req, want) in cases {
        let m = invalid(p.generate(&req, &mut |_, _| true));
        assert!(m.contains(want), "{m}");
    }
    // An export without vae_encoder: img2img is refused, text-to-image works.
    let fp16 = load("tiny-sd-fp16");
    assert!(!fp16.has_vae_encoder());
    let m = invalid(fp16.generate(&base, &mut |_, _| true));
    assert!(
        m.contains("init_image: this model has no vae_encoder"),
        "{m}"
    );
}

#[test]
fn a_separate_vae_replaces_the_checkpoint_decoder() {
    let p = load("tiny-sd");
    let vae = Arc::new(VaeModel::load(&root().join("tiny-vae"), &cfg()).unwrap());
    assert!(!vae.has_encoder());
    let req = GenerateRequest {
        prompt: "a red castle".into(),
        width: 32,
        height: 24,
        steps: 3,
        scheduler: "ddim".into(),
        ..Default::default()
    };
    let own = p.generate(&req, &mut |_, _| true).unwrap();
    let with = GenerateRequest {
        vae: Some(vae.clone()),
        ..req.clone()
    };
    let other = p.generate(&with, &mut |_, _| true).unwrap();
    assert_ne!(own[0].png, other[0].png);
    // Same latents, decoded by the other VAE.
    let per = p.latent_len(32, 24);
    let noise = corral::pipeline::noise::initial_noise(req.seed, 1, per);
    let lat = p.denoise(&req, &noise, &mut |_, _| true).unwrap();
    let want = vae.decode(&lat, 32, 24).unwrap();
    let rgb = corral::pipeline::png::to_rgb8(&want, 32, 24);
    let decoded = {
        let mut r = png::Decoder::new(std::io::Cursor::new(other[0].png.clone()))
            .read_info()
            .unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        r.next_frame(&mut buf).unwrap();
        buf
    };
    assert_eq!(decoded, rgb);
    // img2img with a decoder-only VAE encodes with the checkpoint's encoder.
    let i2i = GenerateRequest {
        init_image: Some(std::fs::read(root().join("images/init-48x64.png")).unwrap()),
        width: 0,
        height: 0,
        vae: Some(vae),
        ..req
    };
    assert_eq!(p.generate(&i2i, &mut |_, _| true).unwrap().len(), 1);
}

#[test]
fn vae_overflow_is_an_error_not_a_black_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&root().join("tiny-sd-fp16"), &dir);
    std::fs::copy(
        root().join("variants/vae_decoder-fp16-overflow.onnx"),
        dir.join("vae_decoder/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        dir.join("vae_decoder/config.json"),
        r#"{"scaling_factor": 0.18215, "force_upcast": true}"#,
    )
    .unwrap();
    let p = Pipeline::load(&dir, &cfg()).unwrap();
    let req = GenerateRequest {
        prompt: "a red castle".into(),
        width: 32,
        height: 24,
        steps: 2,
        ..Default::default()
    };
    match p.generate(&req, &mut |_, _| true) {
        Err(PipelineError::BadModel(m)) => {
            assert!(m.contains("NaN/inf") && m.contains("force_upcast"), "{m}")
        }
        other => panic!("{other:?}"),
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

fn crop_24x32() -> RgbImage {
    let img = image::decode(
        &std::fs::read(root().join("images/init-48x64.png")).unwrap(),
        "x",
    )
    .unwrap();
    let rgb = (0..32)
        .flat_map(|y| img.rgb[y * 48 * 3..y * 48 * 3 + 24 * 3].to_vec())
        .collect();
    RgbImage {
        width: 24,
        height: 32,
        rgb,
    }
}

#[test]
fn tiled_upscale_equals_untiled_and_the_reference() {
    let up = Upscaler::load(&root().join("upscaler-x2"), &cfg()).unwrap();
    assert_eq!(
        up.scale(),
        2,
        "read by a probe run: the output size is dynamic"
    );
    let img = crop_24x32();
    let chw = img.to_chw_unit();
    let whole = up.run(&chw, 24, 32).unwrap();
    let want = read_f32(&root().join("golden/upscaler-x2/crop-24x32.x2.f32"));
    assert!(max_rel_err(&whole, &want) <= 1e-5);
    // 8x8 tiles with 2 pixels of context (the network sees 2 pixels around each one): 12 runs,
    // and the same pixels as one run over the whole image.
    let tiled = Upscaler::load(&root().join("upscaler-x2"), &cfg())
        .unwrap()
        .with_tiling(8, 2);
    let got = tiled.upscale_chw(&chw, 24, 32).unwrap();
    let err = max_rel_err(&got, &whole);
    println!("tiled vs untiled: max error {err:e}");
    assert!(err <= 1e-5, "{err}");
    // Without enough context the tile borders show.
    let blind = Upscaler::load(&root().join("upscaler-x2"), &cfg())
        .unwrap()
        .with_tiling(8, 0);
    assert!(max_rel_err(&blind.upscale_chw(&chw, 24, 32).unwrap(), &whole) > 1e-3);
    let out = tiled.upscale(&img).unwrap();
    assert_eq!(
        (out.width, out.height, out.rgb.len()),
        (48, 64, 48 * 64 * 3)
    );
}

#[test]
fn generate_with_an_upscaler_records_it() {
    let p = load("tiny-sd");
    let up = Arc::new(Upscaler::load(&root().join("upscaler-x2"), &cfg()).unwrap());
    let req = GenerateRequest {
        prompt: "a red castle".into(),
        width: 32,
        height: 24,
        steps: 2,
        upscaler: Some(up),
        ..Default::default()
    };
    let (images, t) = p.generate_timed(&req, &mut |_, _| true).unwrap();
    assert!(t.upscale_s > 0.0);
    let reader = png::Decoder::new(std::io::Cursor::new(images[0].png.clone()))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (64, 48));
    let text = &reader.info().uncompressed_latin1_text[0].text;
    assert!(
        text.ends_with(", Postprocess upscaler: upscaler-x2, Postprocess upscale by: 2")
            && text.contains("Size: 32x24"),
        "{text}"
    );
}

#[test]
fn bench_covers_the_new_stages() {
    let opts = corral::pipeline::bench::BenchOptions {
        steps: 2,
        width: 64,
        height: 64,
        runs: 1,
        upscaler: Some(root().join("upscaler-x2")),
        ..Default::default()
    };
    let r = corral::pipeline::bench::bench_with(&root().join("tiny-sdxl"), &cfg(), &opts).unwrap();
    assert_eq!(r.vae_encode.unwrap().samples, 1);
    assert_eq!(r.upscale.as_ref().unwrap().scale, 2);
    let table = r.to_string();
    assert!(table.contains("vae encode (img2img)") && table.contains("upscale (tiled)"));
}

#[test]
fn sdxl_loras_in_kohya_sgm_names_and_peft_names_agree() {
    use corral::pipeline::lora::{inspect, Lora, LoraWeight};
    let p = load("tiny-sdxl");
    let lora = |f: &str| LoraWeight {
        lora: Arc::new(Lora::load(&root().join("loras").join(f)).unwrap()),
        weight: 0.9,
    };
    let info = inspect(&root().join("loras/tiny-c-sdxl.kohya.safetensors")).unwrap();
    assert_eq!(
        info.family,
        Some(p.family()),
        "attn2.to_k reads 80 features"
    );
    assert_eq!((info.unet_modules, info.text_encoder_modules), (2, 2));
    let (m, dir) = golden("tiny-sdxl");
    let noise = read_f32(&dir.join("noise.f32"));
    let with = |l: Vec<LoraWeight>| {
        let r = GenerateRequest {
            loras: l,
            ..request(&m, "dpmpp_2m")
        };
        p.denoise(&r, &noise, &mut |_, _| true).unwrap()
    };
    let kohya = with(vec![lora("tiny-c-sdxl.kohya.safetensors")]);
    let peft = with(vec![lora("tiny-c-sdxl.peft.safetensors")]);
    assert_eq!(kohya, peft);
    // Both text encoders and the UNet are patched (4 weights), and that shows in the latents.
    let base = with(vec![]);
    assert!(max_rel_err(&kohya, &base) > 100.0 * TOL);
    let prepared = p
        .prepare_loras(&[lora("tiny-c-sdxl.kohya.safetensors")])
        .unwrap()
        .unwrap();
    assert_eq!(prepared.weights(), 4);
}
