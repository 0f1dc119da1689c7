//! The OpenAI wire format: request bodies, their validation, responses,
//! stream chunks and errors.
//!
//! Bodies are parsed here (not by axum's `Json` extractor) so that every
//! failure, a syntax error or a wrong type included, answers in OpenAI's
//! error shape `{"error": {"message", "type", "param", "code"}}` and names
//! the field at fault.
//!
//! Unknown fields are ignored (as vLLM does, so that clients which send
//! extras keep working); known fields that would change the result and that
//! the engine does not implement (`n > 1`, `logprobs`, tools, penalties,
//! ...) are refused with a 400 naming them, rather than silently dropped.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

/// The most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// An error answered to one request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unsupported(field: &str, what: &str) -> Self {
        ApiError::invalid(format!("`{field}` {what} is not supported by this server"), Some(field))
            .with_code("unsupported_parameter")
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist (GET /v1/models lists the one served)"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Missing or incorrect API key: send `Authorization: Bearer KEY`".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn queue_full(depth: usize) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("The server's queue is full ({depth} requests waiting); retry later"),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    pub fn shutting_down() -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "The server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: Some("shutting_down"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("No route {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A completion's `prompt`: text, one text in a list, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// A chat message's `content`: text, or a list of parts of which only text
/// parts are understood.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// An extension (vLLM's name): keep generating past the stop token.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// `messages`, the field only chat requests have.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<Message>,
}

/// `prompt`, the field only completion requests have.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionFields {
    pub prompt: Prompt,
}

/// Parses a body as a JSON object.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    let raw: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("The body is not valid JSON: {e}"), None).with_code("invalid_json"))?;
    if !raw.is_object() {
        return Err(ApiError::invalid("The body must be a JSON object", None));
    }
    Ok(raw)
}

/// Reads `T` out of a parsed body: wrong types and missing fields are a 400
/// that names the field where serde could tell. (Each part of a request is
/// read from the whole object, unknown fields ignored, rather than through
/// `#[serde(flatten)]`, which loses the path.)
pub fn from_body<T: serde::de::DeserializeOwned>(raw: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(raw).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != "." && !path.is_empty()).then_some(path);
        let inner = e.into_inner().to_string();
        let message = match &param {
            Some(p) => format!("Invalid value for `{p}`: {inner}"),
            None => format!("Invalid request: {inner}"),
        };
        ApiError {
            param,
            ..ApiError::invalid(message, None)
        }
    })
}

/// Refuses fields that would change the result and that are not
/// implemented; a field at its neutral value (`n: 1`, `logprobs: false`,
/// `presence_penalty: 0`, ...) passes, since clients often send defaults.
pub fn refuse_unsupported(raw: &Value, endpoint: Endpoint) -> Result<(), ApiError> {
    let obj = raw.as_object().into_iter().flatten();
    for (field, value) in obj {
        let neutral = match (field.as_str(), value) {
            (_, Value::Null) => true,
            ("n" | "best_of", v) => v.as_u64() == Some(1),
            ("logprobs", Value::Bool(false)) => endpoint == Endpoint::Chat,
            ("top_logprobs", v) => v.as_u64() == Some(0),
            ("presence_penalty" | "frequency_penalty", v) => v.as_f64() == Some(0.0),
            ("repetition_penalty", v) => v.as_f64() == Some(1.0),
            ("logit_bias", Value::Object(m)) => m.is_empty(),
            ("tools" | "functions", Value::Array(a)) => a.is_empty(),
            ("tool_choice" | "function_call", Value::String(s)) => s == "none",
            ("parallel_tool_calls", _) => true,
            ("response_format", v) => v.get("type").and_then(Value::as_str) == Some("text"),
            ("echo", Value::Bool(false)) => true,
            ("suffix", Value::String(s)) => s.is_empty(),
            ("top_k", v) => v.as_i64() == Some(0) || v.as_i64() == Some(-1),
            ("logprobs" | "logit_bias" | "tools" | "functions" | "tool_choice" | "function_call", _) => false,
            ("echo" | "suffix" | "min_tokens" | "prediction" | "audio" | "modalities", _) => false,
            ("guided_json" | "guided_regex" | "guided_choice" | "guided_grammar", _) => false,
            _ => true,
        };
        if !neutral {
            return Err(ApiError::unsupported(field, &format!("= {value}")));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Sampling knobs validated against OpenAI's ranges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Common {
    pub fn knobs(&self) -> Result<Knobs, ApiError> {
        let (max_tokens, param) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => (Some(n), "max_completion_tokens"),
            (None, n) => (n, "max_tokens"),
        };
        if max_tokens == Some(0) {
            return Err(ApiError::invalid(format!("`{param}` must be at least 1"), Some(param)));
        }
        // OpenAI's default temperature is 1 (sampling); 0 is greedy.
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("`temperature` {temperature} must be in [0, 2]"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("`top_p` {top_p} must be in (0, 1]"),
                Some("top_p"),
            ));
        }
        Ok(Knobs {
            max_tokens: max_tokens.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            temperature: temperature as f32,
            top_p: top_p as f32,
            // Any 64-bit pattern is a seed; negative ones keep their bits.
            seed: self.seed.map(|s| s as u64),
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }

    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(
                format!("`stop` has {} strings, more than {MAX_STOP_STRINGS}", stops.len()),
                Some("stop"),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid("`stop` strings must not be empty", Some("stop")));
        }
        Ok(stops)
    }
}

/// A chat request's messages as the template's turns.
pub fn chat_messages(messages: &[Message]) -> Result<Vec<asynctls_models::ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("`messages` must not be empty", Some("messages")));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant") {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    &format!("`{}`", m.role),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::unsupported(
                                    &format!("messages[{i}].content[{j}].type"),
                                    &format!("`{kind}`"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            // "developer" is OpenAI's newer name for the system turn.
            let role = if m.role == "developer" { "system" } else { &m.role };
            Ok(asynctls_models::ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// Token usage of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// What identifies one response across its chunks.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl ResponseMeta {
    pub fn new(endpoint: Endpoint, model: &str, serial: u64) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        ResponseMeta {
            id: format!("{prefix}-{created:x}{serial:08x}"),
            created,
            model: model.to_string(),
            endpoint,
        }
    }

    /// The whole (non-streamed) response.
    pub fn full(&self, text: &str, finish_reason: &str, usage: Usage) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
            Endpoint::Completions => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage.to_json(),
        })
    }

    /// One stream chunk: the first (`role`), a text delta, or the last
    /// (`finish_reason` set, empty delta).
    pub fn chunk(&self, text: Option<&str>, first: bool, finish_reason: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason})
            }
        };
        self.chunk_with(vec![choice], None)
    }

    /// The usage chunk of `stream_options.include_usage`: no choices.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        self.chunk_with(vec![], Some(usage))
    }

    fn chunk_with(&self, choices: Vec<Value>, usage: Option<Usage>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": match self.endpoint { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completions => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            chunk["usage"] = u.to_json();
        }
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &[u8]) -> Result<(Common, ChatFields), ApiError> {
        let raw = parse_json(body)?;
        Ok((from_body(&raw)?, from_body(&raw)?))
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let err = chat(b"{not json").unwrap_err();
        assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, Some("invalid_json")));
        let err = chat(br#"{"model":"m","messages":[],"temperature":"hot"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"), "{err:?}");
        let err = chat(br#"{"model":"m","messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].content"), "{err:?}");
        let err = chat(br#"{"model":"m"}"#).unwrap_err();
        assert!(err.message.contains("messages"), "{err:?}");
        let err = chat(b"[1]").unwrap_err();
        assert!(err.message.contains("object"), "{err:?}");
        let (common, fields) = chat(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"x":1}"#).unwrap();
        assert_eq!((common.model.as_str(), fields.messages.len()), ("m", 1));
    }

    #[test]
    fn unsupported_fields_are_refused_unless_neutral() {
        let ok = json!({"model": "m", "n": 1, "logprobs": false, "presence_penalty": 0, "user": "x", "tools": null});
        refuse_unsupported(&ok, Endpoint::Chat).unwrap();
        for (field, value) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("tools", json!([{"type": "function"}])),
            ("frequency_penalty", json!(0.5)),
            ("response_format", json!({"type": "json_object"})),
        ] {
            let body = json!({"model": "m", field: value});
            let err = refuse_unsupported(&body, Endpoint::Chat).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field));
            assert!(err.message.contains(field), "{err:?}");
        }
        // Completions' `logprobs` is a count: any value asks for them.
        assert!(refuse_unsupported(&json!({"logprobs": false}), Endpoint::Completions).is_err());
    }

    #[test]
    fn knobs_follow_openai_ranges() {
        let common = |extra: Value| {
            let mut body = json!({"model": "m", "prompt": "x"});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            from_body::<Common>(&body).unwrap()
        };
        let k = common(json!({})).knobs().unwrap();
        assert_eq!(
            (k.temperature, k.top_p, k.max_tokens, k.stream),
            (1.0, 1.0, None, false)
        );
        assert!(common(json!({"temperature": 3})).knobs().is_err());
        assert!(common(json!({"top_p": 0})).knobs().is_err());
        assert!(common(json!({"max_tokens": 0})).knobs().is_err());
        assert_eq!(common(json!({"stop": "x"})).stop_strings().unwrap(), vec!["x"]);
        assert!(common(json!({"stop": ["a", "b", "c", "d", "e"]}))
            .stop_strings()
            .is_err());
        assert!(common(json!({"stop": [""]})).stop_strings().is_err());
    }
}
