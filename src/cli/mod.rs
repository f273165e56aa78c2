//! The command line. `main.rs` parses it and calls [`run`]; this module
//! maps each command to the code that does it and holds no logic of its own.
//!
//! - `args`: argument types, and how flags, `CORRAL_*` variables and the
//!   config file combine into a coordinator's or worker's config.
//! - `overrides`: one flag and `CORRAL_*` variable per config key, generated
//!   from the config structs.
//! - `commands`: the client commands (models, submit, jobs, workers, status).

mod args;
mod commands;
pub mod overrides;

pub use args::*;

use clap::{Parser, Subcommand};

use crate::client::ClientArgs;

use crate::error::{Error, Result};

#[derive(Parser, Debug)]
#[command(
    name = "corral",
    version,
    about = "Serve Stable Diffusion from thousands of models on interruptible GPUs"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "CORRAL_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the coordinator.
    Coordinator(CoordinatorArgs),
    /// Run a worker.
    Worker(Box<WorkerArgs>),
    /// The model catalogue.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Submit a job and (by default) wait for its image.
    Submit(SubmitArgs),
    /// Look at or cancel jobs.
    #[command(subcommand)]
    Jobs(JobsCmd),
    /// List connected workers and what they hold.
    Workers(ClientArgs),
    /// Per model: queued jobs and the workers holding it.
    Status(ClientArgs),
    /// Simulate the fleet: Corral's scheduler against the baselines.
    Sim(crate::sim::SimArgs),
    /// Which models to bake into the worker image under a byte budget.
    PlanImage(PlanImageCmd),
    /// The main job end to end: a coordinator, two workers, jobs, images.
    Demo(crate::demo::DemoArgs),
    /// Per-stage timings of a Stable Diffusion pipeline (session creation,
    /// text encoder, UNet step, VAE).
    BenchPipeline(BenchPipelineArgs),
    /// Load benchmark of the control plane (coordinator, N synthetic workers, K clients).
    Bench(crate::bench::BenchArgs),
}

/// Runs one command to its end.
pub async fn run(command: Command) -> Result<()> {
    match command {
        Command::Coordinator(a) => {
            let cfg = a.resolve()?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .map_err(|e| Error::io(cfg.listen.to_string(), e))?;
            crate::coordinator::run(listener, cfg, crate::shutdown::signal()).await
        }
        Command::Worker(a) => {
            let (cfg, id) = a.resolve()?;
            let engine = crate::worker::engine::from_config(&cfg)?;
            let http = cfg.http_listen;
            let (worker, outbox) = crate::worker::Worker::new(cfg, id, engine).await?;
            let _http = match http {
                Some(a) => Some(crate::worker::http::start(a, &worker).await?),
                None => None,
            };
            crate::worker::run(worker, outbox, crate::shutdown::signal()).await
        }
        Command::Models(c) => commands::models(c).await,
        Command::Submit(a) => commands::submit(a).await,
        Command::Jobs(c) => commands::jobs(c).await,
        Command::Workers(c) => commands::workers(c).await,
        Command::Status(c) => commands::status(c).await,
        Command::Demo(a) => crate::demo::run(a).await,
        Command::Sim(a) => {
            blocking(move || crate::sim::run_cli(&a).map(|out| println!("{out}"))).await
        }
        Command::PlanImage(a) => commands::plan_image(a).await,
        Command::Bench(a) => crate::bench::run_cli(a).await,
        Command::BenchPipeline(a) => blocking(move || commands::bench_pipeline(a)).await,
    }
}

/// Runs CPU-bound work off the async runtime's threads.
async fn blocking(f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::Internal(e.to_string())))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
