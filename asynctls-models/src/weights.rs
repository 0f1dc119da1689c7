//! Checkpoint weights from safetensors files, memory-mapped: one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

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
}

impl WeightSource for Weights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Weights::get(self, name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        Weights::contains(self, name)
    }
}

/// Random weights generated in place, for measuring real-size models with
/// no checkpoint: N(0, std^2) for matrices, `1 +- 0.1` for norms, small biases.
/// Each tensor's values depend only on the seed and its name.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    pub seed: u64,
    pub std: f32,
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        // FNV-1a of the name, mixed with the seed, starts a splitmix64 stream.
        let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ self.seed, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let is_norm = name.contains("norm");
        let is_bias = name.ends_with(".bias");
        Ok((0..n)
            .map(|_| {
                let u = next();
                if is_norm {
                    1.0 + 0.1 * u
                } else if is_bias {
                    0.01 * u
                } else {
                    // Uniform with the requested standard deviation.
                    u * self.std * 3f32.sqrt()
                }
            })
            .collect())
    }

    fn contains(&self, name: &str) -> bool {
        // Generated checkpoints are untied: they have every tensor.
        name == "lm_head.weight"
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
            files.into_iter().map(|f| dir.join(f)).collect()
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
