//! Result rows and the resumable result file (JSON lines, one row each).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::EvalError;

/// What identifies a row: a rerun with the same key skips it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowKey {
    pub model: String,
    pub task: String,
    pub ctx: usize,
    pub policy: String,
    /// The token budget; `None` for dense.
    pub budget: Option<usize>,
    /// k_b of the block stage; `None` where the policy has none (dense, ds).
    pub block_topk: Option<usize>,
    pub dense_layers: usize,
    pub samples: usize,
    pub seed: u64,
    /// The label channels: `default`, or the calibration file used
    /// (`--label-channels`); rows of files from before have `default`.
    #[serde(default = "default_channels")]
    pub label_channels: String,
    /// The needle's depth in percent of the haystack (`--depths`); absent
    /// for a seeded position, as in the rows of files from before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
}

fn default_channels() -> String {
    "default".into()
}

/// One (task, context, policy, budget) cell of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    #[serde(flatten)]
    pub key: RowKey,
    /// RULER's string-match-all score, 0 to 100.
    pub score: f64,
    /// Mean prompt tokens of the samples (the chat template included).
    pub prompt_tokens: f64,
    /// Layers that took the sparse path at decode (the model's layers less
    /// the dense leading ones; 0 for dense).
    pub sparse_layers: usize,
    /// The selection stages that cut anything in this row: `block`, `token`
    /// or `block+token` (`None` for dense). tls with k_b*64 >= the context
    /// is token-only; with k_b*64 <= k_t, block-only.
    #[serde(default)]
    pub stages: Option<String>,
    /// Mean fraction of the context attended per layer and step, and the
    /// recall of the dense softmax mass (only with --measure-attention).
    pub attended_fraction: Option<f64>,
    pub recall: Option<f64>,
    pub decode_tokens: usize,
    pub wall_s: f64,
    /// Per sample: the output and its recall of the answers.
    pub outputs: Vec<SampleOutcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleOutcome {
    pub answers: Vec<String>,
    pub output: String,
    pub recall: f64,
}

/// A JSON-lines file of rows, read at start so finished rows are skipped,
/// appended to and flushed after every row so an interrupted run resumes.
#[derive(Debug)]
pub struct ResultFile {
    path: PathBuf,
    rows: Vec<ResultRow>,
}

impl ResultFile {
    /// Opens `path`, reading the rows already there (none if it is absent).
    pub fn open(path: &Path) -> Result<Self, EvalError> {
        let err = |message: String| EvalError::ResultFile {
            path: path.display().to_string(),
            message,
        };
        let mut rows = Vec::new();
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let row: ResultRow = serde_json::from_str(line).map_err(|e| err(format!("line {}: {e}", i + 1)))?;
                rows.push(row);
            }
        }
        Ok(ResultFile {
            path: path.to_path_buf(),
            rows,
        })
    }

    pub fn rows(&self) -> &[ResultRow] {
        &self.rows
    }

    pub fn find(&self, key: &RowKey) -> Option<&ResultRow> {
        self.rows.iter().find(|r| &r.key == key)
    }

    pub fn append(&mut self, row: ResultRow) -> Result<(), EvalError> {
        let err = |e: std::io::Error| EvalError::ResultFile {
            path: self.path.display().to_string(),
            message: e.to_string(),
        };
        let line = serde_json::to_string(&row).map_err(|e| EvalError::ResultFile {
            path: self.path.display().to_string(),
            message: e.to_string(),
        })?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(err)?;
        writeln!(f, "{line}").map_err(err)?;
        f.flush().map_err(err)?;
        self.rows.push(row);
        Ok(())
    }
}
