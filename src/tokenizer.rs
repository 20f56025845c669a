//! Tokenizer and chat template of a model, built from a GGUF file or a Hugging Face directory.
//!
//! `encode` never adds BOS/EOS: the engine assembles prompts from separately encoded pieces
//! (chat prefix, documents, question), so it decides itself where BOS goes (`add_bos`).

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use minijinja::{context, Environment};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use tokenizers::pre_tokenizers::{
    byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
};

/// One chat turn, as chat templates expect it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Token strings that end a turn in common chat formats, besides the declared EOS.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
];

/// Replaces the user message in `chat_wrap`; chosen so no template rewrites it.
const SENTINEL: &str = "SAMKVCONTENTSENTINEL7f3a9c";

/// Cheap to clone: the state is shared.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tk: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos: bool,
    eos_ids: Vec<u32>,
    /// Ids dropped by `decode` (control / special tokens).
    skip_ids: HashSet<u32>,
    /// Compiled chat template (`None`: plain "role: content" fallback).
    template: Option<Environment<'static>>,
    fingerprint: String,
}

fn tk_err(what: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{what}: {e}"))
}

fn gguf_u32(v: &gguf_file::Value) -> Option<u32> {
    use gguf_file::Value::*;
    match v {
        U8(x) => Some(u32::from(*x)),
        U16(x) => Some(u32::from(*x)),
        U32(x) => Some(*x),
        I32(x) => u32::try_from(*x).ok(),
        U64(x) => u32::try_from(*x).ok(),
        I64(x) => u32::try_from(*x).ok(),
        _ => None,
    }
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let mut tk = tokenizers::Tokenizer::from_gguf(content)
            .map_err(|e| Error::Tokenizer(format!("building tokenizer from GGUF: {e}")))?;
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
            .unwrap_or("");
        if pre == "smollm" {
            // candle falls back to plain GPT-2 ByteLevel here; SmolLM2 (StarCoder lineage) was
            // trained with every digit split off first, and without a prefix space.
            let seq: PreTokenizerWrapper = Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into();
            tk.with_pre_tokenizer(Some(seq));
        }
        let id = |key: &str| md.get(key).and_then(gguf_u32);
        let tokens = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok());
        let token_str = |id: u32| -> Option<String> {
            tokens
                .and_then(|t| t.get(id as usize))
                .and_then(|v| v.to_string().ok())
                .cloned()
        };
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);

        // Token types (llama.cpp): 2 unknown, 3 control, 5 unused are not text; 4
        // (user-defined, e.g. Qwen's <tool_call>) is text that decode must keep.
        let mut skip_ids = HashSet::new();
        if let Some(types) = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            for (i, t) in types.iter().enumerate() {
                if matches!(gguf_u32(t), Some(2 | 3 | 5)) {
                    skip_ids.insert(i as u32);
                }
            }
        }
        let eos = [
            eos_id,
            id("tokenizer.ggml.eot_token_id"),
            id("tokenizer.ggml.eom_token_id"),
        ];
        let template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok());
        Self::finish(
            Inner {
                bos_token: bos_id.and_then(token_str),
                eos_token: eos_id.and_then(token_str),
                tk,
                bos_id,
                add_bos,
                eos_ids: eos.into_iter().flatten().collect(),
                skip_ids,
                template: None,
                fingerprint: String::new(),
            },
            template.cloned(),
        )
    }

    /// Loads `tokenizer.json` plus, when present, `tokenizer_config.json` (special tokens,
    /// `add_bos_token`, `chat_template`), `chat_template.jinja` and `generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(Error::Tokenizer(format!(
                "no tokenizer.json in {}; a Hugging Face model directory needs one",
                dir.display()
            )));
        }
        let mut tk = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| Error::Tokenizer(format!("reading {}: {e}", tj.display())))?;
        // The engine does its own truncation and never pads.
        tk.with_truncation(None)
            .map_err(tk_err("disabling truncation"))?;
        tk.with_padding(None);

        let cfg = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let token_field = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_field("bos_token");
        let eos_token = token_field("eos_token");
        let bos_id = bos_token.as_deref().and_then(|t| tk.token_to_id(t));
        let add_bos = match cfg.get("add_bos_token").and_then(Json::as_bool) {
            Some(b) => b,
            // No explicit flag: see whether the post-processor would prepend BOS.
            None => match bos_id {
                Some(b) => {
                    let enc = tk.encode("a", true).map_err(tk_err("probing BOS"))?;
                    enc.get_ids().first() == Some(&b)
                }
                None => false,
            },
        };

        let mut eos = vec![eos_token.as_deref().and_then(|t| tk.token_to_id(t))];
        if let Some(gen) = read_json_opt(&dir.join("generation_config.json"))? {
            match gen.get("eos_token_id") {
                Some(Json::Number(n)) => eos.push(n.as_u64().and_then(|x| u32::try_from(x).ok())),
                Some(Json::Array(a)) => eos.extend(
                    a.iter()
                        .map(|n| n.as_u64().and_then(|x| u32::try_from(x).ok())),
                ),
                _ => {}
            }
        }
        let skip_ids = tk
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let template = hf_template(dir, &cfg)?;
        Self::finish(
            Inner {
                tk,
                bos_id,
                bos_token,
                eos_token,
                add_bos,
                eos_ids: eos.into_iter().flatten().collect(),
                skip_ids,
                template: None,
                fingerprint: String::new(),
            },
            template,
        )
    }

    /// Adds the conventional end-of-turn ids, the fingerprint and the compiled template.
    fn finish(mut inner: Inner, template: Option<String>) -> Result<Self> {
        let named = END_OF_TURN_TOKENS
            .iter()
            .filter_map(|t| inner.tk.token_to_id(t));
        let mut eos_ids: Vec<u32> = Vec::new();
        for id in inner.eos_ids.drain(..).chain(named) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        inner.eos_ids = eos_ids;
        let json = inner
            .tk
            .to_string(false)
            .map_err(tk_err("serializing tokenizer for its fingerprint"))?;
        let mut h = Sha256::new();
        h.update(b"samkv-tokenizer-v1\n");
        h.update(json.as_bytes());
        inner.fingerprint = hex::encode(h.finalize());
        inner.template = template.map(compile_template).transpose()?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) become
    /// their ids; no BOS/EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .tk
            .encode(text, false)
            .map_err(tk_err("encoding text"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, without special/control tokens (BOS, `<|im_end|>`, ...).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !self.inner.skip_ids.contains(id))
            .collect();
        self.decode_raw(&kept)
    }

    fn decode_raw(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .tk
            .decode(ids, false)
            .map_err(tk_err("decoding ids"))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos_id
    }

    /// Whether prompts should start with BOS.
    pub fn add_bos(&self) -> bool {
        self.inner.add_bos
    }

    /// All ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eos_ids
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.inner.eos_ids.contains(&id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.tk.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tk.token_to_id(token)
    }

    pub fn has_chat_template(&self) -> bool {
        self.inner.template.is_some()
    }

    /// Renders `messages` with the model's chat template; without one, "role: content\n" per
    /// message, then "assistant:" when a generation prompt is asked for.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(env) = &self.inner.template else {
            let mut s = String::new();
            for m in messages {
                s.push_str(&format!("{}: {}\n", m.role, m.content));
            }
            if add_generation_prompt {
                s.push_str("assistant:");
            }
            return Ok(s);
        };
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(format!("{e:#}")))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.inner.bos_token.as_deref().unwrap_or(""),
            eos_token => self.inner.eos_token.as_deref().unwrap_or(""),
        })
        .map_err(|e| Error::Template(format!("rendering: {e:#}")))
    }

    /// Text before and after the content of a single user message rendered with a generation
    /// prompt, so the engine can splice documents and question between them.
    pub fn chat_wrap(&self) -> Result<(String, String)> {
        self.chat_wrap_with(None, &[])
    }

    /// [`Tokenizer::chat_wrap`] after a system message (`None`: the template's own default,
    /// if it has one) and earlier turns, each in its role.
    pub fn chat_wrap_with(
        &self,
        system: Option<&str>,
        history: &[ChatMessage],
    ) -> Result<(String, String)> {
        let mut msgs: Vec<ChatMessage> = system
            .map(|s| ChatMessage::new("system", s))
            .into_iter()
            .chain(history.iter().cloned())
            .collect();
        msgs.push(ChatMessage::new("user", SENTINEL));
        let text = self.render_chat(&msgs, true)?;
        let mut parts = text.split(SENTINEL);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(pre), Some(post), None) => Ok((pre.to_string(), post.to_string())),
            _ => Err(Error::Template(
                "the chat template does not show a user message's content exactly once; \
                 it cannot be split around the prompt"
                    .into(),
            )),
        }
    }

    /// Stable sha256 (hex) of the whole tokenizer definition: vocab, merges, added tokens,
    /// normalizer and pre-tokenizer. Content-addresses cached KV.
    pub fn fingerprint(&self) -> String {
        self.inner.fingerprint.clone()
    }

    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new(self)
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::Tokenizer(format!("{} is not valid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The chat template of an HF directory: `tokenizer_config.json` (a string, or a list of
/// named templates of which "default" is used), else `chat_template.jinja` / `.json`.
fn hf_template(dir: &Path, cfg: &Json) -> Result<Option<String>> {
    match cfg.get("chat_template") {
        Some(Json::String(s)) => return Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some(n))
            };
            if let Some(t) = named("default").or_else(|| list.first()) {
                return Ok(t.get("template").and_then(Json::as_str).map(str::to_string));
            }
        }
        _ => {}
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(std::fs::read_to_string(jinja)?));
    }
    let json = read_json_opt(&dir.join("chat_template.json"))?;
    Ok(json.and_then(|j| {
        j.get("chat_template")
            .and_then(Json::as_str)
            .map(str::to_string)
    }))
}

/// A minijinja environment configured like transformers' (trim_blocks, lstrip_blocks,
/// Python string methods, `raise_exception`, `strftime_now`).
fn compile_template(src: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("template raised: {msg}"),
            ))
        },
    );
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_template_owned("chat", src)
        .map_err(|e| Error::Template(format!("compiling the model's chat template: {e:#}")))?;
    Ok(env)
}

/// Current UTC time formatted with the common strftime codes (Llama 3 templates print the
/// date); unknown codes are copied as written.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_time(secs, fmt)
}

fn format_time(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian, era-based).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let month = MONTHS[(m - 1) as usize];
    let weekday = DAYS[(days + 3).rem_euclid(7) as usize]; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Incremental detokenizer. Byte-level BPE splits characters across tokens, so text is only
/// released once it is valid UTF-8; the concatenated deltas equal `decode` of all ids.
pub struct StreamDecoder {
    tok: Tokenizer,
    ids: Vec<u32>,
    /// Start of the decode window: one already-released chunk is kept as context, since
    /// some decoders (SentencePiece-style) treat a leading space differently.
    prefix: usize,
    /// Ids before this index have been released as text.
    read: usize,
}

/// A UTF-8 character spans at most 4 bytes, so after this many held-back tokens an
/// unfinished character is truly invalid and is released as U+FFFD rather than stalling.
const MAX_PENDING: usize = 4;

impl StreamDecoder {
    pub fn new(tok: &Tokenizer) -> Self {
        Self {
            tok: tok.clone(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one generated id; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        if self.tok.inner.skip_ids.contains(&id) {
            return Ok(None);
        }
        self.ids.push(id);
        let text = self.tok.decode_raw(&self.ids[self.prefix..])?;
        let incomplete = text.ends_with('\u{FFFD}');
        if incomplete && self.ids.len() - self.read < MAX_PENDING {
            return Ok(None);
        }
        let delta = self.take_delta(&text)?;
        if incomplete {
            // Never look at those bytes again: later ids cannot repair released text.
            self.prefix = self.ids.len();
        }
        Ok((!delta.is_empty()).then_some(delta))
    }

    /// Releases whatever is still held back (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let text = self.tok.decode_raw(&self.ids[self.prefix..])?;
        let delta = self.take_delta(&text)?;
        Ok((!delta.is_empty()).then_some(delta))
    }

    fn take_delta(&mut self, text: &str) -> Result<String> {
        let released = self.tok.decode_raw(&self.ids[self.prefix..self.read])?;
        // The window re-decodes released text; strip it (by length should a decoder ever
        // render it differently in context).
        let delta = text
            .strip_prefix(released.as_str())
            .or_else(|| text.get(released.len()..))
            .unwrap_or_default()
            .to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }
}

#[cfg(test)]
mod tests;
