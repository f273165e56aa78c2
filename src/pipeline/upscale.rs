//! Upscalers: ONNX image-to-image networks (Real-ESRGAN style: RGB `[1, 3, h, w]` in [0, 1] in,
//! `[1, 3, s*h, s*w]` out), run in tiles so that memory stays bounded for any image size.
//!
//! Owns: loading ([`Upscaler::load`]: the scale from the output shape when the model fixes it,
//! else from a probe run on a 16 x 16 input) and tiled inference: each `tile` x `tile` block of
//! the input is run with `pad` pixels of context on every side (clipped at the borders), and
//! only the block's own region of the output is kept. With `pad` at least the network's
//! receptive radius, the tiled result equals the untiled one (tests/pipeline_xl.rs checks it).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::session::Session;

use super::image::RgbImage;
use super::runtime::{self, ModelSource};
use super::tensors::{find_port, float_tensor, read_floats, Port};
use super::{lock, PipelineConfig, PipelineError};

/// Default input tile side, in pixels.
pub const DEFAULT_TILE: u32 = 256;
/// Default context around each tile, in input pixels.
pub const DEFAULT_PAD: u32 = 16;

pub struct Upscaler {
    name: String,
    session: Mutex<Session>,
    input: Port,
    output: Port,
    scale: u32,
    tile: u32,
    pad: u32,
    bytes: u64,
}

impl std::fmt::Debug for Upscaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upscaler")
            .field("name", &self.name)
            .field("scale", &self.scale)
            .field("tile", &self.tile)
            .field("pad", &self.pad)
            .finish()
    }
}

/// Two upscalers are equal when they are the same loaded object.
impl PartialEq for Upscaler {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Upscaler {
    /// Loads `path` (a `.onnx` file, or a directory holding `model.onnx`).
    pub fn load(path: &Path, cfg: &PipelineConfig) -> Result<Upscaler, PipelineError> {
        runtime::init()?;
        let file: PathBuf = if path.is_dir() {
            path.join("model.onnx")
        } else {
            path.to_owned()
        };
        if !file.is_file() {
            return Err(PipelineError::MissingFile {
                path: file,
                what: "the upscaler model".into(),
            });
        }
        let session = runtime::build_session(
            ModelSource {
                path: &file,
                bytes: None,
            },
            cfg,
            None,
        )?;
        let input = find_port(&session, false, "upscaler", &["input", "image"], |p| {
            p.is_float() && p.shape.len() == 4
        })?;
        let output = find_port(&session, true, "upscaler", &["output"], |p| {
            p.is_float() && p.shape.len() == 4
        })?;
        let name = if path.is_dir() { path } else { &file };
        let mut up = Upscaler {
            name: name
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            session: Mutex::new(session),
            input,
            output,
            scale: 0,
            tile: DEFAULT_TILE,
            pad: DEFAULT_PAD,
            bytes: super::load::model_bytes(&file),
        };
        up.scale = match (
            up.input.fixed_dim(2),
            up.output.fixed_dim(2),
            up.input.fixed_dim(3),
            up.output.fixed_dim(3),
        ) {
            (Some(ih), Some(oh), Some(iw), Some(ow)) if oh % ih == 0 && oh / ih == ow / iw => {
                (oh / ih) as u32
            }
            _ => up.probe()?,
        };
        if up.input.fixed_dim(2).is_some() || up.input.fixed_dim(3).is_some() {
            return Err(PipelineError::Unsupported(format!(
                "upscaler {}: a fixed input size {:?} (tiling needs dynamic height and width)",
                up.name, up.input.shape
            )));
        }
        Ok(up)
    }

    fn probe(&self) -> Result<u32, PipelineError> {
        let out = self.run(&vec![0.0; 3 * 16 * 16], 16, 16)?;
        let s = ((out.len() / 3) as f64 / 256.0).sqrt().round() as u32;
        if s == 0 || (s * s * 256 * 3) as usize != out.len() {
            return Err(PipelineError::BadModel(format!(
                "upscaler {}: a 16x16 input gave {} values, not an integer scale",
                self.name,
                out.len()
            )));
        }
        Ok(s)
    }

    /// Sets the tile side and the context around each tile (input pixels).
    pub fn with_tiling(mut self, tile: u32, pad: u32) -> Self {
        self.tile = tile.max(8);
        self.pad = pad;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Output pixels per input pixel along each side (2 or 4 for Real-ESRGAN).
    pub fn scale(&self) -> u32 {
        self.scale
    }

    pub fn resident_bytes(&self) -> u64 {
        self.bytes
    }

    /// One model run on `[3, h, w]` in [0, 1]; returns `[3, s*h, s*w]`.
    pub fn run(&self, chw: &[f32], width: u32, height: u32) -> Result<Vec<f32>, PipelineError> {
        let input = float_tensor(self.input.ty, &[1, 3, height as usize, width as usize], chw)?;
        let mut session = lock(&self.session);
        let mut outputs = session
            .run(vec![(self.input.name.as_str(), input)])
            .map_err(|e| PipelineError::Runtime(format!("upscaler {}: {e}", self.name)))?;
        let value = outputs
            .remove(&self.output.name)
            .ok_or_else(|| PipelineError::BadModel("the upscaler returned nothing".into()))?;
        let (shape, data) = read_floats(value)?;
        let s = self.scale.max(1) as usize;
        if self.scale > 0 && shape != [1, 3, height as usize * s, width as usize * s] {
            return Err(PipelineError::BadModel(format!(
                "upscaler {} returned {shape:?} for a {width}x{height} input (scale {s})",
                self.name
            )));
        }
        Ok(data)
    }

    /// Upscales `[3, h, w]` in [0, 1] tile by tile; returns `[3, s*h, s*w]`.
    pub fn upscale_chw(
        &self,
        chw: &[f32],
        width: u32,
        height: u32,
    ) -> Result<Vec<f32>, PipelineError> {
        let (w, h, s) = (width as usize, height as usize, self.scale as usize);
        let (ow, oh) = (w * s, h * s);
        let mut out = vec![0f32; 3 * ow * oh];
        let (tile, pad) = (self.tile as usize, self.pad as usize);
        for y0 in (0..h).step_by(tile) {
            for x0 in (0..w).step_by(tile) {
                let (tw, th) = (tile.min(w - x0), tile.min(h - y0));
                let (px0, py0) = (x0.saturating_sub(pad), y0.saturating_sub(pad));
                let (px1, py1) = ((x0 + tw + pad).min(w), (y0 + th + pad).min(h));
                let (pw, ph) = (px1 - px0, py1 - py0);
                let mut crop = vec![0f32; 3 * pw * ph];
                for c in 0..3 {
                    for y in 0..ph {
                        let src = c * w * h + (py0 + y) * w + px0;
                        let dst = c * pw * ph + y * pw;
                        crop[dst..dst + pw].copy_from_slice(&chw[src..src + pw]);
                    }
                }
                let res = self.run(&crop, pw as u32, ph as u32)?;
                let (rw, rh) = (pw * s, ph * s);
                let (ox, oy) = ((x0 - px0) * s, (y0 - py0) * s);
                for c in 0..3 {
                    for y in 0..th * s {
                        let src = c * rw * rh + (oy + y) * rw + ox;
                        let dst = c * ow * oh + (y0 * s + y) * ow + x0 * s;
                        out[dst..dst + tw * s].copy_from_slice(&res[src..src + tw * s]);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Upscales an 8-bit RGB image.
    pub fn upscale(&self, img: &RgbImage) -> Result<RgbImage, PipelineError> {
        let out = self.upscale_chw(&img.to_chw_unit(), img.width, img.height)?;
        Ok(RgbImage::from_chw_unit(
            &out,
            img.width * self.scale,
            img.height * self.scale,
        ))
    }
}
