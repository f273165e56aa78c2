//! LoRA files: header inspection and loading (safetensors, kohya and diffusers/PEFT key names).
//!
//! Owns: reading a `.safetensors` LoRA into [`Lora`] (per targeted module: `up`, `down`, optional
//! `alpha`, as f32), [`inspect`] (the header only: format, the base family it was trained for,
//! rank, targeted modules, size) and the AUTOMATIC1111 hash that the PNG `parameters` chunk
//! records. Applying LoRAs to a loaded pipeline lives in [`merge`].
//!
//! Key names understood (module names are PyTorch's, `.` or `_` separated):
//! - kohya: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_`
//!   (`lora_te1_`, `lora_te2_` for SDXL) for the text encoders.
//! - diffusers / PEFT: `unet.<module>.lora_A.weight`, `.lora_B.weight` (or the older
//!   `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down.weight`, and the attention
//!   processor form `.processor.to_q_lora.down.weight`), `text_encoder.` / `text_encoder_2.`;
//!   an `.alpha` key if present, else alpha = rank (scale 1), as diffusers does.
//!
//! LyCORIS variants (LoHa `hada_`, LoKr `lokr_`, `lora_mid`, DoRA `dora_scale`) are refused with
//! an error naming the key.

pub mod merge;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{ModelFamily, PipelineError};

/// The network a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    /// The export's directory (and the name map's `component`).
    pub fn dir(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How a LoRA file names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// kohya-ss sd-scripts: `lora_unet_..._to_q.lora_down.weight`, `lora_up`, `alpha`.
    Kohya,
    /// diffusers / PEFT: `unet.....to_q.lora_A.weight`, `lora_B` (or `lora.down`/`lora.up`).
    Peft,
}

/// One low-rank update: `W' = W + weight * alpha / rank * up @ down` on the module's weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub component: Component,
    /// The module name as written in the file, for messages.
    pub name: String,
    /// The module name with every `.` replaced by `_`: how kohya spells it, and the lookup key.
    pub key: String,
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    pub up_shape: Vec<usize>,
    pub up: Vec<f32>,
    /// `[rank, in]` or `[rank, in, kh, kw]`.
    pub down_shape: Vec<usize>,
    pub down: Vec<f32>,
    pub alpha: Option<f32>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down_shape[0]
    }

    /// alpha / rank, or 1 without alpha.
    pub fn scale(&self) -> f64 {
        self.alpha
            .map_or(1.0, |a| f64::from(a) / self.rank() as f64)
    }
}

/// What the header of a LoRA file says (no tensor data read).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraInfo {
    pub format: LoraFormat,
    /// The base model family, from the cross-attention and text-encoder widths; None when the
    /// file targets nothing that tells (e.g. only convolutions).
    pub family: Option<ModelFamily>,
    /// The largest rank of its modules.
    pub rank: usize,
    /// Targeted modules, `component/module`, sorted.
    pub modules: Vec<String>,
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    pub tensors: usize,
    pub file_bytes: u64,
}

/// A loaded LoRA. `name` is what the PNG `parameters` chunk shows (`<lora:name:0.8>`).
#[derive(Debug, Clone)]
pub struct Lora {
    name: String,
    hash: String,
    format: LoraFormat,
    modules: Vec<LoraModule>,
    file_bytes: u64,
}

impl PartialEq for Lora {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.hash == other.hash
    }
}

/// A LoRA and the weight a request applies it with.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    pub lora: std::sync::Arc<Lora>,
    pub weight: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a tensor name into (component, module as written, part, format).
fn parse_key(key: &str) -> Result<(Option<Component>, String, Part, LoraFormat), String> {
    const KOHYA: [(&str, Component); 4] = [
        ("lora_unet_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
    ];
    for (prefix, component) in KOHYA {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (module, suffix) = rest.split_once('.').unwrap_or((rest, ""));
            let part = match suffix {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                _ => return Err(format!("{key}: unsupported LoRA tensor ({suffix})")),
            };
            return Ok((Some(component), module.to_string(), part, LoraFormat::Kohya));
        }
    }
    const PEFT: [(&str, Option<Component>); 4] = [
        ("unet.", Some(Component::Unet)),
        ("text_encoder_2.", Some(Component::TextEncoder2)),
        ("text_encoder.", Some(Component::TextEncoder)),
        ("base_model.model.", None),
    ];
    const SUFFIXES: [(&str, Part); 9] = [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    let (component, rest) = PEFT
        .iter()
        .find_map(|(p, c)| key.strip_prefix(p).map(|r| (*c, r)))
        .unwrap_or((None, key));
    // The attention-processor form: `...attn1.processor.to_q_lora.down.weight`.
    if let Some((head, tail)) = rest.split_once(".processor.") {
        for (proj, module) in [
            ("to_q_lora", "to_q"),
            ("to_k_lora", "to_k"),
            ("to_v_lora", "to_v"),
            ("to_out_lora", "to_out.0"),
        ] {
            if let Some(s) = tail.strip_prefix(proj) {
                let part = match s {
                    ".down.weight" => Part::Down,
                    ".up.weight" => Part::Up,
                    _ => break,
                };
                return Ok((
                    component,
                    format!("{head}.{module}"),
                    part,
                    LoraFormat::Peft,
                ));
            }
        }
    }
    for (suffix, part) in SUFFIXES {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Ok((component, module.to_string(), part, LoraFormat::Peft));
        }
    }
    Err(format!("{key}: not a LoRA tensor name this loader knows"))
}

/// Reads and checks the header of a safetensors file: (header length, metadata, file size).
fn read_header(path: &Path) -> Result<(usize, Metadata, u64), PipelineError> {
    let bad = |m: String| PipelineError::BadModel(format!("LoRA {}: {m}", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let file_bytes = f.metadata().map_err(|e| PipelineError::io(path, e))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || n + 8 > file_bytes {
        return Err(bad(format!(
            "header length {n} does not fit a {file_bytes}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| PipelineError::io(path, e))?;
    let meta: Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("safetensors header: {e}")))?;
    if meta.data_len() as u64 + 8 + n != file_bytes {
        return Err(bad(format!(
            "the header describes {} bytes of tensors, the file holds {} (truncated?)",
            meta.data_len(),
            file_bytes - 8 - n
        )));
    }
    Ok((n as usize, meta, file_bytes))
}

/// kohya's SDXL (and some SD 1.x) files name UNet modules as the original (ldm/sgm) code did:
/// `input_blocks_4_1_transformer_blocks_0_attn1_to_q`. This gives the diffusers name the name maps
/// use (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`), for UNets with two layers
/// per block (SD 1.x, 2.x, SDXL), as diffusers' own conversion does; None for other names.
pub(crate) fn sgm_to_diffusers(key: &str) -> Option<String> {
    const RESNET: [(&str, &str); 6] = [
        ("in_layers_0", "norm1"),
        ("in_layers_2", "conv1"),
        ("emb_layers_1", "time_emb_proj"),
        ("out_layers_0", "norm2"),
        ("out_layers_3", "conv2"),
        ("skip_connection", "conv_shortcut"),
    ];
    const FIXED: [(&str, &str); 7] = [
        ("input_blocks_0_0", "conv_in"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_0", "conv_norm_out"),
        ("out_2", "conv_out"),
    ];
    if let Some((_, d)) = FIXED.iter().find(|(k, _)| *k == key) {
        return Some(d.to_string());
    }
    let resnet = |rest: &str| {
        RESNET
            .iter()
            .find_map(|(k, d)| rest.strip_prefix(k).map(|r| format!("{d}{r}")))
    };
    // "<i>_<j>_<rest>" -> (i, j, rest)
    let split = |s: &str| -> Option<(usize, usize, String)> {
        let mut it = s.splitn(3, '_');
        let i = it.next()?.parse().ok()?;
        let j = it.next()?.parse().ok()?;
        Some((i, j, it.next().unwrap_or("").to_string()))
    };
    if let Some(s) = key.strip_prefix("input_blocks_") {
        let (i, j, rest) = split(s)?;
        let (block, pos) = ((i.checked_sub(1)?) / 3, (i - 1) % 3);
        return match (pos, j) {
            (2, 0) => Some(format!(
                "down_blocks_{block}_downsamplers_0_conv{}",
                rest.strip_prefix("op")?
            )),
            (_, 0) => Some(format!(
                "down_blocks_{block}_resnets_{pos}_{}",
                resnet(&rest)?
            )),
            (_, 1) => Some(format!("down_blocks_{block}_attentions_{pos}_{rest}")),
            _ => None,
        };
    }
    if let Some(s) = key.strip_prefix("middle_block_") {
        let (j, rest) = s.split_once('_')?;
        return match j {
            "0" | "2" => Some(format!(
                "mid_block_resnets_{}_{}",
                if j == "0" { 0 } else { 1 },
                resnet(rest)?
            )),
            "1" => Some(format!("mid_block_attentions_0_{rest}")),
            _ => None,
        };
    }
    if let Some(s) = key.strip_prefix("output_blocks_") {
        let (i, j, rest) = split(s)?;
        let (block, pos) = (i / 3, i % 3);
        if let Some(r) = rest.strip_prefix("conv") {
            return Some(format!("up_blocks_{block}_upsamplers_0_conv{r}"));
        }
        return match j {
            0 => Some(format!(
                "up_blocks_{block}_resnets_{pos}_{}",
                resnet(&rest)?
            )),
            1 => Some(format!("up_blocks_{block}_attentions_{pos}_{rest}")),
            _ => None,
        };
    }
    None
}

/// A tensor's shape and values.
type Tensor = (Vec<usize>, Vec<f32>);

/// The module a set of tensor names describes, keyed by (component, module key).
type Grouped = BTreeMap<(Option<Component>, String), (String, Vec<(Part, String)>)>;

fn group<'a>(names: impl Iterator<Item = &'a str>) -> Result<(Grouped, LoraFormat), PipelineError> {
    let mut groups: Grouped = BTreeMap::new();
    let mut formats = Vec::new();
    let mut errors = Vec::new();
    for name in names {
        match parse_key(name) {
            Ok((component, module, part, format)) => {
                if !formats.contains(&format) {
                    formats.push(format);
                }
                let key = module.replace('.', "_");
                groups
                    .entry((component, key))
                    .or_insert_with(|| (module, Vec::new()))
                    .1
                    .push((part, name.to_string()));
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        let n = errors.len();
        errors.truncate(5);
        return Err(PipelineError::BadModel(format!(
            "{n} tensor(s) are not LoRA up/down/alpha weights: {}",
            errors.join("; ")
        )));
    }
    match formats.as_slice() {
        [f] => Ok((groups, *f)),
        [] => Err(PipelineError::BadModel("no LoRA tensors".into())),
        _ => Err(PipelineError::BadModel(
            "mixes kohya (lora_unet_/lora_te_) and diffusers/PEFT (unet./text_encoder.) names"
                .into(),
        )),
    }
}

/// The base family from the modules' input widths: the cross-attention keys (`attn2.to_k`)
/// read the text encoder's hidden states (768 SD 1.x, 1024 SD 2.x, 2048 SDXL); else a second
/// text encoder means SDXL, and the first one's width tells SD 1.x (768) from SD 2.x (1024).
fn family(modules: &[(Option<Component>, String, Vec<usize>)]) -> Option<ModelFamily> {
    let width = |pred: &dyn Fn(&Option<Component>, &str) -> bool| {
        modules
            .iter()
            .find(|(c, k, s)| pred(c, k) && s.len() >= 2)
            .map(|(_, _, s)| s[1])
    };
    if let Some(d) = width(&|c, k| *c != Some(Component::TextEncoder) && k.ends_with("attn2_to_k"))
    {
        return Some(ModelFamily::from_cross_attention_dim(d));
    }
    if modules
        .iter()
        .any(|(c, _, _)| *c == Some(Component::TextEncoder2))
    {
        return Some(ModelFamily::Sdxl);
    }
    match width(&|c, _| *c == Some(Component::TextEncoder)) {
        Some(768) => Some(ModelFamily::Sd1),
        Some(1024) => Some(ModelFamily::Sd2),
        _ => None,
    }
}

fn describe(component: Option<Component>, module: &str) -> String {
    format!("{}/{module}", component.map_or("?", Component::dir))
}

/// Reads a LoRA file's header only: what RegisterModel records.
pub fn inspect(path: &Path) -> Result<LoraInfo, PipelineError> {
    let (_, meta, file_bytes) = read_header(path)?;
    inspect_metadata(&meta, file_bytes, &path.display().to_string())
}

/// [`inspect`] from the header's JSON (the `n` bytes after the file's first
/// eight), for a file read remotely; `file_bytes` is the whole file's size.
pub fn inspect_header(
    header: &[u8],
    file_bytes: u64,
    name: &str,
) -> Result<LoraInfo, PipelineError> {
    let bad = |m: String| PipelineError::BadModel(format!("LoRA {name}: {m}"));
    let meta: Metadata =
        serde_json::from_slice(header).map_err(|e| bad(format!("safetensors header: {e}")))?;
    if meta.data_len() as u64 + 8 + header.len() as u64 != file_bytes {
        return Err(bad(format!(
            "the header describes {} bytes of tensors, the file holds {}",
            meta.data_len(),
            file_bytes.saturating_sub(8 + header.len() as u64)
        )));
    }
    inspect_metadata(&meta, file_bytes, name)
}

fn inspect_metadata(
    meta: &Metadata,
    file_bytes: u64,
    name: &str,
) -> Result<LoraInfo, PipelineError> {
    let tensors = meta.tensors();
    let (groups, format) = group(tensors.keys().map(String::as_str))
        .map_err(|e| PipelineError::BadModel(format!("LoRA {name}: {e}")))?;
    let mut downs = Vec::new();
    let mut modules = Vec::new();
    let (mut unet, mut te, mut rank) = (0, 0, 0);
    for ((component, key), (module, parts)) in &groups {
        match component {
            Some(Component::Unet) | None => unet += 1,
            _ => te += 1,
        }
        modules.push(describe(*component, module));
        if let Some((_, name)) = parts.iter().find(|(p, _)| *p == Part::Down) {
            let shape = tensors[name].shape.clone();
            rank = rank.max(shape.first().copied().unwrap_or(0));
            downs.push((*component, key.clone(), shape));
        }
    }
    modules.sort();
    Ok(LoraInfo {
        format,
        family: family(&downs),
        rank,
        modules,
        unet_modules: unet,
        text_encoder_modules: te,
        tensors: tensors.len(),
        file_bytes,
    })
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>, name: &str) -> Result<Vec<f32>, String> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "{name}: dtype {other:?} (expected F32, F16 or BF16)"
            ))
        }
    })
}

impl Lora {
    /// Loads a LoRA file; its name is the file stem.
    pub fn load(path: &Path) -> Result<Lora, PipelineError> {
        let bytes = std::fs::read(path).map_err(|e| PipelineError::io(path, e))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_bytes(&name, &bytes)
            .map_err(|e| PipelineError::BadModel(format!("LoRA {}: {e}", path.display())))
    }

    /// Parses a LoRA from the bytes of a safetensors file.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Lora, PipelineError> {
        let bad = |m: String| PipelineError::BadModel(m);
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("safetensors: {e}")))?;
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])) as usize;
        // AUTOMATIC1111 ("addnet" hash): SHA-256 of everything after the header.
        let hash = hex::encode(Sha256::digest(&bytes[8 + header_len..]));
        let (groups, format) = group(st.names().into_iter())?;
        let mut modules = Vec::with_capacity(groups.len());
        for ((component, key), (module, parts)) in groups {
            let get = |part: Part| -> Result<Option<Tensor>, PipelineError> {
                let Some((_, tname)) = parts.iter().find(|(p, _)| *p == part) else {
                    return Ok(None);
                };
                let view = st.tensor(tname).map_err(|e| bad(format!("{tname}: {e}")))?;
                Ok(Some((
                    view.shape().to_vec(),
                    to_f32(&view, tname).map_err(bad)?,
                )))
            };
            let what = describe(component, &module);
            let (down_shape, down) =
                get(Part::Down)?.ok_or_else(|| bad(format!("{what}: no down (lora_A) weight")))?;
            let (up_shape, up) =
                get(Part::Up)?.ok_or_else(|| bad(format!("{what}: no up (lora_B) weight")))?;
            let alpha = get(Part::Alpha)?.and_then(|(_, v)| v.first().copied());
            let rank = down_shape.first().copied().unwrap_or(0);
            let square = |s: &[usize]| s.len() == 2 || (s.len() == 4 && s[2] == 1 && s[3] == 1);
            if rank == 0
                || !(down_shape.len() == 2 || down_shape.len() == 4)
                || !square(&up_shape)
                || up_shape[1] != rank
            {
                return Err(bad(format!(
                    "{what}: up {up_shape:?} and down {down_shape:?} are not a rank-r pair"
                )));
            }
            let component = component.unwrap_or(Component::Unet);
            let key = match component {
                Component::Unet => sgm_to_diffusers(&key).unwrap_or(key),
                _ => key,
            };
            modules.push(LoraModule {
                component,
                name: module,
                key,
                up_shape,
                up,
                down_shape,
                down,
                alpha,
            });
        }
        Ok(Lora {
            name: name.to_string(),
            hash,
            format,
            modules,
            file_bytes: bytes.len() as u64,
        })
    }

    /// The name shown in `<lora:name:weight>`; defaults to the file stem.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames it (e.g. to the catalogue id). AUTOMATIC1111 drops `:` and `,` from names.
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.replace([':', ','], "");
        self
    }

    /// SHA-256 (hex) of the tensor data after the header: AUTOMATIC1111's LoRA hash.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The first 12 hex digits of [`Lora::hash`], as the `Lora hashes` parameter shows it.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }

    pub fn format(&self) -> LoraFormat {
        self.format
    }

    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Host memory the loaded tensors take.
    pub fn bytes(&self) -> u64 {
        self.modules
            .iter()
            .map(|m| 4 * (m.up.len() + m.down.len()) as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_of_both_formats() {
        let k = parse_key("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").unwrap();
        assert_eq!(
            k,
            (
                Some(Component::Unet),
                "down_blocks_0_attentions_0_proj_in".into(),
                Part::Down,
                LoraFormat::Kohya
            )
        );
        let k = parse_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
        assert_eq!((k.0, k.2), (Some(Component::TextEncoder2), Part::Alpha));
        let k =
            parse_key("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight")
                .unwrap();
        assert_eq!(
            k,
            (
                Some(Component::TextEncoder),
                "text_model.encoder.layers.0.self_attn.q_proj".into(),
                Part::Up,
                LoraFormat::Peft
            )
        );
        let k = parse_key("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight").unwrap();
        assert_eq!(
            k.1,
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"
        );
        let k = parse_key("unet.down_blocks.1.attentions.0.proj_out.lora.up.weight").unwrap();
        assert_eq!(
            (k.1.as_str(), k.2),
            ("down_blocks.1.attentions.0.proj_out", Part::Up)
        );
        for bad in [
            "lora_unet_conv_in.hada_w1_a",
            "lora_unet_x.dora_scale",
            "model.diffusion_model.x.weight",
        ] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sgm_unet_names_map_to_diffusers() {
        for (sgm, diffusers) in [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_2_0_in_layers_2",
                "down_blocks_0_resnets_1_conv1",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            (
                "input_blocks_8_0_skip_connection",
                "down_blocks_2_resnets_1_conv_shortcut",
            ),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            (
                "output_blocks_5_1_transformer_blocks_9_ff_net_2",
                "up_blocks_1_attentions_2_transformer_blocks_9_ff_net_2",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_6_0_out_layers_3",
                "up_blocks_2_resnets_0_conv2",
            ),
            ("label_emb_0_0", "add_embedding_linear_1"),
        ] {
            assert_eq!(sgm_to_diffusers(sgm).as_deref(), Some(diffusers), "{sgm}");
        }
        assert_eq!(sgm_to_diffusers("down_blocks_0_attentions_0_proj_in"), None);
    }

    #[test]
    fn family_from_widths() {
        let m = |c, k: &'static str, w| (Some(c), k.to_string(), vec![4, w]);
        use Component::*;
        assert_eq!(
            family(&[m(Unet, "x_attn2_to_k", 768)]),
            Some(ModelFamily::Sd1)
        );
        assert_eq!(
            family(&[m(Unet, "x_attn2_to_k", 1024)]),
            Some(ModelFamily::Sd2)
        );
        assert_eq!(
            family(&[m(Unet, "x_attn2_to_k", 2048)]),
            Some(ModelFamily::Sdxl)
        );
        assert_eq!(
            family(&[m(TextEncoder2, "q", 1280)]),
            Some(ModelFamily::Sdxl)
        );
        assert_eq!(family(&[m(TextEncoder, "q", 1024)]), Some(ModelFamily::Sd2));
        assert_eq!(family(&[m(Unet, "conv_in", 4)]), None);
        assert_eq!(
            family(&[m(Unet, "x_attn2_to_k", 32)]),
            Some(ModelFamily::Other {
                cross_attention_dim: 32
            })
        );
    }
}
