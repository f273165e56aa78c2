//! Runs `corral::pipeline::bench::bench_with`, as `corral bench-pipeline` does.
//!
//! cargo run --release --example bench_pipeline -- DIR [STEPS WIDTH HEIGHT RUNS] [--cuda] [--json]
//!     [--lora FILE:WEIGHT]... [--lora-conv] [--upscaler MODEL.onnx]

use std::path::PathBuf;

use corral::pipeline::bench::{bench_with, BenchOptions};
use corral::pipeline::{Device, PipelineConfig};

const USAGE: &str = "usage: bench_pipeline DIR [STEPS WIDTH HEIGHT RUNS] [--cuda] [--json] \
                     [--lora FILE:WEIGHT]... [--lora-conv] [--upscaler MODEL.onnx]";

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut flags, mut pos, mut loras) = (Vec::new(), Vec::new(), Vec::new());
    let mut upscaler = None;
    while let Some(a) = args.next() {
        if a == "--upscaler" {
            upscaler = args.next().map(PathBuf::from);
        } else if a == "--lora" {
            let spec = args.next().unwrap_or_default();
            let Some((file, w)) = spec.rsplit_once(':') else {
                eprintln!("--lora takes FILE:WEIGHT, got {spec:?}\n{USAGE}");
                std::process::exit(2);
            };
            let Ok(w) = w.parse::<f32>() else {
                eprintln!("--lora {spec}: weight {w:?} is not a number");
                std::process::exit(2);
            };
            loras.push((PathBuf::from(file), w));
        } else if a.starts_with("--") {
            flags.push(a);
        } else {
            pos.push(a);
        }
    }
    let Some(dir) = pos.first() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let has = |f: &str| flags.iter().any(|x| x == f);
    let num = |i: usize, d: u32| pos.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let cfg = PipelineConfig {
        device: if has("--cuda") {
            Device::Cuda { device_id: 0 }
        } else {
            Device::Cpu
        },
        lora_conv: has("--lora-conv").then_some(true),
        ..Default::default()
    };
    let opts = BenchOptions {
        steps: num(1, 20),
        width: num(2, 512),
        height: num(3, 512),
        runs: num(4, 3),
        loras,
        upscaler,
    };
    match bench_with(&PathBuf::from(dir), &cfg, &opts) {
        Ok(r) if has("--json") => {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default())
        }
        Ok(r) => print!("{r}"),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
