//! Checkpoint weights from safetensors files, memory-mapped: one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use asynctls_kernels::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::io_err;
use crate::{ModelError, Result};

/// Where a model's tensors come from: a checkpoint, or generated weights.
pub trait WeightSource {
    /// The tensor `name` as f32, checked against `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    fn contains(&self, name: &str) -> bool;

    /// Alias of [`tensor`](Self::tensor) that reads like a map lookup.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.tensor(name, shape)
    }

    /// A matrix on `device` as the forward pass reads it: f32 on the CPU
    /// (the reference computes in f32), bf16 on a GPU (checkpoints in bf16
    /// stay exact; f32 and dequantized GGUF tensors round once).
    fn matrix(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = Tensor::from_vec(self.get(name, shape)?, shape)?;
        Ok(match device {
            Device::Cpu => t,
            Device::Cuda(_) => t.to_dtype(DType::BF16)?.to_device(device)?,
        })
    }

    /// A small vector (norm weights, biases) on `device`, in f32 everywhere.
    fn vector(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.get(name, shape)?, shape)?.to_device(device)?)
    }
}

impl WeightSource for Weights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Weights::get(self, name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }
}

/// The path of shard `file` listed by `index`: a plain relative path that
/// stays inside the model directory `dir` (no absolute paths, no `..`, and
/// no symbolic link that leads out of it).
fn shard_inside(dir: &Path, index: &Path, file: &str) -> Result<PathBuf> {
    let outside = |why: &str| ModelError::Safetensors {
        path: index.to_path_buf(),
        what: format!("shard `{file}` {why}; shards must be files inside the model directory"),
    };
    let rel = Path::new(file);
    if file.is_empty() || rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(outside("is not a plain relative path"));
    }
    let joined = dir.join(rel);
    if let (Ok(root), Ok(real)) = (dir.canonicalize(), joined.canonicalize()) {
        if !real.starts_with(&root) {
            return Err(outside("resolves outside the model directory"));
        }
    }
    Ok(joined)
}

/// Fails when the checkpoint holds a layer at index `num_layers` (its config
/// under-counts the layers, and the rest would be silently ignored).
pub(crate) fn check_layer_count(w: &dyn WeightSource, num_layers: usize) -> Result<()> {
    let tensor = format!("model.layers.{num_layers}.input_layernorm.weight");
    if w.contains(&tensor) {
        return Err(ModelError::ExtraLayers {
            config: num_layers,
            tensor,
        });
    }
    Ok(())
}

/// Random weights generated in place, for measuring real-size models with
/// no checkpoint: N(0, std^2) for matrices, `1 +- 0.1` for norms, small biases.
/// Each tensor's values depend only on the seed and its name.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    pub seed: u64,
    pub std: f32,
}

impl RandomWeights {
    /// The stream seed of tensor `name`: FNV-1a of the name mixed with the seed.
    fn stream(&self, name: &str) -> u64 {
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ self.seed, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
    }

    /// `(scale, offset)` of the uniform draw for `name`: norms `1 +- 0.1`,
    /// biases `+- 0.01`, matrices uniform with standard deviation `std`.
    fn law(&self, name: &str) -> (f32, f32) {
        if name.contains("norm") {
            (0.1, 1.0)
        } else if name.ends_with(".bias") {
            (0.01, 0.0)
        } else {
            (self.std * 3f32.sqrt(), 0.0)
        }
    }

    fn generate(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let (scale, offset) = self.law(name);
        Ok(asynctls_kernels::ops::fill_uniform(
            shape,
            dtype,
            device,
            self.stream(name),
            scale,
            offset,
        )?)
    }
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.generate(name, shape, DType::F32, &Device::Cpu)?.to_f32_vec()?)
    }

    fn contains(&self, name: &str) -> bool {
        // Generated checkpoints are untied: they have every tensor.
        name == "lm_head.weight"
    }

    /// Generated where it is used: on a GPU directly in bf16, with no host copy.
    fn matrix(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu => self.generate(name, shape, DType::F32, device),
            Device::Cuda(_) => self.generate(name, shape, DType::BF16, device),
        }
    }

    fn vector(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.generate(name, shape, DType::F32, device)
    }
}

/// The memory-mapped shards of a checkpoint and which shard holds each tensor.
#[derive(Debug)]
pub struct Weights {
    shards: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> shard index.
    index: HashMap<String, usize>,
}

impl Weights {
    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(vec![path.to_path_buf()])
    }

    /// Opens the weights of a model directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| io_err(&index_path, "cannot read", e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Safetensors {
                path: index_path.clone(),
                what: e.to_string(),
            })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Safetensors {
                    path: index_path.clone(),
                    what: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            files
                .into_iter()
                .map(|f| shard_inside(dir, &index_path, &f))
                .collect::<Result<Vec<_>>>()?
        } else {
            return Err(ModelError::NoWeights(dir.to_path_buf()));
        };
        Self::open_files(files)
    }

    fn open_files(files: Vec<PathBuf>) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| io_err(&path, "cannot open weights", e))?;
            // SAFETY: the file is opened read-only and not modified while mapped;
            // a concurrent writer would be a user error outside our control.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(&path, "cannot map weights", e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                what: e.to_string(),
            })?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            drop(st);
            shards.push((path, mmap));
        }
        Ok(Weights { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The header view of tensor `name`.
    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        let shard = *self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        let (path, mmap) = &self.shards[shard];
        let malformed = |e: safetensors::SafeTensorError| ModelError::Safetensors {
            path: path.clone(),
            what: e.to_string(),
        };
        SafeTensors::deserialize(mmap)
            .map_err(malformed)?
            .tensor(name)
            .map_err(malformed)
    }

    /// The tensor `name` as f32, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self.view(name)?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                name: name.into(),
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::TensorDType {
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    /// An integer tensor (i32 or i64), as i64.
    pub fn get_ints(&self, name: &str) -> Result<Vec<i64>> {
        let view = self.view(name)?;
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            other => {
                return Err(ModelError::TensorDType {
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    /// A tensor's shape.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.shape().to_vec())
    }
}
