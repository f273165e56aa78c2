//! Hardening: the faults and hostile inputs of issue 12, one test each,
//! with real processes where the fault needs one (a full disk on a small
//! tmpfs, SIGSTOP, two workers with one id, a restart).
//!
//! - `disk`: a full disk under submits and under a result.
//! - `workers`: zombies (SIGSTOP past the heartbeat timeout), duplicate
//!   worker ids, results that fail their checks, stale failure reports,
//!   worker ids bound to tokens, results over the message limit.
//! - `clients`: idempotency keys reused for another request, unknown page
//!   tokens, proto3 zero values, the HTTP port's token, log colours.
//!
//! Figures: `cargo nextest run -E 'binary(hardening)' --no-capture`.

#[path = "../common/mod.rs"]
mod common;

mod clients;
mod disk;
mod workers;
