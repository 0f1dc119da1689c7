//! [`CudaAttention`]: the attention backend on a GPU. It owns the
//! GPU-resident paged cache ([`GpuKvStorage`]), the selection and decode
//! scratch, and the per-step metadata (write slots, touched blocks, block
//! tables, lengths) that is built once per step and read by every layer.
//! The [`SparseConfig`] -> GPU selection parameters conversion lives here,
//! once.

use std::any::Any;

use asynctls_kernels::cuda::attention::{decode_splits, DecodeKernel};
use asynctls_kernels::cuda::{CudaOps, DecodeScratch, SelectParams, SelectScratch};
use asynctls_kernels::{CudaDevice, DType, Device, Tensor};
use asynctls_kvcache::{CacheConfig, GpuKvStorage, LabelChannels, MemoryReport, PagedKvCache, SeqId};
use cudarc::driver::CudaSlice;

use crate::backend::{check_positions, make_step, reserve_decode};
use crate::{AttentionBackend, AttnError, AttnShape, Policy, Result, SparseConfig, Step, StepKind};

/// The selection parameters of `config` on the GPU, or why it has none.
pub fn select_params(config: &SparseConfig, block_size: usize) -> Result<Option<SelectParams>> {
    config.validate()?;
    let (block_topk, token_topk) = match config.policy {
        Policy::Dense => return Ok(None),
        Policy::Tls => (config.block_topk, config.token_topk),
        // Quest attends every token of its blocks: a token budget that keeps
        // all candidates turns the label stage into the identity.
        Policy::Quest => (config.block_topk, config.block_topk * block_size),
        Policy::Ds => return Err(AttnError::NoGpuPath { policy: config.policy }),
    };
    Ok(Some(SelectParams {
        block_topk,
        token_topk,
        sink_blocks: config.sink_blocks,
        local_blocks: config.local_blocks,
        reduce_max: config.group_reduce == crate::GroupReduce::Max,
    }))
}

/// Device copies of one step's cache metadata.
#[derive(Debug)]
struct StepMeta {
    /// Pool slot (block * block_size + offset) of each token written.
    slots: CudaSlice<i32>,
    /// Physical blocks the step's writes touch and their fill after it.
    blocks: CudaSlice<i32>,
    fills: CudaSlice<i32>,
    /// `[seqs, max_blocks]` physical blocks, and the lengths after the step.
    table: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    max_blocks: usize,
    max_len: usize,
    min_len: usize,
}

/// A GPU-resident KV cache and the kernels that attend over it.
#[derive(Debug)]
pub struct CudaAttention {
    cache: PagedKvCache<GpuKvStorage>,
    device: Device,
    ops: std::sync::Arc<CudaOps>,
    sms: usize,
    decode_scratch: DecodeScratch,
    select_scratch: SelectScratch,
    meta: Option<StepMeta>,
}

impl CudaAttention {
    /// A cache of `config` on `device`; refused before allocating when it
    /// does not fit the GPU's free memory.
    pub fn new(device: &CudaDevice, config: &CacheConfig, channels: LabelChannels) -> Result<Self> {
        let storage = GpuKvStorage::new(device, config, channels)?;
        let ops = device.ops()?;
        let sms = device
            .context()
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(asynctls_kernels::Error::from)? as usize;
        Ok(CudaAttention {
            cache: PagedKvCache::new(storage)?,
            device: Device::Cuda(device.clone()),
            decode_scratch: DecodeScratch::new(&ops)?,
            select_scratch: SelectScratch::new(&ops)?,
            ops,
            sms,
            meta: None,
        })
    }

    pub fn cache(&self) -> &PagedKvCache<GpuKvStorage> {
        &self.cache
    }

    /// Reserves `len` positions of `seq` and writes random K/V (uniform in
    /// [-1, 1)) into every layer, as a prefill would but without the model:
    /// what a decode benchmark at a long context starts from.
    pub fn fill_random(&mut self, seq: SeqId, len: usize, seed: u64) -> Result<()> {
        const CHUNK: usize = 8192;
        let c = self.cache.config().clone();
        let start = self.cache.table(seq)?.len();
        self.cache.reserve(seq, len)?;
        let (kw, vw) = (c.kv_heads * c.key_dim, c.kv_heads * c.value_dim());
        for at in (start..start + len).step_by(CHUNK) {
            let n = CHUNK.min(start + len - at);
            let positions: Vec<usize> = (at..at + n).collect();
            self.meta = Some(self.build_meta(&[seq], &vec![seq; n], &positions)?);
            for layer in 0..c.num_layers {
                let salt = seed ^ ((layer as u64) << 40) ^ at as u64;
                let keys = asynctls_kernels::ops::fill_uniform(&[n, kw], DType::F32, &self.device, salt, 1.0, 0.0)?;
                let values = asynctls_kernels::ops::fill_uniform(&[n, vw.max(1)], DType::F32, &self.device, !salt, 1.0, 0.0)?;
                let step = make_step(StepKind::Prefill { seq, start: at }, vec![seq], positions.clone(), &Device::Cpu)?;
                self.write_kv(&step, layer, &keys, &values)?;
            }
        }
        self.meta = None;
        Ok(())
    }

    /// The token lists of the last sparse decode (rows `seq * kv_heads + head`).
    pub fn last_selection(&self) -> Result<Vec<Vec<i32>>> {
        let lists = self.select_scratch.lists();
        let stream = self.ops.device().stream();
        let counts = stream.clone_dtoh(lists.counts).map_err(asynctls_kernels::Error::from)?;
        let tokens = stream.clone_dtoh(lists.tokens).map_err(asynctls_kernels::Error::from)?;
        Ok(counts
            .iter()
            .enumerate()
            .map(|(r, &c)| tokens[r * lists.max_tokens..r * lists.max_tokens + c.max(0) as usize].to_vec())
            .collect())
    }

    fn upload(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        let stream = self.ops.device().stream();
        Ok(stream.clone_htod(v).map_err(asynctls_kernels::Error::from)?)
    }

    /// Builds and uploads the metadata of a step over `seqs` whose tokens
    /// are at `positions` (one sequence repeated for a prefill chunk).
    fn build_meta(&self, seqs: &[SeqId], token_seqs: &[SeqId], positions: &[usize]) -> Result<StepMeta> {
        let bs = self.cache.config().block_size;
        let mut slots = Vec::with_capacity(positions.len());
        let mut touched: Vec<(i32, i32)> = Vec::new();
        for (&s, &p) in token_seqs.iter().zip(positions) {
            let table = self.cache.table(s)?;
            let block = table.blocks()[p / bs].0 as i32;
            slots.push(block * bs as i32 + (p % bs) as i32);
            let fill = ((table.len() - (p / bs) * bs).min(bs)) as i32;
            match touched.last_mut() {
                Some(last) if last.0 == block => last.1 = fill,
                _ => touched.push((block, fill)),
            }
        }
        let tables = seqs
            .iter()
            .map(|&s| self.cache.table(s))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let max_blocks = tables.iter().map(|t| t.blocks().len()).max().unwrap_or(1).max(1);
        let mut table = vec![0i32; seqs.len() * max_blocks];
        for (i, t) in tables.iter().enumerate() {
            for (j, b) in t.blocks().iter().enumerate() {
                table[i * max_blocks + j] = b.0 as i32;
            }
        }
        let lens: Vec<i32> = tables.iter().map(|t| t.len() as i32).collect();
        let (blocks, fills): (Vec<i32>, Vec<i32>) = touched.into_iter().unzip();
        Ok(StepMeta {
            slots: self.upload(&slots)?,
            blocks: self.upload(&blocks)?,
            fills: self.upload(&fills)?,
            table: self.upload(&table)?,
            lens: self.upload(&lens)?,
            max_blocks,
            max_len: tables.iter().map(|t| t.len()).max().unwrap_or(0),
            min_len: tables.iter().map(|t| t.len()).min().unwrap_or(0),
        })
    }

}

fn gpu_err(what: &'static str) -> AttnError {
    AttnError::Config(format!("{what} must be a whole f32 tensor on the GPU"))
}

impl AttentionBackend for CudaAttention {
    fn device(&self) -> &Device {
        &self.device
    }

    fn add_sequence(&mut self) -> SeqId {
        self.cache.add_sequence()
    }

    fn free(&mut self, seq: SeqId) -> Result<usize> {
        Ok(self.cache.free(seq)?)
    }

    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        Ok(self.cache.fork(seq)?)
    }

    fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.cache.table(seq)?.len())
    }

    fn memory_report(&self) -> MemoryReport {
        self.cache.memory_report()
    }

    fn begin_prefill(&mut self, seq: SeqId, n: usize, limit: usize) -> Result<Step> {
        let start = self.cache.table(seq)?.len();
        check_positions(start + n, limit)?;
        let range = self.cache.reserve(seq, n)?;
        let positions: Vec<usize> = range.collect();
        self.meta = Some(self.build_meta(&[seq], &vec![seq; n], &positions)?);
        make_step(StepKind::Prefill { seq, start }, vec![seq], positions, &self.device)
    }

    fn begin_decode(&mut self, seqs: &[SeqId], limit: usize) -> Result<Step> {
        let positions = reserve_decode(&mut self.cache, seqs, limit)?;
        self.meta = Some(self.build_meta(seqs, seqs, &positions)?);
        make_step(StepKind::Decode, seqs.to_vec(), positions, &self.device)
    }

    fn write_kv(&mut self, step: &Step, layer: usize, keys: &Tensor, values: &Tensor) -> Result<()> {
        // Order is checked (and recorded) before the write is issued, so a
        // refused write leaves the cache as it was.
        match step.kind {
            StepKind::Prefill { seq, start } => self.cache.mark_written(seq, layer, start, step.tokens())?,
            StepKind::Decode => {
                for (&s, &p) in step.seqs.iter().zip(&step.positions) {
                    self.cache.mark_written(s, layer, p, 1)?;
                }
            }
        }
        let k = keys.cuda_slice::<f32>().map_err(|_| gpu_err("keys"))?;
        let separate = self.cache.storage().layer(layer).geometry.separate_values;
        let v = if separate {
            Some(values.cuda_slice::<f32>().map_err(|_| gpu_err("values"))?)
        } else {
            None
        };
        let meta = self.meta.take().ok_or_else(|| AttnError::Config("write_kv outside a step".into()));
        let meta = meta?;
        let result = self
            .cache
            .storage_mut()
            .write_rows(layer, k, v, &meta.slots, &meta.blocks, &meta.fills);
        self.meta = Some(meta);
        Ok(result?)
    }

    fn attend(
        &mut self,
        step: &Step,
        layer: usize,
        q: &Tensor,
        shape: &AttnShape,
        sparse: &SparseConfig,
    ) -> Result<Tensor> {
        let n = step.tokens();
        let qs = q.cuda_slice::<f32>().map_err(|_| gpu_err("queries"))?;
        let mut out = Tensor::zeros_on(&[n, shape.q_heads * shape.value_dim], DType::F32, &self.device)?;
        let meta = self
            .meta
            .as_ref()
            .ok_or_else(|| AttnError::Config("attend outside a step (call begin_prefill or begin_decode)".into()))?;
        let pool = self.cache.storage().layer(layer);
        let view = pool.view(&meta.table, meta.max_blocks, &meta.lens);
        match step.kind {
            StepKind::Prefill { start, .. } => {
                let o = out.cuda_slice_mut::<f32>()?;
                self.ops.prefill_attention(qs, &view, start, shape.q_heads, shape.scale, o)?;
            }
            StepKind::Decode => {
                let bs = self.cache.config().block_size;
                // Per sequence the CPU goes dense below `dense_below`; here a
                // step is dense when every sequence is, else sparse for all
                // (a short sequence's selection then covers most of it).
                let params = if meta.max_len < sparse.dense_below {
                    None
                } else {
                    select_params(sparse, bs)?
                };
                let mla = pool.values.is_none();
                let ctas = if mla { step.seqs.len() } else { step.seqs.len() * shape.kv_heads };
                let (kernel, attended) = match (&params, mla) {
                    (_, true) => (DecodeKernel::Mla, meta.max_len),
                    (None, false) => (DecodeKernel::GqaDense, meta.max_len),
                    (Some(p), false) => (
                        DecodeKernel::GqaSparse,
                        (p.token_topk + (p.sink_blocks + p.local_blocks + 1) * bs).min(meta.max_len),
                    ),
                };
                let _ = meta.min_len;
                let splits = decode_splits(ctas, attended, kernel, self.sms);
                let o = out.cuda_slice_mut::<f32>()?;
                match params {
                    None => self.ops.decode_attention(
                        qs,
                        &view,
                        None,
                        shape.q_heads,
                        shape.scale,
                        splits,
                        &mut self.decode_scratch,
                        o,
                    )?,
                    Some(p) => {
                        self.ops.sparse_select(
                            qs,
                            pool,
                            &meta.table,
                            meta.max_blocks,
                            &meta.lens,
                            shape.q_heads,
                            &p,
                            &mut self.select_scratch,
                        )?;
                        let lists = self.select_scratch.lists();
                        self.ops.decode_attention(
                            qs,
                            &view,
                            Some(&lists),
                            shape.q_heads,
                            shape.scale,
                            splits,
                            &mut self.decode_scratch,
                            o,
                        )?;
                    }
                }
            }
        }
        Ok(out)
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
