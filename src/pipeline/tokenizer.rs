//! CLIP tokenization: `tokenizer/tokenizer.json` when present, else a CLIP byte-level BPE built
//! from `vocab.json` + `merges.txt` (what optimum exports of SD 1.x/2.x ship). Prompts become
//! `<|startoftext|> tokens... <|endoftext|> pad...`, truncated and padded to the model's length.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use super::PipelineError;

/// CLIP's pre-tokenization pattern (without its special-token alternatives).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl ClipTokenizer {
    /// Loads from an optimum `tokenizer/` directory.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let json = dir.join("tokenizer.json");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| PipelineError::BadModel(format!("{}: {e}", json.display())))?
        } else {
            build_bpe(dir)?
        };
        inner
            .with_truncation(None)
            .map_err(|e| PipelineError::BadModel(e.to_string()))?;
        inner.with_padding(None);
        let config = read_json(&dir.join("tokenizer_config.json"));
        let special = read_json(&dir.join("special_tokens_map.json"));
        let token_of = |key: &str| -> Option<String> {
            [&config, &special]
                .into_iter()
                .flatten()
                .find_map(|v| match v.get(key)? {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                    _ => None,
                })
        };
        let id = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                PipelineError::BadModel(format!(
                    "{}: the vocabulary has no {tok:?} token",
                    dir.display()
                ))
            })
        };
        let bos = id(&token_of("bos_token").unwrap_or_else(|| BOS.into()))?;
        let eos = id(&token_of("eos_token").unwrap_or_else(|| EOS.into()))?;
        let pad = id(&token_of("pad_token").unwrap_or_else(|| EOS.into()))?;
        let max_len = config
            .as_ref()
            .and_then(|c| c.get("model_max_length")?.as_u64())
            .filter(|&n| (3..=4096).contains(&n))
            .unwrap_or(77) as usize;
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Overrides the padded length (a text encoder with a fixed sequence length).
    pub fn set_max_len(&mut self, n: usize) {
        self.max_len = n.max(3);
    }

    /// BOS, the prompt's tokens (truncated), EOS, then padding to `max_len`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| PipelineError::InvalidRequest(format!("tokenizing the prompt: {e}")))?;
        let body = enc.get_ids();
        let keep = body.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn build_bpe(dir: &Path) -> Result<Tokenizer, PipelineError> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    for f in [&vocab, &merges] {
        if !f.is_file() {
            return Err(PipelineError::MissingFile {
                path: f.clone(),
                what: "the CLIP tokenizer needs tokenizer.json, or vocab.json and merges.txt"
                    .into(),
            });
        }
    }
    let bad =
        |e: &dyn std::fmt::Display| PipelineError::BadModel(format!("{}: {e}", dir.display()));
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .end_of_word_suffix("</w>".into())
        .unk_token(EOS.into())
        .build()
        .map_err(|e| bad(&e))?;
    let mut tk = Tokenizer::new(bpe);
    let ws = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| bad(&e))?;
    tk.with_normalizer(Some(NormSequence::new(vec![
        NFC.into(),
        ws.into(),
        Lowercase.into(),
    ])));
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| bad(&e))?;
    tk.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    Ok(tk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd/tokenizer")
    }

    #[test]
    fn pads_truncates_and_wraps() {
        let t = ClipTokenizer::load(&fixture()).unwrap();
        let ids = t.encode("A   Cat").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], t.bos);
        let lower = t.encode("a cat").unwrap();
        assert_eq!(ids, lower, "lower-cased, whitespace collapsed");
        let eos_at = ids.iter().position(|&i| i == t.eos).unwrap();
        assert!(
            ids[eos_at..].iter().all(|&i| i == t.eos),
            "SD 1.x pads with EOS"
        );
        let long = t.encode(&"horse ".repeat(100)).unwrap();
        assert_eq!((long.len(), long[76]), (77, t.eos));
    }

    #[test]
    fn tokenizer_json_gives_the_same_ids() {
        let from_bpe = ClipTokenizer::load(&fixture()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(fixture().join(f), tmp.path().join(f)).unwrap();
        }
        from_bpe
            .inner
            .save(tmp.path().join("tokenizer.json"), false)
            .unwrap();
        let from_json = ClipTokenizer::load(tmp.path()).unwrap();
        for text in [
            "a photo of an astronaut riding a horse on mars",
            "Ugly, blurry!! 42 zebras",
            "",
        ] {
            assert_eq!(
                from_json.encode(text).unwrap(),
                from_bpe.encode(text).unwrap(),
                "{text}"
            );
        }
    }
}
