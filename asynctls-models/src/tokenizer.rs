//! Text in and out: `tokenizer.json` through the `tokenizers` crate, and the
//! chat template of `tokenizer_config.json` rendered with minijinja.

use std::path::Path;

use serde::Serialize;

use crate::error::io_err;
use crate::{ModelError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    fn to_value(&self) -> minijinja::Value {
        minijinja::Value::from(std::collections::BTreeMap::from([
            ("role".to_string(), self.role.clone()),
            ("content".to_string(), self.content.clone()),
        ]))
    }

    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer, its chat template and its special tokens.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// Instructions one chat-template render may run (minijinja's fuel).
const TEMPLATE_FUEL: u64 = 2_000_000;

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::Tokenizer(format!("{} not found", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| io_err(&config_path, "cannot read", e))?;
            serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", config_path.display())))?
        } else {
            serde_json::Value::Null
        };
        // The template is a string, or a list of named templates ("default" wins).
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        })
    }

    /// A stand-in vocabulary for weights without one (random weights at a
    /// real model's shape, for benchmarks): token `i` is the decimal text
    /// `i`, text splits on whitespace, and decoding joins ids with spaces.
    /// No chat template and no special tokens.
    pub fn numeric(vocab_size: usize) -> Result<Self> {
        if vocab_size == 0 || vocab_size > u32::MAX as usize {
            return Err(ModelError::Tokenizer(format!(
                "a numeric vocabulary of {vocab_size} tokens"
            )));
        }
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..vocab_size as u32).map(|i| (i.to_string(), i.into())).collect();
        let spec = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "0"},
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| ModelError::Tokenizer(format!("numeric vocabulary: {e}")))?;
        Ok(Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of the tokenizer's end-of-sequence token, if it names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for `messages`, ending with the assistant's
    /// turn opened when `add_generation_prompt`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::ChatTemplate("the tokenizer has no chat template".into()))?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or_default(),
            self.eos_token.as_deref().unwrap_or_default(),
        )
    }
}

/// Renders a chat `template` (Jinja, as HF writes them) for `messages`, with
/// a bounded amount of work: a template that loops without end fails with
/// an error instead of hanging the process.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // Templates come with untrusted checkpoints: bound the work one
    // render may do (real chat templates use a few thousand units).
    env.set_fuel(Some(TEMPLATE_FUEL));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => messages.iter().map(ChatMessage::to_value).collect::<Vec<_>>(),
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        })
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_runaway_loops_run_out_of_fuel() {
        let ok = render_chat_template(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            &[ChatMessage::user("hi")],
            true,
            "",
            "",
        )
        .unwrap();
        assert_eq!(ok, "<user>hi<assistant>");
        // 10^4 x 10^4 x 10^4 iterations: would run for hours without fuel.
        let start = std::time::Instant::now();
        let err = render_chat_template(
            "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}",
            &[],
            false,
            "",
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("fuel"), "{err}");
        assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
    }
}

#[cfg(test)]
mod numeric_tests {
    use super::Tokenizer;

    #[test]
    fn numeric_vocabulary_round_trips_ids() {
        let t = Tokenizer::numeric(151_936).unwrap();
        assert_eq!(t.encode("7 151935 0", false).unwrap(), vec![7, 151_935, 0]);
        assert_eq!(t.decode(&[3, 1000, 42]).unwrap(), "3 1000 42");
        assert!(Tokenizer::numeric(0).is_err());
    }
}
