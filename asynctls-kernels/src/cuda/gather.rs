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
        let f = self.function(&self.gather, "gather_units")?;
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

impl CudaOps {
    /// On `stream`: `table[index[i]] = values[i]`.
    ///
    /// # Safety
    /// Every `index[i]` must be below `table.len()` (the indices live on the
    /// device and are not checked).
    pub unsafe fn scatter_i32(
        &self,
        stream: &Arc<CudaStream>,
        table: &mut CudaSlice<i32>,
        index: &CudaSlice<i32>,
        values: &CudaSlice<i32>,
    ) -> Result<()> {
        if index.len() != values.len() {
            return Err(invalid(
                "scatter_i32",
                format!("{} indices for {} values", index.len(), values.len()),
            ));
        }
        if index.is_empty() {
            return Ok(());
        }
        let f = self.function(&self.gather, "scatter_i32")?;
        let n = index.len() as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(table).arg(index).arg(values).arg(&n);
        // SAFETY: indices come from the caller's bookkeeping of this table
        // (each below its length).
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }?;
        Ok(())
    }
}
