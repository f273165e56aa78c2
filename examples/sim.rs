//! Runs the simulator until `corral sim` is wired into the CLI:
//! `cargo run --release --example sim -- --scenario s1`.
//! `--plan-image-budget-bytes N` prints an image plan instead.

use clap::Parser;
use corral::sim::{plan_image_cli, run_cli, PlanImageArgs, SimArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
    /// Print the image plan for this budget instead of simulating.
    #[arg(long)]
    plan_image_budget_bytes: Option<u64>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let out = match cli.plan_image_budget_bytes {
        Some(budget_bytes) => plan_image_cli(&PlanImageArgs {
            budget_bytes,
            demand: None,
            scenario: cli.sim.scenario.clone(),
            config: cli.sim.config.clone(),
            seed: 1,
        })?,
        None => run_cli(&cli.sim)?,
    };
    print!("{out}");
    Ok(())
}
