//! Errors of model loading and execution.

use std::path::PathBuf;

/// Everything loading or running a model can refuse, each naming what it is about.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {what}")]
    Config { path: PathBuf, what: String },
    #[error("unsupported model type `{0}` (supported: qwen3, qwen2, llama)")]
    UnsupportedModel(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error(
        "the checkpoint has more layers than the config's num_hidden_layers = {config} \
         (it holds `{tensor}`); the extra layers would be silently ignored"
    )]
    ExtraLayers { config: usize, tensor: String },
    #[error("the model's weights need {need_gib:.2} GiB on {device}, {free_gib:.2} GiB are free")]
    WeightsDoNotFit {
        device: String,
        need_gib: f64,
        free_gib: f64,
    },
    #[error("{0}: no weights found (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights(PathBuf),
    #[error("{path}: invalid safetensors file: {what}")]
    Safetensors { path: PathBuf, what: String },
    #[error("weight `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("weight `{name}` has shape {got:?} but the config implies {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("weight `{name}` has unsupported dtype {dtype} (expected f32, f16 or bf16)")]
    TensorDType { name: String, dtype: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("the prompt has {prompt} tokens and {new} more were asked for, beyond the model's context of {context}")]
    ContextTooLong { prompt: usize, new: usize, context: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error(transparent)]
    Cache(#[from] asynctls_kvcache::CacheError),
    #[error(transparent)]
    Attention(#[from] asynctls_attn::AttnError),
    #[error(transparent)]
    Kernel(#[from] asynctls_kernels::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn io_err(path: &std::path::Path, what: &str, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        what: what.to_string(),
        source,
    }
}
