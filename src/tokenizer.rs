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
        let text = self.render_chat(&[ChatMessage::new("user", SENTINEL)], true)?;
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
mod tests {
    use super::*;
    use crate::fetch::test_model_path;
    use std::sync::OnceLock;

    fn load(name: &str) -> Tokenizer {
        let path = test_model_path(name);
        let mut f = std::fs::File::open(&path).expect("open model");
        let content = gguf_file::Content::read(&mut f).expect("read GGUF header");
        Tokenizer::from_gguf(&content).expect("build tokenizer")
    }

    fn smol() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| load("smollm2"))
    }

    fn qwen() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| load("qwen2.5-coder-0.5b"))
    }

    const UNICODE: &str =
        "Héllo wörld — naïve café, 日本語のテキスト、中文字符。 Ελληνικά Русский \
                           emoji 🦀🚀👩‍👩‍👧 ﷽ x² ½\ttab\n\nnew  lines   12345 3.14159";

    #[test]
    fn smollm2_splits_digits_individually() {
        let t = smol();
        let ids = t.encode("12345").unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| t.decode(&[i]).unwrap()).collect();
        assert_eq!(pieces, ["1", "2", "3", "4", "5"]);
        // Digits inside text as well, and no prefix space is invented.
        let ids = t.encode("in 2024").unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| t.decode(&[i]).unwrap()).collect();
        assert_eq!(pieces, ["in", " ", "2", "0", "2", "4"]);
    }

    /// The pre-tokenizers must match the HF tokenizer.json of each model family.
    #[test]
    fn pipelines_match_hf_layout() {
        let json = |t: &Tokenizer| -> Json {
            serde_json::from_str(&t.inner.tk.to_string(false).unwrap()).unwrap()
        };
        let s = json(smol());
        assert_eq!(
            s["pre_tokenizer"],
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": true}]})
        );
        assert!(s["normalizer"].is_null());
        let q = json(qwen());
        assert_eq!(q["normalizer"]["type"], "NFC");
        let pre = &q["pre_tokenizer"]["pretokenizers"];
        assert_eq!(pre[0]["type"], "Split");
        assert_eq!(pre[0]["behavior"], "Isolated");
        assert_eq!(pre[0]["invert"], false);
        assert!(pre[0]["pattern"]["Regex"]
            .as_str()
            .unwrap()
            .contains(r"\p{N}|"));
        assert_eq!(
            pre[1],
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                               "trim_offsets": false, "use_regex": false})
        );
    }

    #[test]
    fn known_ids() {
        assert_eq!(qwen().encode("Hello, world").unwrap(), [9707, 11, 1879]);
        assert_eq!(qwen().encode("12345").unwrap().len(), 5); // Qwen2 splits digits too
        assert_eq!(qwen().encode("Hello").unwrap(), [9707]);
        assert_eq!(smol().encode("Hello").unwrap(), [19556]);
        assert_eq!(smol().vocab_size(), 49_152);
        assert_eq!(qwen().vocab_size(), 151_936);
    }

    #[test]
    fn special_tokens_map_to_their_ids() {
        let t = smol();
        assert_eq!(t.encode("<|im_start|>").unwrap(), [1]);
        assert_eq!(t.encode("<|im_end|>").unwrap(), [2]);
        let ids = t.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(t.decode(&ids).unwrap(), "user\nHi");
        assert_eq!(t.bos_id(), Some(1));
        assert!(!t.add_bos());
        assert!(t.eos_ids().contains(&2) && t.eos_ids().contains(&0));

        let q = qwen();
        assert_eq!(q.encode("<|im_start|>").unwrap(), [151_644]);
        assert_eq!(q.encode("<|im_end|>").unwrap(), [151_645]);
        assert_eq!(q.encode("<|endoftext|>").unwrap(), [151_643]);
        assert!(!q.add_bos());
        assert_eq!(q.eos_ids().first(), Some(&151_645));
        assert!(q.eos_ids().contains(&151_643));
        assert!(q.is_eos(151_645) && !q.is_eos(9707));
        // User-defined tokens (type 4) are text: decode keeps them.
        let call = q.encode("<tool_call>").unwrap();
        assert_eq!(call.len(), 1);
        assert_eq!(q.decode(&call).unwrap(), "<tool_call>");
    }

    #[test]
    fn unicode_round_trip() {
        for t in [smol(), qwen()] {
            let ids = t.encode(UNICODE).unwrap();
            assert!(ids.len() > 20);
            assert_eq!(t.decode(&ids).unwrap(), UNICODE);
        }
    }

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", "What is 2+2?"),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "And 3+3?"),
        ]
    }

    #[test]
    fn chat_templates_render_chatml() {
        let convo = "<|im_start|>system\nYou are terse.<|im_end|>\n\
                     <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
                     <|im_start|>assistant\n4<|im_end|>\n\
                     <|im_start|>user\nAnd 3+3?<|im_end|>\n";
        for t in [smol(), qwen()] {
            assert!(t.has_chat_template());
            assert_eq!(t.render_chat(&conversation(), false).unwrap(), convo);
            assert_eq!(
                t.render_chat(&conversation(), true).unwrap(),
                format!("{convo}<|im_start|>assistant\n")
            );
        }
        // Without a system message each template inserts its own default.
        let user = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            smol().render_chat(&user, true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            qwen().render_chat(&user, true).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
             assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn chat_wrap_splits_around_content() {
        let (pre, post) = smol().chat_wrap().unwrap();
        assert_eq!(
            pre,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\n"
        );
        assert_eq!(post, "<|im_end|>\n<|im_start|>assistant\n");
        let (pre, post) = qwen().chat_wrap().unwrap();
        assert_eq!(
            pre,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
             assistant.<|im_end|>\n<|im_start|>user\n"
        );
        assert_eq!(post, "<|im_end|>\n<|im_start|>assistant\n");
        // Splicing content between the halves equals rendering it.
        let msg = [ChatMessage::new("user", "Q?")];
        assert_eq!(
            format!("{pre}Q?{post}"),
            qwen().render_chat(&msg, true).unwrap()
        );
    }

    #[test]
    fn stream_decoder_matches_whole_decode() {
        for t in [smol(), qwen()] {
            let mut ids = t.encode(UNICODE).unwrap();
            // Control tokens in the stream are skipped like in decode.
            ids.insert(3, t.eos_ids()[0]);
            // The test only means something if some token is a partial character.
            assert!(ids
                .iter()
                .any(|&i| t.decode(&[i]).unwrap().contains('\u{FFFD}')));
            let mut sd = t.stream_decoder();
            let mut out = String::new();
            let mut held = 0;
            for &id in &ids {
                match sd.push(id).unwrap() {
                    Some(delta) => {
                        assert!(!delta.contains('\u{FFFD}'), "partial char released");
                        out.push_str(&delta);
                    }
                    None => held += 1,
                }
            }
            if let Some(rest) = sd.finish().unwrap() {
                out.push_str(&rest);
            }
            assert!(held > 1);
            assert_eq!(out, t.decode(&ids).unwrap());
            assert_eq!(out, UNICODE);
        }
    }

    #[test]
    fn stream_decoder_flushes_unfinished_char() {
        let t = qwen();
        // Rare 4-byte characters are split into byte tokens.
        let ids = ["𓀀", "𐍈", "🜁", "𝔘"]
            .iter()
            .map(|c| t.encode(c).unwrap())
            .find(|ids| ids.len() > 1)
            .expect("some rare character spans several tokens");
        let mut sd = t.stream_decoder();
        assert_eq!(sd.push(ids[0]).unwrap(), None);
        assert_eq!(sd.finish().unwrap().as_deref(), Some("\u{FFFD}"));
        assert_eq!(sd.finish().unwrap(), None);
    }

    #[test]
    fn fingerprint_is_stable_and_distinct() {
        // The server shares tokenizers across threads.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Tokenizer>();
        send_sync::<StreamDecoder>();
        let a = smol().fingerprint();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, load("smollm2").fingerprint());
        assert_ne!(a, qwen().fingerprint());
    }

    /// Writes the SmolLM2 tokenizer as an HF directory and loads it back.
    #[test]
    fn hf_dir_matches_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let json = smol().inner.tk.to_string(false).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
        let template = smol().inner.template.as_ref().unwrap();
        let src = template.get_template("chat").unwrap().source().to_string();
        let cfg = serde_json::json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": true},
            "add_bos_token": false,
            "chat_template": src,
        });
        let cfg_path = dir.path().join("tokenizer_config.json");
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let gen = serde_json::json!({"eos_token_id": [2, 5]});
        std::fs::write(dir.path().join("generation_config.json"), gen.to_string()).unwrap();

        let hf = Tokenizer::from_hf_dir(dir.path()).unwrap();
        let ids = hf.encode(UNICODE).unwrap();
        assert_eq!(ids, smol().encode(UNICODE).unwrap());
        assert_eq!(hf.decode(&ids).unwrap(), UNICODE);
        assert_eq!(hf.bos_id(), Some(1));
        assert!(!hf.add_bos());
        assert_eq!(hf.eos_ids()[..2], [2, 5]);
        assert_eq!(hf.fingerprint(), smol().fingerprint());
        assert_eq!(
            hf.render_chat(&conversation(), true).unwrap(),
            smol().render_chat(&conversation(), true).unwrap()
        );

        // Without a template: plain "role: content" lines.
        std::fs::write(&cfg_path, r#"{"eos_token": "<|im_end|>"}"#).unwrap();
        let plain = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert!(!plain.has_chat_template());
        let msgs = [
            ChatMessage::new("system", "S"),
            ChatMessage::new("user", "U"),
        ];
        assert_eq!(
            plain.render_chat(&msgs, true).unwrap(),
            "system: S\nuser: U\nassistant:"
        );
        let (pre, post) = plain.chat_wrap().unwrap();
        assert_eq!((pre.as_str(), post.as_str()), ("user: ", "\nassistant:"));

        let empty = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_hf_dir(empty.path()).err().unwrap();
        assert!(err.to_string().contains("no tokenizer.json"));
    }

    #[test]
    fn template_helpers() {
        let env = compile_template(
            "{{ ' a b '.strip() }}|{{ 'Hi'.upper() }}|{{ messages | length }}".into(),
        )
        .unwrap();
        let out = env
            .get_template("chat")
            .unwrap()
            .render(context! { messages => vec![1, 2] })
            .unwrap();
        assert_eq!(out, "a b|HI|2");
        let env = compile_template("{{ raise_exception('only user and assistant roles') }}".into())
            .unwrap();
        let err = env.get_template("chat").unwrap().render(()).unwrap_err();
        assert!(format!("{err:#}").contains("only user and assistant roles"));
        assert_eq!(
            format_time(1_721_999_109, "%d %b %Y %H:%M:%S %%"),
            "26 Jul 2024 13:05:09 %"
        );
        assert_eq!(
            format_time(951_782_400, "%A %a %B %y %e %m"),
            "Tuesday Tue February 00 29 02"
        );
        assert_eq!(format_time(0, "%Y-%m-%d %A %q"), "1970-01-01 Thursday %q");
    }
}
