//! Where tensors live and ops run: the CPU, or a CUDA GPU reached through
//! cudarc with the driver loaded at run time.
//!
//! The same binary serves a machine without a GPU and the H200: nothing here
//! links libcuda, and asking for CUDA where no driver can be loaded is an
//! [`Error::NoCudaDriver`], never a panic.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaStream};

use crate::{Error, Result};

/// What the user asked for on the command line (`--device cpu|cuda|cuda:N|auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    Cuda(usize),
    /// The first CUDA device when a driver and a GPU are present, else the CPU.
    Auto,
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            "auto" => Ok(DeviceRequest::Auto),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceRequest::Cuda(n)),
                _ => Err(format!("unknown device `{s}` (expected cpu, cuda, cuda:N or auto)")),
            },
        }
    }
}

/// A CUDA GPU: its context and the stream ops are issued on.
#[derive(Clone)]
pub struct CudaDevice {
    ordinal: usize,
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Streaming multiprocessors, read once at open (grid heuristics size
    /// launches by them on hot paths).
    multiprocessors: usize,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaDevice({})", self.ordinal)
    }
}

impl CudaDevice {
    /// Opens CUDA device `ordinal`: one per GPU per process (later calls
    /// return the same device), so every tensor, kernel and cache on a GPU
    /// shares its one compute stream and stream order is all the ordering
    /// they need. Fails cleanly when no driver is installed.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !cuda_driver_present() {
            return Err(Error::NoCudaDriver);
        }
        static OPENED: OnceLock<Mutex<HashMap<usize, CudaDevice>>> = OnceLock::new();
        let mut opened = OPENED
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(dev) = opened.get(&ordinal) {
            return Ok(dev.clone());
        }
        let dev = Self::open_new(ordinal)?;
        opened.insert(ordinal, dev.clone());
        Ok(dev)
    }

    fn open_new(ordinal: usize) -> Result<Self> {
        let context = CudaContext::new(ordinal).map_err(|source| Error::CudaOpen { ordinal, source })?;
        // Every kernel runs on the one compute stream, and the copy streams of
        // the offload engine order themselves with explicit events, so
        // cudarc's per-buffer event tracking (an event record per kernel
        // argument, tens of microseconds per launch) buys nothing here.
        // SAFETY: no buffer exists on this context yet; see above for why no
        // buffer is used on two streams without an explicit event.
        unsafe { context.disable_event_tracking() };
        // A stream of our own rather than the legacy default stream: work on
        // it can be captured into a CUDA graph (decode steps are replayed as
        // graphs, so launch overhead does not gate small kernels).
        let stream = context
            .new_stream()
            .map_err(|source| Error::CudaOpen { ordinal, source })?;
        let multiprocessors = context
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|source| Error::CudaOpen { ordinal, source })? as usize;
        Ok(CudaDevice {
            ordinal,
            context,
            stream,
            multiprocessors,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Streaming multiprocessors of the GPU (the split heuristics size grids by them).
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// The stream this device's ops are issued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernels of this device: the PTX modules are loaded once per GPU
    /// per process and shared by every tensor op and cache on it.
    pub fn ops(&self) -> Result<Arc<crate::cuda::CudaOps>> {
        static LOADED: OnceLock<Mutex<HashMap<usize, Arc<crate::cuda::CudaOps>>>> = OnceLock::new();
        let mut loaded = LOADED
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(ops) = loaded.get(&self.ordinal) {
            return Ok(ops.clone());
        }
        let ops = Arc::new(crate::cuda::CudaOps::new(self)?);
        loaded.insert(self.ordinal, ops.clone());
        Ok(ops)
    }

    /// GPU 0 for a GPU test, or `None` after printing `skipped: no CUDA
    /// device` when there is no driver or no GPU. Any other failure to open
    /// a present device panics, so a broken GPU machine fails its tests
    /// instead of skipping them.
    pub fn for_tests() -> Option<CudaDevice> {
        if !cuda_driver_present() {
            println!("skipped: no CUDA device (no driver)");
            return None;
        }
        match CudaDevice::open(0) {
            Ok(dev) => Some(dev),
            Err(Error::CudaOpen { source, .. })
                if matches!(
                    source.0,
                    cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE
                        | cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_DEVICE
                ) =>
            {
                println!("skipped: no CUDA device ({source:?})");
                None
            }
            Err(e) => panic!("a CUDA driver is present but device 0 did not open: {e:?}"),
        }
    }

    /// Returns the memory the stream-ordered allocator keeps cached after
    /// frees to the driver (after waiting for the stream), so that free
    /// memory reports what a new allocation can get.
    pub fn release_cached_memory(&self) -> Result<()> {
        self.stream.synchronize()?;
        self.context.bind_to_thread()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: plain driver queries on this context's device; the pool
        // handle is the device's default pool, owned by the driver.
        unsafe {
            cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, self.context.cu_device()).result()?;
            cudarc::driver::sys::cuMemPoolTrimTo(pool, 0).result()?;
        }
        Ok(())
    }

    /// Free and total bytes of GPU memory, after returning cached memory.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.release_cached_memory()?;
        Ok(cudarc::driver::result::mem_get_info()?)
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> Result<String> {
        Ok(self.context.name()?)
    }
}

/// Whether libcuda can be loaded on this machine.
///
/// cudarc panics on first use when the library is missing, so every path
/// into CUDA asks this first.
pub fn cuda_driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda and reports whether it succeeded.
    let present = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() });
    present.unwrap_or(false)
}

/// Where a tensor lives and an op runs.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    Cuda(CudaDevice),
}

impl Device {
    /// Resolves a user request into a device. `Auto` falls back to the CPU
    /// when no driver or no GPU is present; an explicit CUDA request does not.
    pub fn from_request(request: DeviceRequest) -> Result<Device> {
        match request {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Cuda(ordinal) => Ok(Device::Cuda(CudaDevice::open(ordinal)?)),
            DeviceRequest::Auto => Ok(CudaDevice::open(0).map_or(Device::Cpu, Device::Cuda)),
        }
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Whether two devices are the same place (same CPU, or same GPU ordinal).
    pub fn same_device(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.ordinal == b.ordinal,
            _ => false,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert!("gpu".parse::<DeviceRequest>().is_err());
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn cuda_request_without_driver_is_an_error_not_a_panic() {
        if cuda_driver_present() {
            println!("skipped: a CUDA driver is present on this machine");
            return;
        }
        let err = Device::from_request(DeviceRequest::Cuda(0)).unwrap_err();
        assert!(matches!(err, Error::NoCudaDriver), "{err}");
        assert!(err.to_string().contains("--device cpu"));
        // auto falls back to the CPU.
        assert!(Device::from_request(DeviceRequest::Auto).unwrap().is_cpu());
    }
}
