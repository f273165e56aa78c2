//! `corral`: parses the command line and dispatches; no logic of its own.

use clap::Parser;
use corral::cli::{self, Cli, Command, LogFormat};

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let result = match cli.command {
        Command::Coordinator(a) => run_coordinator(a).await,
        Command::Worker(a) => run_worker(*a).await,
        Command::Models(c) => cli::models(c).await,
        Command::Submit(a) => cli::submit(a).await,
        Command::Jobs(c) => cli::jobs(c).await,
        Command::Workers(c) => cli::workers(c).await,
        Command::Status(c) => cli::status(c).await,
        Command::Demo(a) => corral::demo::run(a).await,
        Command::Sim(a) => tokio::task::spawn_blocking(move || corral::sim::run_cli(&a))
            .await
            .unwrap_or_else(|e| Err(corral::Error::Internal(e.to_string())))
            .map(|out| println!("{out}")),
        Command::PlanImage(a) => cli::plan_image(a).await,
        Command::Bench(a) => corral::bench::run_cli(a).await,
        Command::BenchPipeline(a) => tokio::task::spawn_blocking(move || cli::bench_pipeline(a))
            .await
            .unwrap_or_else(|e| Err(corral::Error::Internal(e.to_string()))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_coordinator(a: cli::CoordinatorArgs) -> corral::Result<()> {
    let cfg = a.resolve()?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| corral::Error::io(cfg.listen.to_string(), e))?;
    corral::coordinator::run(listener, cfg, cli::shutdown_signal()).await
}

async fn run_worker(a: cli::WorkerArgs) -> corral::Result<()> {
    let (cfg, id) = a.resolve()?;
    let engine = cli::engine(&cfg)?;
    let http = cfg.http_listen;
    let (worker, outbox) = corral::worker::Worker::new(cfg, id, engine).await?;
    let _http = match http {
        Some(a) => Some(corral::worker::http::start(a, &worker).await?),
        None => None,
    };
    corral::worker::run(worker, outbox, cli::shutdown_signal()).await
}
