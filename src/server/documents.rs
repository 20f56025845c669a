//! `/v1/documents`: upload, paginated listing, read and delete. The registry in the store is
//! the source of truth ([`super::registry`]); an upload is answered 200 only once both its KV
//! and its record are durable in the store, else 507 (store full) or 503 (store unreachable).

use std::sync::atomic::Ordering::Relaxed;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Extension;
use axum::Json;
use serde_json::{json, Value};

use super::guard::ClientId;
use super::openai::{upload_id, ApiError, ApiJson, DocumentUpload};
use super::registry::{valid_id, DocRecord, Inserted};
use super::routes::{blocking, deadline_passed, next_event, submit, worker_gone, ApiResult, St};
use super::worker::{Event, Work};
use super::{AppState, DocPath};
use crate::store::{now_unix, DocId};

/// Default and largest `limit` of `GET /v1/documents`.
pub const LIST_DEFAULT: usize = 100;
pub const LIST_MAX: usize = 1000;

fn doc_json(r: &DocRecord, with_text: bool) -> Value {
    let mut v = json!({
        "id": r.id, "object": "document", "tokens": r.tokens, "bytes": r.text.len(),
        "kv_id": r.kv_id, "metadata": r.metadata, "created": r.created,
    });
    if with_text {
        v["text"] = json!(r.text);
    }
    v
}

fn conflict(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "invalid_request_error",
        format!("document `{id}` already exists with another text; DELETE it first"),
    )
    .param("id")
    .code("document_exists")
}

pub(crate) async fn upload(
    State(st): St,
    Extension(client): Extension<ClientId>,
    ApiJson(req): ApiJson<DocumentUpload>,
) -> ApiResult {
    let deadline = tokio::time::Instant::now() + st.opts.limits.request_timeout();
    let id = upload_id(&req, st.opts.max_document_tokens)?;
    // A cheap early refusal; the atomic check is the insert below.
    let (st2, id2) = (st.clone(), id.clone());
    let old = blocking(move || st2.registry.get(&id2))
        .await?
        .map_err(|e| st.store_error(e))?;
    if old.as_ref().is_some_and(|o| o.text != req.text) {
        return Err(conflict(&id));
    }
    let (mut rx, _slot) = submit(
        &st,
        &client,
        Work::Ingest {
            text: req.text.clone(),
        },
    )?;
    let (kv_id, tokens, cached) = match next_event(&mut rx, deadline).await {
        None => return Err(deadline_passed(&st)),
        Some(Some(Event::Ingested {
            kv_id,
            tokens,
            cached,
        })) => (kv_id, tokens, cached),
        Some(Some(Event::Failed(e))) if e.status.is_server_error() => return Err(e),
        Some(Some(Event::Failed(e))) => return Err(e.param("text")),
        _ => return Err(worker_gone()),
    };
    // Uploading the same document again keeps its metadata unless new metadata is given.
    let (metadata, created) = match old {
        Some(o) if req.metadata.is_null() => (o.metadata, o.created),
        _ => (req.metadata, now_unix()),
    };
    let rec = DocRecord {
        id: id.clone(),
        text: req.text,
        metadata,
        tokens,
        kv_id,
        created,
    };
    let (st2, rec2) = (st.clone(), rec.clone());
    let inserted = blocking(move || st2.registry.insert(rec2))
        .await?
        .map_err(|e| st.store_error(e))?;
    if let Inserted::Conflict(_) = inserted {
        return Err(conflict(&id));
    }
    if let Some(ix) = st.retriever.clone() {
        let pair = (rec.id.clone(), rec.text.clone());
        blocking(move || ix.add(&[pair])).await??;
    }
    st.metrics.documents.fetch_add(1, Relaxed);
    let mut v = doc_json(&rec, false);
    // With --private-cache, whether the text was already stored (perhaps by another
    // client) is not told: it would let a client test guesses of others' documents.
    v["cached"] = if st.opts.private_cache {
        Value::Null
    } else {
        json!(cached)
    };
    Ok(Json(v).into_response())
}

/// `limit` and `after` of a listing, checked.
fn list_params(query: Option<&str>) -> Result<(usize, Option<String>), ApiError> {
    let (mut limit, mut after) = (LIST_DEFAULT, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=LIST_MAX).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(format!("limit must be between 1 and {LIST_MAX}"))
                            .param("limit")
                    })?
            }
            "after" => {
                if !valid_id(v) {
                    return Err(ApiError::invalid(
                        "after must be a document id (the last_id of the previous page)",
                    )
                    .param("after"));
                }
                after = Some(v.to_string());
            }
            "order" if v == "asc" => {}
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter `{other}`; use limit and after (order=asc)"
                ))
                .param(other.to_string()))
            }
        }
    }
    Ok((limit, after))
}

pub(crate) async fn list_documents(State(st): St, RawQuery(q): RawQuery) -> ApiResult {
    let (limit, after) = list_params(q.as_deref())?;
    let st2 = st.clone();
    let page = blocking(move || st2.registry.list(after.as_deref(), limit))
        .await?
        .map_err(|e| st.store_error(e))?;
    let data: Vec<Value> = page.data.iter().map(|r| doc_json(r, false)).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": page.data.first().map(|r| &r.id),
        "last_id": page.data.last().map(|r| &r.id),
        "has_more": page.has_more,
    }))
    .into_response())
}

pub(crate) async fn get_document(State(st): St, DocPath(id): DocPath) -> ApiResult {
    let id2 = id.clone();
    let found = blocking(move || -> Result<Option<Value>, ApiError> {
        if let Some(r) = st.registry.get(&id2).map_err(|e| st.store_error(e))? {
            return Ok(Some(doc_json(&r, true)));
        }
        // Documents ingested into the index by `samkv ingest --index`.
        match &st.retriever {
            Some(ix) => Ok(ix.get(&id2)?.map(|text| {
                json!({"id": id2, "object": "document", "bytes": text.len(), "text": text, "source": "index"})
            })),
            None => Ok(None),
        }
    })
    .await??;
    found
        .map(|v| Json(v).into_response())
        .ok_or_else(|| ApiError::not_found(format!("document `{id}` not found")))
}

fn delete_blocking(st: &AppState, id: &str) -> Result<bool, ApiError> {
    let rec = st.registry.remove(id).map_err(|e| st.store_error(e))?;
    let mut any = rec.is_some();
    if let Some(ix) = &st.retriever {
        any |= ix.remove(id)?;
    }
    // The KV entry goes too, unless another id names the same text. It is a cache of the
    // text (recomputed when missing), so a failure here is logged, not an error.
    if let Some(rec) = rec {
        match st.registry.kv_in_use(&rec.kv_id) {
            Ok(false) => {
                if let Ok(kv) = DocId::parse(&rec.kv_id) {
                    if let Err(e) = st.store.remove(&kv) {
                        tracing::warn!("could not remove the KV of document {id}: {e}");
                    }
                }
            }
            Ok(true) => {}
            Err(e) => tracing::warn!("kept the KV of document {id}: {e}"),
        }
    }
    Ok(any)
}

pub(crate) async fn delete_document(State(st): St, DocPath(id): DocPath) -> ApiResult {
    let id2 = id.clone();
    let deleted = blocking(move || delete_blocking(&st, &id2)).await??;
    if !deleted {
        return Err(ApiError::not_found(format!("document `{id}` not found")));
    }
    Ok(Json(json!({"id": id, "object": "document", "deleted": true})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_params_are_checked() {
        assert_eq!(list_params(None).unwrap(), (LIST_DEFAULT, None));
        assert_eq!(
            list_params(Some("limit=5&after=doc-1")).unwrap(),
            (5, Some("doc-1".into()))
        );
        for (q, p) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=18446744073709551616", "limit"),
            ("after=..", "after"),
            ("page=2", "page"),
        ] {
            assert_eq!(
                list_params(Some(q)).unwrap_err().param.as_deref(),
                Some(p),
                "{q}"
            );
        }
    }
}
