//! A small tensor: a shape, a dtype and contiguous row-major elements on one
//! device. The storage is shared (`Arc`), and a tensor is a window of it that
//! starts at an element offset: `narrow_rows` and `reshape` are views, not
//! copies. There are no strides: ops that need a layout change say so in
//! their names (`matmul_nt`), which keeps every kernel's indexing obvious.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
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
    U32(Vec<u32>),
    U8(Vec<u8>),
}

/// Device storage, one variant per dtype.
#[derive(Debug)]
pub enum CudaStorage {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
    I32(CudaSlice<i32>),
    U32(CudaSlice<u32>),
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

macro_rules! each_cpu {
    ($s:expr, $v:ident => $e:expr) => {
        match $s {
            CpuStorage::F32($v) => $e,
            CpuStorage::BF16($v) => $e,
            CpuStorage::F16($v) => $e,
            CpuStorage::I32($v) => $e,
            CpuStorage::U32($v) => $e,
            CpuStorage::U8($v) => $e,
        }
    };
}

impl CpuStorage {
    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::U32(_) => DType::U32,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    fn len(&self) -> usize {
        each_cpu!(self, v => v.len())
    }

    fn to_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v[range].to_vec(),
            CpuStorage::BF16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            CpuStorage::F16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            CpuStorage::I32(v) => v[range].iter().map(|&x| x as f32).collect(),
            CpuStorage::U32(v) => v[range].iter().map(|&x| x as f32).collect(),
            CpuStorage::U8(v) => v[range].iter().map(|&x| x as f32).collect(),
        }
    }

    fn from_f32(values: Vec<f32>, dtype: DType) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(values),
            DType::BF16 => CpuStorage::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => CpuStorage::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::I32 => CpuStorage::I32(values.iter().map(|&x| x as i32).collect()),
            DType::U32 => CpuStorage::U32(values.iter().map(|&x| x as u32).collect()),
            DType::U8 => CpuStorage::U8(values.iter().map(|&x| x as u8).collect()),
        }
    }

    fn window(&self, range: std::ops::Range<usize>) -> CpuStorage {
        match self {
            CpuStorage::F32(v) => CpuStorage::F32(v[range].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[range].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[range].to_vec()),
            CpuStorage::I32(v) => CpuStorage::I32(v[range].to_vec()),
            CpuStorage::U32(v) => CpuStorage::U32(v[range].to_vec()),
            CpuStorage::U8(v) => CpuStorage::U8(v[range].to_vec()),
        }
    }
}

impl CudaStorage {
    fn len(&self) -> usize {
        match self {
            CudaStorage::F32(v) => v.len(),
            CudaStorage::BF16(v) => v.len(),
            CudaStorage::F16(v) => v.len(),
            CudaStorage::I32(v) => v.len(),
            CudaStorage::U32(v) => v.len(),
            CudaStorage::U8(v) => v.len(),
        }
    }

    /// The address of the first element.
    fn base(&self, stream: &cudarc::driver::CudaStream) -> u64 {
        // Event tracking is off on every context this crate opens, so the
        // guards record nothing; ordering is by the one compute stream.
        match self {
            CudaStorage::F32(v) => v.device_ptr(stream).0,
            CudaStorage::BF16(v) => v.device_ptr(stream).0,
            CudaStorage::F16(v) => v.device_ptr(stream).0,
            CudaStorage::I32(v) => v.device_ptr(stream).0,
            CudaStorage::U32(v) => v.device_ptr(stream).0,
            CudaStorage::U8(v) => v.device_ptr(stream).0,
        }
    }
}

/// Rust element types that map to a [`DType`].
pub trait WithDType:
    Copy + Send + Sync + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + 'static
{
    const DTYPE: DType;
    fn into_storage(data: Vec<Self>) -> CpuStorage;
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
    fn cuda_slice(storage: &CudaStorage) -> Option<&CudaSlice<Self>>;
    fn cuda_slice_mut(storage: &mut CudaStorage) -> Option<&mut CudaSlice<Self>>;
    fn into_cuda(data: CudaSlice<Self>) -> CudaStorage;
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
            fn cuda_slice(storage: &CudaStorage) -> Option<&CudaSlice<Self>> {
                match storage {
                    CudaStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn cuda_slice_mut(storage: &mut CudaStorage) -> Option<&mut CudaSlice<Self>> {
                match storage {
                    CudaStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_cuda(data: CudaSlice<Self>) -> CudaStorage {
                CudaStorage::$variant(data)
            }
        }
    };
}
with_dtype!(f32, F32);
with_dtype!(bf16, BF16);
with_dtype!(f16, F16);
with_dtype!(i32, I32);
with_dtype!(u32, U32);
with_dtype!(u8, U8);

/// A contiguous, row-major window of shared storage on one device.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Arc<Storage>,
    /// First element of the window, in elements of `dtype`.
    offset: usize,
}

fn element_count(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| invalid(op, format!("shape {shape:?} has more elements than fit in memory")))
}

impl Tensor {
    /// A CPU tensor from a vector; fails when the element count does not match the shape.
    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        let expected = element_count("Tensor::from_vec", shape)?;
        if data.len() != expected {
            return Err(Error::ShapeMismatch {
                op: "Tensor::from_vec",
                lhs_name: "data",
                lhs: vec![data.len()],
                rhs_name: "shape",
                rhs: shape.to_vec(),
            });
        }
        Ok(Tensor::from_storage(
            Storage::Cpu(T::into_storage(data)),
            shape,
            T::DTYPE,
        ))
    }

    /// A device tensor that takes ownership of `data` (`shape` must cover it exactly).
    pub fn from_cuda<T: WithDType>(device: &crate::CudaDevice, data: CudaSlice<T>, shape: &[usize]) -> Result<Tensor> {
        let expected = element_count("Tensor::from_cuda", shape)?;
        if data.len() != expected {
            return Err(Error::ShapeMismatch {
                op: "Tensor::from_cuda",
                lhs_name: "data",
                lhs: vec![data.len()],
                rhs_name: "shape",
                rhs: shape.to_vec(),
            });
        }
        let storage = Storage::Cuda {
            device: device.clone(),
            data: T::into_cuda(data),
        };
        Ok(Tensor::from_storage(storage, shape, T::DTYPE))
    }

    fn from_storage(storage: Storage, shape: &[usize], dtype: DType) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Arc::new(storage),
            offset: 0,
        }
    }

    /// A CPU tensor of the given dtype, converted from f32 values.
    pub fn from_f32(data: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(data, shape)?.to_dtype(dtype)
    }

    /// Zeros on the CPU.
    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_storage(Storage::Cpu(CpuStorage::from_f32(vec![0.0; n], dtype)), shape, dtype)
    }

    /// Zeros on `device` (the GPU allocates on its stream).
    pub fn zeros_on(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = element_count("Tensor::zeros_on", shape)?;
        match device {
            Device::Cpu => Ok(Tensor::zeros(shape, dtype)),
            Device::Cuda(dev) => {
                let s = dev.stream();
                let data = match dtype {
                    DType::F32 => CudaStorage::F32(s.alloc_zeros(n)?),
                    DType::BF16 => CudaStorage::BF16(s.alloc_zeros(n)?),
                    DType::F16 => CudaStorage::F16(s.alloc_zeros(n)?),
                    DType::I32 => CudaStorage::I32(s.alloc_zeros(n)?),
                    DType::U32 => CudaStorage::U32(s.alloc_zeros(n)?),
                    DType::U8 => CudaStorage::U8(s.alloc_zeros(n)?),
                };
                Ok(Tensor::from_storage(
                    Storage::Cuda {
                        device: dev.clone(),
                        data,
                    },
                    shape,
                    dtype,
                ))
            }
        }
    }

    /// Uninitialised on `device` when it is a GPU (the caller writes every
    /// element before reading), zeros on the CPU.
    pub(crate) fn uninit_on(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = element_count("Tensor::uninit_on", shape)?;
        let Device::Cuda(dev) = device else {
            return Ok(Tensor::zeros(shape, dtype));
        };
        let s = dev.stream();
        // SAFETY: every op that asks for an uninitialised output writes all of it.
        let data = unsafe {
            match dtype {
                DType::F32 => CudaStorage::F32(s.alloc(n)?),
                DType::BF16 => CudaStorage::BF16(s.alloc(n)?),
                DType::F16 => CudaStorage::F16(s.alloc(n)?),
                DType::I32 => CudaStorage::I32(s.alloc(n)?),
                DType::U32 => CudaStorage::U32(s.alloc(n)?),
                DType::U8 => CudaStorage::U8(s.alloc(n)?),
            }
        };
        Ok(Tensor::from_storage(
            Storage::Cuda {
                device: dev.clone(),
                data,
            },
            shape,
            dtype,
        ))
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
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(&*self.storage, Storage::Cuda { .. })
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

    /// The first dimension (1 for a scalar): the rows of a `[rows, ..]` tensor.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Same elements, another shape with the same element count (a view).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if element_count("reshape", shape)? != self.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                lhs_name: "tensor",
                lhs: self.shape.clone(),
                rhs_name: "new shape",
                rhs: shape.to_vec(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// [`reshape`](Self::reshape) that consumes `self`, so a tensor that
    /// owned its storage still does (in-place ops need that).
    pub fn reshaped(self, shape: &[usize]) -> Result<Tensor> {
        if element_count("reshape", shape)? != self.elem_count() {
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

    /// Rows `start..start + n` of the first dimension (a view).
    pub fn narrow_rows(&self, start: usize, n: usize) -> Result<Tensor> {
        let rows = self.rows();
        if start.checked_add(n).is_none_or(|end| end > rows) || self.shape.is_empty() {
            return Err(invalid(
                "narrow_rows",
                format!(
                    "rows {start}..{} of a tensor of shape {:?}",
                    start.saturating_add(n),
                    self.shape
                ),
            ));
        }
        let row = self.elem_count() / rows.max(1);
        let mut shape = self.shape.clone();
        shape[0] = n;
        Ok(Tensor {
            shape,
            dtype: self.dtype,
            storage: self.storage.clone(),
            offset: self.offset + start * row,
        })
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.elem_count()
    }

    pub(crate) fn cpu_storage(&self, op: &'static str) -> Result<&CpuStorage> {
        match &*self.storage {
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
        let all = T::slice(storage).ok_or(Error::DTypeMismatch {
            op: "as_slice",
            lhs_name: "tensor",
            lhs: self.dtype,
            rhs_name: "requested",
            rhs: T::DTYPE,
        })?;
        Ok(&all[self.range()])
    }

    /// The whole device buffer of a tensor that is not a view (offset 0,
    /// covering its storage), for launches that take a `CudaSlice`.
    pub fn cuda_slice<T: WithDType>(&self) -> Result<&CudaSlice<T>> {
        let Storage::Cuda { data, .. } = &*self.storage else {
            return Err(invalid("cuda_slice", "the tensor is on the CPU"));
        };
        let slice = T::cuda_slice(data).ok_or(Error::DTypeMismatch {
            op: "cuda_slice",
            lhs_name: "tensor",
            lhs: self.dtype,
            rhs_name: "requested",
            rhs: T::DTYPE,
        })?;
        if self.offset != 0 || slice.len() != self.elem_count() {
            return Err(invalid(
                "cuda_slice",
                "the tensor is a view of a larger buffer (copy it first)",
            ));
        }
        Ok(slice)
    }

    /// Mutable access to the device buffer of a tensor nobody else shares.
    pub fn cuda_slice_mut<T: WithDType>(&mut self) -> Result<&mut CudaSlice<T>> {
        let n = self.elem_count();
        let offset = self.offset;
        let dtype = self.dtype;
        let storage = Arc::get_mut(&mut self.storage)
            .ok_or_else(|| invalid("cuda_slice_mut", "the tensor's storage is shared"))?;
        let Storage::Cuda { data, .. } = storage else {
            return Err(invalid("cuda_slice_mut", "the tensor is on the CPU"));
        };
        let slice = T::cuda_slice_mut(data).ok_or(Error::DTypeMismatch {
            op: "cuda_slice_mut",
            lhs_name: "tensor",
            lhs: dtype,
            rhs_name: "requested",
            rhs: T::DTYPE,
        })?;
        if offset != 0 || slice.len() != n {
            return Err(invalid("cuda_slice_mut", "the tensor is a view of a larger buffer"));
        }
        Ok(slice)
    }

    /// Fails unless this tensor is the only owner of its storage (what an
    /// in-place op on a GPU tensor, which writes through raw addresses, needs).
    pub(crate) fn cuda_slice_mut_any(&mut self) -> Result<()> {
        Arc::get_mut(&mut self.storage)
            .map(|_| ())
            .ok_or_else(|| invalid("in-place op", "the tensor's storage is shared"))
    }

    /// Mutable elements of a CPU tensor; a tensor that shares its storage
    /// (a clone, a view) gets a copy of its own first (copy on write).
    pub fn as_slice_mut<T: WithDType>(&mut self) -> Result<&mut [T]> {
        if Arc::get_mut(&mut self.storage).is_none() && !self.is_cuda() {
            *self = self.to_device(&Device::Cpu)?;
        }
        let range = self.range();
        let dtype = self.dtype;
        let storage =
            Arc::get_mut(&mut self.storage).ok_or_else(|| invalid("as_slice_mut", "the tensor's storage is shared"))?;
        let Storage::Cpu(s) = storage else {
            return Err(invalid("as_slice_mut", "the tensor is on a GPU"));
        };
        let all: &mut Vec<T> = cpu_vec_mut(s).ok_or(Error::DTypeMismatch {
            op: "as_slice_mut",
            lhs_name: "tensor",
            lhs: dtype,
            rhs_name: "requested",
            rhs: T::DTYPE,
        })?;
        Ok(&mut all[range])
    }

    /// Overwrites the elements with `data` (same count and dtype), in place:
    /// the address stays, so a captured CUDA graph reading it sees the new
    /// values; clones sharing the storage see them too (that is the point
    /// for a graph's input buffers). On the GPU the copy is ordered on the
    /// device's stream; `data` must be ordinary (pageable) host memory, for
    /// which the driver stages the copy before returning.
    pub fn write_from_host<T: WithDType>(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.elem_count() || T::DTYPE != self.dtype {
            return Err(invalid(
                "write_from_host",
                format!(
                    "{} {} values into a {} tensor of {:?}",
                    data.len(),
                    T::DTYPE,
                    self.dtype,
                    self.shape
                ),
            ));
        }
        if !self.is_cuda() {
            self.as_slice_mut::<T>()?.copy_from_slice(data);
            return Ok(());
        }
        let Storage::Cuda { device, .. } = &*self.storage else {
            unreachable!("checked")
        };
        let stream = device.stream().clone();
        let dst = self.device_ptr()?;
        // SAFETY: dst holds data.len() elements of T on this device; the
        // host slice outlives the call, which waits for the copy (pageable
        // memory: the driver stages it before returning).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(dst, data, stream.cu_stream())?;
        }
        Ok(())
    }

    /// The device address of the first element of a GPU tensor (views
    /// included), for kernels that take raw pointers.
    pub fn device_ptr(&self) -> Result<u64> {
        let Storage::Cuda { device, data } = &*self.storage else {
            return Err(invalid("device_ptr", "the tensor is on the CPU"));
        };
        debug_assert!(self.offset + self.elem_count() <= data.len());
        Ok(data.base(device.stream()) + (self.offset * self.dtype.size_in_bytes()) as u64)
    }

    /// The elements converted to f32 (from either device).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match &*self.storage {
            Storage::Cpu(s) => Ok(s.to_f32(self.range())),
            Storage::Cuda { .. } => self.to_device(&Device::Cpu)?.to_f32_vec(),
        }
    }

    /// The elements as a host vector of `T` (from either device).
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        match &*self.storage {
            Storage::Cpu(_) => Ok(self.as_slice::<T>()?.to_vec()),
            Storage::Cuda { .. } => Ok(self.to_device(&Device::Cpu)?.as_slice::<T>()?.to_vec()),
        }
    }

    /// A copy converted to `dtype`, on the same device.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if self.is_cuda() {
            return crate::ops::cast(self, dtype);
        }
        let storage = self.cpu_storage("to_dtype")?;
        let storage = if storage.dtype() == dtype {
            storage.window(self.range())
        } else {
            CpuStorage::from_f32(storage.to_f32(self.range()), dtype)
        };
        Ok(Tensor::from_storage(Storage::Cpu(storage), &self.shape, dtype))
    }

    /// A copy on `device`. Host-to-device and device-to-host copies go through
    /// the device's stream and are synchronous from the caller's view.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let range = self.range();
        let storage = match (&*self.storage, device) {
            (Storage::Cpu(s), Device::Cpu) => Storage::Cpu(s.window(range)),
            (Storage::Cpu(s), Device::Cuda(dev)) => {
                let stream = dev.stream();
                let data = match s {
                    CpuStorage::F32(v) => CudaStorage::F32(stream.clone_htod(&v[range])?),
                    CpuStorage::BF16(v) => CudaStorage::BF16(stream.clone_htod(&v[range])?),
                    CpuStorage::F16(v) => CudaStorage::F16(stream.clone_htod(&v[range])?),
                    CpuStorage::I32(v) => CudaStorage::I32(stream.clone_htod(&v[range])?),
                    CpuStorage::U32(v) => CudaStorage::U32(stream.clone_htod(&v[range])?),
                    CpuStorage::U8(v) => CudaStorage::U8(stream.clone_htod(&v[range])?),
                };
                Storage::Cuda {
                    device: dev.clone(),
                    data,
                }
            }
            (Storage::Cuda { device: src, data }, Device::Cpu) => {
                let stream = src.stream();
                Storage::Cpu(match data {
                    CudaStorage::F32(v) => CpuStorage::F32(stream.clone_dtoh(&v.slice(range))?),
                    CudaStorage::BF16(v) => CpuStorage::BF16(stream.clone_dtoh(&v.slice(range))?),
                    CudaStorage::F16(v) => CpuStorage::F16(stream.clone_dtoh(&v.slice(range))?),
                    CudaStorage::I32(v) => CpuStorage::I32(stream.clone_dtoh(&v.slice(range))?),
                    CudaStorage::U32(v) => CpuStorage::U32(stream.clone_dtoh(&v.slice(range))?),
                    CudaStorage::U8(v) => CpuStorage::U8(stream.clone_dtoh(&v.slice(range))?),
                })
            }
            (Storage::Cuda { device: src, .. }, Device::Cuda(dst)) => {
                if src.ordinal() != dst.ordinal() {
                    return Err(Error::DeviceMismatch {
                        lhs: self.device().to_string(),
                        rhs: device.to_string(),
                    });
                }
                return crate::ops::copy(self);
            }
        };
        Ok(Tensor::from_storage(storage, &self.shape, self.dtype))
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

    /// Whether the window covers its whole storage (not a view).
    pub fn is_whole(&self) -> bool {
        let len = match &*self.storage {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda { data, .. } => data.len(),
        };
        self.offset == 0 && len == self.elem_count()
    }
}

fn cpu_vec_mut<T: WithDType>(s: &mut CpuStorage) -> Option<&mut Vec<T>> {
    // Checked by dtype, then reinterpreted: each variant holds exactly `T`.
    if s.dtype() != T::DTYPE {
        return None;
    }
    let any: &mut dyn std::any::Any = match s {
        CpuStorage::F32(v) => v,
        CpuStorage::BF16(v) => v,
        CpuStorage::F16(v) => v,
        CpuStorage::I32(v) => v,
        CpuStorage::U32(v) => v,
        CpuStorage::U8(v) => v,
    };
    any.downcast_mut::<Vec<T>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_vec_checks_element_count() {
        let err = Tensor::from_vec(vec![1.0f32; 5], &[2, 3]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("[5]") && msg.contains("[2, 3]"), "{msg}");
        let err = Tensor::zeros_on(&[usize::MAX, 3], DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("more elements"), "{err}");
    }

    #[test]
    fn dtype_round_trip_and_mismatch_names_both() {
        let t = Tensor::from_f32(vec![1.5, -2.0, 3.25], &[3], DType::BF16).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.5, -2.0, 3.25]);
        let err = t.as_slice::<f32>().unwrap_err().to_string();
        assert!(err.contains("bf16") && err.contains("f32"), "{err}");
    }

    #[test]
    fn row_views_share_storage_and_copy_on_demand() {
        let t = Tensor::from_vec((0..12).map(|i| i as u32).collect(), &[4, 3]).unwrap();
        let v = t.narrow_rows(1, 2).unwrap();
        assert_eq!(v.shape(), &[2, 3]);
        assert_eq!(v.as_slice::<u32>().unwrap(), &[3, 4, 5, 6, 7, 8]);
        assert!(!v.is_whole());
        assert_eq!(v.to_dtype(DType::F32).unwrap().to_f32_vec().unwrap()[0], 3.0);
        assert!(t.narrow_rows(3, 2).is_err());
        let r = v.reshape(&[6]).unwrap();
        assert_eq!(r.to_vec::<u32>().unwrap(), vec![3, 4, 5, 6, 7, 8]);
        assert!(v.reshape(&[5]).is_err());
        let mut owned = Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap();
        owned.as_slice_mut::<f32>().unwrap()[0] = 5.0;
        let shared = owned.clone();
        assert_eq!(shared.as_slice::<f32>().unwrap(), &[5.0, 2.0]);
        owned.as_slice_mut::<f32>().unwrap()[1] = 7.0;
        assert_eq!(shared.as_slice::<f32>().unwrap(), &[5.0, 2.0], "copy on write");
        assert_eq!(owned.as_slice::<f32>().unwrap(), &[5.0, 7.0]);
    }
}
