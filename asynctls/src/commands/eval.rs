//! `asynctls eval`: RULER-style tasks on a real model, every policy and
//! budget side by side, one row per (task, context, policy, budget).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use asynctls::engine::{Engine, Request};
use asynctls::eval::{self, EvalError, ResultFile, ResultRow, RowKey, Sample, SampleOutcome, TokenCounter};
use asynctls::sampler::SamplingParams;
use asynctls_attn::{Policy, SparseConfig};
use asynctls_kernels::{Device, DeviceRequest};
use asynctls_kvcache::KvDType;
use asynctls_models::{AttentionPlan, ChatMessage, Tokenizer};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Tasks, comma separated, or `all`: niah_single_1, niah_multikey_noise,
    /// niah_multikey_2, niah_multikey_3, niah_multivalue_noise,
    /// niah_multiquery_noise, vt, cwe, fwe.
    tasks: String,
    /// A pulled model name or a model directory (with tokenizer.json).
    #[arg(long)]
    model: String,
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Context lengths in tokens (prompt and answer), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    ctx: Vec<usize>,
    /// Attention policies, comma separated: dense, tls, quest, ds.
    #[arg(long, value_delimiter = ',', default_value = "dense,tls,quest,ds")]
    policies: Vec<Policy>,
    /// Token budgets of the sparse policies (k_t for tls and ds, budget/64
    /// blocks for quest), comma separated; dense runs once per context.
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    budgets: Vec<usize>,
    /// Samples per task and context.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Seed of the task generators.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The NIAH depth x length grid: the needle of the single-needle tasks
    /// at each of these depths (percent of the haystack, comma separated),
    /// one row each, instead of at a seeded position.
    #[arg(long, value_delimiter = ',')]
    depths: Vec<u32>,
    /// k_b of tls's block stage (default 128 blocks of 64 tokens, which keeps
    /// every block up to 8,192 tokens; pass about an eighth of the context's
    /// blocks to exercise it at short contexts).
    #[arg(long)]
    block_topk: Option<usize>,
    /// Leading layers that always attend densely.
    #[arg(long, default_value_t = 2)]
    dense_layers: usize,
    /// Calibrated label channels (`asynctls calibrate --out FILE`) instead
    /// of the model's own (its directory's label_channels.json or the
    /// defaults); rows are keyed by it, so one results file can hold both.
    #[arg(long)]
    label_channels: Option<PathBuf>,
    /// Measure the attended fraction and recall of dense attention mass at
    /// every decode step (runs a dense pass beside each sparse one: slow).
    #[arg(long)]
    measure_attention: bool,
    /// New tokens per answer (default: per task, 30 to 64).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: DeviceRequest,
    /// Append rows to this JSON-lines file; rows already in it are skipped.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the rows as one JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Counts the tokens of a user turn as the model will see it: the chat
/// template's own tokens (measured once on an empty turn) plus the text's.
struct ChatCounter<'a> {
    tokenizer: &'a Tokenizer,
    template_tokens: usize,
}

impl TokenCounter for ChatCounter<'_> {
    fn count_tokens(&self, text: &str) -> Result<usize, EvalError> {
        let n = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EvalError::Tokenizer(e.to_string()))?
            .len();
        Ok(self.template_tokens + n)
    }
}

fn prompt_ids(tokenizer: &Tokenizer, sample: &Sample) -> Result<Vec<u32>> {
    if tokenizer.has_chat_template() {
        let rendered = tokenizer.apply_chat_template(&[ChatMessage::user(sample.input.clone())], true)?;
        Ok(tokenizer.encode(&format!("{rendered}{}", sample.answer_prefix), false)?)
    } else {
        Ok(tokenizer.encode(&format!("{}{}", sample.input, sample.answer_prefix), true)?)
    }
}

/// One policy setting of the grid.
#[derive(Debug, Clone, Copy)]
struct Setting {
    policy: Policy,
    budget: Option<usize>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let tasks = eval::parse_tasks(&args.tasks)?;
    if let Some(&d) = args.depths.iter().find(|&&d| d > 100) {
        bail!("--depths {d}: depths are percent, 0 to 100");
    }
    if let (false, Some(t)) = (args.depths.is_empty(), tasks.iter().find(|t| !t.single_needle())) {
        bail!("--depths places one needle: {t} has more (the grid takes niah_single_1, niah_single_2, niah_single_3)");
    }
    let depths: Vec<Option<u32>> = if args.depths.is_empty() {
        vec![None]
    } else {
        let mut d = args.depths.clone();
        d.sort_unstable();
        d.dedup();
        d.into_iter().map(Some).collect()
    };
    // The essay tasks' haystack, checked before any model work.
    let essays = if tasks.iter().any(|t| t.needs_essays()) {
        let cache = asynctls::registry::cache_dir(args.cache_dir.as_deref())?;
        let file = asynctls::registry::dataset_file(&cache, asynctls::registry::ESSAYS.name);
        Some(eval::Essays::load(&file)?)
    } else {
        None
    };
    if args.samples == 0 {
        bail!("--samples must be positive");
    }
    if args.ctx.is_empty() || args.ctx.contains(&0) {
        bail!("--ctx needs positive context lengths");
    }
    if args.policies.is_empty() {
        bail!("--policies needs at least one of dense, tls, quest, ds");
    }
    let sparse_asked = args.policies.iter().any(|&p| p != Policy::Dense);
    if sparse_asked && (args.budgets.is_empty() || args.budgets.contains(&0)) {
        bail!("--budgets needs positive token budgets for the sparse policies");
    }
    if args.block_topk == Some(0) {
        bail!("--block-topk must be positive");
    }
    if args.max_new_tokens == Some(0) {
        bail!("--max-new-tokens must be positive");
    }
    let device = Device::from_request(args.device).context("opening the device")?;
    let model_dir = asynctls::registry::resolve_model(&args.model, args.cache_dir.as_deref())?;
    if !model_dir.join("tokenizer.json").is_file() {
        bail!("{} has no tokenizer.json; eval prompts are text", model_dir.display());
    }
    let mut model = asynctls::engine::load_for_request(&model_dir, args.device, &device)
        .with_context(|| format!("loading model from {}", model_dir.display()))?;
    let own = model_dir.join(asynctls_models::LABEL_CHANNELS_FILE);
    let channels_name = match &args.label_channels {
        Some(path) => {
            let config = model.cache_config(1, asynctls_kvcache::KvDType::BF16);
            model.set_label_channels(asynctls_models::read_label_channels(path, &config)?);
            path.display().to_string()
        }
        None if own.is_file() => own.display().to_string(),
        None => "default".to_string(),
    };
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let template_tokens = if tokenizer.has_chat_template() {
        let empty = tokenizer.apply_chat_template(&[ChatMessage::user(String::new())], true)?;
        tokenizer.encode(&empty, false)?.len()
    } else {
        tokenizer.encode("", true)?.len()
    };
    let counter = ChatCounter {
        tokenizer: &tokenizer,
        template_tokens,
    };
    let num_layers = model.cache_config(1, KvDType::F32).num_layers;
    let max_positions = model.max_positions();
    if let Some(&too_long) = args.ctx.iter().find(|&&c| c > max_positions) {
        bail!("--ctx {too_long} is longer than the model's context of {max_positions} tokens");
    }
    let mut stop_ids = model.eos_token_ids();
    stop_ids.extend(tokenizer.eos_token_id());
    let model_name = args.model.clone();

    let mut settings: Vec<Setting> = Vec::new();
    for &policy in &args.policies {
        if policy == Policy::Dense {
            settings.push(Setting { policy, budget: None });
        } else {
            settings.extend(args.budgets.iter().map(|&b| Setting {
                policy,
                budget: Some(b),
            }));
        }
    }
    let mut results = match &args.out {
        Some(path) => Some(ResultFile::open(path)?),
        None => None,
    };
    let total = (tasks.len() * args.ctx.len() * depths.len() * settings.len()) as u64;
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} rows ({elapsed}, eta {eta}) {msg}")
            .expect("static template"),
    );
    let mut engine = Engine::new(model, AttentionPlan::dense(), KvDType::F32);
    engine.measure_attention = args.measure_attention;
    let mut rows: Vec<ResultRow> = Vec::new();
    for &task in &tasks {
        let max_new = args.max_new_tokens.unwrap_or(task.max_new_tokens());
        for (&ctx, &depth) in args.ctx.iter().flat_map(|c| depths.iter().map(move |d| (c, d))) {
            let key_of = |s: Setting| RowKey {
                model: model_name.clone(),
                task: task.name().to_string(),
                ctx,
                policy: s.policy.name().to_string(),
                budget: s.budget,
                block_topk: match s.policy {
                    Policy::Tls => Some(args.block_topk.unwrap_or(SparseConfig::default().block_topk)),
                    Policy::Quest => s
                        .budget
                        .map(|b| SparseConfig::with_budget(Policy::Quest, b, 64).block_topk),
                    Policy::Dense | Policy::Ds => None,
                },
                dense_layers: args.dense_layers,
                samples: args.samples,
                seed: args.seed,
                label_channels: channels_name.clone(),
                depth,
            };
            let pending: Vec<Setting> = settings
                .iter()
                .copied()
                .filter(|&s| match &results {
                    Some(file) => match file.find(&key_of(s)) {
                        Some(done) => {
                            rows.push(done.clone());
                            bar.inc(1);
                            false
                        }
                        None => true,
                    },
                    None => true,
                })
                .collect();
            if pending.is_empty() {
                continue;
            }
            bar.set_message(format!("{task} @ {ctx}: generating prompts"));
            let target = ctx
                .checked_sub(max_new)
                .filter(|&t| t > 0)
                .with_context(|| format!("--ctx {ctx} leaves no room for the prompt after {max_new} new tokens"))?;
            let samples: Vec<Sample> = (0..args.samples)
                .map(|i| {
                    let depth = depth.map(|d| d as f64 / 100.0);
                    eval::generate_with(task, args.seed, i, target, &counter, essays.as_ref(), depth)
                })
                .collect::<Result<_, _>>()?;
            let requests: Vec<Request> = samples
                .iter()
                .map(|s| {
                    Ok(Request {
                        prompt_ids: prompt_ids(&tokenizer, s)?,
                        max_new_tokens: max_new,
                        sampling: SamplingParams::greedy(),
                        stop_ids: stop_ids.clone(),
                    })
                })
                .collect::<Result<_>>()?;
            let prompt_tokens =
                requests.iter().map(|r| r.prompt_ids.len()).sum::<usize>() as f64 / requests.len() as f64;
            for setting in pending {
                let key = key_of(setting);
                bar.set_message(format!(
                    "{task} @ {ctx}: {}{}",
                    setting.policy,
                    setting.budget.map(|b| format!(" {b}")).unwrap_or_default()
                ));
                let mut sparse = match setting.budget {
                    Some(b) => SparseConfig::with_budget(setting.policy, b, 64),
                    None => SparseConfig {
                        policy: Policy::Dense,
                        ..SparseConfig::default()
                    },
                };
                // Every context of the grid is sparse when asked to be: the
                // short-context dense fallback would hide the policy.
                sparse.dense_below = 0;
                if let (Policy::Tls, Some(k)) = (setting.policy, args.block_topk) {
                    sparse.block_topk = k;
                }
                engine.plan = AttentionPlan {
                    sparse,
                    dense_layers: args.dense_layers,
                };
                // A policy the GPU cannot serve at this length (ds beyond its
                // reach) is a skipped row, not the end of the sweep.
                if let Err(e) = engine.check_requests_reach(&requests) {
                    bar.println(format!("{task} @ {ctx} {}: skipped ({e})", setting.policy));
                    continue;
                }
                let start = Instant::now();
                let (generations, timings) = engine.generate(&requests, |_| {})?;
                let wall_s = start.elapsed().as_secs_f64();
                let mut outputs = Vec::with_capacity(samples.len());
                for (sample, generation) in samples.iter().zip(&generations) {
                    let output = tokenizer.decode(&generation.generated_ids)?;
                    outputs.push(SampleOutcome {
                        recall: eval::sample_recall(&output, &sample.answers),
                        answers: sample.answers.clone(),
                        output,
                    });
                }
                let score = 100.0 * outputs.iter().map(|o| o.recall).sum::<f64>() / outputs.len() as f64;
                let row = ResultRow {
                    stages: selection_stages(setting, key.block_topk, prompt_tokens),
                    key,
                    score,
                    prompt_tokens,
                    sparse_layers: if setting.policy == Policy::Dense {
                        0
                    } else {
                        num_layers.saturating_sub(args.dense_layers)
                    },
                    attended_fraction: timings.attended_fraction,
                    recall: timings.recall,
                    decode_tokens: timings.decode_tokens,
                    wall_s,
                    outputs,
                };
                if let Some(file) = results.as_mut() {
                    file.append(row.clone())?;
                }
                let line = format!(
                    "{:<22} ctx {:>6}{}  {:<5} budget {:>5}  score {:>6.1}  ({:.0}s)",
                    row.key.task,
                    row.key.ctx,
                    row.key.depth.map_or(String::new(), |d| format!(" depth {d:>3}%")),
                    row.key.policy,
                    row.key.budget.map_or("-".to_string(), |b| b.to_string()),
                    row.score,
                    row.wall_s
                );
                // A hidden bar (no terminal, or --json) prints nothing.
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
                rows.push(row);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}

/// Which selection stages can drop tokens at this setting (see
/// [`ResultRow::stages`]); the sink and local blocks come on top of k_b.
fn selection_stages(setting: Setting, block_topk: Option<usize>, prompt_tokens: f64) -> Option<String> {
    const BLOCK: usize = 64;
    let defaults = SparseConfig::default();
    let always = (defaults.sink_blocks + defaults.local_blocks) * BLOCK;
    let stages = match (setting.policy, block_topk, setting.budget) {
        (Policy::Dense, _, _) => return None,
        (Policy::Quest, _, _) => "block",
        (Policy::Ds, _, _) => "token",
        (Policy::Tls, Some(k_b), Some(k_t)) => {
            let candidates = k_b * BLOCK;
            match ((candidates + always) as f64 >= prompt_tokens, candidates <= k_t) {
                (true, _) => "token",
                (false, true) => "block",
                (false, false) => "block+token",
            }
        }
        (Policy::Tls, _, _) => "block+token",
    };
    Some(stages.to_string())
}

fn print_table(rows: &[ResultRow]) {
    println!(
        "{:<22} {:>6} {:>5} {:<6} {:>6} {:>5} {:>7} {:>8} {:>7} {:>12} {:>7}",
        "task", "ctx", "depth", "policy", "budget", "k_b", "score", "samples", "sparse", "stages", "attend"
    );
    for r in rows {
        let opt = |v: Option<usize>| v.map_or("-".to_string(), |b| b.to_string());
        println!(
            "{:<22} {:>6} {:>5} {:<6} {:>6} {:>5} {:>7.1} {:>8} {:>7} {:>12} {:>7}",
            r.key.task,
            r.key.ctx,
            r.key.depth.map_or("-".to_string(), |d| format!("{d}%")),
            r.key.policy,
            opt(r.key.budget),
            opt(r.key.block_topk),
            r.score,
            r.key.samples,
            r.sparse_layers,
            r.stages.as_deref().unwrap_or("-"),
            r.attended_fraction
                .map_or("-".to_string(), |f| format!("{:.1}%", f * 100.0))
        );
    }
}
