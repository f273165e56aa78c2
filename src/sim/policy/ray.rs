//! B4 Ray-multiplex: the least-loaded node with the model in VRAM, else the
//! node with the fewest loaded models; each node keeps at most
//! `b4_vram_models` models in VRAM (LRU).

use super::push::Placer;
use crate::sim::engine::Core;

pub(crate) struct Ray;

impl Placer for Ray {
    fn begin(&mut self, c: &mut Core) {
        c.vram_models_max = c.p.b4_vram_models.max(1);
    }

    fn choose(&mut self, c: &Core, j: u32, up: &[u32]) -> u32 {
        let m = c.arrival(j).model;
        let warm = up
            .iter()
            .filter(|n| c.nodes[**n as usize].vram.contains_key(&m))
            .min_by_key(|n| (c.nodes[**n as usize].load(), **n));
        match warm {
            Some(n) => *n,
            None => *up
                .iter()
                .min_by_key(|n| {
                    let x = &c.nodes[**n as usize];
                    (x.vram.len(), x.load(), **n)
                })
                .expect("non-empty"),
        }
    }
}
