//! Time estimates: how long until a job could start on a worker.

use crate::types::Millis;

/// The cost model behind placement. Defaults follow ../shared/BENCHMARK.md.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    /// Download rate assumed for a worker that has not measured one. Default: 25 MB/s.
    pub default_download_bps: u64,
    /// Fixed part of loading a model into VRAM. Default: 1,500 ms.
    pub load_base_ms: Millis,
    /// Rate of loading model bytes into VRAM. Default: 1.5 GB/s.
    pub load_bps: u64,
    /// Generation time assumed before any has been observed. Default: 5,000 ms.
    pub default_service_ms: Millis,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            default_download_bps: 25_000_000,
            load_base_ms: 1_500,
            load_bps: 1_500_000_000,
            default_service_ms: 5_000,
        }
    }
}

impl CostModel {
    /// Time to fetch `bytes` at `bps` (0 = unknown: the default rate).
    pub fn download_ms(&self, bytes: u64, bps: u64) -> Millis {
        let bps = if bps == 0 {
            self.default_download_bps
        } else {
            bps
        };
        bytes.saturating_mul(1000) / bps.max(1)
    }

    /// Time to load a model of `bytes` from disk into VRAM.
    pub fn load_ms(&self, bytes: u64) -> Millis {
        self.load_base_ms + bytes.saturating_mul(1000) / self.load_bps.max(1)
    }
}
