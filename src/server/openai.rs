//! The OpenAI wire format: request and response bodies, errors in OpenAI's shape, and a JSON
//! extractor whose every rejection is such an error.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};

use crate::engine::FinishReason;
use crate::store::now_unix;
use crate::Error;

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 invalid_request_error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    pub fn code(mut self, c: impl Into<String>) -> Self {
        self.code = Some(c.into());
        self
    }

    pub fn body(&self) -> Value {
        serde_json::json!({"error": {
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

/// Library errors: bad input is the client's (400), the rest is the server's (500).
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match &e {
            Error::InvalidInput(m) => ApiError::invalid(m.clone()),
            Error::ContextTooLong { .. } => {
                ApiError::invalid(e.to_string()).code("context_length_exceeded")
            }
            Error::Tokenizer(_) | Error::Template(_) => ApiError::invalid(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

/// `axum::Json`, but malformed bodies, wrong types and oversize bodies are OpenAI-shaped
/// errors instead of plain-text rejections.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_ascii_lowercase();
        if !ct.starts_with("application/json") && !ct.contains("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!("content type `{ct}` is not JSON; send Content-Type: application/json"),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::new(
                e.status(),
                "invalid_request_error",
                format!("cannot read the request body: {}", e.body_text()),
            )
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            ApiError::invalid(format!(
                "the request body is not valid for this endpoint: {e}"
            ))
            .code("invalid_json")
        })
    }
}

/// `stop`: one string or a list of them.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by both completion endpoints.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<u64>,
    /// The newer name for max_tokens.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// samkv extension: keep the k most likely tokens (0: no limit).
    pub top_k: Option<u64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u64>,
    /// vLLM-style extension: do not stop at the end-of-sequence token.
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Retrieve {
    pub top_k: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Document ids (strings) or `{"id": ...}` / `{"text": ...}` objects, in order.
    #[serde(default)]
    pub documents: Vec<Value>,
    pub retrieve: Option<Retrieve>,
    /// A MethodConfig object; its fields override the server's defaults.
    pub kv: Option<Value>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DocumentUpload {
    pub text: String,
    pub id: Option<String>,
    #[serde(default)]
    pub metadata: Value,
}

/// A document named in a chat request.
#[derive(Clone, Debug, PartialEq)]
pub enum DocRef {
    Id(String),
    Inline(String),
}

/// Parses `documents`: each item a string (an id), `{"id": ...}` or `{"text": ...}`.
pub fn parse_documents(items: &[Value]) -> Result<Vec<DocRef>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let bad = || {
                ApiError::invalid(format!(
                    "documents[{i}] must be a document id string, {{\"id\": \"...\"}} or {{\"text\": \"...\"}}"
                ))
                .param(format!("documents[{i}]"))
            };
            match v {
                Value::String(s) => Ok(DocRef::Id(s.clone())),
                Value::Object(o) => match (o.get("id"), o.get("text")) {
                    (Some(Value::String(id)), None) => Ok(DocRef::Id(id.clone())),
                    (None, Some(Value::String(t))) => Ok(DocRef::Inline(t.clone())),
                    _ => Err(bad()),
                },
                _ => Err(bad()),
            }
        })
        .collect()
}

/// The text of a message's `content`: a string, or a list of `{"type": "text", "text"}` parts.
pub fn content_text(v: &Value, i: usize) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "messages[{i}].content must be a string or a list of text parts"
        ))
        .param(format!("messages[{i}].content"))
    };
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    _ => return Err(bad()),
                }
            }
            Ok(out)
        }
        _ => Err(bad()),
    }
}

/// A chat conversation reduced to what the engine takes: system text (the preamble), the
/// earlier turns, and the last user message (the question).
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub system: String,
    /// Earlier user/assistant turns as `User: ...` / `Assistant: ...` lines.
    pub history: String,
    pub question: String,
}

pub fn parse_messages(msgs: &[ChatMessage]) -> Result<Conversation, ApiError> {
    let last_user = msgs.iter().rposition(|m| m.role == "user").ok_or_else(|| {
        ApiError::invalid("messages must contain a user message (the question)").param("messages")
    })?;
    let mut system = Vec::new();
    let mut history = String::new();
    for (i, m) in msgs.iter().enumerate() {
        let text = content_text(&m.content, i)?;
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" if i == last_user => {}
            "user" => history.push_str(&format!("User: {text}\n")),
            "assistant" => history.push_str(&format!("Assistant: {text}\n")),
            other => {
                return Err(ApiError::invalid(format!(
                    "messages[{i}].role `{other}` is not supported; use system, user or assistant"
                ))
                .param(format!("messages[{i}].role")))
            }
        }
    }
    let question = content_text(&msgs[last_user].content, last_user)?;
    if question.trim().is_empty() {
        return Err(
            ApiError::invalid("the last user message is empty; ask something")
                .param(format!("messages[{last_user}].content")),
        );
    }
    Ok(Conversation {
        system: system.join("\n"),
        history,
        question,
    })
}

/// samkv's accounting of a request, in `usage` beside OpenAI's fields.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Context tokens whose KV came from the store instead of being computed for this request.
    pub cached_tokens: usize,
    /// Context tokens recomputed by the method (mean over layers).
    pub recomputed_tokens: usize,
    /// Context tokens whose KV was kept for decoding (mean over layers).
    pub kv_tokens_kept: usize,
    pub prompt_tokens_details: PromptDetails,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PromptDetails {
    pub cached_tokens: usize,
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // Nobody reads a cancelled answer; "stop" keeps clients' enums closed.
        FinishReason::Cancelled => "stop",
    }
}

/// Formats one request's responses (chat or text completion).
pub(crate) struct Reply {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub chat: bool,
    /// samkv's extension object on full responses and the last chunk.
    pub extra: Value,
}

impl Reply {
    pub fn new(model: &str, chat: bool, extra: Value) -> Reply {
        static N: AtomicU64 = AtomicU64::new(0);
        let created = now_unix();
        let prefix = if chat { "chatcmpl" } else { "cmpl" };
        Reply {
            id: format!("{prefix}-{created:x}{:06x}", N.fetch_add(1, Relaxed)),
            created,
            model: model.to_string(),
            chat,
            extra,
        }
    }

    fn head(&self, object: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(object));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m
    }

    pub fn chunk(&self, role: bool, text: Option<&str>, finish: Option<&str>) -> String {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut m = self.head(object);
        let choice = if self.chat {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
        } else {
            json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
        };
        m.insert("choices".into(), json!([choice]));
        if finish.is_some() {
            m.insert("samkv".into(), self.extra.clone());
        }
        Value::Object(m).to_string()
    }

    pub fn usage_chunk(&self, usage: &Usage) -> String {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut m = self.head(object);
        m.insert("choices".into(), json!([]));
        m.insert("usage".into(), json!(usage));
        Value::Object(m).to_string()
    }

    pub fn full(&self, text: &str, finish: &str, usage: &Usage) -> Value {
        let (object, choice) = if self.chat {
            (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": finish, "logprobs": null}),
            )
        } else {
            (
                "text_completion",
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}),
            )
        };
        let mut m = self.head(object);
        m.insert("choices".into(), json!([choice]));
        m.insert("usage".into(), json!(usage));
        m.insert("samkv".into(), self.extra.clone());
        Value::Object(m)
    }
}

pub fn complete_usage(mut u: Usage, completion_tokens: usize) -> Usage {
    u.completion_tokens = completion_tokens;
    u.total_tokens = u.prompt_tokens + completion_tokens;
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msgs(v: Value) -> Vec<ChatMessage> {
        serde_json::from_value(v).expect("messages")
    }

    #[test]
    fn messages_split_into_system_history_question() {
        let c = parse_messages(&msgs(json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
            {"role": "user", "content": [{"type": "text", "text": "Who "}, {"type": "text", "text": "won?"}]},
        ])))
        .expect("valid");
        assert_eq!(c.system, "Be brief.\nNo lists.");
        assert_eq!(c.history, "User: Hi\nAssistant: Hello\n");
        assert_eq!(c.question, "Who won?");
    }

    #[test]
    fn bad_messages_name_the_field() {
        let e = parse_messages(&msgs(json!([{"role": "system", "content": "x"}]))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse_messages(&msgs(
            json!([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}]),
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse_messages(&msgs(json!([{"role": "user", "content": 3}]))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = parse_messages(&msgs(json!([{"role": "user", "content": "  "}]))).unwrap_err();
        assert!(e.message.contains("empty"));
    }

    #[test]
    fn documents_are_ids_or_inline_texts() {
        let d = parse_documents(&[json!("abc"), json!({"id": "x"}), json!({"text": "t"})])
            .expect("valid");
        assert_eq!(
            d,
            vec![
                DocRef::Id("abc".into()),
                DocRef::Id("x".into()),
                DocRef::Inline("t".into())
            ]
        );
        for bad in [
            json!(3),
            json!({"id": "x", "text": "y"}),
            json!({"txt": "y"}),
        ] {
            let e = parse_documents(&[json!("a"), bad]).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("documents[1]"));
        }
    }

    #[test]
    fn errors_have_openai_shape() {
        let e = ApiError::invalid("nope").param("x").code("c");
        let b = e.body();
        assert_eq!(b["error"]["message"], "nope");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "x");
        assert_eq!(b["error"]["code"], "c");
        let e: ApiError = Error::ContextTooLong { tokens: 9, max: 8 }.into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e: ApiError = Error::Store("x".into()).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
