//! LoRAs in the pipeline: golden latents with one and two LoRAs against
//! scripts/reference_sd.py (which merges them into the ONNX weights with numpy), the kohya and
//! PEFT forms of one LoRA, weight 0, the errors, the prepared-set cache and the PNG record.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use corral::pipeline::lora::{inspect, Lora, LoraFormat, LoraWeight};
use corral::pipeline::{
    Device, GenerateRequest, ModelFamily, Pipeline, PipelineConfig, PipelineError,
};
use serde_json::Value;

const FIXTURES: [&str; 2] = ["tiny-sd", "tiny-sd-fp16"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn cfg(conv: bool) -> PipelineConfig {
    PipelineConfig {
        device: Device::Cpu,
        intra_op_threads: Some(1),
        lora_conv: Some(conv),
        ..Default::default()
    }
}

fn load(name: &str) -> Pipeline {
    Pipeline::load(&root().join(name), &cfg(true)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn lora(file: &str, weight: f32) -> LoraWeight {
    LoraWeight {
        lora: Arc::new(Lora::load(&root().join("loras").join(file)).unwrap()),
        weight,
    }
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn meta(fixture: &str) -> Value {
    let p = root().join("golden").join(fixture).join("meta.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn request(m: &Value, scheduler: &str, loras: Vec<LoraWeight>) -> GenerateRequest {
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
        loras,
        ..Default::default()
    }
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// The same tolerances as the base goldens (tests/pipeline.rs).
fn tolerance(fixture: &str) -> f32 {
    if fixture.ends_with("fp16") {
        5e-3
    } else {
        1e-3
    }
}

fn denoise(p: &Pipeline, fixture: &str, scheduler: &str, loras: Vec<LoraWeight>) -> Vec<f32> {
    let m = meta(fixture);
    let noise = read_f32(&root().join("golden").join(fixture).join("noise.f32"));
    p.denoise(&request(&m, scheduler, loras), &noise, &mut |_, _| true)
        .unwrap()
}

#[test]
fn latents_with_one_and_two_loras_match_the_merged_reference() {
    for fx in FIXTURES {
        let p = load(fx);
        let m = meta(fx);
        for (set, loras) in m["lora_sets"].as_object().unwrap() {
            for s in m["schedulers"].as_array().unwrap() {
                let s = s.as_str().unwrap();
                let loras: Vec<LoraWeight> = loras
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| lora(l[0].as_str().unwrap(), l[1].as_f64().unwrap() as f32))
                    .collect();
                let got = denoise(&p, fx, s, loras);
                let dir = root().join("golden").join(fx);
                let want = read_f32(&dir.join(format!("{set}.{s}.latents.f32")));
                let base = read_f32(&dir.join(format!("{s}.latents.f32")));
                let err = max_rel_err(&got, &want);
                println!("{fx} {set} {s}: max relative error {err:e}");
                assert!(err <= tolerance(fx), "{fx} {set} {s}: {err}");
                // The LoRAs change the result far beyond the tolerance.
                assert!(
                    max_rel_err(&base, &want) > 20.0 * tolerance(fx),
                    "{set} {s}"
                );
            }
        }
    }
}

#[test]
fn kohya_and_peft_files_of_one_lora_give_the_same_latents() {
    let p = load("tiny-sd");
    for s in ["euler", "dpmpp_2m"] {
        let kohya = denoise(
            &p,
            "tiny-sd",
            s,
            vec![lora("tiny-a.kohya.safetensors", 0.8)],
        );
        let peft = denoise(&p, "tiny-sd", s, vec![lora("tiny-a.peft.safetensors", 0.8)]);
        assert_eq!(kohya, peft, "{s}");
    }
}

#[test]
fn weight_zero_gives_the_base_output_exactly_and_order_does_not_matter() {
    let p = load("tiny-sd-fp16");
    let base = denoise(&p, "tiny-sd-fp16", "ddim", vec![]);
    let zero = denoise(
        &p,
        "tiny-sd-fp16",
        "ddim",
        vec![lora("tiny-a.kohya.safetensors", 0.0)],
    );
    assert_eq!(base, zero);
    let ab = denoise(
        &p,
        "tiny-sd-fp16",
        "ddim",
        vec![
            lora("tiny-a.kohya.safetensors", 0.8),
            lora("tiny-b.kohya.safetensors", -0.7),
        ],
    );
    let ba = denoise(
        &p,
        "tiny-sd-fp16",
        "ddim",
        vec![
            lora("tiny-b.kohya.safetensors", -0.7),
            lora("tiny-a.kohya.safetensors", 0.8),
        ],
    );
    assert_eq!(ab, ba);
    assert_ne!(ab, base);
}

#[test]
fn inspect_reads_the_header_only() {
    let a = inspect(&root().join("loras/tiny-a.kohya.safetensors")).unwrap();
    assert_eq!(a.format, LoraFormat::Kohya);
    assert_eq!(
        a.family,
        Some(ModelFamily::Other {
            cross_attention_dim: 32
        })
    );
    assert_eq!(a.family, Some(load("tiny-sd").family()));
    assert_eq!((a.rank, a.unet_modules, a.text_encoder_modules), (4, 3, 1));
    assert_eq!(a.tensors, 12);
    assert!(a
        .modules
        .contains(&"text_encoder/text_model_encoder_layers_0_mlp_fc1".to_string()));
    let peft = inspect(&root().join("loras/tiny-a.peft.safetensors")).unwrap();
    assert_eq!(peft.format, LoraFormat::Peft);
    assert_eq!(
        (peft.rank, peft.unet_modules, peft.text_encoder_modules),
        (4, 3, 1)
    );
    assert!(peft
        .modules
        .contains(&"unet/mid_block.attentions.0.transformer_blocks.0.attn2.to_q".to_string()));
    let b = inspect(&root().join("loras/tiny-b.kohya.safetensors")).unwrap();
    assert_eq!((b.rank, b.unet_modules), (2, 3));
    assert_eq!(b.family, None, "no cross-attention key nor text encoder");
    assert_eq!(
        b.file_bytes,
        std::fs::metadata(root().join("loras/tiny-b.kohya.safetensors"))
            .unwrap()
            .len()
    );
    // A truncated file is refused from its header.
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("cut.safetensors");
    let bytes = std::fs::read(root().join("loras/tiny-a.kohya.safetensors")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let e = inspect(&cut).unwrap_err().to_string();
    assert!(
        e.contains("truncated") && e.contains("cut.safetensors"),
        "{e}"
    );
}

/// A kohya LoRA file with the given modules (rank 1), written with the safetensors crate.
fn write_lora(path: &Path, modules: &[(&str, usize, usize)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for &(name, out, inp) in modules {
        let bytes = |n: usize| vec![0u8; n * 4];
        data.push((format!("{name}.lora_up.weight"), vec![out, 1], bytes(out)));
        data.push((format!("{name}.lora_down.weight"), vec![1, inp], bytes(inp)));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn invalid(r: Result<impl std::fmt::Debug, PipelineError>) -> String {
    match r {
        Err(PipelineError::InvalidRequest(m)) => m,
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
}

#[test]
fn keys_that_match_no_weight_are_an_error_listing_them() {
    let p = load("tiny-sd");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("stray.safetensors");
    write_lora(
        &path,
        &[
            (
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q",
                16,
                16,
            ),
            ("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320),
            ("lora_te_text_model_encoder_layers_5_mlp_fc2", 32, 32),
        ],
    );
    let l = LoraWeight {
        lora: Arc::new(Lora::load(&path).unwrap()),
        weight: 0.0, // checked even at weight 0
    };
    let m = invalid(p.prepare_loras(&[l]));
    assert!(m.contains("stray: 1 of 3 modules match"), "{m}");
    assert!(m.contains("no weight for 2"), "{m}");
    assert!(m.contains("unet/down_blocks_0_attentions_0_proj_in"), "{m}");
    assert!(
        m.contains("text_encoder/text_model_encoder_layers_5_mlp_fc2"),
        "{m}"
    );

    // Right module, wrong shape.
    let path = tmp.path().join("shape.safetensors");
    write_lora(
        &path,
        &[(
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
            16,
            768,
        )],
    );
    let l = LoraWeight {
        lora: Arc::new(Lora::load(&path).unwrap()),
        weight: 1.0,
    };
    let m = invalid(p.prepare_loras(&[l]));
    assert!(m.contains("does not fit the weight [16, 32]"), "{m}");

    // A weight that is not a number.
    let m = invalid(p.prepare_loras(&[lora("tiny-a.kohya.safetensors", f32::NAN)]));
    assert!(m.contains("weight NaN of tiny-a.kohya"), "{m}");
}

#[test]
fn conv_loras_need_lora_conv_on_the_cpu_and_exports_need_a_name_map() {
    let p = Pipeline::load(&root().join("tiny-sd"), &cfg(false)).unwrap();
    let m = invalid(p.prepare_loras(&[lora("tiny-b.kohya.safetensors", 1.0)]));
    assert!(m.contains("2 of 3 modules match"), "{m}");
    assert!(m.contains("conv_out.weight is a 3x3 convolution"), "{m}");
    assert!(m.contains("lora_conv"), "{m}");
    // LoRA A has no conv module: fine without lora_conv.
    assert!(p
        .prepare_loras(&[lora("tiny-a.kohya.safetensors", 1.0)])
        .unwrap()
        .is_some());

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&root().join("tiny-sd"), &dir);
    std::fs::remove_file(dir.join("unet/name_map.json")).unwrap();
    std::fs::remove_file(dir.join("text_encoder/name_map.json")).unwrap();
    let p = Pipeline::load(&dir, &cfg(true)).unwrap();
    let m = invalid(p.prepare_loras(&[lora("tiny-a.kohya.safetensors", 1.0)]));
    assert!(
        m.contains("0 of 4 modules match") && m.contains("name_map.json"),
        "{m}"
    );
    // Without LoRAs the export runs as before.
    let base = denoise(&p, "tiny-sd", "euler", vec![]);
    let want = read_f32(&root().join("golden/tiny-sd/euler.latents.f32"));
    assert!(max_rel_err(&base, &want) <= tolerance("tiny-sd"));
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

#[test]
fn prepared_sets_are_cached_least_recently_used_within_the_budget() {
    let p = load("tiny-sd");
    let a = vec![lora("tiny-a.kohya.safetensors", 0.8)];
    let b = vec![lora("tiny-b.kohya.safetensors", 0.5)];
    let base_bytes = p.resident_bytes();
    let pa = p.prepare_loras(&a).unwrap().unwrap();
    assert!(Arc::ptr_eq(&pa, &p.prepare_loras(&a).unwrap().unwrap()));
    // tiny-a patches q, k, v (16x16, 32x16, 32x16) and fc1 (32x32), all f32.
    assert_eq!(pa.weights(), 4);
    assert_eq!(pa.bytes(), 4 * (16 * 16 + 2 * 32 * 16 + 32 * 32));
    assert_eq!(p.resident_bytes(), base_bytes + pa.bytes());
    let pb = p.prepare_loras(&b).unwrap().unwrap();
    assert_eq!(p.lora_cache_usage(), (pa.bytes() + pb.bytes(), 2));

    // A budget of one set: preparing B evicts A.
    let small = PipelineConfig {
        lora_cache_bytes: pa.bytes(),
        ..cfg(true)
    };
    let p = Pipeline::load(&root().join("tiny-sd"), &small).unwrap();
    let pa = p.prepare_loras(&a).unwrap().unwrap();
    let pb2 = p.prepare_loras(&b).unwrap().unwrap();
    assert!(pb2.bytes() <= pa.bytes());
    assert_eq!(p.lora_cache_usage().1, 1);
    assert!(!Arc::ptr_eq(&pa, &p.prepare_loras(&a).unwrap().unwrap()));
}

#[test]
fn png_parameters_record_loras_like_automatic1111() {
    use sha2::{Digest, Sha256};
    let p = load("tiny-sd");
    let a = lora("tiny-a.kohya.safetensors", 0.8);
    let bytes = std::fs::read(root().join("loras/tiny-a.kohya.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let hash = hex::encode(Sha256::digest(&bytes[8 + n..]));
    assert_eq!(a.lora.hash(), hash);
    let req = GenerateRequest {
        model_id: "tiny-model".into(),
        prompt: "a red castle".into(),
        width: 32,
        height: 24,
        steps: 2,
        scheduler: "euler".into(),
        loras: vec![a],
        ..Default::default()
    };
    let img = p.generate(&req, &mut |_, _| true).unwrap().remove(0);
    let reader = png::Decoder::new(std::io::Cursor::new(img.png))
        .read_info()
        .unwrap();
    let text = reader.info().uncompressed_latin1_text[0].text.clone();
    assert_eq!(
        text,
        format!(
            "a red castle <lora:tiny-a.kohya:0.8>\nSteps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 0, Size: 32x24, Model: tiny-model, Lora hashes: \"tiny-a.kohya: {}\"",
            &hash[..12]
        )
    );
}
