//! Just enough of the ONNX protobuf wire format to find a model's initializers and to make some
//! of them overridable, without decoding (or holding) the whole model.
//!
//! Owns: [`scan`] (the initializer table: name, element type, dims and where the bytes lie,
//! inline or in external data, found by seeking past every large field), [`read_floats`] (one
//! initializer's values as f32) and [`with_overridable`] (the model bytes with chosen
//! initializers also listed as graph inputs, which ONNX Runtime then accepts as feeds: the
//! mechanism LoRA switching uses). Field numbers are those of onnx.proto (ModelProto.graph = 7,
//! GraphProto.initializer = 5, GraphProto.input = 11, TensorProto.dims = 1, data_type = 2,
//! float_data = 4, int32_data = 5, name = 8, raw_data = 9, external_data = 13,
//! data_location = 14).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::PipelineError;

/// TensorProto.DataType values used here.
pub const FLOAT: i32 = 1;
pub const FLOAT16: i32 = 10;

/// Where an initializer's values are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// Little-endian bytes at `offset` in the model file (raw_data, or packed float_data).
    Inline { offset: u64, len: u64 },
    /// Packed varints at `offset` in the model file (int32_data: float16 bits).
    Varints { offset: u64, len: u64 },
    /// Little-endian bytes in an external data file beside the model.
    External {
        file: PathBuf,
        offset: u64,
        len: u64,
    },
}

/// One initializer of the main graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initializer {
    pub dims: Vec<usize>,
    pub data_type: i32,
    pub data: Data,
}

impl Initializer {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes of the values in memory (f32 or f16).
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * if self.data_type == FLOAT16 { 2 } else { 4 }
    }
}

/// What [`scan`] found: the initializers, the graph's input names, and where the graph lies.
#[derive(Debug, Clone)]
pub struct Scan {
    pub path: PathBuf,
    pub initializers: HashMap<String, Initializer>,
    pub inputs: HashSet<String>,
    graph_tag_at: u64,
    graph_body: (u64, u64),
    file_len: u64,
}

struct Wire<R> {
    r: R,
    pos: u64,
}

impl<R: Read + Seek> Wire<R> {
    fn byte(&mut self) -> std::io::Result<u8> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b)?;
        self.pos += 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> std::io::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad_data("varint longer than 10 bytes"))
    }

    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        self.r.seek(SeekFrom::Current(n as i64))?;
        self.pos += n;
        Ok(())
    }

    fn bytes(&mut self, n: u64) -> std::io::Result<Vec<u8>> {
        if n > 1 << 20 {
            return Err(bad_data("a name or dims field larger than 1 MiB"));
        }
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v)?;
        self.pos += n;
        Ok(v)
    }

    /// Skips a field's value of the given wire type.
    fn skip_value(&mut self, wire: u64) -> std::io::Result<()> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.skip(8),
            2 => {
                let n = self.varint()?;
                self.skip(n)
            }
            5 => self.skip(4),
            _ => Err(bad_data("unsupported protobuf wire type")),
        }
    }
}

fn bad_data(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string())
}

fn parse_varints(mut b: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let mut v = 0u64;
        let mut shift = 0;
        while let Some((&x, rest)) = b.split_first() {
            b = rest;
            v |= u64::from(x & 0x7f) << shift;
            shift += 7;
            if x & 0x80 == 0 || shift >= 64 {
                break;
            }
        }
        out.push(v);
    }
    out
}

/// Reads the initializer table and graph inputs of an ONNX model file.
pub fn scan(path: &Path) -> Result<Scan, PipelineError> {
    let io = |e: std::io::Error| {
        PipelineError::BadModel(format!("{}: not an ONNX model ({e})", path.display()))
    };
    let file = File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| PipelineError::io(path, e))?
        .len();
    let mut w = Wire {
        r: BufReader::with_capacity(64 * 1024, file),
        pos: 0,
    };
    let mut graph = None;
    while w.pos < file_len {
        let at = w.pos;
        let key = w.varint().map_err(io)?;
        if key >> 3 == 7 && key & 7 == 2 {
            if graph.is_some() {
                return Err(PipelineError::BadModel(format!(
                    "{}: two graph fields",
                    path.display()
                )));
            }
            let n = w.varint().map_err(io)?;
            graph = Some((at, w.pos, n));
            w.skip(n).map_err(io)?;
        } else {
            w.skip_value(key & 7).map_err(io)?;
        }
    }
    let (graph_tag_at, start, len) =
        graph.ok_or_else(|| PipelineError::BadModel(format!("{}: no graph", path.display())))?;
    w.r.seek(SeekFrom::Start(start)).map_err(io)?;
    w.pos = start;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut initializers = HashMap::new();
    let mut inputs = HashSet::new();
    while w.pos < start + len {
        let key = w.varint().map_err(io)?;
        match (key >> 3, key & 7) {
            (5, 2) => {
                let n = w.varint().map_err(io)?;
                let end = w.pos + n;
                let (name, init) = tensor(&mut w, end, dir).map_err(io)?;
                if let Some(init) = init {
                    initializers.insert(name, init);
                }
            }
            (11, 2) => {
                let n = w.varint().map_err(io)?;
                let end = w.pos + n;
                while w.pos < end {
                    let k = w.varint().map_err(io)?;
                    if k == (1 << 3 | 2) {
                        let l = w.varint().map_err(io)?;
                        let name = w.bytes(l).map_err(io)?;
                        inputs.insert(String::from_utf8_lossy(&name).into_owned());
                    } else {
                        w.skip_value(k & 7).map_err(io)?;
                    }
                }
            }
            (_, wire) => w.skip_value(wire).map_err(io)?,
        }
    }
    Ok(Scan {
        path: path.to_owned(),
        initializers,
        inputs,
        graph_tag_at,
        graph_body: (start, len),
        file_len,
    })
}

/// Parses one TensorProto ending at `end`; returns None for types other than f32/f16.
fn tensor<R: Read + Seek>(
    w: &mut Wire<R>,
    end: u64,
    dir: &Path,
) -> std::io::Result<(String, Option<Initializer>)> {
    let mut dims = Vec::new();
    let mut data_type = 0;
    let mut name = String::new();
    let mut data = None;
    let mut external: HashMap<String, String> = HashMap::new();
    while w.pos < end {
        let key = w.varint()?;
        match (key >> 3, key & 7) {
            (1, 0) => dims.push(w.varint()? as usize),
            (1, 2) => {
                let n = w.varint()?;
                dims.extend(parse_varints(&w.bytes(n)?).into_iter().map(|d| d as usize));
            }
            (2, 0) => data_type = w.varint()? as i32,
            (4, 2) | (9, 2) => {
                let len = w.varint()?;
                data = Some(Data::Inline { offset: w.pos, len });
                w.skip(len)?;
            }
            (5, 2) => {
                let len = w.varint()?;
                data = Some(Data::Varints { offset: w.pos, len });
                w.skip(len)?;
            }
            (8, 2) => {
                let n = w.varint()?;
                name = String::from_utf8_lossy(&w.bytes(n)?).into_owned();
            }
            (13, 2) => {
                let n = w.varint()?;
                let entry_end = w.pos + n;
                let (mut k, mut v) = (String::new(), String::new());
                while w.pos < entry_end {
                    let f = w.varint()?;
                    let l = w.varint()?;
                    let s = String::from_utf8_lossy(&w.bytes(l)?).into_owned();
                    match f >> 3 {
                        1 => k = s,
                        2 => v = s,
                        _ => {}
                    }
                }
                external.insert(k, v);
            }
            (_, wire) => w.skip_value(wire)?,
        }
    }
    if let Some(location) = external.get("location") {
        let num = |k: &str| external.get(k).and_then(|v| v.parse::<u64>().ok());
        let numel: usize = dims.iter().product();
        let elem = if data_type == FLOAT16 { 2 } else { 4 };
        data = Some(Data::External {
            file: dir.join(location),
            offset: num("offset").unwrap_or(0),
            len: num("length").unwrap_or((numel * elem) as u64),
        });
    }
    let init = match (data_type, data) {
        (FLOAT | FLOAT16, Some(data)) => Some(Initializer {
            dims,
            data_type,
            data,
        }),
        _ => None,
    };
    Ok((name, init))
}

/// The values of an initializer as f32 (f16 converted exactly).
pub fn read_floats(scan: &Scan, name: &str) -> Result<Vec<f32>, PipelineError> {
    let init = scan.initializers.get(name).ok_or_else(|| {
        PipelineError::BadModel(format!(
            "{}: no float initializer {name}",
            scan.path.display()
        ))
    })?;
    let (file, offset, len) = match &init.data {
        Data::Inline { offset, len } | Data::Varints { offset, len } => {
            (scan.path.as_path(), *offset, *len)
        }
        Data::External { file, offset, len } => (file.as_path(), *offset, *len),
    };
    let mut f = File::open(file).map_err(|e| PipelineError::io(file, e))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| PipelineError::io(file, e))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .map_err(|e| PipelineError::io(file, e))?;
    let n = init.numel();
    let values: Vec<f32> = match (&init.data, init.data_type) {
        (Data::Varints { .. }, FLOAT16) => parse_varints(&buf)
            .into_iter()
            .map(|v| half::f16::from_bits(v as u16).to_f32())
            .collect(),
        (_, FLOAT16) => buf
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => buf
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    };
    if values.len() != n {
        return Err(PipelineError::BadModel(format!(
            "{}: initializer {name} holds {} values, its dims {:?} say {n}",
            scan.path.display(),
            values.len(),
            init.dims
        )));
    }
    Ok(values)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len_field(out: &mut Vec<u8>, field: u64, body: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// A GraphProto.input entry (ValueInfoProto) declaring an initializer as a tensor input.
fn value_info(name: &str, init: &Initializer) -> Vec<u8> {
    let mut shape = Vec::new();
    for &d in &init.dims {
        let mut dim = Vec::new();
        put_varint(&mut dim, 1 << 3);
        put_varint(&mut dim, d as u64);
        put_len_field(&mut shape, 1, &dim);
    }
    let mut tensor = Vec::new();
    put_varint(&mut tensor, 1 << 3);
    put_varint(&mut tensor, init.data_type as u64);
    put_len_field(&mut tensor, 2, &shape);
    let mut ty = Vec::new();
    put_len_field(&mut ty, 1, &tensor);
    let mut vi = Vec::new();
    put_len_field(&mut vi, 1, name.as_bytes());
    put_len_field(&mut vi, 2, &ty);
    let mut entry = Vec::new();
    put_len_field(&mut entry, 11, &vi);
    entry
}

/// The model file's bytes with `names` (initializers) also declared as graph inputs. ONNX
/// Runtime treats such initializers as defaults that a run may override; the rest of the model
/// is copied byte for byte. Names already declared as inputs are left as they are.
pub fn with_overridable(scan: &Scan, names: &[String]) -> Result<Vec<u8>, PipelineError> {
    let mut extra = Vec::new();
    for n in names {
        if scan.inputs.contains(n) {
            continue;
        }
        let init = scan.initializers.get(n).ok_or_else(|| {
            PipelineError::BadModel(format!("{}: no initializer {n}", scan.path.display()))
        })?;
        extra.extend(value_info(n, init));
    }
    let (start, len) = scan.graph_body;
    let mut out = Vec::with_capacity((scan.file_len + extra.len() as u64 + 16) as usize);
    let mut f = File::open(&scan.path).map_err(|e| PipelineError::io(&scan.path, e))?;
    let mut read = |out: &mut Vec<u8>, n: u64| {
        let before = out.len();
        out.resize(before + n as usize, 0);
        f.read_exact(&mut out[before..])
            .map_err(|e| PipelineError::io(&scan.path, e))
    };
    read(&mut out, scan.graph_tag_at)?;
    // Skip the original tag and length: re-emitted with the new length.
    let mut header = Vec::new();
    read(&mut header, start - scan.graph_tag_at)?;
    put_varint(&mut out, 7 << 3 | 2);
    put_varint(&mut out, len + extra.len() as u64);
    read(&mut out, len)?;
    out.extend_from_slice(&extra);
    read(&mut out, scan.file_len - start - len)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        let mut b = Vec::new();
        for v in [0u64, 1, 127, 128, 300, 1 << 40] {
            put_varint(&mut b, v);
        }
        assert_eq!(parse_varints(&b), vec![0, 1, 127, 128, 300, 1 << 40]);
    }

    #[test]
    fn scans_the_fixture_and_declares_inputs() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd/unet/model.onnx");
        let s = scan(&path).unwrap();
        let conv = &s.initializers["conv_in.weight"];
        assert_eq!(conv.dims, vec![16, 4, 3, 3]);
        assert_eq!(conv.data_type, FLOAT);
        assert_eq!(read_floats(&s, "conv_in.weight").unwrap().len(), 16 * 4 * 9);
        assert!(s.inputs.contains("sample") && s.inputs.contains("timestep"));
        let bytes = with_overridable(&s, &["conv_in.weight".to_string()]).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("m.onnx");
        std::fs::write(&p, &bytes).unwrap();
        let s2 = scan(&p).unwrap();
        assert!(s2.inputs.contains("conv_in.weight"));
        assert_eq!(s2.initializers.len(), s.initializers.len());
        assert_eq!(
            read_floats(&s2, "conv_in.weight").unwrap(),
            read_floats(&s, "conv_in.weight").unwrap()
        );
    }
}
