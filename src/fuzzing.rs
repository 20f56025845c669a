//! Entry points for the fuzz targets in `fuzz/` (cargo fuzz, nightly) and for
//! `tests/fuzz_corpus.rs`, which replays their corpora on stable Rust.
//!
//! Each function takes arbitrary bytes. Rejecting them is fine; a panic is a bug: either in
//! the code under test or an invariant asserted here that the code broke.

use std::sync::OnceLock;

use crate::engine::Sampling;
use crate::methods::MethodConfig;
use crate::server::openai::{
    check_document_text, completion_prompt, content_text, decode_body, parse_documents,
    parse_messages, parse_method, parse_sampling, upload_id, ApiError, ChatRequest,
    CompletionRequest, DocRef, DocumentUpload,
};
use crate::store::format::{decode, encode, read_meta_json_from};
use crate::store::{DocId, DocMeta, StoredDoc};

/// `samkv serve`'s defaults for the limits the request checks use.
const MAX_TOKENS_LIMIT: usize = 4096;
const DEFAULT_MAX_TOKENS: usize = 256;
const MAX_DOCUMENT_TOKENS: usize = 4096;

/// One store entry file: the full decoder ([`decode`]) and the header-only reader used for
/// listings ([`read_meta_json_from`]). An accepted entry must also be accepted under its own
/// id, refused under another, readable by the listing reader, and re-encode to an entry that
/// decodes to the same document.
pub fn store_decode(data: &[u8]) {
    let listed = read_meta_json_from(&mut &data[..]);
    let Ok(doc) = decode(data, None) else {
        return;
    };
    if let Err(e) = decode(data, Some(&doc.id)) {
        panic!("entry decodes, but not under its own id {}: {e}", doc.id);
    }
    let other = DocId("0".repeat(64));
    if other != doc.id {
        assert!(
            decode(data, Some(&other)).is_err(),
            "entry decodes under an id that is not its own"
        );
    }
    let listed = listed.unwrap_or_else(|e| panic!("entry decodes but its listing fails: {e}"));
    let listed: DocMeta = serde_json::from_value(listed)
        .unwrap_or_else(|e| panic!("entry decodes but its listed meta does not: {e}"));
    assert_eq!(listed, doc.meta, "listing and decoder read different metas");
    let bytes = encode(&doc).unwrap_or_else(|e| panic!("decoded entry does not re-encode: {e}"));
    let back = decode(&bytes, Some(&doc.id))
        .unwrap_or_else(|e| panic!("re-encoded entry does not decode: {e}"));
    assert_same_doc(&doc, &back);
}

fn tensor_bytes(t: &candle_core::Tensor) -> Vec<u8> {
    let mut b = Vec::new();
    t.write_bytes(&mut b).expect("tensor bytes");
    b
}

fn assert_same_doc(a: &StoredDoc, b: &StoredDoc) {
    assert_eq!(a.id, b.id);
    assert_eq!(a.meta, b.meta);
    let named = |d: &StoredDoc| {
        d.k.iter()
            .chain(&d.v)
            .chain(&d.k_scale)
            .chain(&d.v_scale)
            .chain(d.side.values())
            .map(|t| (t.dtype(), t.dims().to_vec(), tensor_bytes(t)))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        a.side.keys().collect::<Vec<_>>(),
        b.side.keys().collect::<Vec<_>>()
    );
    assert!(named(a) == named(b), "re-encoded entry has other tensors");
}

fn default_method() -> &'static MethodConfig {
    static D: OnceLock<MethodConfig> = OnceLock::new();
    D.get_or_init(MethodConfig::default)
}

/// One HTTP request body, as each JSON endpoint decodes it, followed by the checks the server
/// runs before any model work: chat (messages, sampling, `kv`, documents, inline document
/// texts), text completion (prompt, sampling) and document upload (text, id).
pub fn request_decode(data: &[u8]) {
    if let Ok(req) = decode_body::<ChatRequest>(data) {
        if let Ok(conv) = parse_messages(&req.messages) {
            assert!(!conv.question.trim().is_empty(), "empty question accepted");
        }
        check_sampling(&parse_sampling(
            &req.sampling,
            MAX_TOKENS_LIMIT,
            DEFAULT_MAX_TOKENS,
        ));
        let _ = parse_method(default_method(), req.kv.as_ref());
        if let Ok(refs) = parse_documents(&req.documents) {
            assert_eq!(refs.len(), req.documents.len());
            for (i, r) in refs.iter().enumerate() {
                if let DocRef::Inline(text) = r {
                    let _ =
                        check_document_text(text, MAX_DOCUMENT_TOKENS, &format!("documents[{i}]"));
                }
            }
        }
        for (i, m) in req.messages.iter().enumerate() {
            let _ = content_text(&m.content, i);
        }
    }
    if let Ok(req) = decode_body::<CompletionRequest>(data) {
        if let Ok(p) = completion_prompt(&req.prompt) {
            assert!(!p.trim().is_empty(), "empty prompt accepted");
        }
        check_sampling(&parse_sampling(
            &req.sampling,
            MAX_TOKENS_LIMIT,
            DEFAULT_MAX_TOKENS,
        ));
    }
    if let Ok(req) = decode_body::<DocumentUpload>(data) {
        let _ = upload_id(&req, MAX_DOCUMENT_TOKENS);
    }
}

/// Accepted sampling settings are within the ranges the server promises, and the engine
/// (which checks them again on the model thread) accepts them too.
fn check_sampling(s: &Result<Sampling, ApiError>) {
    if let Ok(s) = s {
        assert!((1..=MAX_TOKENS_LIMIT).contains(&s.max_new_tokens));
        assert!(s.stop.len() <= 4 && s.stop.iter().all(|x| !x.is_empty()));
        if let Err(e) = s.validate() {
            panic!("request sampling accepted but the engine refuses it: {e} ({s:?})");
        }
    }
}
