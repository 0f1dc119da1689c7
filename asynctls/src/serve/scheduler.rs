//! Continuous batching: one thread owns the model and its KV cache and runs
//! every request through them, a step at a time.
//!
//! Each iteration of the loop
//!
//! 1. takes new requests off the channel from the HTTP handlers,
//! 2. drops requests whose client went away (their event receiver is
//!    closed), freeing their KV blocks before the next step runs,
//! 3. admits waiting requests, oldest first, while the batch has room and
//!    the pool can hold their prompt plus `max_tokens` (reserved up front,
//!    so a running sequence never runs out of blocks mid-decode),
//! 4. prefills one chunk of one admitted prompt (the oldest), so a long
//!    prompt costs the running streams a chunk's time per step instead of
//!    its whole prefill,
//! 5. runs one batched decode step over every sequence past its prefill,
//!    samples each with its own sampler, and sends the new text.
//!
//! With `mixed_steps`, 4 and 5 are one forward whenever both have work: the
//! chunk rides in the decode step (`CausalLm::mixed_step`), so the weights
//! are read once for both.
//!
//! The thread is a plain `std` thread: a step is seconds of CPU work (or a
//! GPU launch sequence) that must not sit on the async runtime, and the
//! model's device state stays on the one thread that made it. Requests come
//! in over a `std` channel; events go back over tokio channels, whose
//! `send` never blocks and whose `is_closed` tells of a dropped client.

use anyhow::Context as _;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use asynctls_kernels::Tensor;
use asynctls_kvcache::{KvDType, SeqId};
use asynctls_models::{AttentionBackend, AttentionPlan, CausalLm, DecodeGraphs};
use tokio::sync::mpsc::UnboundedSender;

use super::api::{ApiError, Usage};
use super::metrics::{Metrics, Outcome};
use super::text::{Detokenize, TextStream};
use crate::engine::FinishReason;
use crate::sampler::{Sampler, SamplingParams};

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at most.
    pub max_batch: usize,
    /// Requests waiting for the batch at most; more are refused (429).
    pub max_queue: usize,
    /// Prompt tokens per prefill chunk (one chunk per iteration).
    pub prefill_chunk: usize,
    pub plan: AttentionPlan,
    pub kv_dtype: KvDType,
    /// Blocks in the KV pool; default: `max_batch` sequences of the whole
    /// context.
    pub kv_blocks: Option<usize>,
    /// Prompt plus output tokens of one request at most; default (and
    /// upper bound): the model's positions.
    pub max_context: Option<usize>,
    /// Resident units per layer of the offload tier (CPU); `None`: the
    /// whole cache in the backend's memory.
    pub resident_slots: Option<usize>,
    /// With `resident_slots`: blocks of a resident tier beside the
    /// offloaded cache (sequences there while it has room).
    pub resident_tier_blocks: usize,
    /// With `resident_slots` on a GPU: how misses are promoted.
    pub offload_policy: asynctls_offload::PromotePolicy,
    /// Replay greedy decode steps from CUDA graphs on a GPU.
    pub cuda_graphs: bool,
    /// Measure attended fraction and recall of every decode step against a
    /// dense pass (slow; the CPU path only).
    pub measure_attention: bool,
    /// Carry each prefill chunk in the decode step of the same iteration
    /// (one forward) instead of running it alone first.
    pub mixed_steps: bool,
    /// Panic inside the step of this busy iteration (counted from 1): the
    /// test of a failing engine step. `None` in real use.
    pub debug_panic_at_iteration: Option<u64>,
    /// Sleep this long in every busy iteration: makes queueing and
    /// cancellation observable in tests on a model that decodes in
    /// microseconds. Zero in real use.
    pub step_delay: std::time::Duration,
}

impl SchedulerConfig {
    pub fn new(plan: AttentionPlan, kv_dtype: KvDType) -> Self {
        SchedulerConfig {
            max_batch: 8,
            max_queue: 64,
            prefill_chunk: 512,
            plan,
            kv_dtype,
            kv_blocks: None,
            max_context: None,
            resident_slots: None,
            resident_tier_blocks: 0,
            offload_policy: asynctls_offload::PromotePolicy::union_of_last_two(usize::MAX),
            cuda_graphs: true,
            measure_attention: false,
            mixed_steps: false,
            debug_panic_at_iteration: None,
            step_delay: std::time::Duration::ZERO,
        }
    }
}

/// What a request may ask for, known once the model is loaded.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Prompt plus `max_tokens` at most.
    pub max_context: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub block_size: usize,
    pub kv_blocks: usize,
}

impl Limits {
    /// Blocks a request of `tokens` (prompt plus output) reserves.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size.max(1))
    }
}

/// A validated request, ready to run.
#[derive(Debug)]
pub struct Job {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the generation (not sent as text).
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

/// What the scheduler tells a request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (never empty).
    Text(String),
    /// The end: why, and the token counts.
    Done { finish: FinishReason, usage: Usage },
    /// The request failed (the engine, or shutdown); nothing follows.
    Failed(ApiError),
}

enum Command {
    Run(Job),
    /// Fail every request, waiting or running (shutdown's deadline passed).
    CancelAll,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull(usize),
    ShuttingDown,
}

/// The HTTP side's handle on the scheduler thread.
#[derive(Debug)]
pub struct Scheduler {
    commands: Mutex<mpsc::Sender<Command>>,
    queued: Arc<AtomicUsize>,
    accepting: AtomicBool,
    max_queue: usize,
    pub limits: Limits,
    metrics: Arc<Metrics>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts the scheduler thread: `load` runs on it (so that the model's
    /// device state is made and used by one thread), then the KV pool is
    /// allocated; either failing is returned here.
    pub fn start(
        load: impl FnOnce() -> anyhow::Result<Box<dyn CausalLm>> + Send + 'static,
        detokenizer: Arc<dyn Detokenize + Send + Sync>,
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Scheduler> {
        anyhow::ensure!(config.max_batch > 0, "--max-batch must be positive");
        anyhow::ensure!(config.prefill_chunk > 0, "--prefill-chunk must be positive");
        anyhow::ensure!(config.kv_blocks != Some(0), "--kv-blocks must be positive");
        let (commands, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<Limits>>();
        let queued = Arc::new(AtomicUsize::new(0));
        let max_queue = config.max_queue;
        let (queued_loop, metrics_loop) = (queued.clone(), metrics.clone());
        let thread = std::thread::Builder::new()
            .name("asynctls-scheduler".into())
            .spawn(move || {
                let mut state = match Loop::new(load, detokenizer, config, metrics_loop, queued_loop) {
                    Ok(state) => state,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(state.limits.clone())).is_ok() {
                    state.run(rx);
                }
            })?;
        let limits = match ready_rx.recv() {
            Ok(result) => result?,
            Err(_) => {
                let _ = thread.join();
                anyhow::bail!("the scheduler thread stopped while loading the model");
            }
        };
        Ok(Scheduler {
            commands: Mutex::new(commands),
            queued,
            accepting: AtomicBool::new(true),
            max_queue,
            limits,
            metrics,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a request, or says why not; the answer comes over
    /// `job.events`.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        // Claim a place first, so that concurrent submits cannot overshoot.
        let before = self.queued.fetch_add(1, Ordering::SeqCst);
        if before >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(before));
        }
        self.metrics.queue_depth.store((before + 1) as u64, Ordering::Relaxed);
        let sent = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Command::Run(job));
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(())
    }

    /// Stops taking requests (new ones get [`SubmitError::ShuttingDown`]);
    /// those already in keep running.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// Fails every request still waiting or running.
    pub fn cancel_all(&self) {
        let _ = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Command::CancelAll);
    }

    /// Whether the scheduler thread is still running.
    pub fn is_alive(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    /// Ends the thread once its work is done and waits for it.
    pub fn join(&self) {
        // Replacing the sender drops the one the loop listens to: it exits
        // when idle.
        let (dead, _) = mpsc::channel();
        *self.commands.lock().unwrap_or_else(|e| e.into_inner()) = dead;
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A request in the running batch.
struct Running {
    job: Job,
    seq: SeqId,
    /// Prompt tokens prefilled so far.
    prefilled: usize,
    sampler: Sampler,
    generated: usize,
    /// The last sampled token, to feed to the next decode step; `None`
    /// while prefilling.
    next: Option<u32>,
    text: TextStream,
    last_token_at: Option<Instant>,
    blocks_reserved: usize,
}

/// The scheduler thread's state.
struct Loop {
    model: Box<dyn CausalLm>,
    backend: Box<dyn AttentionBackend>,
    detokenizer: Arc<dyn Detokenize + Send + Sync>,
    config: SchedulerConfig,
    limits: Limits,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
    waiting: VecDeque<Job>,
    running: Vec<Running>,
    blocks_reserved: usize,
    graphs: DecodeGraphs,
    measuring: bool,
    /// Decode steps since the offload counters were last collected.
    steps_since_offload_read: usize,
    /// Busy iterations so far.
    iterations: u64,
}

/// Decode steps between two reads of the offload counters.
const OFFLOAD_READ_EVERY: usize = 16;

impl Loop {
    fn new(
        load: impl FnOnce() -> anyhow::Result<Box<dyn CausalLm>>,
        detokenizer: Arc<dyn Detokenize + Send + Sync>,
        mut config: SchedulerConfig,
        metrics: Arc<Metrics>,
        queued: Arc<AtomicUsize>,
    ) -> anyhow::Result<Loop> {
        let model = load()?;
        config.plan.sparse.fit_to_cache(&model.cache_config(1, config.kv_dtype));
        let positions = model.max_positions();
        let max_context = config.max_context.unwrap_or(positions).min(positions);
        anyhow::ensure!(max_context > 1, "--max-context must be at least 2");
        let block_size = model.cache_config(1, config.kv_dtype).block_size;
        let per_seq = max_context.div_ceil(block_size);
        let kv_blocks = config.kv_blocks.unwrap_or(per_seq.saturating_mul(config.max_batch));
        // More resident slots than the pool has units are never used.
        let units = kv_blocks.saturating_mul(model.cache_config(1, config.kv_dtype).kv_heads);
        let offload = config.resident_slots.map(|s| asynctls_attn::OffloadOptions {
            resident_tier_blocks: config.resident_tier_blocks,
            // The dense leading layers read every block each step: they stay on the GPU.
            resident_layers: config.plan.dense_layers,
            policy: config.offload_policy,
            ..asynctls_attn::OffloadOptions::new(s.min(units))
        });
        if model.device().is_cuda() {
            // Refused at start, not at the first long request's decode step.
            asynctls_attn::check_gpu_reach(&config.plan.sparse, per_seq + 1, block_size).with_context(|| {
                format!("a context of {max_context} tokens (lower --max-context, or another --attention)")
            })?;
        }
        let mut backend = model
            .new_backend(kv_blocks, config.kv_dtype, offload)
            .with_context(|| {
                format!(
                    "a KV pool of {kv_blocks} blocks (--kv-blocks; by default --max-batch x --max-context, here \
                     {} x {max_context})",
                    config.max_batch
                )
            })?;
        // The pool is the server's working memory for its whole life: held
        // resident from the start. Each host pool was checked against the
        // available memory when it was sized; here a tiered cache's pools
        // together (and a tensor-parallel model's ranks', whose backend
        // reports their sum), before any page is touched.
        if !model.device().is_cuda() {
            let need = backend.memory_report().storage_bytes;
            if let Some(available) = asynctls_offload::host_available_bytes() {
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                anyhow::ensure!(
                    need <= available,
                    "the KV pool needs {:.2} GiB of host memory, {:.2} GiB are available (lower --kv-blocks, \
                     --max-batch or --max-context)",
                    gib(need),
                    gib(available)
                );
            }
        }
        backend.commit_memory();
        if config.mixed_steps && !model.supports_mixed_steps() {
            eprintln!("note: this model runs prefill chunks apart from the decode steps (--mixed-steps ignored)");
        }
        let measuring = config.measure_attention && backend.measure(true).is_ok();
        if config.measure_attention && !measuring {
            eprintln!("note: attention statistics are not measured on {}", model.device());
        }
        let graphs = DecodeGraphs::new(per_seq + 1, config.cuda_graphs && !measuring);
        let limits = Limits {
            max_context,
            vocab_size: model.vocab_size(),
            eos_token_ids: model.eos_token_ids(),
            block_size,
            kv_blocks: backend.memory_report().blocks_total,
        };
        metrics
            .kv_blocks_total
            .store(limits.kv_blocks as u64, Ordering::Relaxed);
        Ok(Loop {
            model,
            backend,
            detokenizer,
            config,
            limits,
            metrics,
            queued,
            waiting: VecDeque::new(),
            running: Vec::new(),
            blocks_reserved: 0,
            graphs,
            steps_since_offload_read: OFFLOAD_READ_EVERY,
            iterations: 0,
            measuring,
        })
    }

    fn run(&mut self, commands: mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle {
                if !open {
                    return;
                }
                // Nothing to do: sleep until a request comes.
                match commands.recv() {
                    Ok(c) => self.command(c),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(c) => self.command(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_disconnected();
            self.admit();
            self.iterations += 1;
            self.step_guarded();
            self.update_gauges();
            if !self.config.step_delay.is_zero() {
                std::thread::sleep(self.config.step_delay);
            }
        }
    }

    /// One iteration's engine work (a prefill chunk and a decode step, or
    /// one mixed step). A panic in it (an engine bug) fails the requests
    /// running now, whose cache state it may have left half-written, and
    /// the server goes on with the next ones instead of losing its
    /// scheduler.
    fn step_guarded(&mut self) {
        let inject = self.config.debug_panic_at_iteration == Some(self.iterations);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if inject {
                panic!("injected by --debug-panic-at-iteration");
            }
            if !self.mixed_iteration() {
                self.prefill_one_chunk();
                self.decode_step();
            }
        }));
        if let Err(panic) = outcome {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            eprintln!(
                "error: the engine failed during a step ({what}); failing the {} running requests",
                self.running.len()
            );
            self.metrics.engine_failures.fetch_add(1, Ordering::Relaxed);
            let e = ApiError::internal(format!("the engine failed during this step: {what}"));
            for i in (0..self.running.len()).rev() {
                self.finish_failed(i, e.clone());
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Run(job) => self.waiting.push_back(job),
            Command::CancelAll => {
                for job in std::mem::take(&mut self.waiting) {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = job.events.send(Event::Failed(ApiError::shutting_down()));
                    self.metrics.count_request(Outcome::Failed);
                }
                for i in (0..self.running.len()).rev() {
                    self.finish_failed(i, ApiError::shutting_down());
                }
                self.update_gauges();
            }
        }
    }

    /// Frees what clients that went away held: waiting requests leave the
    /// queue, running ones their blocks, before the next step spends work
    /// on them.
    fn drop_disconnected(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|job| !job.events.is_closed());
        for _ in self.waiting.len()..before {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.metrics.count_request(Outcome::Cancelled);
        }
        for i in (0..self.running.len()).rev() {
            if self.running[i].job.events.is_closed() {
                self.release(i);
                self.metrics.count_request(Outcome::Cancelled);
            }
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            let Some(job) = self.waiting.front() else { break };
            let need = self.limits.blocks_for(job.prompt_ids.len() + job.max_tokens);
            // Oldest first, even when a younger one would fit: no request
            // waits forever behind a stream of small ones.
            if self.blocks_reserved + need > self.limits.kv_blocks {
                break;
            }
            // A tiered cache must also hold the request whole in one tier.
            if !self.backend.room_for(job.prompt_ids.len() + job.max_tokens) {
                if self.running.is_empty() {
                    // Nothing running will free a tier: it never fits.
                    let Some(job) = self.waiting.pop_front() else { break };
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    let e = ApiError::invalid(
                        "the prompt plus max_tokens fits neither tier of the KV cache",
                        Some("max_tokens"),
                    )
                    .with_code("context_length_exceeded");
                    let _ = job.events.send(Event::Failed(e));
                    self.metrics.count_request(Outcome::Failed);
                    continue;
                }
                break;
            }
            let Some(job) = self.waiting.pop_front() else { break };
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.blocks_reserved += need;
            let seq = self.backend.add_sequence();
            // A tiered cache places the sequence where all of it fits.
            self.backend.plan_sequence(seq, job.prompt_ids.len() + job.max_tokens);
            let sampler = Sampler::new(job.sampling);
            let text = TextStream::new(job.stop_strings.clone());
            self.running.push(Running {
                job,
                seq,
                prefilled: 0,
                sampler,
                generated: 0,
                next: None,
                text,
                last_token_at: None,
                blocks_reserved: need,
            });
        }
    }

    fn prefill_one_chunk(&mut self) {
        let Some(i) = self.running.iter().position(|r| r.next.is_none()) else {
            return;
        };
        let r = &self.running[i];
        let (start, total) = (r.prefilled, r.job.prompt_ids.len());
        let end = total.min(start + self.config.prefill_chunk);
        let chunk = &r.job.prompt_ids[start..end];
        let result = self
            .model
            .prefill(self.backend.as_mut(), r.seq, chunk, false, self.config.prefill_chunk);
        self.metrics.prefill_chunks.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => return self.finish_failed(i, ApiError::internal(format!("prefill failed: {e}"))),
        };
        self.metrics
            .prompt_tokens
            .fetch_add((end - start) as u64, Ordering::Relaxed);
        self.running[i].prefilled = end;
        if end < total {
            return;
        }
        let mut samplers = [self.running[i].sampler.clone()];
        match crate::engine::sample(&logits, &mut samplers, &[0]) {
            Ok(ids) => {
                let [sampler] = samplers;
                self.running[i].sampler = sampler;
                if let Some(&token) = ids.first() {
                    self.on_token(i, token);
                }
            }
            Err(e) => self.finish_failed(i, ApiError::internal(format!("sampling failed: {e}"))),
        }
    }

    /// With `mixed_steps`: the oldest prompt's next chunk and the running
    /// batch's next tokens in one forward. False (and nothing done) unless
    /// both have work and the model runs mixed steps.
    fn mixed_iteration(&mut self) -> bool {
        if !self.config.mixed_steps || !self.model.supports_mixed_steps() {
            return false;
        }
        let Some(p) = self.running.iter().position(|r| r.next.is_none()) else {
            return false;
        };
        let batch: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].next.is_some())
            .collect();
        if batch.is_empty() {
            return false;
        }
        let (start, total) = (self.running[p].prefilled, self.running[p].job.prompt_ids.len());
        let end = total.min(start + self.config.prefill_chunk);
        let chunk = self.running[p].job.prompt_ids[start..end].to_vec();
        let seqs: Vec<SeqId> = batch.iter().map(|&i| self.running[i].seq).collect();
        let tokens: Vec<u32> = batch.iter().filter_map(|&i| self.running[i].next).collect();
        // Which of the batch a failed step touched (reserved a position in).
        let lens_before: Vec<Option<usize>> = seqs.iter().map(|&s| self.backend.seq_len(s).ok()).collect();
        let result = self.model.mixed_step(
            self.backend.as_mut(),
            self.running[p].seq,
            &chunk,
            &seqs,
            &tokens,
            &self.config.plan,
        );
        // Not timed into the decode-step histogram: a mixed step's time is
        // the chunk's as well.
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.metrics.prefill_chunks.fetch_add(1, Ordering::Relaxed);
        self.metrics.mixed_steps.fetch_add(1, Ordering::Relaxed);
        self.collect_step_telemetry();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The prompt fails, and those of the batch the step reserved
                // a position in (they cannot go on); the others decode next
                // iteration.
                let e = ApiError::internal(format!("mixed step failed: {e}"));
                let mut failed: Vec<usize> = batch
                    .iter()
                    .zip(&seqs)
                    .zip(&lens_before)
                    .filter(|((_, &s), before)| self.backend.seq_len(s).ok() != **before)
                    .map(|((&i, _), _)| i)
                    .chain([p])
                    .collect();
                failed.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in failed {
                    self.finish_failed(i, e.clone());
                }
                return true;
            }
        };
        self.metrics
            .prompt_tokens
            .fetch_add((end - start) as u64, Ordering::Relaxed);
        self.running[p].prefilled = end;
        // Row 0 is the chunk's last token: sampled when the prompt is complete.
        let (rows, order): (anyhow::Result<Tensor>, Vec<usize>) = if end == total {
            (Ok(logits), [p].into_iter().chain(batch.iter().copied()).collect())
        } else {
            let rest = logits
                .narrow_rows(1, batch.len())
                .and_then(|r| asynctls_kernels::ops::copy(&r))
                .map_err(anyhow::Error::from);
            (rest, batch.clone())
        };
        let mut samplers: Vec<Sampler> = order.iter().map(|&i| self.running[i].sampler.clone()).collect();
        let which: Vec<usize> = (0..order.len()).collect();
        match rows.and_then(|r| crate::engine::sample(&r, &mut samplers, &which)) {
            Ok(ids) => {
                for (&i, s) in order.iter().zip(samplers) {
                    self.running[i].sampler = s;
                }
                let mut tokens: Vec<(usize, u32)> = order.into_iter().zip(ids).collect();
                // Highest index first: finishing removes from `running`.
                tokens.sort_unstable_by_key(|t| std::cmp::Reverse(t.0));
                for (i, token) in tokens {
                    self.on_token(i, token);
                }
            }
            Err(e) => {
                let e = ApiError::internal(format!("sampling failed: {e}"));
                let mut sampled = order;
                sampled.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in sampled {
                    self.finish_failed(i, e.clone());
                }
            }
        }
        true
    }

    fn decode_step(&mut self) {
        let batch: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].next.is_some())
            .collect();
        if batch.is_empty() {
            return;
        }
        let seqs: Vec<SeqId> = batch.iter().map(|&i| self.running[i].seq).collect();
        let tokens: Vec<u32> = batch.iter().filter_map(|&i| self.running[i].next).collect();
        let greedy = batch.iter().all(|&i| self.running[i].job.sampling.is_greedy());
        let started = Instant::now();
        let result = if greedy {
            self.model
                .decode_greedy(
                    self.backend.as_mut(),
                    &seqs,
                    &tokens,
                    &self.config.plan,
                    &mut self.graphs,
                )
                .map_err(anyhow::Error::from)
        } else {
            self.sampled_step(&batch, &seqs, tokens)
        };
        self.metrics.decode_step.observe(started.elapsed().as_secs_f64());
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.collect_step_telemetry();
        match result {
            Ok(ids) if ids.len() == batch.len() => {
                // Highest index first: finishing removes from `running`.
                for (&i, &token) in batch.iter().zip(&ids).rev() {
                    self.on_token(i, token);
                }
            }
            Ok(ids) => {
                let e = ApiError::internal(format!(
                    "decode returned {} ids for {} sequences",
                    ids.len(),
                    batch.len()
                ));
                for &i in batch.iter().rev() {
                    self.finish_failed(i, e.clone());
                }
            }
            Err(e) => {
                // A failed step may have reserved positions in some of the
                // batch's sequences: none of them can go on.
                let e = ApiError::internal(format!("decode step failed: {e}"));
                for &i in batch.iter().rev() {
                    self.finish_failed(i, e.clone());
                }
            }
        }
    }

    /// A decode step with each sequence's own sampler.
    fn sampled_step(&mut self, batch: &[usize], seqs: &[SeqId], tokens: Vec<u32>) -> anyhow::Result<Vec<u32>> {
        let ids = Tensor::from_vec(tokens, &[seqs.len()])?.to_device(self.model.device())?;
        let logits = self
            .model
            .decode_step(self.backend.as_mut(), seqs, &ids, &self.config.plan)?;
        let mut samplers: Vec<Sampler> = batch.iter().map(|&i| self.running[i].sampler.clone()).collect();
        let rows: Vec<usize> = (0..batch.len()).collect();
        let ids = crate::engine::sample(&logits, &mut samplers, &rows)?;
        for (&i, s) in batch.iter().zip(samplers) {
            self.running[i].sampler = s;
        }
        Ok(ids)
    }

    /// After a decode step (alone or mixed): the offload counters, every few
    /// steps (reading the GPU's costs a synchronization and a read per
    /// layer; the sums stay exact), and the attention statistics.
    fn collect_step_telemetry(&mut self) {
        if self.steps_since_offload_read >= OFFLOAD_READ_EVERY {
            self.steps_since_offload_read = 0;
            if let Some((hits, misses)) = self.backend.take_offload_reads() {
                self.metrics.add_offload_reads(hits, misses);
            }
        }
        self.steps_since_offload_read += 1;
        if self.measuring {
            if let Some(stats) = self.backend.stats().filter(|s| s.count > 0) {
                self.metrics
                    .set_attention_stats(stats.attended_fraction(), stats.recall());
            }
        }
    }

    /// Takes sequence `i`'s new token: sends its text, and finishes the
    /// sequence at a stop token, a stop string or its token limit.
    fn on_token(&mut self, i: usize, token: u32) {
        let now = Instant::now();
        let r = &mut self.running[i];
        r.generated += 1;
        self.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        match r.last_token_at {
            None => self.metrics.ttft.observe((now - r.job.arrived).as_secs_f64()),
            Some(t) => self.metrics.tpot.observe((now - t).as_secs_f64()),
        }
        r.last_token_at = Some(now);
        let tok = self.detokenizer.as_ref();
        let (delta, finish) = if r.job.stop_ids.contains(&token) {
            (r.text.finish(tok), Some(FinishReason::Stop))
        } else {
            match r.text.push(tok, token) {
                Ok(d) if d.stopped => (Ok(d), Some(FinishReason::Stop)),
                Ok(d) if r.generated >= r.job.max_tokens => match r.text.finish(tok) {
                    Ok(rest) => (
                        Ok(super::text::Delta {
                            text: d.text + &rest.text,
                            stopped: false,
                        }),
                        Some(FinishReason::Length),
                    ),
                    Err(e) => (Err(e), None),
                },
                other => (other, None),
            }
        };
        let delta = match delta {
            Ok(d) => d,
            Err(e) => return self.finish_failed(i, ApiError::internal(format!("detokenizing failed: {e}"))),
        };
        let r = &mut self.running[i];
        if !delta.text.is_empty() && r.job.events.send(Event::Text(delta.text)).is_err() {
            self.release(i);
            self.metrics.count_request(Outcome::Cancelled);
            return;
        }
        match finish {
            None => r.next = Some(token),
            Some(finish) => {
                let usage = Usage {
                    prompt_tokens: r.job.prompt_ids.len(),
                    completion_tokens: r.generated,
                };
                let sent = r.job.events.send(Event::Done { finish, usage });
                self.metrics.latency.observe((now - r.job.arrived).as_secs_f64());
                self.release(i);
                self.metrics.count_request(if sent.is_ok() {
                    Outcome::Completed
                } else {
                    Outcome::Cancelled
                });
            }
        }
    }

    fn finish_failed(&mut self, i: usize, error: ApiError) {
        let _ = self.running[i].job.events.send(Event::Failed(error));
        self.release(i);
        self.metrics.count_request(Outcome::Failed);
    }

    /// Removes running sequence `i` and frees its blocks.
    fn release(&mut self, i: usize) {
        let r = self.running.remove(i);
        self.blocks_reserved -= r.blocks_reserved;
        // A prefill chunk that failed part-way has already freed its
        // sequence (the decoder does, so a half-written one never lingers).
        if self.backend.seq_len(r.seq).is_err() {
            return;
        }
        if let Err(e) = self.backend.free(r.seq) {
            // Bookkeeping gone wrong, not the client's fault: say so, and
            // keep serving the others.
            eprintln!("warning: freeing {:?} failed: {e}", r.seq);
        }
    }

    fn update_gauges(&self) {
        let report = self.backend.memory_report();
        let m = &self.metrics;
        m.kv_blocks_used.store(report.blocks_used as u64, Ordering::Relaxed);
        m.kv_blocks_total.store(report.blocks_total as u64, Ordering::Relaxed);
        m.running.store(self.running.len() as u64, Ordering::Relaxed);
        let prefilling = self.running.iter().filter(|r| r.next.is_none()).count();
        m.prefilling.store(prefilling as u64, Ordering::Relaxed);
        m.queue_depth
            .store(self.queued.load(Ordering::SeqCst) as u64, Ordering::Relaxed);
        // GPU memory moves slowly and reading it is a driver call: every 16
        // iterations, and when the last sequence has gone (so the idle value
        // is the one shown after a load). The process's resident memory is
        // read when /metrics is scraped.
        if self.iterations % 16 == 1 || self.running.is_empty() {
            if let asynctls_kernels::Device::Cuda(dev) = self.model.device() {
                if let Ok((free, total)) = dev.memory_info() {
                    m.gpu_used_bytes
                        .store(total.saturating_sub(free) as u64, Ordering::Relaxed);
                }
            }
        }
    }
}
