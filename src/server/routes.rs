//! HTTP handlers: request validation, document resolution and the OpenAI response shapes.
//! Model work is sent to the worker thread; blocking store and index calls run on tokio's
//! blocking pool.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::documents::{delete_document, get_document, list_documents, upload};
use super::guard::{ClientId, ClientSlot};
use super::openai::*;
use super::worker::{Event, GenerateWork, Job, Work};
use super::AppState;
use crate::engine::{Prompt, Sampling};
use crate::methods::Recompute;

pub(crate) type St = State<Arc<AppState>>;
pub(crate) type ApiResult = Result<Response, ApiError>;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.opts.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/documents", post(upload).get(list_documents))
        .route(
            "/v1/documents/{id}",
            get(get_document).delete(delete_document),
        )
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "this endpoint does not take that HTTP method",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(Extension(BodyLimit(body_limit)))
        // Outside the body limit (an unauthorized client learns nothing about it), inside
        // `track` (refusals are counted).
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        // Host, target and header checks come first: they need nothing but the request.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            super::guard::check_request,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// With `--api-key`: every route but /health needs `Authorization: Bearer KEY`, else 401 in
/// OpenAI's error shape (as OpenAI and vLLM answer). The key is compared, never logged.
async fn auth(State(st): St, req: Request, next: Next) -> Response {
    let Some(key) = &st.opts.api_key else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let message = match given {
        None => {
            "no API key given; send it as `Authorization: Bearer KEY` (the key the \
                 server was started with, --api-key or SAMKV_API_KEY)"
        }
        Some(v) => match v.strip_prefix("Bearer ").map(str::trim) {
            Some(k) if key.matches(k) => return next.run(req).await,
            Some(_) => {
                "incorrect API key; send the key the server was started with \
                        (--api-key or SAMKV_API_KEY)"
            }
            None => "the Authorization header must be `Bearer KEY`",
        },
    };
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
        .code("invalid_api_key")
        .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Counts every response by route template and status.
async fn track(State(st): St, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    st.metrics.request(&route, resp.status().as_u16());
    resp
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("internal error: {e}")))
}

async fn health(State(st): St) -> Json<Value> {
    let m = &st.metrics;
    Json(json!({
        "status": "ok",
        "model": st.models[0],
        "queued": m.queued.load(Relaxed),
        "running": m.active_sequences.load(Relaxed),
        "index": st.retriever.is_some(),
    }))
}

async fn metrics(State(st): St) -> ApiResult {
    let st2 = st.clone();
    let sample = blocking(move || st2.store_sample()).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(sample.as_ref()),
    )
        .into_response())
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "samkv"})
}

async fn models(State(st): St) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_json(&st.models[0])]}))
}

async fn model(State(st): St, super::DocPath(id): super::DocPath) -> ApiResult {
    check_model(&st, Some(&id))?;
    Ok(Json(model_json(&id)).into_response())
}

/// A request's `model` must name the served model (its listed id or one of its aliases);
/// leaving it out means that one.
fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !st.models.iter().any(|id| id == m) => Err(ApiError::not_found(format!(
            "model `{m}` is not served here; this server runs `{}` (GET /v1/models)",
            st.models[0]
        ))
        .param("model")
        .code("model_not_found")),
        _ => Ok(()),
    }
}

// ---- validation --------------------------------------------------------------------------

fn sampling(st: &AppState, f: &SamplingFields) -> Result<Sampling, ApiError> {
    let limit = st.opts.max_tokens_limit.min(st.max_context);
    parse_sampling(f, limit, st.opts.default_max_tokens)
}

fn check_text(st: &AppState, text: &str, param: &str) -> Result<(), ApiError> {
    check_document_text(text, st.opts.max_document_tokens, param)
}

/// A document of a chat request, resolved to its text.
struct Resolved {
    id: Option<String>,
    text: String,
    source: &'static str,
    score: Option<f32>,
}

fn resolve_documents(
    st: &AppState,
    refs: Vec<DocRef>,
    retrieve: Option<Retrieve>,
    query: &str,
) -> Result<Vec<Resolved>, ApiError> {
    let max = st.opts.max_documents;
    if refs.len() > max {
        return Err(ApiError::invalid(format!(
            "{} documents given; this server takes at most {max} (--max-documents)",
            refs.len()
        ))
        .param("documents")
        .code("too_many_documents"));
    }
    let mut out = Vec::with_capacity(refs.len());
    for (i, r) in refs.into_iter().enumerate() {
        let param = format!("documents[{i}]");
        match r {
            DocRef::Inline(text) => {
                check_text(st, &text, &param)?;
                out.push(Resolved {
                    id: None,
                    text,
                    source: "inline",
                    score: None,
                });
            }
            DocRef::Id(id) => {
                // A registry that cannot be read is 503, not "not found".
                let rec = st.registry.get(&id).map_err(|e| st.store_error(e))?;
                let text = match rec {
                    Some(r) => Some(r.text),
                    None => match &st.retriever {
                        Some(ix) => ix.get(&id).map_err(ApiError::from)?,
                        None => None,
                    },
                };
                let text = text.ok_or_else(|| {
                    ApiError::not_found(format!(
                        "document `{id}` not found; upload it with POST /v1/documents or send {{\"text\": ...}}"
                    ))
                    .param(param.clone())
                })?;
                out.push(Resolved {
                    id: Some(id),
                    text,
                    source: "id",
                    score: None,
                });
            }
        }
    }
    if let Some(r) = retrieve {
        let Some(ix) = &st.retriever else {
            return Err(ApiError::invalid(
                "retrieve needs a document index; start the server with --index DIR",
            )
            .param("retrieve"));
        };
        let room = max - out.len();
        if r.top_k == 0 || r.top_k as usize > room {
            return Err(ApiError::invalid(format!(
                "retrieve.top_k must be between 1 and {room} (--max-documents {max} minus the documents given)"
            ))
            .param("retrieve.top_k"));
        }
        // Fetch extra so documents also given explicitly do not use up top_k.
        let hits = ix.search(query, r.top_k as usize + out.len())?;
        let mut added = 0;
        for h in hits {
            if added == r.top_k as usize {
                break;
            }
            if out.iter().any(|d| d.id.as_deref() == Some(h.id.as_str())) {
                continue;
            }
            out.push(Resolved {
                id: Some(h.id),
                text: h.text,
                source: "retrieved",
                score: Some(h.score),
            });
            added += 1;
        }
    }
    Ok(out)
}

/// The engine prompt of a chat. System text is the chat template's system role. Without
/// documents the conversation is the model's own chat, turn by turn. With documents they
/// sit in the LongBench layout `samkv ask` uses (so uploads and ingests share their KV with
/// chats), and earlier turns go after them, before the question, so that documents' KV does
/// not depend on the conversation.
fn chat_prompt(conv: &Conversation, docs: &[String]) -> Prompt {
    let system = (!conv.system.is_empty()).then(|| conv.system.clone());
    if docs.is_empty() {
        return Prompt {
            question: conv.question.clone(),
            system,
            history: conv.history.clone(),
            ..Default::default()
        };
    }
    let rp = Prompt::for_question(docs, &conv.question);
    let history = conv.history_text();
    let question = if history.is_empty() {
        rp.question
    } else {
        rp.question
            .replacen("Question: ", &format!("{history}Question: "), 1)
    };
    Prompt {
        preamble: rp.preamble,
        documents: rp.documents,
        question,
        system,
        history: Vec::new(),
    }
}

// ---- generation --------------------------------------------------------------------------

pub(crate) fn submit(
    st: &AppState,
    client: &ClientId,
    work: Work,
) -> Result<(UnboundedReceiver<Event>, ClientSlot), ApiError> {
    let max = st.opts.limits.max_requests_per_client;
    let slot = st.clients.try_acquire(&client.0, max).ok_or_else(|| {
        st.metrics.rejected_full.fetch_add(1, Relaxed);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            format!(
                "this client already has {max} requests queued or running \
                 (--max-requests-per-client); wait for one to finish"
            ),
        )
        .code("too_many_concurrent_requests")
    })?;
    let permit = st.gate.try_acquire().ok_or_else(|| {
        st.metrics.rejected_full.fetch_add(1, Relaxed);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            format!(
                "the server is busy ({} requests queued or running, --queue); retry shortly",
                st.opts.queue
            ),
        )
        .code("rate_limit_exceeded")
    })?;
    let (tx, rx) = unbounded_channel();
    let job = Job {
        work,
        events: tx,
        received: Instant::now(),
        permit,
    };
    st.jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| ApiError::internal("the model thread has stopped; restart the server"))?;
    // The client's slot is held by the HTTP side (the handler, or the stream), so it is free
    // as soon as the client has its answer or its deadline error.
    Ok((rx, slot))
}

pub(crate) fn worker_gone() -> ApiError {
    ApiError::internal("the model thread stopped during the request")
}

/// Sends the work, waits for its first token, then answers with JSON or an SSE stream.
/// The per-request deadline passed: the request is dropped (the worker sees its channel
/// closed and stops it).
pub(crate) fn deadline_passed(st: &AppState) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "server_error",
        format!(
            "the request did not finish within {} s (--request-timeout-secs); ask for fewer \
             max_tokens or retry when the server is less busy",
            st.opts.limits.request_timeout_secs
        ),
    )
    .code("timeout")
}

/// Waits for the next event, or None once `deadline` passes.
pub(crate) async fn next_event(
    rx: &mut UnboundedReceiver<Event>,
    deadline: tokio::time::Instant,
) -> Option<Option<Event>> {
    tokio::time::timeout_at(deadline, rx.recv()).await.ok()
}

async fn generate(
    st: &AppState,
    client: &ClientId,
    work: GenerateWork,
    mut reply: Reply,
    stream: bool,
    include_usage: bool,
) -> ApiResult {
    let deadline = tokio::time::Instant::now() + st.opts.limits.request_timeout();
    let (mut rx, slot) = submit(st, client, Work::Generate(Box::new(work)))?;
    // Errors found while assembling (context too long, document too long) still get a 4xx.
    let (usage, method) = match next_event(&mut rx, deadline).await {
        None => return Err(deadline_passed(st)),
        Some(Some(Event::Started { mut usage, method })) => {
            if st.opts.private_cache {
                usage.cached_tokens = 0;
                usage.prompt_tokens_details.cached_tokens = 0;
            }
            (usage, method)
        }
        Some(Some(Event::Failed(e))) => return Err(e),
        _ => return Err(worker_gone()),
    };
    if let Value::Object(m) = &mut reply.extra {
        m.insert("method".into(), json!(method));
    }
    if !stream {
        let mut text = String::new();
        loop {
            let Some(ev) = next_event(&mut rx, deadline).await else {
                return Err(deadline_passed(st));
            };
            match ev {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done {
                    finish,
                    completion_tokens,
                }) => {
                    let u = complete_usage(usage, completion_tokens);
                    return Ok(Json(reply.full(&text, finish_reason(finish), &u)).into_response());
                }
                Some(Event::Failed(e)) => return Err(e),
                _ => return Err(worker_gone()),
            }
        }
    }
    let mut first = VecDeque::new();
    if reply.chat {
        first.push_back(reply.chunk(true, Some(""), None));
    }
    struct S {
        rx: UnboundedReceiver<Event>,
        out: VecDeque<String>,
        ended: bool,
        reply: Reply,
        usage: Usage,
        include_usage: bool,
        deadline: tokio::time::Instant,
        timed_out: ApiError,
        _slot: ClientSlot,
    }
    let s = S {
        rx,
        out: first,
        ended: false,
        reply,
        usage,
        include_usage,
        deadline,
        timed_out: deadline_passed(st),
        _slot: slot,
    };
    // Dropping this stream (client gone) drops `rx`, which the worker sees as cancellation.
    let events = futures::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(d) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(d)), s));
            }
            if s.ended {
                return None;
            }
            let Some(ev) = next_event(&mut s.rx, s.deadline).await else {
                s.out.push_back(s.timed_out.body().to_string());
                s.out.push_back("[DONE]".into());
                s.ended = true;
                continue;
            };
            match ev {
                Some(Event::Text(t)) => s.out.push_back(s.reply.chunk(false, Some(&t), None)),
                Some(Event::Done {
                    finish,
                    completion_tokens,
                }) => {
                    s.out
                        .push_back(s.reply.chunk(false, None, Some(finish_reason(finish))));
                    if s.include_usage {
                        let u = complete_usage(s.usage.clone(), completion_tokens);
                        s.out.push_back(s.reply.usage_chunk(&u));
                    }
                    s.out.push_back("[DONE]".into());
                    s.ended = true;
                }
                other => {
                    let e = match other {
                        Some(Event::Failed(e)) => e,
                        _ => worker_gone(),
                    };
                    s.out.push_back(e.body().to_string());
                    s.out.push_back("[DONE]".into());
                    s.ended = true;
                }
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn chat(
    State(st): St,
    Extension(client): Extension<ClientId>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> ApiResult {
    check_model(&st, req.model.as_deref())?;
    let conv = parse_messages(&req.messages)?;
    let sampling = sampling(&st, &req.sampling)?;
    let method = parse_method(&st.defaults, req.kv.as_ref())?;
    let refs = parse_documents(&req.documents)?;
    let (st2, q, retrieve) = (st.clone(), conv.question.clone(), req.retrieve.clone());
    let docs = blocking(move || resolve_documents(&st2, refs, retrieve, &q)).await??;
    let extra = json!({"documents": docs.iter().map(|d| json!({
        "id": d.id, "source": d.source, "score": d.score,
    })).collect::<Vec<_>>()});
    let texts: Vec<String> = docs.into_iter().map(|d| d.text).collect();
    let work = GenerateWork {
        prompt: chat_prompt(&conv, &texts),
        method,
        sampling,
        ignore_eos: req.sampling.ignore_eos,
        raw: false,
    };
    let reply = Reply::new(&st.models[0], true, extra);
    generate(
        &st,
        &client,
        work,
        reply,
        req.sampling.stream,
        req.sampling.include_usage(),
    )
    .await
}

async fn completions(
    State(st): St,
    Extension(client): Extension<ClientId>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> ApiResult {
    check_model(&st, req.model.as_deref())?;
    let prompt = completion_prompt(&req.prompt)?;
    let sampling = sampling(&st, &req.sampling)?;
    let work = GenerateWork {
        prompt: Prompt {
            question: prompt,
            ..Default::default()
        },
        method: Box::new(Recompute),
        sampling,
        ignore_eos: req.sampling.ignore_eos,
        raw: true,
    };
    let reply = Reply::new(&st.models[0], false, json!({}));
    generate(
        &st,
        &client,
        work,
        reply,
        req.sampling.stream,
        req.sampling.include_usage(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(system: &str, history: &[(&str, &str)]) -> Conversation {
        Conversation {
            system: system.into(),
            history: history
                .iter()
                .map(|(r, c)| crate::tokenizer::ChatMessage::new(*r, *c))
                .collect(),
            question: "Who?".into(),
        }
    }

    #[test]
    fn chat_prompt_matches_ask_without_system() {
        let docs = vec!["A doc.".to_string()];
        let p = chat_prompt(&conv("", &[]), &docs);
        let rp = Prompt::for_question(&docs, "Who?");
        assert_eq!(
            (p.preamble, p.documents, p.question),
            (rp.preamble, rp.documents, rp.question)
        );
    }

    #[test]
    fn chat_prompt_places_system_and_history() {
        let docs = vec!["A doc.".to_string()];
        let turns = [("user", "hi"), ("assistant", "hello")];
        let p = chat_prompt(&conv("Be terse.", &turns), &docs);
        // The system message is the template's system role; the RAG preamble stays.
        assert_eq!(p.system.as_deref(), Some("Be terse."));
        assert_eq!(p.preamble, Prompt::for_question(&docs, "Who?").preamble);
        assert!(p.history.is_empty());
        assert!(
            p.question
                .contains("User: hi\nAssistant: hello\nQuestion: Who?"),
            "{}",
            p.question
        );
        // Without documents: the model's own chat, turn by turn.
        let p = chat_prompt(&conv("S", &turns[..1]), &[]);
        assert_eq!((p.system.as_deref(), p.preamble.as_str()), (Some("S"), ""));
        assert_eq!(p.question, "Who?");
        assert_eq!(p.history.len(), 1);
        assert!(p.documents.is_empty());
        assert_eq!(chat_prompt(&conv("", &[]), &[]).system, None);
    }
}
