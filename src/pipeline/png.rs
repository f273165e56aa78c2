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
    pub loras: &'a [LoraUse<'a>],
    /// Image-to-image: the strength (A1111's "Denoising strength").
    pub denoising_strength: Option<f32>,
    /// The upscaler run after generation and its scale (A1111's "Postprocess upscaler").
    pub upscaler: Option<(&'a str, u32)>,
}

/// A LoRA as the `parameters` chunk records it.
pub struct LoraUse<'a> {
    pub name: &'a str,
    pub weight: f32,
    /// The first 12 hex digits of the SHA-256 of the file's tensor data.
    pub short_hash: &'a str,
}

impl Parameters<'_> {
    /// "prompt\nNegative prompt: ...\nSteps: N, Sampler: X, CFG scale: G, Seed: S, Size: WxH, Model: ID"
    /// With LoRAs, as AUTOMATIC1111 writes them: `<lora:name:weight>` after the prompt, and
    /// `, Lora hashes: "name: hash, name2: hash2"` at the end of the parameters line.
    pub fn to_a1111(&self) -> String {
        let mut s = String::from(self.prompt);
        for l in self.loras {
            s.push_str(&format!(" <lora:{}:{}>", l.name, l.weight));
        }
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
        if let Some(d) = self.denoising_strength {
            s.push_str(&format!(", Denoising strength: {d}"));
        }
        if !self.loras.is_empty() {
            let hashes: Vec<String> = self
                .loras
                .iter()
                .map(|l| format!("{}: {}", l.name, l.short_hash))
                .collect();
            // AUTOMATIC1111 quotes a value holding ':' or ',' as a JSON string.
            s.push_str(&format!(
                ", Lora hashes: {}",
                serde_json::Value::String(hashes.join(", "))
            ));
        }
        if let Some((name, by)) = self.upscaler {
            s.push_str(&format!(
                ", Postprocess upscaler: {}, Postprocess upscale by: {by}",
                name.replace([',', ':'], "")
            ));
        }
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
            loras: &[],
            denoising_strength: None,
            upscaler: None,
        };
        let text = p.to_a1111();
        assert_eq!(text, "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 2x1, Model: sd15");
        let loras = [
            LoraUse {
                name: "ink",
                weight: 0.8,
                short_hash: "0123456789ab",
            },
            LoraUse {
                name: "film",
                weight: -0.5,
                short_hash: "ba9876543210",
            },
        ];
        let with = Parameters {
            loras: &loras,
            negative_prompt: "",
            denoising_strength: Some(0.6),
            upscaler: Some(("x4plus", 4)),
            ..p
        };
        assert_eq!(
            with.to_a1111(),
            "a cat <lora:ink:0.8> <lora:film:-0.5>\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 2x1, Model: sd15, Denoising strength: 0.6, Lora hashes: \"ink: 0123456789ab, film: ba9876543210\", Postprocess upscaler: x4plus, Postprocess upscale by: 4"
        );
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
