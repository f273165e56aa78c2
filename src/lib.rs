//! Corral: serve image generation from thousands of Stable Diffusion models
//! on cheap, interruptible GPUs.
//!
//! # Layout
//!
//! One module per concern:
//!
//! - `types`, `error`, `clock`: the domain, shared by everything; `redact`:
//!   secrets out of every error and log line.
//! - `pb` and `convert`: the wire contract and the only place that maps it.
//! - `scheduler`: the pure, synchronous core (no I/O, no tokio, no protobuf),
//!   one file per concern (jobs, workers, queues, indexes, matching,
//!   estimates, replication).
//! - `sim`: a discrete-event simulator driving `scheduler` against baseline
//!   policies (see docs/sim.md).
//! - `coordinator`: tonic services around the scheduler; `coordinator::store`
//!   the durable state (embedded redb, or PostgreSQL with leadership).
//! - `source` (where bundles come from: file, http(s), s3/gs/az) and
//!   `manifest` (a model's files, sizes and digests, validated).
//! - `worker`: the stream to the coordinator, the disk cache, downloads,
//!   VRAM residency, engines.
//! - `pipeline`: the Stable Diffusion pipelines on ONNX Runtime (`ort`).
//! - `cloud`: SaladCloud's instance metadata service and API (optional).
//! - `auth`: tokens and TLS on the client side (`coordinator::auth` checks
//!   them); `http`: the HTTP ports and the connection acceptor.
//! - `metrics`: Prometheus registries (one per coordinator and per worker).
//! - `client`: what the CLI, the demo and the bench share to talk to a
//!   coordinator; `shutdown`: signals.
//! - `bench`: `corral bench`, load on the control plane over loopback gRPC,
//!   and its ceiling.
//! - `config`: the TOML file (flags and variables generated from it); `cli`:
//!   the command line; `demo`: `corral demo`, the main job end to end.

pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cloud;
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
