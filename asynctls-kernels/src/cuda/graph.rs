//! CUDA graphs of whole steps: what a decode loop replays so that hundreds
//! of small launches cost one. Work is recorded from the device's stream
//! (allocations become graph memory nodes, freed inside the same graph), and
//! the graph reads its inputs from buffers whose addresses stay fixed.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use crate::{CudaDevice, Error, Result};

/// A captured step, replayed with [`StepGraph::launch`].
pub struct StepGraph {
    graph: CudaGraph,
}

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepGraph")
    }
}

impl StepGraph {
    /// Replays the step on the device's stream (asynchronously).
    pub fn launch(&self) -> Result<()> {
        Ok(self.graph.launch()?)
    }

    /// Uploads the graph to the device ahead of its first launch (runs
    /// nothing), so that launch costs what every later one does.
    pub fn upload(&self) -> Result<()> {
        Ok(self.graph.upload()?)
    }
}

impl CudaDevice {
    /// Records what `work` issues on this device's stream as a graph (none of
    /// it runs now). A failure inside `work` ends the capture and is returned.
    pub fn capture<T, E: From<Error>>(
        &self,
        work: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<(StepGraph, T), E> {
        let stream = self.stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(Error::from)?;
        let worked = work();
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        let value = worked?;
        let graph = graph.map_err(Error::from)?.ok_or_else(|| Error::InvalidArgument {
            op: "capture",
            what: "the captured step launched nothing".into(),
        })?;
        Ok((StepGraph { graph }, value))
    }
}
