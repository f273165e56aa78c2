//! LoRAs, SDXL, image-to-image, separate VAEs and upscalers end to end: a
//! coordinator and a worker running the real ONNX pipeline on the bundled
//! tiny models, over gRPC on 127.0.0.1.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use corral::config::{CoordinatorConfig, EngineKind};
use corral::pb;
use corral::types::{ModelId, ModelKind, ModelManifest};
use tonic::Code;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(p)
}

/// A bundle directory holding one file (how LoRAs and upscalers are shipped).
fn one_file_bundle(root: &Path, name: &str, file: &Path) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(file, dir.join(file.file_name().unwrap())).unwrap();
    dir
}

async fn add(url: &str, id: &str, dir: &Path, kind: ModelKind, format: &str) -> pb::Model {
    let mut m: ModelManifest = corral::manifest::manifest_from_source(
        &ModelId(id.into()),
        &format!("file://{}", dir.display()),
    )
    .await
    .unwrap();
    m.kind = kind;
    m.format = format.into();
    assert_eq!(corral::manifest::guess_kind(&m.files), kind, "{id}");
    admin(url)
        .await
        .register_model(pb::RegisterModelRequest {
            model: Some(m.into()),
        })
        .await
        .unwrap()
        .into_inner()
}

fn lora(id: &str, weight: f32) -> pb::LoraRef {
    pb::LoraRef {
        model_id: id.into(),
        weight,
    }
}

fn timings(j: &pb::Job) -> pb::Timings {
    j.output.as_ref().unwrap().timings.unwrap()
}

/// The `parameters` text of a PNG, and its size.
fn png_info(png: &[u8]) -> (String, u32, u32) {
    let dec = png::Decoder::new(std::io::Cursor::new(png));
    let reader = dec.read_info().unwrap();
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .unwrap_or_default();
    (text, info.width, info.height)
}

async fn done(url: &str, spec: pb::JobSpec) -> pb::Job {
    let id = submit(url, spec).await.id;
    wait_state(url, &id, pb::JobState::Completed, 120).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loras_sdxl_img2img_vae_and_upscalers_end_to_end() {
    let c = coordinator(fast_config()).await;
    let bundles = tmp();
    let b = bundles.path();
    let sd = add(
        &c.url,
        "tiny-sd",
        &fixture("tiny-sd"),
        ModelKind::Checkpoint,
        "",
    )
    .await;
    assert_eq!(sd.family, "dim:32", "read from unet/config.json");
    let xl = add(
        &c.url,
        "tiny-sdxl",
        &fixture("tiny-sdxl"),
        ModelKind::Checkpoint,
        "",
    )
    .await;
    assert_eq!(xl.family, "dim:80");
    let a = add(
        &c.url,
        "lora-a",
        &one_file_bundle(b, "a", &fixture("loras/tiny-a.kohya.safetensors")),
        ModelKind::Lora,
        "",
    )
    .await;
    assert_eq!((a.family.as_str(), a.format.as_str()), ("dim:32", "kohya"));
    let bl = add(
        &c.url,
        "lora-b",
        &one_file_bundle(b, "b", &fixture("loras/tiny-b.kohya.safetensors")),
        ModelKind::Lora,
        "",
    )
    .await;
    // B touches nothing that tells the family (to_q, time embedding, a
    // conv): unknown, so it is not refused for any checkpoint.
    assert_eq!(bl.family, "");
    let cx = add(
        &c.url,
        "lora-xl",
        &one_file_bundle(b, "c", &fixture("loras/tiny-c-sdxl.peft.safetensors")),
        ModelKind::Lora,
        "",
    )
    .await;
    assert_eq!((cx.family.as_str(), cx.format.as_str()), ("dim:80", "peft"));
    add(&c.url, "vae", &fixture("tiny-vae"), ModelKind::Vae, "").await;
    add(
        &c.url,
        "up2",
        &one_file_bundle(b, "up", &fixture("upscaler-x2/model.onnx")),
        ModelKind::Upscaler,
        "x2",
    )
    .await;

    // Refused at submit, naming the LoRA: another family, an unknown id.
    for (loras, needle) in [
        (vec![lora("lora-xl", 1.0)], "lora-xl is for dim:80"),
        (vec![lora("nope", 1.0)], "unknown model nope"),
        (
            vec![lora("lora-a", 1.0), lora("lora-a", 0.5)],
            "named twice",
        ),
        (vec![lora("lora-a", 9.0)], "max_lora_weight"),
        (vec![lora("vae", 1.0)], "not a Lora"),
    ] {
        let err = jobs(&c.url)
            .await
            .submit_job(pb::SubmitJobRequest {
                spec: Some(pb::JobSpec {
                    loras,
                    ..spec("tiny-sd", 1)
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{needle}: {err:?}");
    }

    let cache = tmp();
    let w = worker(
        "w1",
        corral::config::WorkerConfig {
            engine: EngineKind::Onnx,
            // LoRA B has a 3x3 conv module (off by default on CPU).
            lora_conv: Some(true),
            ..worker_config(&c.url, cache.path())
        },
    )
    .await;

    // The checkpoint first, then LoRAs the worker lacks: downloaded once.
    let plain = done(&c.url, spec("tiny-sd", 7)).await;
    assert_eq!(timings(&plain).tier, pb::CacheTier::Download as i32);
    let with = |seed| pb::JobSpec {
        loras: vec![lora("lora-a", 0.8), lora("lora-b", -0.7)],
        ..spec("tiny-sd", seed)
    };
    let first = done(&c.url, with(7)).await;
    let t = timings(&first);
    assert_eq!(
        t.tier,
        pb::CacheTier::Vram as i32,
        "checkpoint still loaded"
    );
    assert!(t.download_s > 0.0, "the LoRAs were fetched: {t:?}");
    let second = done(&c.url, with(8)).await;
    assert_eq!(timings(&second).download_s, 0.0, "nothing fetched again");
    let out = &first.output.as_ref().unwrap().images[0];
    let (params, ..) = png_info(out);
    assert!(
        params.contains("<lora:lora-a:0.8>") && params.contains("<lora:lora-b:-0.7>"),
        "{params}"
    );
    // LoRAs change the image; the same seed without them differs.
    assert_ne!(out, &plain.output.as_ref().unwrap().images[0]);
    let disk: Vec<String> = admin(&c.url)
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers[0]
        .state
        .as_ref()
        .unwrap()
        .disk_models
        .iter()
        .map(|d| d.model_id.clone())
        .collect();
    assert!(disk.contains(&"lora-a".to_string()) && disk.contains(&"lora-b".to_string()));

    // SDXL with its LoRA.
    let xl_job = done(
        &c.url,
        pb::JobSpec {
            loras: vec![lora("lora-xl", 1.0)],
            width: 128,
            height: 128,
            ..spec("tiny-sdxl", 3)
        },
    )
    .await;
    let (_, w0, h0) = png_info(&xl_job.output.as_ref().unwrap().images[0]);
    assert_eq!((w0, h0), (128, 128));

    // Image-to-image, with a separate VAE, and an upscaled job.
    let mut init = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut init, 64, 64);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let pixels: Vec<u8> = (0..64 * 64 * 3).map(|i| (i % 251) as u8).collect();
        enc.write_header()
            .unwrap()
            .write_image_data(&pixels)
            .unwrap();
    }
    let i2i = done(
        &c.url,
        pb::JobSpec {
            init_image: init.clone(),
            strength: 0.5,
            vae_id: "vae".into(),
            width: 0,
            height: 0,
            ..spec("tiny-sd", 4)
        },
    )
    .await;
    assert_eq!(
        (
            i2i.spec.as_ref().unwrap().width,
            i2i.spec.as_ref().unwrap().height
        ),
        (64, 64)
    );
    let up = done(
        &c.url,
        pb::JobSpec {
            upscaler_id: "up2".into(),
            ..spec("tiny-sd", 5)
        },
    )
    .await;
    let (_, uw, uh) = png_info(&up.output.as_ref().unwrap().images[0]);
    assert_eq!((uw, uh), (128, 128), "64 x 64 upscaled x2");
    assert!(timings(&up).upscale_s > 0.0);

    // Image-to-image input checks name the field.
    for (s, needle) in [
        (
            pb::JobSpec {
                init_image: b"not an image".to_vec(),
                ..spec("tiny-sd", 1)
            },
            "init_image",
        ),
        (
            pb::JobSpec {
                init_image: init.clone(),
                width: 128,
                height: 128,
                ..spec("tiny-sd", 1)
            },
            "init_image",
        ),
        (
            pb::JobSpec {
                strength: 0.5,
                ..spec("tiny-sd", 1)
            },
            "strength",
        ),
        (
            pb::JobSpec {
                init_image: init,
                strength: 1.5,
                width: 0,
                height: 0,
                ..spec("tiny-sd", 1)
            },
            "strength",
        ),
    ] {
        let err = jobs(&c.url)
            .await
            .submit_job(pb::SubmitJobRequest { spec: Some(s) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{needle}: {err:?}");
    }
    w.stop().await;
    c.stop().await;
}

/// A result that cannot fit one message is refused at submit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_larger_than_a_message_are_refused_at_submit() {
    let c = coordinator(CoordinatorConfig {
        max_message_bytes: 2 << 20,
        ..fast_config()
    })
    .await;
    add(
        &c.url,
        "tiny-sd",
        &fixture("tiny-sd"),
        ModelKind::Checkpoint,
        "",
    )
    .await;
    let err = jobs(&c.url)
        .await
        .submit_job(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                width: 1024,
                height: 1024,
                num_images: 2,
                ..spec("tiny-sd", 1)
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("max_message_bytes"), "{err:?}");
    c.stop().await;
}
