//! Accuracy evals: RULER-style synthetic long-context tasks, generated
//! deterministically from a seed, fitted to a token length by the model's
//! own tokenizer, and scored as RULER scores them (string-match recall of
//! the expected answers).
//!
//! The generators follow the task definitions of RULER (Hsieh et al., 2024,
//! "RULER: What's the Real Context Size of Your Long-Context Language
//! Models?"): the templates, needle sentences and answer prefixes are
//! RULER's; the word lists are our own small ones (RULER draws from the
//! `wonderwords` lists), so prompts are RULER-shaped but not byte-identical.
//! The essay haystack (Paul Graham essays, [`Essays`]) is fetched and
//! verified like a model (`asynctls pull paul-graham-essays`), never
//! committed.

mod essays;
mod results;
mod score;
mod tasks;
mod words;

pub use essays::Essays;
pub use results::{ResultFile, ResultRow, RowKey, SampleOutcome};
pub use score::{sample_recall, string_match_all};
pub use tasks::{generate, generate_with, sample_seed, Sample, Task, NOISE};

/// What can go wrong generating or scoring a task.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("unknown eval task `{0}` (known: {known}, or `all`)", known = Task::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "))]
    UnknownTask(String),
    #[error("task {task} needs at least {needed} tokens for its smallest prompt; {target} were asked for")]
    ContextTooShort {
        task: &'static str,
        needed: usize,
        target: usize,
    },
    #[error("tokenizing a prompt: {0}")]
    Tokenizer(String),
    #[error("haystack: {0}")]
    Haystack(String),
    #[error("result file {path}: {message}")]
    ResultFile { path: String, message: String },
}

/// Counts the tokens a prompt text will take once it reaches the model (a
/// counter may wrap the text in a chat template first).
pub trait TokenCounter {
    fn count_tokens(&self, text: &str) -> Result<usize, EvalError>;
}

/// Any closure from text to a count: the tests count bytes or words.
impl<F: Fn(&str) -> usize> TokenCounter for F {
    fn count_tokens(&self, text: &str) -> Result<usize, EvalError> {
        Ok(self(text))
    }
}

/// Parses a comma-separated task list; `all` stands for every task.
pub fn parse_tasks(list: &str) -> Result<Vec<Task>, EvalError> {
    let mut out: Vec<Task> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            for t in Task::ALL {
                if !out.contains(&t) {
                    out.push(t);
                }
            }
            continue;
        }
        let task: Task = name.parse()?;
        if !out.contains(&task) {
            out.push(task);
        }
    }
    if out.is_empty() {
        return Err(EvalError::UnknownTask(list.to_string()));
    }
    Ok(out)
}
