//! PNG encoding with the AUTOMATIC1111 `parameters` text chunk that SD tools read.

use super::PipelineError;

/// What the `parameters` chunk records.
pub struct Parameters<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub steps: u32,
    pub sampler: &'a str,
    pub guidance_scale: f32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub model: &'a str,
}

impl Parameters<'_> {
    /// "prompt\nNegative prompt: ...\nSteps: N, Sampler: X, CFG scale: G, Seed: S, Size: WxH, Model: ID"
    pub fn to_a1111(&self) -> String {
        let mut s = String::from(self.prompt);
        if !self.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(self.negative_prompt);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.sampler,
            self.guidance_scale,
            self.seed,
            self.width,
            self.height,
            self.model
        ));
        s
    }
}

/// Encodes 8-bit RGB pixels (`width * height * 3` bytes) with a `parameters` chunk: tEXt when
/// the text is Latin-1, else iTXt (UTF-8).
pub fn encode_rgb(
    width: u32,
    height: u32,
    rgb: &[u8],
    parameters: &str,
) -> Result<Vec<u8>, PipelineError> {
    let err = |e: png::EncodingError| PipelineError::Runtime(format!("encoding PNG: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into())
                .map_err(err)?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into())
                .map_err(err)?;
        }
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(rgb).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(out)
}

/// Converts a decoded image `[3, h, w]` in [-1, 1] to interleaved RGB bytes.
pub fn to_rgb8(chw: &[f32], width: usize, height: usize) -> Vec<u8> {
    let plane = width * height;
    let mut out = vec![0u8; plane * 3];
    for p in 0..plane {
        for c in 0..3 {
            let v = (chw[c * plane + p] / 2.0 + 0.5).clamp(0.0, 1.0);
            out[p * 3 + c] = (v * 255.0).round() as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_text_and_chunk() {
        let p = Parameters {
            prompt: "a cat",
            negative_prompt: "blurry",
            steps: 20,
            sampler: "Euler a",
            guidance_scale: 7.5,
            seed: 42,
            width: 2,
            height: 1,
            model: "sd15",
        };
        let text = p.to_a1111();
        assert_eq!(text, "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 2x1, Model: sd15");
        let png = encode_rgb(2, 1, &[0, 0, 0, 255, 255, 255], &text).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(png));
        let reader = dec.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(info.uncompressed_latin1_text[0].keyword, "parameters");
        assert_eq!(info.uncompressed_latin1_text[0].text, text);
        let png = encode_rgb(1, 1, &[1, 2, 3], "猫").unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        assert_eq!(reader.info().utf8_text[0].get_text().unwrap(), "猫");
    }

    #[test]
    fn rgb_conversion_clamps() {
        assert_eq!(to_rgb8(&[-2.0, 0.0, 1.0], 1, 1), vec![0, 128, 255]);
    }
}
