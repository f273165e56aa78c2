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
//! - `manifest`: a model's files, sizes and digests, built from its source.
//! - `worker`: the stream to the coordinator, the disk cache, downloads, engines.
//! - `auth`: tokens and TLS on the client side (`coordinator::auth` checks them).
//! - `pipeline`: the Stable Diffusion pipeline on ONNX Runtime (`ort`).
//! - `metrics`: Prometheus counters and histograms (coordinator and worker).
//! - `bench`: `corral bench`, load on the control plane over loopback gRPC.
//! - `config`: the TOML file, flags and environment; `cli`: the command line;
//!   `demo`: `corral demo`, the main job end to end.

pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod convert;
pub mod coordinator;
pub mod demo;
pub mod error;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod pb;
pub mod pipeline;
pub mod redact;
pub mod scheduler;
pub mod shutdown;
pub mod sim;
pub mod source;
pub mod types;
pub mod worker;

pub use error::{Error, Result};
