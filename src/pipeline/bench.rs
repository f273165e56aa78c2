//! Per-stage timings of the pipeline (`corral bench-pipeline`).
