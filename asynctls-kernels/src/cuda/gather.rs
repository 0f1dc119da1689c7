//! Whole-unit gathers for the offload engine: one launch copies many
//! scattered units (a block's rows of one KV head) into resident slots,
//! reading the source through the device's mapping of pinned host memory.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::CudaOps;
use crate::error::invalid;
use crate::Result;

impl CudaOps {
    /// On `stream`, copies unit `units[i]` of the pool at device address
    /// `src` (`[.., unit_bytes]`, e.g. mapped pinned host memory) to slot
    /// `slots[i]` of the pool at device address `dst`.
    ///
    /// # Safety
    /// `src` and `dst` must be device-accessible addresses holding every unit
    /// and slot named, valid until the copy completes on `stream`.
    pub unsafe fn gather_units(
        &self,
        stream: &Arc<CudaStream>,
        src: u64,
        dst: u64,
        units: &CudaSlice<i64>,
        slots: &CudaSlice<i32>,
        unit_bytes: usize,
    ) -> Result<()> {
        if unit_bytes % 16 != 0 || units.len() != slots.len() {
            return Err(invalid(
                "gather_units",
                format!(
                    "unit of {unit_bytes} bytes (need a multiple of 16), {} units for {} slots",
                    units.len(),
                    slots.len()
                ),
            ));
        }
        if units.is_empty() {
            return Ok(());
        }
        let f = Self::function(&self.gather, "gather_units")?;
        let vec4 = (unit_bytes / 16) as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&src).arg(&dst).arg(units).arg(slots).arg(&vec4);
        let cfg = LaunchConfig {
            grid_dim: (units.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller vouches for `src` and `dst`.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}
