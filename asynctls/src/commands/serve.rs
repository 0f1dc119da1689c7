//! `asynctls serve`: the OpenAI-compatible server on a model.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use asynctls::serve::metrics::Metrics;
use asynctls::serve::scheduler::{Scheduler, SchedulerConfig};
use asynctls::serve::ServerState;
use asynctls_attn::{Policy, SparseConfig};
use asynctls_kernels::{Device, DeviceRequest};
use asynctls_kvcache::KvDType;
use asynctls_models::{AttentionPlan, Tokenizer};
use clap::Args;

/// How the engine behind the server runs (shared with `bench serve`).
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Serve random bf16 weights at a real model's shape instead of a model
    /// (qwen3-8b, qwen3-14b, glm-4.7-flash, ...; for load tests): the vocabulary is the
    /// token ids as decimal words, and there is no chat template.
    #[arg(long, conflicts_with = "model")]
    pub model_shape: Option<String>,
    /// Split the model over this many tensor-parallel ranks (the GQA
    /// family; on the CPU, ranks as threads: the multi-GPU form is not
    /// built yet).
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel: usize,
    /// Model cache for names (see `asynctls pull --help`).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// The model id clients name (default: the --model name or the
    /// directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Where to run: cpu, cuda, cuda:N or auto (the GPU when one is present).
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting for a place in the batch at most; more get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Decode attention: dense, tls (two-level sparse), quest or ds.
    #[arg(long, default_value = "dense")]
    pub attention: Policy,
    /// Token budget of the sparse policy (k_t for tls/ds, k_b*64 tokens for quest).
    #[arg(long, default_value_t = 1024)]
    pub budget: usize,
    /// Leading layers that always attend densely.
    #[arg(long, default_value_t = 2)]
    pub dense_layers: usize,
    /// Contexts shorter than this decode densely.
    #[arg(long, default_value_t = 4096)]
    pub dense_below: usize,
    /// Prompt tokens per prefill chunk: one chunk runs between two decode
    /// steps, so this bounds how long a new prompt stalls running streams.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Carry each prefill chunk in the decode step of the same iteration
    /// (one forward, the weights read once) instead of running it first.
    #[arg(long)]
    pub mixed_steps: bool,
    /// Prompt plus output tokens of one request at most (default: the
    /// model's context).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// KV blocks (64 tokens) in the pool (default: --max-batch requests of
    /// the whole --max-context).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Keep the K/V in a host tier behind the offload engine with this many
    /// resident (block, head) units per layer: on a GPU in pinned host
    /// memory with the residency decided on the device (GQA models).
    #[arg(long)]
    pub offload_slots: Option<usize>,
    /// With --offload-slots: a resident tier of this many blocks (64
    /// tokens each) beside the offloaded cache; requests go there, K/V
    /// whole on the device, while it has room for prompt + max_tokens.
    #[arg(long, default_value_t = 0, requires = "offload_slots")]
    pub resident_tier_blocks: usize,
    #[command(flatten)]
    pub offload_policy: super::OffloadPolicyArgs,
    /// K/V element type in the host cache: f32 or bf16 (bf16 on the GPU).
    #[arg(long, default_value = "f32")]
    pub kv_dtype: String,
    /// Run greedy decode steps eagerly instead of replaying CUDA graphs.
    #[arg(long)]
    pub no_cuda_graphs: bool,
    /// Measure the attended fraction and recall of every decode step
    /// against a dense pass, for /metrics (slow; CPU only).
    #[arg(long)]
    pub measure_attention: bool,
    /// Sleep this many milliseconds in every busy scheduler iteration (for
    /// tests of queueing and cancellation on tiny models).
    #[arg(long, default_value_t = 0, hide = true)]
    pub debug_step_delay_ms: u64,
    /// Panic inside the engine step of this busy scheduler iteration (for
    /// the test of a failing step).
    #[arg(long, hide = true)]
    pub debug_panic_at_iteration: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model directory (config.json, safetensors, tokenizer.json), or the
    /// name of a pulled model.
    #[arg(long, required_unless_present = "model_shape")]
    pub model: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on (loopback by default: pass 0.0.0.0 to serve
    /// other machines).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long)]
    pub api_key: Option<String>,
    /// After SIGINT/SIGTERM, seconds running requests get to finish before
    /// they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace_s: f64,
}

/// What the server loads: a model directory, or random weights at a shape.
enum Source {
    Dir(PathBuf),
    Shape(Box<asynctls_models::ModelShape>, String),
}

/// Loads the model on the scheduler thread and builds the server's state:
/// `model` (a directory or pulled name), or `engine.model_shape`.
pub fn build_state(model: Option<&str>, engine: &EngineArgs, api_key: Option<String>) -> Result<Arc<ServerState>> {
    let device_request = engine.device;
    let device = Device::from_request(device_request).context("opening the device")?;
    eprintln!("serve: device {device}");
    let source = match (model, &engine.model_shape) {
        (Some(model), None) => Source::Dir(asynctls::registry::resolve_model(model, engine.cache_dir.as_deref())?),
        (None, Some(shape)) => {
            let config = asynctls_models::ModelShape::named(shape).with_context(|| {
                format!(
                    "unknown --model-shape `{shape}` (known: {})",
                    asynctls_models::ModelShape::names().join(", ")
                )
            })?;
            Source::Shape(Box::new(config), shape.clone())
        }
        (Some(_), Some(_)) => bail!("give --model or --model-shape, not both"),
        (None, None) => bail!("give --model (a directory or pulled name) or --model-shape"),
    };
    let tokenizer = match &source {
        Source::Dir(dir) => {
            if !dir.join("tokenizer.json").is_file() {
                bail!(
                    "{} has no tokenizer.json: the server needs the model's tokenizer",
                    dir.display()
                );
            }
            Arc::new(Tokenizer::from_dir(dir)?)
        }
        Source::Shape(config, _) => Arc::new(Tokenizer::numeric(config.vocab_size())?),
    };
    let kv_dtype = match engine.kv_dtype.as_str() {
        "f32" => KvDType::F32,
        "bf16" => KvDType::BF16,
        other => bail!("unknown --kv-dtype `{other}` (expected f32 or bf16)"),
    };
    if engine.offload_slots == Some(0) {
        bail!("--offload-slots must be positive (leave it out to keep the whole cache in memory)");
    }
    let plan = AttentionPlan {
        sparse: SparseConfig {
            dense_below: engine.dense_below,
            ..SparseConfig::with_budget(engine.attention, engine.budget, 64)
        },
        dense_layers: engine.dense_layers,
    };
    let config = SchedulerConfig {
        max_batch: engine.max_batch,
        max_queue: engine.max_queue,
        prefill_chunk: engine.prefill_chunk,
        kv_blocks: engine.kv_blocks,
        max_context: engine.max_context,
        resident_slots: engine.offload_slots,
        resident_tier_blocks: engine.resident_tier_blocks,
        offload_policy: engine
            .offload_policy
            .policy(device.is_cuda() && engine.offload_slots.is_some())?,
        cuda_graphs: !engine.no_cuda_graphs,
        measure_attention: engine.measure_attention,
        mixed_steps: engine.mixed_steps,
        step_delay: Duration::from_millis(engine.debug_step_delay_ms),
        debug_panic_at_iteration: engine.debug_panic_at_iteration,
        ..SchedulerConfig::new(plan, kv_dtype)
    };
    let metrics = Arc::new(Metrics::default());
    let (what, default_id) = match &source {
        Source::Dir(dir) => {
            let given = model.unwrap_or_default();
            let id = if std::path::Path::new(given).is_dir() {
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| given.to_string())
            } else {
                given.to_string()
            };
            (dir.display().to_string(), id)
        }
        Source::Shape(_, shape) => (format!("random weights at the {shape} shape"), shape.clone()),
    };
    let tensor_parallel = engine.tensor_parallel;
    if tensor_parallel == 0 {
        bail!("--tensor-parallel must be at least 1");
    }
    if tensor_parallel > 1 && (device.is_cuda() || !matches!(source, Source::Dir(_))) {
        bail!(
            "--tensor-parallel {tensor_parallel} runs on the CPU over a model directory for now \
             (the multi-GPU form, NCCL, is not built yet)"
        );
    }
    let load = move || -> Result<Box<dyn asynctls_models::CausalLm>> {
        match source {
            Source::Dir(dir) if tensor_parallel > 1 => {
                Ok(asynctls_models::load_model_tensor_parallel(&dir, tensor_parallel)?)
            }
            Source::Dir(dir) => asynctls::engine::load_for_request(&dir, device_request, &device),
            Source::Shape(config, _) => {
                let weights = asynctls_models::RandomWeights {
                    seed: 0x5eed,
                    std: 0.02,
                };
                Ok(config.load(&weights, &device)?)
            }
        }
    };
    let scheduler = Scheduler::start(load, tokenizer.clone(), config, metrics.clone())
        .with_context(|| format!("loading {what}"))?;
    let model_id = engine.served_model_name.clone().unwrap_or(default_id);
    Ok(Arc::new(ServerState::new(
        scheduler, metrics, tokenizer, model_id, api_key,
    )))
}

/// Resolves when the process gets SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    eprintln!("serve: shutting down (finishing running requests)");
}

pub fn run(args: ServeArgs) -> Result<()> {
    if !(args.shutdown_grace_s.is_finite() && args.shutdown_grace_s >= 0.0) {
        bail!("--shutdown-grace-s must be a number of seconds >= 0");
    }
    let state = build_state(args.model.as_deref(), &args.engine, args.api_key.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let addr: SocketAddr = tokio::net::lookup_host((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("resolving --host {}", args.host))?
            .next()
            .with_context(|| format!("--host {} has no address", args.host))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        // The line tests and scripts wait for.
        println!(
            "asynctls serve: listening on http://{local} (model `{}`)",
            state.model_id
        );
        let grace = Duration::from_secs_f64(args.shutdown_grace_s);
        asynctls::serve::run(listener, state.clone(), shutdown_signal(), grace)
            .await
            .context("serving")
    });
    state.scheduler.join();
    eprintln!("serve: stopped");
    result
}
