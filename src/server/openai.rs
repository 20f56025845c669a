//! The OpenAI wire format: request and response bodies, errors in OpenAI's shape, and a JSON
//! extractor whose every rejection is such an error.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};

use crate::engine::{FinishReason, Sampling};
use crate::methods::{Knob, Method, MethodConfig, MethodSettings};
use crate::retrieval::text_id;
use crate::store::now_unix;
use crate::Error;

use super::registry::valid_id;

pub use super::fields::{decode_body, RequestBody};

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

    /// 500: a bug or a failure of the model or the device, logged here so that every 500
    /// leaves a trace in the server's log.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!("internal error: {message}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 503: the store (disk or Redis) cannot be used now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .code("store_unavailable")
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

/// Library errors: bad input is the client's (400); a full store 507, a store that cannot
/// be reached or read 503 (retry later: nothing was stored); the rest 500.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match &e {
            Error::InvalidInput(m) => ApiError::invalid(m.clone()),
            Error::ContextTooLong { .. } => {
                ApiError::invalid(e.to_string()).code("context_length_exceeded")
            }
            Error::Tokenizer(_) | Error::Template(_) => ApiError::invalid(e.to_string()),
            Error::StoreFull(_) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "server_error",
                e.to_string(),
            )
            .code("insufficient_storage"),
            Error::Store(_) | Error::Unavailable(_) => ApiError::unavailable(format!(
                "{e}; nothing was stored, retry when the store is back"
            )),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

/// `axum::Json`, but malformed bodies, wrong types and oversize bodies are OpenAI-shaped
/// errors instead of plain-text rejections.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: RequestBody> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Required, not assumed: a web page can POST text/plain (or no type) to a loopback
        // server without a CORS preflight, but not application/json.
        let Some(ct) = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
        else {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "the request has no Content-Type; send Content-Type: application/json",
            ));
        };
        if !ct.starts_with("application/json") && !ct.contains("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!("content type `{ct}` is not JSON; send Content-Type: application/json"),
            ));
        }
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0);
        let timeout = req
            .extensions()
            .get::<super::guard::BodyTimeout>()
            .map_or(std::time::Duration::from_secs(30), |t| t.0);
        let read = tokio::time::timeout(timeout, Bytes::from_request(req, state));
        let bytes = read.await.map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s (--body-timeout-secs)",
                    timeout.as_secs()
                ),
            )
            .code("body_timeout")
        })?;
        let bytes = bytes.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                let limit = limit.map_or("its limit".into(), |n| format!("{n} bytes"));
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!(
                        "the request body is larger than this server accepts ({limit}, \
                         --max-body-bytes); send fewer or shorter documents, or upload them \
                         with POST /v1/documents and name them by id"
                    ),
                )
                .code("request_too_large");
            }
            ApiError::new(
                e.status(),
                "invalid_request_error",
                format!("cannot read the request body: {}", e.body_text()),
            )
        })?;
        decode_body(&bytes).map(ApiJson)
    }
}

/// The body size limit of the router, for the 413 message.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

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
#[serde(deny_unknown_fields)]
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
    /// OpenAI's end-user identifier: accepted, changes nothing.
    pub user: Option<String>,
}

impl SamplingFields {
    /// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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

/// A chat conversation reduced to what the engine takes: the system text (the chat
/// template's system role), the earlier turns, and the last user message (the question).
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    /// System and developer messages joined by newlines; empty when there are none.
    pub system: String,
    /// Earlier user/assistant turns, in order.
    pub history: Vec<crate::tokenizer::ChatMessage>,
    pub question: String,
}

impl Conversation {
    /// The earlier turns as `User: ...` / `Assistant: ...` lines (placed after the documents
    /// of a RAG request, so that documents' KV does not depend on the conversation).
    pub fn history_text(&self) -> String {
        self.history
            .iter()
            .map(|m| {
                let who = if m.role == "assistant" {
                    "Assistant"
                } else {
                    "User"
                };
                format!("{who}: {}\n", m.content)
            })
            .collect()
    }
}

pub fn parse_messages(msgs: &[ChatMessage]) -> Result<Conversation, ApiError> {
    let last_user = msgs.iter().rposition(|m| m.role == "user").ok_or_else(|| {
        ApiError::invalid("messages must contain a user message (the question)").param("messages")
    })?;
    let mut system = Vec::new();
    let mut history = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let text = content_text(&m.content, i)?;
        match m.role.as_str() {
            "system" | "developer" => system.push(text),
            "user" if i == last_user => {}
            "user" | "assistant" => {
                history.push(crate::tokenizer::ChatMessage::new(m.role.clone(), text))
            }
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

/// Checks the sampling fields of a request. `limit`: the largest max_tokens allowed;
/// `default_max_tokens`: max_tokens when the request gives none.
pub fn parse_sampling(
    f: &SamplingFields,
    limit: usize,
    default_max_tokens: usize,
) -> Result<Sampling, ApiError> {
    static SEEDS: AtomicU64 = AtomicU64::new(0);
    let (max, pname) = match (f.max_completion_tokens, f.max_tokens) {
        (Some(m), _) => (m, "max_completion_tokens"),
        (None, Some(m)) => (m, "max_tokens"),
        (None, None) => (default_max_tokens as u64, "max_tokens"),
    };
    if max == 0 || max > limit as u64 {
        return Err(
            ApiError::invalid(format!("{pname} must be between 1 and {limit}")).param(pname),
        );
    }
    // Checked as the engine holds them (f32): a top_p of 1e-50 is 0 there, which it refuses.
    let temperature = f.temperature.unwrap_or(1.0) as f32;
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature must be between 0 and 2").param("temperature"));
    }
    let top_p = f.top_p.unwrap_or(1.0) as f32;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p must be in (0, 1]").param("top_p"));
    }
    if f.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported").param("n"));
    }
    let stop = f.stop.clone().map(Stop::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid("stop takes up to 4 non-empty strings").param("stop"));
    }
    // OpenAI samples differently each time unless a seed is given.
    let seed = f
        .seed
        .unwrap_or_else(|| now_unix() ^ SEEDS.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed));
    Ok(Sampling {
        temperature,
        top_p,
        top_k: f.top_k.unwrap_or(0) as usize,
        seed,
        max_new_tokens: max as usize,
        stop,
    })
}

/// The method of a chat request: its `kv` object (`method` and that method's knobs) over the
/// server's `defaults`, through the one override parser.
pub fn parse_method(
    defaults: &MethodConfig,
    kv: Option<&Value>,
) -> Result<Box<dyn Method>, ApiError> {
    let (name, overrides) = match kv {
        None | Some(Value::Null) => (None, Vec::new()),
        Some(Value::Object(o)) => {
            let name = match o.get("method") {
                None => None,
                Some(Value::String(m)) => Some(m.as_str()),
                Some(_) => {
                    return Err(
                        ApiError::invalid("kv.method must be a method name").param("kv.method")
                    )
                }
            };
            let knobs = o
                .iter()
                .filter(|(k, _)| *k != "method")
                .map(|(k, v)| (k.clone(), Knob::Json(v.clone())))
                .collect();
            (name, knobs)
        }
        Some(_) => {
            return Err(ApiError::invalid("kv must be an object of method settings").param("kv"))
        }
    };
    let param = |e: crate::Error| {
        // Point at the knob the method does not have, if that is what was wrong.
        let known = MethodSettings::with_overrides(defaults, name, &[])
            .map(|s| s.knob_names())
            .unwrap_or_default();
        let unknown = overrides
            .iter()
            .map(|(k, _)| k.replace('-', "_"))
            .find(|k| !known.contains(k));
        let p = unknown.map_or("kv".to_string(), |k| format!("kv.{k}"));
        ApiError::from(e).param(p).code("invalid_method")
    };
    MethodSettings::with_overrides(defaults, name, &overrides)
        .and_then(|s| s.build())
        .map_err(param)
}

/// The prompt of a text completion: one string (or a list holding one), not blank.
pub fn completion_prompt(prompt: &Value) -> Result<String, ApiError> {
    let prompt = match prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(ApiError::invalid("prompt must be one string").param("prompt"));
        }
    };
    if prompt.trim().is_empty() {
        return Err(ApiError::invalid("prompt is empty").param("prompt"));
    }
    Ok(prompt)
}

/// Checks a document's text (uploaded or inline) before it reaches the model thread;
/// `param` names the field in the error.
pub fn check_document_text(
    text: &str,
    max_document_tokens: usize,
    param: &str,
) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::invalid("document text is empty")
            .param(param)
            .code("empty_document"));
    }
    // No tokenizer makes a token of more than a few dozen bytes from ordinary text, so this
    // refuses hopeless documents before they reach the model thread.
    if text.len() > max_document_tokens.saturating_mul(64) {
        return Err(ApiError::invalid(format!(
            "document is {} bytes, far more than this server's limit of {max_document_tokens} tokens (--max-document-tokens); split it",
            text.len(),
        ))
        .param(param)
        .code("document_too_long"));
    }
    Ok(())
}

/// Checks an upload's text and id; the id under which it is registered (the given one, else
/// one derived from the text).
pub fn upload_id(req: &DocumentUpload, max_document_tokens: usize) -> Result<String, ApiError> {
    check_document_text(&req.text, max_document_tokens, "text")?;
    match &req.id {
        Some(id) if !valid_id(id) => Err(ApiError::invalid(
            "id must be 1-128 characters from A-Z a-z 0-9 . _ : -, not starting with `.`",
        )
        .param("id")
        .code("invalid_id")),
        Some(id) => Ok(id.clone()),
        None => Ok(text_id(&req.text)),
    }
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
        assert_eq!(c.history_text(), "User: Hi\nAssistant: Hello\n");
        assert_eq!(
            (c.history[1].role.as_str(), c.history[1].content.as_str()),
            ("assistant", "Hello")
        );
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
    fn sampling_is_checked_as_the_engine_holds_it() {
        let fields = |v: Value| -> SamplingFields { serde_json::from_value(v).expect("fields") };
        // Found by the request_decode fuzz target: positive in f64, 0 in f32.
        let e = parse_sampling(&fields(json!({"top_p": 1e-50})), 4096, 256).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_p"));
        for ok in [
            json!({}),
            json!({"top_p": 1e-30, "temperature": 1e-50}),
            json!({"top_p": 1.0, "temperature": 2.0, "max_tokens": 4096}),
        ] {
            let s = parse_sampling(&fields(ok.clone()), 4096, 256).expect("valid");
            assert!(s.validate().is_ok(), "{ok}: {s:?}");
        }
        for (bad, param) in [
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"temperature": 2.1}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_completion_tokens": 4097}),
                "max_completion_tokens",
            ),
            (json!({"n": 2}), "n"),
            (json!({"stop": ["a", ""]}), "stop"),
        ] {
            let e = parse_sampling(&fields(bad.clone()), 4096, 256).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}");
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
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e: ApiError = Error::StoreFull("x".into()).into();
        assert_eq!(e.status, StatusCode::INSUFFICIENT_STORAGE);
        let e: ApiError = Error::Corrupt("x".into()).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
