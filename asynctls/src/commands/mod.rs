//! One module per subcommand: its arguments and what it runs.

pub mod bench_attn;
pub mod bench_e2e;
pub mod bench_kv;
pub mod bench_offload;
pub mod bench_prefill;
pub mod bench_serve;
pub mod calibrate;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod import_gguf;
pub mod pull;
pub mod serve;

/// How an offloaded GPU cache promotes its misses (`generate`, `bench e2e`,
/// `serve`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OffloadPolicyArgs {
    /// With an offloaded cache on a GPU: which resident units a promotion
    /// may evict. `union` keeps the units either of the last two steps
    /// selected, `one-step-lag` only the last step's (the CPU offload engine
    /// always predicts with the union).
    #[arg(long, value_enum, default_value_t = OffloadPredictor::Union)]
    pub offload_predictor: OffloadPredictor,
    /// With an offloaded cache on a GPU: misses promoted (copied into a
    /// slot for the next step) per layer and step at most; the others are
    /// read in place until selected again. Default: every miss.
    #[arg(long)]
    pub offload_max_promote: Option<usize>,
}

/// The residency predictor of `--offload-predictor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffloadPredictor {
    Union,
    OneStepLag,
}

impl OffloadPolicyArgs {
    /// The device's promotion policy; an error when a flag was given
    /// without the offloaded GPU cache it configures.
    pub fn policy(&self, offloaded_on_gpu: bool) -> anyhow::Result<asynctls_offload::PromotePolicy> {
        let given = self.offload_predictor != OffloadPredictor::Union || self.offload_max_promote.is_some();
        if given && !offloaded_on_gpu {
            anyhow::bail!(
                "--offload-predictor and --offload-max-promote configure an offloaded cache on a GPU \
                 (--device cuda with the offload flag)"
            );
        }
        if self.offload_max_promote == Some(0) {
            anyhow::bail!("--offload-max-promote must be positive (a cache that never promotes never fills its slots)");
        }
        let max = self.offload_max_promote.unwrap_or(usize::MAX);
        Ok(match self.offload_predictor {
            OffloadPredictor::Union => asynctls_offload::PromotePolicy::union_of_last_two(max),
            OffloadPredictor::OneStepLag => asynctls_offload::PromotePolicy::one_step_lag(max),
        })
    }
}
