//! The one decoder loop of every model family, on any device: embed the
//! step's tokens, run each layer (which projects, hands K/V and queries to
//! the [`AttentionBackend`], and applies its MLP), then the final norm and
//! the LM head. Prefill runs a prompt in chunks (`prefill_chunk` tokens at a
//! time, so a 96k prompt never holds 96k x hidden activations at once);
//! decode runs one token of each sequence of a batch.

use asynctls_attn::{AttentionBackend, AttentionPlan, AttnError, Step};
use std::collections::HashMap;

use asynctls_kernels::cuda::graph::StepGraph;
use asynctls_kernels::{ops, DType, Device, Tensor};
use asynctls_kvcache::SeqId;

use crate::weights::WeightSource;
use crate::{ModelError, Result};

/// Tokens per prefill chunk unless the caller asks otherwise.
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;

/// A dense layer `y = x W^T + b` with HF's `[out, in]` weight.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer of `weight` (`[out, in]`, on its device) and an optional `bias`.
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub(crate) fn load(
        w: &dyn WeightSource,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self> {
        Ok(Linear {
            weight: w.matrix(&format!("{prefix}.weight"), &[out_dim, in_dim], device)?,
            bias: if bias {
                Some(w.vector(&format!("{prefix}.bias"), &[out_dim], device)?)
            } else {
                None
            },
        })
    }

    /// Several layers of one input as one: their weights stacked by rows
    /// (`[sum out_i, in]`), so a decode step reads them in one GEMV, and the
    /// output's columns are the layers' outputs in order. `parts` are
    /// `(prefix, out_dim)`; biases, when `bias`, stack the same way.
    pub(crate) fn load_stacked(
        w: &dyn WeightSource,
        parts: &[(&str, usize)],
        in_dim: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Self> {
        let layers = parts
            .iter()
            .map(|&(prefix, out_dim)| Linear::load(w, prefix, in_dim, out_dim, bias, device))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let weight = ops::stack_rows(&weights)?;
        let bias = if bias {
            let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(stack_vectors(&biases)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x`: `[n, in]` -> `[n, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(x, &self.weight, self.bias.as_ref())?)
    }

    /// `residual += forward(x)`, without the product's own buffer on a GPU.
    pub(crate) fn forward_add(&self, x: &Tensor, residual: &mut Tensor) -> Result<()> {
        Ok(ops::linear_add_(residual, x, &self.weight, self.bias.as_ref())?)
    }
}

/// Vectors end to end (`[sum n_i]`): stacked layers' biases, each a column
/// of one row per output.
pub(crate) fn stack_vectors(parts: &[&Tensor]) -> Result<Tensor> {
    let columns = parts
        .iter()
        .map(|v| v.reshape(&[v.elem_count(), 1]))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let total = columns.iter().map(|c| c.elem_count()).sum::<usize>();
    Ok(ops::stack_rows(&columns.iter().collect::<Vec<_>>())?.reshaped(&[total])?)
}

/// The SwiGLU MLP, its gate and up projections stacked into one layer.
#[derive(Debug)]
pub(crate) struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub(crate) fn load(w: &dyn WeightSource, prefix: &str, h: usize, i: usize, device: &Device) -> Result<Self> {
        let (gate, up) = (format!("{prefix}.gate_proj"), format!("{prefix}.up_proj"));
        Ok(Mlp {
            gate_up_proj: Linear::load_stacked(w, &[(&gate, i), (&up, i)], h, false, device)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, h, false, device)?,
        })
    }

    /// `silu(gate(x)) * up(x)`, as the down projection's input.
    fn activation(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(&ops::gemm_input(x)?)?;
        Ok(ops::silu_mul_halves_gemm_input(&gate_up)?)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.activation(x)?)
    }

    /// `residual += forward(x)`.
    pub(crate) fn forward_add(&self, x: &Tensor, residual: &mut Tensor) -> Result<()> {
        self.down_proj.forward_add(&self.activation(x)?, residual)
    }
}

/// The token interface of a decoder: the embedding table in, the final norm
/// and the LM head (tied to the embeddings or not) out.
#[derive(Debug)]
pub(crate) struct TokenIo {
    embed_tokens: Tensor,
    norm: Tensor,
    lm_head: Option<Tensor>,
    pub(crate) vocab: usize,
    eps: f32,
}

impl TokenIo {
    pub(crate) fn load(
        w: &dyn WeightSource,
        vocab: usize,
        hidden: usize,
        eps: f32,
        tied: bool,
        device: &Device,
    ) -> Result<Self> {
        // Some tied checkpoints still ship lm_head; use it when present.
        let lm_head = if !tied || w.contains("lm_head.weight") {
            Some(w.matrix("lm_head.weight", &[vocab, hidden], device)?)
        } else {
            None
        };
        Ok(TokenIo {
            embed_tokens: w.matrix("model.embed_tokens.weight", &[vocab, hidden], device)?,
            norm: w.vector("model.norm.weight", &[hidden], device)?,
            lm_head,
            vocab,
            eps,
        })
    }

    pub(crate) fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Every id must be below the vocabulary (the GPU embedding does not check).
    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&t| t as usize >= self.vocab) {
            Some(&id) => Err(ModelError::TokenOutOfRange { id, vocab: self.vocab }),
            None => Ok(()),
        }
    }

    /// Hidden states of `ids` (u32 on the model's device).
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(ops::embedding(&self.embed_tokens, ids)?)
    }

    /// Final norm and LM head over rows of hidden states: f32 `[rows, vocab]`.
    pub(crate) fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let normed = ops::rms_norm(x, &self.norm, self.eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(ops::linear(&normed, head, None)?)
    }
}

/// Greedy decode steps replayed from CUDA graphs: one graph per (batch size,
/// dense or sparse step), captured on the second step of its kind (the
/// first runs eagerly and sizes every scratch buffer) and replayed after,
/// so a step costs one launch and one host sync (the sampled ids). On the
/// CPU, or once a capture failed, steps run eagerly.
#[derive(Debug)]
pub struct DecodeGraphs {
    max_blocks: usize,
    /// What the captured graphs were recorded against: the backend's
    /// buffer generation and the plan. Either changing drops them.
    recorded: Option<(u64, AttentionPlan)>,
    entries: HashMap<(usize, bool), GraphEntry>,
    enabled: bool,
    /// Why graphs were turned off, if they were.
    pub disabled: Option<String>,
    pub eager_steps: usize,
    pub captures: usize,
    pub replays: usize,
}

#[derive(Debug)]
struct GraphEntry {
    ids: Tensor,
    out: Tensor,
    graph: Option<StepGraph>,
    warmed: bool,
}

impl DecodeGraphs {
    /// Graphs for sequences of at most `max_blocks` blocks (prompt plus new
    /// tokens); `enabled: false` runs every step eagerly.
    pub fn new(max_blocks: usize, enabled: bool) -> Self {
        DecodeGraphs {
            max_blocks,
            recorded: None,
            entries: HashMap::new(),
            enabled,
            disabled: None,
            eager_steps: 0,
            captures: 0,
            replays: 0,
        }
    }
}

/// One decoder layer of a family: attention through the backend, then its MLP.
pub(crate) trait Layer: Send + Sync {
    /// `x` (`[tokens, hidden]` f32) through the layer for `step`.
    fn forward(
        &self,
        x: Tensor,
        step: &Step,
        layer: usize,
        backend: &mut dyn AttentionBackend,
        plan: &AttentionPlan,
    ) -> Result<Tensor>;
}

/// The errors of the backend in the model's terms (a context overrun is a
/// user error the CLI explains).
pub(crate) fn attn_err(e: AttnError) -> ModelError {
    match e {
        AttnError::ContextTooLong { end, limit } => ModelError::ContextTooLong {
            prompt: end,
            new: 0,
            context: limit,
        },
        other => ModelError::Attention(other),
    }
}

/// What every prefill checks and promises, around `run` (which prefills
/// `tokens` of `seq` into `backend`): a non-empty prompt of ids below the
/// vocabulary that fits the `max_positions`, refused before anything is
/// reserved; and a prefill that fails after reserving positions frees the
/// sequence (a half-written one is unusable), while one refused up front
/// leaves it as it was (a multi-turn history is not lost).
pub(crate) fn guarded_prefill(
    io: &TokenIo,
    max_positions: usize,
    backend: &mut dyn AttentionBackend,
    seq: SeqId,
    tokens: &[u32],
    run: impl FnOnce(&mut dyn AttentionBackend) -> Result<Tensor>,
) -> Result<Tensor> {
    if tokens.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    io.check_ids(tokens)?;
    let before = backend.seq_len(seq).map_err(attn_err)?;
    if before + tokens.len() > max_positions {
        return Err(ModelError::ContextTooLong {
            prompt: before + tokens.len(),
            new: 0,
            context: max_positions,
        });
    }
    let result = run(&mut *backend);
    if result.is_err() && backend.seq_len(seq).is_ok_and(|n| n != before) {
        let _ = backend.free(seq);
    }
    result
}

/// A model as the loop sees it: token interface, layers, context limit.
pub(crate) struct Decoder<'a, L: Layer> {
    pub io: &'a TokenIo,
    pub layers: &'a [L],
    pub max_positions: usize,
}

impl<L: Layer> Decoder<'_, L> {
    fn run(
        &self,
        backend: &mut dyn AttentionBackend,
        step: &Step,
        ids: &Tensor,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let mut x = self.io.embed(ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, step, l, backend, plan)?;
        }
        Ok(x)
    }

    /// Runs `tokens` of one sequence through the model (dense causal
    /// attention) in chunks, appending their K/V. Returns the logits of the
    /// last token (`[1, vocab]`), or of every token when `all_logits`. A
    /// prefill that fails after reserving positions frees the sequence (a
    /// half-written sequence is unusable); one refused up front leaves it.
    pub fn prefill(
        &self,
        backend: &mut dyn AttentionBackend,
        seq: SeqId,
        tokens: &[u32],
        all_logits: bool,
        chunk: usize,
    ) -> Result<Tensor> {
        guarded_prefill(self.io, self.max_positions, backend, seq, tokens, |backend| {
            self.prefill_chunks(backend, seq, tokens, all_logits, chunk.max(1))
        })
    }

    fn prefill_chunks(
        &self,
        backend: &mut dyn AttentionBackend,
        seq: SeqId,
        tokens: &[u32],
        all_logits: bool,
        chunk: usize,
    ) -> Result<Tensor> {
        let device = self.io.device();
        let plan = AttentionPlan::dense();
        let mut all: Vec<f32> = Vec::new();
        let mut last = None;
        for part in tokens.chunks(chunk) {
            let step = backend
                .begin_prefill(seq, part.len(), self.max_positions)
                .map_err(attn_err)?;
            let ids = Tensor::from_vec(part.to_vec(), &[part.len()])?.to_device(&device)?;
            let x = self.run(backend, &step, &ids, &plan)?;
            if all_logits {
                all.extend(self.io.logits(&x)?.to_f32_vec()?);
            } else {
                last = Some(x.narrow_rows(part.len() - 1, 1)?);
            }
        }
        match last {
            Some(x) if !all_logits => {
                let x = ops::copy(&x)?;
                self.io.logits(&x)
            }
            _ => Ok(Tensor::from_vec(all, &[tokens.len(), self.io.vocab])?),
        }
    }

    /// One forward carrying `chunk`, the next prompt tokens of `seq`, and one
    /// token of each of `seqs` (their last tokens `ids`): the weights are
    /// read once for both, so a long prompt's prefill slows running streams
    /// less. Logits `[1 + seqs, vocab]`: the chunk's last token, then each
    /// sequence's. A step that fails after reserving frees `seq` (as a
    /// failed prefill); `seqs` are the caller's to free, as after a failed
    /// decode step.
    pub fn mixed_step(
        &self,
        backend: &mut dyn AttentionBackend,
        seq: SeqId,
        chunk: &[u32],
        seqs: &[SeqId],
        ids: &[u32],
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        if ids.len() != seqs.len() {
            return Err(ModelError::Attention(AttnError::Shape {
                what: "decode batch",
                expected: format!("{} token ids", seqs.len()),
                got: ids.len().to_string(),
            }));
        }
        self.io.check_ids(ids)?;
        if seqs.is_empty() {
            return self.prefill(backend, seq, chunk, false, chunk.len().max(1));
        }
        // The batch is checked before the chunk reserves anything, so a
        // sequence at the end of its context fails the step without costing
        // the prompt its earlier chunks.
        for &s in seqs {
            let len = backend.seq_len(s).map_err(attn_err)?;
            if len + 1 > self.max_positions {
                return Err(ModelError::ContextTooLong {
                    prompt: len,
                    new: 1,
                    context: self.max_positions,
                });
            }
        }
        guarded_prefill(self.io, self.max_positions, backend, seq, chunk, |backend| {
            let step = backend
                .begin_mixed(seq, chunk.len(), seqs, self.max_positions)
                .map_err(attn_err)?;
            let all: Vec<u32> = chunk.iter().chain(ids).copied().collect();
            let tokens = Tensor::from_vec(all, &[chunk.len() + ids.len()])?.to_device(&self.io.device())?;
            let x = self.run(backend, &step, &tokens, plan)?;
            // The chunk's last row and the batch's rows are contiguous.
            let rows = ops::copy(&x.narrow_rows(chunk.len() - 1, 1 + ids.len())?)?;
            self.io.logits(&rows)
        })
    }

    /// The layers, head and argmax of a begun decode step: the ids on the device.
    fn greedy_ids(
        &self,
        backend: &mut dyn AttentionBackend,
        step: &Step,
        ids: &Tensor,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        let x = self.run(backend, step, ids, plan)?;
        Ok(ops::argmax(&self.io.logits(&x)?)?)
    }

    /// One greedy decode step of `seqs` whose last tokens are `ids`; the
    /// next ids on the host. On a GPU the step is replayed from a CUDA graph
    /// when `graphs` has one for its batch size (see [`DecodeGraphs`]).
    pub fn decode_greedy(
        &self,
        backend: &mut dyn AttentionBackend,
        seqs: &[SeqId],
        ids: &[u32],
        plan: &AttentionPlan,
        graphs: &mut DecodeGraphs,
    ) -> Result<Vec<u32>> {
        let device = self.io.device();
        let gpu = match &device {
            Device::Cuda(dev) if graphs.enabled && graphs.disabled.is_none() => dev.clone(),
            _ => {
                graphs.eager_steps += 1;
                let t = Tensor::from_vec(ids.to_vec(), &[ids.len()])?.to_device(&device)?;
                return Ok(ops::argmax(&self.decode(backend, seqs, &t, plan)?)?.to_vec::<u32>()?);
            }
        };
        if ids.len() != seqs.len() {
            return Err(ModelError::Attention(AttnError::Shape {
                what: "decode batch",
                expected: format!("{} token ids", seqs.len()),
                got: ids.len().to_string(),
            }));
        }
        self.io.check_ids(ids)?;
        // First graph step on this backend: its metadata moves to persistent
        // buffers (`recorded` is set by the generation check below).
        if graphs.recorded.is_none() {
            backend.enable_graphs(graphs.max_blocks).map_err(attn_err)?;
        }
        let mut longest = 0;
        for &s in seqs {
            longest = longest.max(backend.seq_len(s).map_err(attn_err)? + 1);
        }
        let sparse = plan.sparse.policy != asynctls_attn::Policy::Dense && longest >= plan.sparse.dense_below;
        let key = (seqs.len(), sparse);
        let step = backend.begin_decode(seqs, self.max_positions).map_err(attn_err)?;
        // A graph replays the addresses it was captured with: after any
        // buffer it reads was replaced (scratch grown, metadata reallocated)
        // or under another plan, capture anew.
        let now = (backend.graph_generation(), plan.clone());
        if graphs.recorded.as_ref() != Some(&now) {
            graphs.entries.values_mut().for_each(|e| {
                e.graph = None;
                e.warmed = false;
            });
            graphs.recorded = Some(now);
        }
        let entry = match graphs.entries.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let b = seqs.len();
                e.insert(GraphEntry {
                    ids: Tensor::zeros_on(&[b], DType::U32, &device)?,
                    out: Tensor::zeros_on(&[b], DType::U32, &device)?,
                    graph: None,
                    warmed: false,
                })
            }
        };
        entry.ids.write_from_host(ids)?;
        if let Some(graph) = &entry.graph {
            graph.launch()?;
            graphs.replays += 1;
        } else if !entry.warmed {
            let next = self.greedy_ids(backend, &step, &entry.ids, plan)?;
            ops::copy_into(&mut entry.out, &next)?;
            entry.warmed = true;
            graphs.eager_steps += 1;
        } else {
            let (ids_in, out) = (&entry.ids, &mut entry.out);
            let captured = gpu.capture(|| -> Result<()> {
                let next = self.greedy_ids(backend, &step, ids_in, plan)?;
                ops::copy_into(out, &next)?;
                Ok(())
            });
            match captured {
                Ok((graph, ())) => {
                    graph.launch()?;
                    entry.graph = Some(graph);
                    graphs.captures += 1;
                }
                Err(e) => {
                    // Nothing of the step ran: run it eagerly, and stay eager.
                    graphs.disabled = Some(e.to_string());
                    let next = self.greedy_ids(backend, &step, &entry.ids, plan)?;
                    ops::copy_into(&mut entry.out, &next)?;
                    graphs.eager_steps += 1;
                }
            }
        }
        Ok(entry.out.to_vec::<u32>()?)
    }

    /// One decode step: `ids` (u32 `[batch]` on the model's device) are the
    /// next tokens of `seqs`; appends their K/V and returns logits `[batch, vocab]`.
    pub fn decode(
        &self,
        backend: &mut dyn AttentionBackend,
        seqs: &[SeqId],
        ids: &Tensor,
        plan: &AttentionPlan,
    ) -> Result<Tensor> {
        if ids.elem_count() != seqs.len() || ids.dtype() != DType::U32 {
            return Err(ModelError::Attention(AttnError::Shape {
                what: "decode batch",
                expected: format!("{} u32 token ids", seqs.len()),
                got: format!("{} {}", ids.elem_count(), ids.dtype()),
            }));
        }
        // Ids on the host are checked here; ids already on the GPU are the
        // caller's (the sampler's output, always below the vocabulary).
        if !ids.is_cuda() {
            self.io.check_ids(ids.as_slice::<u32>()?)?;
        }
        let step = backend.begin_decode(seqs, self.max_positions).map_err(attn_err)?;
        let x = self.run(backend, &step, ids, plan)?;
        self.io.logits(&x)
    }
}
