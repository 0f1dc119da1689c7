//! GGUF files (v2 and v3): metadata, tensor directory, dequantized tensors,
//! and the import into an HF-format model directory ([`import`]).

mod import;
mod quant;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use import::{import_gguf, ImportReport};
pub use quant::{dequantize, GgmlType};

/// What can be wrong with a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (bad magic {magic:?})")]
    BadMagic { path: PathBuf, magic: [u8; 4] },
    #[error("{path}: GGUF version {version} is not supported (2 and 3 are)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated while reading {what} at byte {offset}")]
    Truncated { path: PathBuf, what: String, offset: usize },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("{path}: tensor `{name}` has unsupported quantization type {type_id}")]
    UnknownType { path: PathBuf, name: String, type_id: u32 },
    #[error("{path}: data of tensor `{name}` ({start}..{end}) lies outside the file of {len} bytes")]
    OutOfBounds {
        path: PathBuf,
        name: String,
        start: usize,
        end: usize,
        len: usize,
    },
    #[error("metadata key `{0}` is missing or has the wrong type")]
    MissingKey(String),
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: innermost dimension first (the reverse of HF's).
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    /// The shape in row-major (HF) order.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An open GGUF file.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], GgufError> {
        if self.data.len().saturating_sub(self.pos) < n {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos,
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }

    /// A count of items that follow in the header (each at least a byte):
    /// more than the bytes left means the file is cut short.
    fn len(&mut self, what: &str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        if n > (self.data.len() - self.pos) as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} (declares {n} items)"),
                offset: self.pos,
            });
        }
        Ok(n as usize)
    }

    /// A tensor dimension: any size up to 2^40 elements.
    fn dim(&mut self, what: &str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        if n > 1 << 40 {
            return Err(GgufError::Malformed {
                path: self.path.to_path_buf(),
                what: format!("{what}: dimension {n} is implausible"),
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.len(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Malformed {
            path: self.path.to_path_buf(),
            what: format!("{what} is not UTF-8"),
        })
    }

    fn value(&mut self, ty: u32, what: &str) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U64(self.take(1, what)?[0] as u64),
            1 => Value::I64(self.take(1, what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(self.u32(what)? as i32 as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4, what)?.try_into().expect("4")) as f64),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                let item = self.u32(what)?;
                let n = self.len(what)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_le_bytes(self.take(8, what)?.try_into().expect("8"))),
            other => {
                return Err(GgufError::Malformed {
                    path: self.path.to_path_buf(),
                    what: format!("{what}: unknown metadata value type {other}"),
                })
            }
        })
    }
}

impl Gguf {
    /// Opens and parses the header, metadata and tensor directory.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |what, source| GgufError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        let file = File::open(path).map_err(|e| io("cannot open", e))?;
        // SAFETY: mapped read-only; the file is not modified while open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io("cannot map", e))?;
        let mut c = Cursor {
            path,
            data: &mmap,
            pos: 0,
        };
        let magic: [u8; 4] = c.take(4, "magic")?.try_into().expect("4 bytes");
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                magic,
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.to_path_buf(),
                version,
            });
        }
        let tensor_count = c.len("tensor count")?;
        let kv_count = c.len("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims > 8 {
                return Err(GgufError::Malformed {
                    path: path.to_path_buf(),
                    what: format!("tensor `{name}` has {n_dims} dimensions"),
                });
            }
            let dims = (0..n_dims).map(|_| c.dim(&name)).collect::<Result<Vec<_>, _>>()?;
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            infos.push((name, dims, type_id, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, type_id, offset) in infos {
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownType {
                path: path.to_path_buf(),
                name: name.clone(),
                type_id,
            })?;
            // Checked: dimensions whose product wraps would pass the bounds
            // check below with a small byte count.
            let n = dims
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .ok_or_else(|| GgufError::Malformed {
                    path: path.to_path_buf(),
                    what: format!("tensor `{name}` has dimensions {dims:?} whose product overflows"),
                })?;
            let bytes = ty.bytes_for(n).ok_or_else(|| GgufError::Malformed {
                path: path.to_path_buf(),
                what: format!("tensor `{name}` of {n} elements is not whole {ty:?} blocks"),
            })?;
            let start = data_start.saturating_add(offset as usize);
            let end = start.saturating_add(bytes);
            if end > mmap.len() {
                return Err(GgufError::OutOfBounds {
                    path: path.to_path_buf(),
                    name,
                    start,
                    end,
                    len: mmap.len(),
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                start,
                end,
            });
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's elements as f32, row-major in [`TensorInfo::shape`] order.
    pub fn dequantize(&self, info: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0.0f32; info.elem_count()];
        dequantize(info.ty, &self.mmap[info.start..info.end], &mut out);
        out
    }
}
