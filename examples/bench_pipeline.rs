//! Runs `corral::pipeline::bench::bench` until `corral bench-pipeline` exists.
//!
//! cargo run --release --example bench_pipeline -- DIR [STEPS WIDTH HEIGHT RUNS] [--cuda] [--json]

use std::path::PathBuf;

use corral::pipeline::{bench::bench, Device, PipelineConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flags: Vec<&str> = args
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let Some(dir) = pos.first() else {
        eprintln!("usage: bench_pipeline DIR [STEPS WIDTH HEIGHT RUNS] [--cuda] [--json]");
        std::process::exit(2);
    };
    let num = |i: usize, d: u32| pos.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let cfg = PipelineConfig {
        device: if flags.contains(&"--cuda") {
            Device::Cuda { device_id: 0 }
        } else {
            Device::Cpu
        },
        allow_cpu_fallback: false,
        intra_op_threads: None,
    };
    match bench(
        &PathBuf::from(dir),
        &cfg,
        num(1, 20),
        num(2, 512),
        num(3, 512),
        num(4, 3),
    ) {
        Ok(r) if flags.contains(&"--json") => {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default())
        }
        Ok(r) => print!("{r}"),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
