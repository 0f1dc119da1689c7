//! A small tensor: a shape, a dtype and contiguous row-major storage on one
//! device. No strides and no views: ops that need a layout change say so in
//! their names (`matmul_nt`), which keeps every kernel's indexing obvious.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};

use crate::error::{check_shape, invalid};
use crate::{DType, Device, Error, Result};

/// Host storage, one variant per dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

/// Device storage, one variant per dtype.
#[derive(Debug)]
pub enum CudaStorage {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
    I32(CudaSlice<i32>),
    U8(CudaSlice<u8>),
}

/// Where a tensor's elements are.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda {
        device: crate::CudaDevice,
        data: CudaStorage,
    },
}

impl CpuStorage {
    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    fn to_f32(&self) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::I32(v) => v.iter().map(|&x| x as f32).collect(),
            CpuStorage::U8(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    fn from_f32(values: Vec<f32>, dtype: DType) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(values),
            DType::BF16 => CpuStorage::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => CpuStorage::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::I32 => CpuStorage::I32(values.iter().map(|&x| x as i32).collect()),
            DType::U8 => CpuStorage::U8(values.iter().map(|&x| x as u8).collect()),
        }
    }
}

/// Rust element types that map to a [`DType`].
pub trait WithDType: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn into_storage(data: Vec<Self>) -> CpuStorage;
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
}

macro_rules! with_dtype {
    ($t:ty, $variant:ident) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$variant;
            fn into_storage(data: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(data)
            }
            fn slice(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
with_dtype!(f32, F32);
with_dtype!(bf16, BF16);
with_dtype!(f16, F16);
with_dtype!(i32, I32);
with_dtype!(u8, U8);

/// A contiguous, row-major tensor on one device.
#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl Tensor {
    /// A CPU tensor from a vector; fails when the element count does not match the shape.
    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(Error::ShapeMismatch {
                op: "Tensor::from_vec",
                lhs_name: "data",
                lhs: vec![data.len()],
                rhs_name: "shape",
                rhs: shape.to_vec(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype: T::DTYPE,
            storage: Storage::Cpu(T::into_storage(data)),
        })
    }

    /// A CPU tensor of the given dtype, converted from f32 values.
    pub fn from_f32(data: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(data, shape)?.to_dtype(dtype)
    }

    /// Zeros on the CPU.
    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cpu(CpuStorage::from_f32(vec![0.0; n], dtype)),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The two dimensions of a matrix, or an error naming the op.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => Err(invalid(
                op,
                format!("expected a 2-d tensor, got shape {:?}", self.shape),
            )),
        }
    }

    /// The last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Same data, another shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                lhs_name: "tensor",
                lhs: self.shape,
                rhs_name: "new shape",
                rhs: shape.to_vec(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self
        })
    }

    pub(crate) fn cpu_storage(&self, op: &'static str) -> Result<&CpuStorage> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s),
            Storage::Cuda { .. } => Err(Error::Unsupported {
                op,
                dtype: self.dtype,
                device: self.device().to_string(),
            }),
        }
    }

    /// Borrow the elements of a CPU tensor as `T`; a dtype mismatch names both types.
    pub fn as_slice<T: WithDType>(&self) -> Result<&[T]> {
        let storage = self.cpu_storage("as_slice")?;
        T::slice(storage).ok_or(Error::DTypeMismatch {
            op: "as_slice",
            lhs_name: "tensor",
            lhs: self.dtype,
            rhs_name: "requested",
            rhs: T::DTYPE,
        })
    }

    /// The elements converted to f32 (CPU tensors).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.cpu_storage("to_f32_vec")?.to_f32())
    }

    /// A copy converted to `dtype` (CPU tensors).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let storage = self.cpu_storage("to_dtype")?;
        let storage = if storage.dtype() == dtype {
            storage.clone()
        } else {
            CpuStorage::from_f32(storage.to_f32(), dtype)
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype,
            storage: Storage::Cpu(storage),
        })
    }

    /// A copy on `device`. Host-to-device and device-to-host copies go through
    /// the device's stream and are synchronous from the caller's view.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let storage = match (&self.storage, device) {
            (Storage::Cpu(s), Device::Cpu) => Storage::Cpu(s.clone()),
            (Storage::Cpu(s), Device::Cuda(dev)) => {
                let stream = dev.stream();
                let data = match s {
                    CpuStorage::F32(v) => CudaStorage::F32(stream.clone_htod(v)?),
                    CpuStorage::BF16(v) => CudaStorage::BF16(stream.clone_htod(v)?),
                    CpuStorage::F16(v) => CudaStorage::F16(stream.clone_htod(v)?),
                    CpuStorage::I32(v) => CudaStorage::I32(stream.clone_htod(v)?),
                    CpuStorage::U8(v) => CudaStorage::U8(stream.clone_htod(v)?),
                };
                Storage::Cuda {
                    device: dev.clone(),
                    data,
                }
            }
            (Storage::Cuda { device: src, data }, Device::Cpu) => {
                let stream = src.stream();
                Storage::Cpu(match data {
                    CudaStorage::F32(v) => CpuStorage::F32(stream.clone_dtoh(v)?),
                    CudaStorage::BF16(v) => CpuStorage::BF16(stream.clone_dtoh(v)?),
                    CudaStorage::F16(v) => CpuStorage::F16(stream.clone_dtoh(v)?),
                    CudaStorage::I32(v) => CpuStorage::I32(stream.clone_dtoh(v)?),
                    CudaStorage::U8(v) => CpuStorage::U8(stream.clone_dtoh(v)?),
                })
            }
            (Storage::Cuda { device: src, .. }, Device::Cuda(dst)) => {
                if src.ordinal() != dst.ordinal() {
                    return Err(Error::DeviceMismatch {
                        lhs: self.device().to_string(),
                        rhs: device.to_string(),
                    });
                }
                // Same GPU: round-trip through the host keeps this simple; the
                // hot paths never copy tensors between devices.
                return self.to_device(&Device::Cpu)?.to_device(device);
            }
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            storage,
        })
    }

    pub(crate) fn require_same_shape(&self, op: &'static str, other: &Tensor) -> Result<()> {
        check_shape(op, "lhs", &self.shape, "rhs", &other.shape)
    }

    pub(crate) fn require_float(&self, op: &'static str) -> Result<()> {
        if self.dtype.is_float() {
            Ok(())
        } else {
            Err(Error::Unsupported {
                op,
                dtype: self.dtype,
                device: self.device().to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_vec_checks_element_count() {
        let err = Tensor::from_vec(vec![1.0f32; 5], &[2, 3]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("[5]") && msg.contains("[2, 3]"), "{msg}");
    }

    #[test]
    fn dtype_round_trip_and_mismatch_names_both() {
        let t = Tensor::from_f32(vec![1.5, -2.0, 3.25], &[3], DType::BF16).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.5, -2.0, 3.25]);
        let err = t.as_slice::<f32>().unwrap_err().to_string();
        assert!(err.contains("bf16") && err.contains("f32"), "{err}");
    }
}
