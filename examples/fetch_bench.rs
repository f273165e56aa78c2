//! Download throughput with SHA-256 on, for comparison with `curl -o /dev/null`.
//!
//! ```text
//! cargo run --release --example fetch_bench -- http://127.0.0.1:8000/big.bin [dest-file]
//! ```
//! (The lead wires `corral::worker::fetch::bench_download` into `corral bench download`.)

#[tokio::main]
async fn main() -> corral::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(url) = args.next() else {
        eprintln!("usage: fetch_bench URL [DEST]");
        std::process::exit(2);
    };
    let dest = args.next().map(std::path::PathBuf::from);
    let r = corral::worker::fetch::bench_download(&url, dest.as_deref()).await?;
    println!(
        "{} bytes in {:.2} s: {:.1} MB/s (sha256 {})",
        r.bytes, r.seconds, r.mb_per_s, r.sha256
    );
    Ok(())
}
