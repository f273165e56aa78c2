//! The worker: one stream to the coordinator (`session`), the disk cache
//! (`cache`, `fetch`), loaded models (`residency`), and the engines that
//! run jobs (`engine`, `onnx`).

pub mod cache;
pub mod engine;
pub mod fetch;
pub mod http;
pub mod onnx;
pub mod residency;
pub mod session;

pub use session::{run, Worker};
