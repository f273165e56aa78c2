//! Session input/output discovery and f32/f16/int tensor conversion.
//!
//! Names, ranks and element types are read from the sessions, never assumed: optimum's fp16
//! exports take and return float16, text encoders take int32 or int64 ids, UNet timesteps come as
//! int64/float/float16 with shape [], [1] or [batch].

use ort::memory::Allocator;
use ort::session::Session;
use ort::value::{
    DynTensor, DynTensorValueType, DynValue, Outlet, Tensor, TensorElementType, ValueType,
};

use super::PipelineError;

/// A session input or output: its name, element type and shape (-1 where dynamic).
#[derive(Debug, Clone)]
pub struct Port {
    pub name: String,
    pub ty: TensorElementType,
    pub shape: Vec<i64>,
}

impl Port {
    fn from_outlet(o: &Outlet) -> Option<Port> {
        match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => Some(Port {
                name: o.name().to_owned(),
                ty: *ty,
                shape: shape.iter().copied().collect(),
            }),
            _ => None,
        }
    }

    /// The fixed size of dimension `i`, if the model fixes it.
    pub fn fixed_dim(&self, i: usize) -> Option<usize> {
        self.shape
            .get(i)
            .copied()
            .filter(|&d| d > 0)
            .map(|d| d as usize)
    }

    pub fn is_float(&self) -> bool {
        matches!(
            self.ty,
            TensorElementType::Float32 | TensorElementType::Float16
        )
    }
}

/// Finds an input (or output) by its usual name, else by a predicate over the ports.
pub fn find_port(
    session: &Session,
    outputs: bool,
    component: &str,
    names: &[&str],
    fallback: impl Fn(&Port) -> bool,
) -> Result<Port, PipelineError> {
    let outlets = if outputs {
        session.outputs()
    } else {
        session.inputs()
    };
    let ports: Vec<Port> = outlets.iter().filter_map(Port::from_outlet).collect();
    if let Some(p) = names
        .iter()
        .find_map(|n| ports.iter().find(|p| p.name == *n))
    {
        return Ok(p.clone());
    }
    ports.iter().find(|p| fallback(p)).cloned().ok_or_else(|| {
        let have: Vec<String> = ports
            .iter()
            .map(|p| format!("{} {:?} {:?}", p.name, p.ty, p.shape))
            .collect();
        PipelineError::BadModel(format!(
            "{component}: no {} named {} (it has: {})",
            if outputs { "output" } else { "input" },
            names.join(" or "),
            have.join("; ")
        ))
    })
}

/// A float tensor of the port's type (f32 or f16) from f32 data.
pub fn float_tensor(
    ty: TensorElementType,
    shape: &[usize],
    data: &[f32],
) -> Result<DynTensor, PipelineError> {
    match ty {
        TensorElementType::Float32 => Ok(Tensor::from_array((shape.to_vec(), data.to_vec()))
            .map_err(PipelineError::runtime)?
            .upcast()),
        TensorElementType::Float16 => {
            let mut t = DynTensor::new(
                &Allocator::default(),
                TensorElementType::Float16,
                shape.to_vec(),
            )
            .map_err(PipelineError::runtime)?;
            let n: usize = shape.iter().product();
            if n != data.len() {
                return Err(PipelineError::Runtime(format!(
                    "tensor of shape {shape:?} given {} values",
                    data.len()
                )));
            }
            if n > 0 {
                // SAFETY: the tensor was just allocated on the CPU with `n` float16 elements, and
                // `half::f16` has the layout of the u16 bits ONNX Runtime stores.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(t.data_ptr_mut().cast::<half::f16>(), n)
                };
                for (d, &s) in dst.iter_mut().zip(data) {
                    *d = half::f16::from_f32(s);
                }
            }
            Ok(t)
        }
        other => Err(PipelineError::BadModel(format!(
            "expected a float16 or float32 tensor, the model wants {other:?}"
        ))),
    }
}

/// A tensor of the port's type from integral-valued data (token ids, timesteps).
pub fn number_tensor(
    ty: TensorElementType,
    shape: &[usize],
    data: &[f64],
) -> Result<DynTensor, PipelineError> {
    let shape = shape.to_vec();
    match ty {
        // Truncation toward zero, as numpy's astype (optimum's pipelines) does.
        TensorElementType::Int64 => Ok(Tensor::from_array((
            shape,
            data.iter().map(|&v| v as i64).collect::<Vec<_>>(),
        ))
        .map_err(PipelineError::runtime)?
        .upcast()),
        TensorElementType::Int32 => Ok(Tensor::from_array((
            shape,
            data.iter().map(|&v| v as i32).collect::<Vec<_>>(),
        ))
        .map_err(PipelineError::runtime)?
        .upcast()),
        TensorElementType::Float32 | TensorElementType::Float16 => float_tensor(
            ty,
            &shape,
            &data.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        ),
        other => Err(PipelineError::BadModel(format!(
            "unsupported element type {other:?}"
        ))),
    }
}

/// Reads a float output (f32 or f16) as f32, with its shape.
pub fn read_floats(value: DynValue) -> Result<(Vec<usize>, Vec<f32>), PipelineError> {
    let t = value
        .downcast::<DynTensorValueType>()
        .map_err(PipelineError::runtime)?;
    let shape: Vec<usize> = t.shape().iter().map(|&d| d.max(0) as usize).collect();
    let n: usize = shape.iter().product();
    let data = match *t.data_type() {
        TensorElementType::Float32 => t
            .try_extract_tensor::<f32>()
            .map_err(PipelineError::runtime)?
            .1
            .to_vec(),
        TensorElementType::Float16 => {
            if n == 0 {
                vec![]
            } else {
                // SAFETY: a CPU tensor (session outputs without IO binding live in CPU memory)
                // holding `n` float16 elements.
                let src =
                    unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<half::f16>(), n) };
                src.iter().map(|v| v.to_f32()).collect()
            }
        }
        other => {
            return Err(PipelineError::BadModel(format!(
                "expected a float output, got {other:?}"
            )))
        }
    };
    Ok((shape, data))
}
