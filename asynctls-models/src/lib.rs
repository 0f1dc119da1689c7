//! Model families of asynctls.
//!
//! Owns: HF `config.json` parsing ([`GqaConfig`]), safetensors weights
//! ([`Weights`], memory-mapped, sharded or not), the GQA decoder shared by
//! Qwen3, Qwen2 and Llama ([`GqaModel`]: prefill and batched decode over a
//! paged KV cache, with the attention policy chosen per run), GLM-4.7-Flash
//! with MLA over a latent cache and MoE ([`GlmModel`]), one interface over
//! both ([`CausalLm`], [`load_model`]), the tokenizer
//! and chat template ([`Tokenizer`]), GGUF import with dequantization
//! ([`gguf`]), and the attention geometry of the real
//! models the benchmarks are sized after ([`KnownModel`]).
//!
//! Does not own: the cache (`asynctls-kvcache`), attention
//! (`asynctls-attn`), sampling and the generation loop (`asynctls`).
//!
//! ```
//! use asynctls_models::KnownModel;
//! let glm = KnownModel::Glm47Flash.geometry();
//! // MLA caches one 576-wide latent per token and layer, not 20 expanded heads.
//! assert_eq!(glm.cached_width_per_layer(), 576);
//! ```

mod channels;
mod config;
mod decoder;
mod error;
mod geometry;
pub mod gguf;
mod glm;
mod gqa;
mod model;
mod tensor_parallel;
mod tokenizer;
mod weights;

pub use asynctls_attn::{AttentionBackend, AttentionPlan, AttentionStats};
pub use channels::{read_label_channels, ChannelsFile, LABEL_CHANNELS_FILE};
pub use config::{Family, GqaConfig, RopeScaling};
pub use decoder::{DecodeGraphs, DEFAULT_PREFILL_CHUNK};
pub use error::{ModelError, Result};
pub use geometry::{AttentionGeometry, AttentionKind, KnownModel};
pub use glm::{read_glm_config, GlmConfig, GlmModel};
pub use gqa::{load_gqa, GqaModel};
pub use model::{load_model, load_model_on, load_model_tensor_parallel, CausalLm, ModelShape};
pub use tensor_parallel::{ShardWeights, TensorParallelGqa};
pub use tokenizer::{render_chat_template, ChatMessage, Tokenizer};
pub use weights::{RandomWeights, WeightSource, Weights};
