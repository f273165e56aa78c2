//! Corral: serve image generation from thousands of Stable Diffusion models
//! on cheap, interruptible GPUs.
//!
//! # Layout
//!
//! - `types`, `error`, `clock`: the domain, shared by everything.
//! - `pb` and `convert`: the wire contract and the only place that maps it.
//! - `scheduler`: the pure, synchronous core (no I/O, no tokio, no protobuf).
//! - `sim`: a discrete-event simulator driving `scheduler` against baseline
//!   policies (see docs/sim.md).
//! - `coordinator`: tonic services around the scheduler.
//! - `worker`: the stream to the coordinator, the disk cache, downloads, engines.
//! - `pipeline`: the Stable Diffusion pipeline on ONNX Runtime (`ort`).

pub mod clock;
pub mod error;
pub mod pb;
pub mod scheduler;
pub mod sim;
pub mod types;

pub use error::{Error, Result};
pub mod cli;
pub mod config;
pub mod convert;
pub mod coordinator;
pub mod manifest;
pub mod worker;
