//! Input images: PNG or JPEG bytes to 8-bit RGB, with size limits, and the conversions the
//! VAE encoder and the upscalers take. Errors name the request field (`init_image`).

use super::PipelineError;

/// Largest encoded input image accepted: 32 MiB.
pub const MAX_IMAGE_BYTES: usize = 32 << 20;
/// Largest input image accepted, in pixels (4096 x 4096).
pub const MAX_IMAGE_PIXELS: u64 = 4096 * 4096;

/// An 8-bit RGB image, rows top to bottom, `width * height * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

fn bad(field: &str, m: impl std::fmt::Display) -> PipelineError {
    PipelineError::InvalidRequest(format!("{field}: {m}"))
}

/// Decodes PNG (8 or 16 bit; gray, RGB, with or without alpha, palette) or JPEG (baseline and
/// progressive; gray, RGB, CMYK) into RGB; alpha is dropped. `field` names the request field
/// in errors.
pub fn decode(bytes: &[u8], field: &str) -> Result<RgbImage, PipelineError> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(bad(
            field,
            format!(
                "{} bytes, more than the {MAX_IMAGE_BYTES} accepted",
                bytes.len()
            ),
        ));
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(bytes, field)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(bytes, field)
    } else {
        Err(bad(field, "not a PNG or JPEG image"))
    }
}

fn check_size(w: u32, h: u32, field: &str) -> Result<(), PipelineError> {
    if w == 0 || h == 0 || u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(bad(
            field,
            format!("{w}x{h} pixels: at most {MAX_IMAGE_PIXELS} pixels are accepted"),
        ));
    }
    Ok(())
}

fn decode_png(bytes: &[u8], field: &str) -> Result<RgbImage, PipelineError> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    // Palette and low bit depths to 8-bit, 16-bit to 8-bit.
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let header = dec
        .read_header_info()
        .map_err(|e| bad(field, format!("undecodable PNG: {e}")))?;
    check_size(header.width, header.height, field)?;
    let mut reader = dec
        .read_info()
        .map_err(|e| bad(field, format!("undecodable PNG: {e}")))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(field, format!("undecodable PNG: {e}")))?;
    let (w, h) = (info.width, info.height);
    let px = (w * h) as usize;
    let data = &buf[..info.buffer_size()];
    let rgb = match info.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => data.chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        png::ColorType::Indexed => return Err(bad(field, "a palette PNG that did not expand")),
    };
    if rgb.len() != px * 3 {
        return Err(bad(field, "PNG data shorter than its size"));
    }
    Ok(RgbImage {
        width: w,
        height: h,
        rgb,
    })
}

fn decode_jpeg(bytes: &[u8], field: &str) -> Result<RgbImage, PipelineError> {
    let mut dec = jpeg_decoder::Decoder::new(std::io::Cursor::new(bytes));
    dec.read_info()
        .map_err(|e| bad(field, format!("undecodable JPEG: {e}")))?;
    let info = dec
        .info()
        .ok_or_else(|| bad(field, "undecodable JPEG: no header"))?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    check_size(w, h, field)?;
    let data = dec
        .decode()
        .map_err(|e| bad(field, format!("undecodable JPEG: {e}")))?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => data,
        jpeg_decoder::PixelFormat::L8 => data.iter().flat_map(|&g| [g, g, g]).collect(),
        jpeg_decoder::PixelFormat::L16 => data.chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        jpeg_decoder::PixelFormat::CMYK32 => data
            .chunks_exact(4)
            .flat_map(|p| {
                let k = 255 - u16::from(p[3]);
                [p[0], p[1], p[2]].map(|c| ((255 - u16::from(c)) * k / 255) as u8)
            })
            .collect(),
    };
    if rgb.len() != (w * h * 3) as usize {
        return Err(bad(field, "JPEG data shorter than its size"));
    }
    Ok(RgbImage {
        width: w,
        height: h,
        rgb,
    })
}

impl RgbImage {
    /// `[3, h, w]` planes in [-1, 1], as diffusers' image processor gives the VAE encoder.
    pub fn to_chw_signed(&self) -> Vec<f32> {
        self.planes(|v| (f32::from(v) / 255.0) * 2.0 - 1.0)
    }

    /// `[3, h, w]` planes in [0, 1], what Real-ESRGAN-style upscalers take.
    pub fn to_chw_unit(&self) -> Vec<f32> {
        self.planes(|v| f32::from(v) / 255.0)
    }

    fn planes(&self, f: impl Fn(u8) -> f32) -> Vec<f32> {
        let plane = (self.width * self.height) as usize;
        let mut out = vec![0f32; plane * 3];
        for (p, px) in self.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = f(px[c]);
            }
        }
        out
    }

    /// From `[3, h, w]` planes in [0, 1] (clamped, rounded).
    pub fn from_chw_unit(chw: &[f32], width: u32, height: u32) -> RgbImage {
        let plane = (width * height) as usize;
        let mut rgb = vec![0u8; plane * 3];
        for p in 0..plane {
            for c in 0..3 {
                rgb[p * 3 + c] = (chw[c * plane + p].clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        RgbImage { width, height, rgb }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_of(w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(data).unwrap();
        wr.finish().unwrap();
        out
    }

    #[test]
    fn png_color_types_become_rgb() {
        let rgba = png_of(2, 1, png::ColorType::Rgba, &[1, 2, 3, 255, 4, 5, 6, 0]);
        let img = decode(&rgba, "init_image").unwrap();
        assert_eq!((img.width, img.height), (2, 1));
        assert_eq!(img.rgb, vec![1, 2, 3, 4, 5, 6]);
        let gray = png_of(1, 2, png::ColorType::Grayscale, &[7, 9]);
        assert_eq!(decode(&gray, "x").unwrap().rgb, vec![7, 7, 7, 9, 9, 9]);
    }

    #[test]
    fn bad_images_name_the_field() {
        for (bytes, want) in [
            (b"GIF89a".to_vec(), "not a PNG or JPEG"),
            (b"\x89PNG\r\n\x1a\ngarbage".to_vec(), "undecodable PNG"),
            (vec![0xFF, 0xD8, 0xFF, 0x00], "undecodable JPEG"),
        ] {
            let e = decode(&bytes, "init_image").unwrap_err().to_string();
            assert!(e.contains("init_image: ") && e.contains(want), "{e}");
        }
        let e = decode(&vec![0u8; MAX_IMAGE_BYTES + 1], "init_image")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes, more than"), "{e}");
    }

    #[test]
    fn conversions() {
        let img = RgbImage {
            width: 1,
            height: 1,
            rgb: vec![0, 255, 51],
        };
        assert_eq!(
            img.to_chw_signed(),
            vec![-1.0, 1.0, 51.0 / 255.0 * 2.0 - 1.0]
        );
        assert_eq!(img.to_chw_unit(), vec![0.0, 1.0, 0.2]);
        assert_eq!(
            RgbImage::from_chw_unit(&[-0.5, 1.5, 0.2], 1, 1).rgb,
            vec![0, 255, 51]
        );
    }
}
