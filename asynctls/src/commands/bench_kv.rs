//! `asynctls bench kv`: the KV cache footprint of the real models, from the
//! cache geometry their configs imply (no weights needed).

use anyhow::Result;
use asynctls_kvcache::{CacheConfig, HostKvStorage, KvDType, LabelChannels, MemoryReport, PagedKvCache};
use asynctls_models::{GlmConfig, GqaConfig};
use clap::Args;

#[derive(Debug, Args)]
pub struct KvArgs {
    /// Context to size one sequence at, in tokens.
    #[arg(long, default_value_t = 98_304)]
    ctx: usize,
    #[arg(long)]
    json: bool,
}

fn report(config: &CacheConfig) -> Result<MemoryReport> {
    let one_block = CacheConfig {
        num_blocks: 1,
        ..config.clone()
    };
    let storage = HostKvStorage::new(&one_block, LabelChannels::leading(&one_block))?;
    Ok(PagedKvCache::new(storage)?.memory_report())
}

pub fn run(args: KvArgs) -> Result<()> {
    let mut rows = Vec::new();
    for name in GqaConfig::PRESETS {
        let c = GqaConfig::preset(name).expect("listed preset");
        let cache = CacheConfig {
            kv_dtype: KvDType::BF16,
            ..CacheConfig::gqa(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 1)
        };
        rows.push((name.to_string(), "gqa", report(&cache)?));
    }
    let glm = GlmConfig::glm_4_7_flash();
    let cache = CacheConfig::mla(glm.num_hidden_layers, glm.kv_lora_rank, glm.qk_rope_head_dim, 1);
    rows.push(("glm-4.7-flash".to_string(), "mla", report(&cache)?));
    if args.json {
        let doc: Vec<_> = rows
            .iter()
            .map(|(name, kind, r)| {
                serde_json::json!({
                    "model": name, "attention": kind,
                    "kv_bytes_per_token": r.kv_bytes_per_token(),
                    "metadata_bytes_per_token": r.metadata_bytes_per_token,
                    "label_bytes_per_token": r.label_bytes_per_token,
                    "kv_bytes_per_sequence": r.kv_bytes_per_token() * args.ctx,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "bench": "kv", "ctx": args.ctx, "rows": doc }))?
        );
        return Ok(());
    }
    println!(
        "KV cache per token (bf16 K/V, f32 block metadata, INT4 labels) and per sequence at {} tokens",
        args.ctx
    );
    println!(
        "{:>16} {:>5} {:>12} {:>14} {:>12} {:>14}",
        "model", "attn", "K/V B/tok", "metadata B/tok", "labels B/tok", "K/V MiB/seq"
    );
    for (name, kind, r) in &rows {
        println!(
            "{:>16} {:>5} {:>12} {:>14.1} {:>12} {:>14.1}",
            name,
            kind,
            r.kv_bytes_per_token(),
            r.metadata_bytes_per_token,
            r.label_bytes_per_token,
            (r.kv_bytes_per_token() * args.ctx) as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
