//! Which top-level fields each JSON endpoint accepts: every other one is refused with a 400
//! that names it, so that a typo (`documentz`) or an OpenAI feature samkv does not implement
//! (`logprobs`, `tools`, ...) is never silently ignored.

use serde_json::{json, Value};

use super::openai::{ApiError, ChatRequest, CompletionRequest, DocumentUpload};

/// A JSON request body with the top-level fields it accepts.
pub trait RequestBody: serde::de::DeserializeOwned {
    /// Fields this endpoint reads.
    const FIELDS: &'static [&'static str];
}

/// Whether a field's value means "off".
type IsOff = fn(&Value) -> bool;

/// OpenAI fields samkv does not implement, with the value that means "off": that value (or
/// null) is accepted, any other is refused as unsupported.
const INERT: &[(&str, IsOff)] = &[
    ("frequency_penalty", |v| v.as_f64() == Some(0.0)),
    ("presence_penalty", |v| v.as_f64() == Some(0.0)),
    ("logprobs", |v| v == &Value::Bool(false)),
    ("top_logprobs", |v| v.as_u64() == Some(0)),
    ("logit_bias", |v| {
        v.as_object().is_some_and(|o| o.is_empty())
    }),
    ("tools", |v| v.as_array().is_some_and(|a| a.is_empty())),
    ("tool_choice", |v| v == "none"),
    ("parallel_tool_calls", |_| true),
    ("functions", |v| v.as_array().is_some_and(|a| a.is_empty())),
    ("response_format", |v| v == &json!({"type": "text"})),
    ("echo", |v| v == &Value::Bool(false)),
    ("best_of", |v| v.as_u64() == Some(1)),
    ("suffix", |v| v.as_str() == Some("")),
];

/// Decodes a request body, refusing fields the endpoint does not know (400 naming them).
pub fn decode_body<T: RequestBody>(bytes: &[u8]) -> Result<T, ApiError> {
    let invalid = |e: serde_json::Error| {
        ApiError::invalid(format!(
            "the request body is not valid for this endpoint: {e}"
        ))
        .code("invalid_json")
    };
    let v: Value = serde_json::from_slice(bytes).map_err(invalid)?;
    if let Value::Object(o) = &v {
        for (k, val) in o {
            if T::FIELDS.contains(&k.as_str()) || val.is_null() {
                continue;
            }
            if let Some((_, off)) = INERT.iter().find(|(n, _)| n == k) {
                if off(val) {
                    continue;
                }
                return Err(ApiError::invalid(format!(
                    "`{k}` is not supported by samkv; leave it out (supported: {})",
                    T::FIELDS.join(", ")
                ))
                .param(k.clone())
                .code("unsupported_parameter"));
            }
            return Err(ApiError::invalid(format!(
                "unknown field `{k}` for this endpoint; known: {}",
                T::FIELDS.join(", ")
            ))
            .param(k.clone())
            .code("unknown_parameter"));
        }
    }
    serde_json::from_value(v).map_err(invalid)
}

/// The sampling fields (flattened [`SamplingFields`]) followed by an endpoint's own.
macro_rules! fields {
    ($($f:literal),*) => {
        &[
            "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
            "stop", "n", "ignore_eos", "stream", "stream_options", "user", $($f),*
        ]
    };
}

impl RequestBody for ChatRequest {
    const FIELDS: &'static [&'static str] =
        fields!("model", "messages", "documents", "retrieve", "kv");
}

impl RequestBody for CompletionRequest {
    const FIELDS: &'static [&'static str] = fields!("model", "prompt");
}

impl RequestBody for DocumentUpload {
    const FIELDS: &'static [&'static str] = &["text", "id", "metadata"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unsupported_fields_are_named() {
        let body = |v: Value| v.to_string().into_bytes();
        let msgs = json!([{"role": "user", "content": "q"}]);
        let ok = decode_body::<ChatRequest>(&body(json!({
            "messages": msgs, "documents": ["a"], "retrieve": {"top_k": 1}, "kv": {},
            "stream": true, "stream_options": {"include_usage": true}, "user": "u",
            "frequency_penalty": 0, "logprobs": false, "tools": null,
        })))
        .expect("accepted");
        assert!(ok.sampling.stream_options.is_some_and(|o| o.include_usage));
        for (v, param, code) in [
            (
                json!({"messages": msgs, "documentz": []}),
                "documentz",
                "unknown_parameter",
            ),
            (
                json!({"messages": msgs, "logprobs": true}),
                "logprobs",
                "unsupported_parameter",
            ),
            (
                json!({"messages": msgs, "frequency_penalty": 1}),
                "frequency_penalty",
                "unsupported_parameter",
            ),
        ] {
            let e = decode_body::<ChatRequest>(&body(v)).unwrap_err();
            assert_eq!(
                (e.param.as_deref(), e.code.as_deref()),
                (Some(param), Some(code))
            );
        }
        let e = decode_body::<CompletionRequest>(&body(json!({"prompt": "p", "documents": []})))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("documents"));
        for nested in [
            json!({"messages": msgs, "retrieve": {"top_k": 1, "query": "x"}}),
            json!({"messages": [{"role": "user", "content": "q", "name": "n"}]}),
        ] {
            let e = decode_body::<ChatRequest>(&body(nested)).unwrap_err();
            assert!(e.message.contains("unknown field"), "{}", e.message);
        }
    }
}
