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

const UNICODE: &str = "Héllo wörld — naïve café, 日本語のテキスト、中文字符。 Ελληνικά Русский \
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
fn chat_wrap_keeps_the_system_role_and_earlier_turns() {
    let history = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello."),
    ];
    let (pre, post) = smol().chat_wrap_with(Some("Be brief."), &history).unwrap();
    // The given system message replaces the template's default one.
    assert_eq!(
        pre,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n"
    );
    assert_eq!(post, "<|im_end|>\n<|im_start|>assistant\n");
    let mut msgs = vec![ChatMessage::new("system", "Be brief.")];
    msgs.extend(history.iter().cloned());
    msgs.push(ChatMessage::new("user", "Q?"));
    for t in [smol(), qwen()] {
        let (pre, post) = t.chat_wrap_with(Some("Be brief."), &history).unwrap();
        assert_eq!(
            format!("{pre}Q?{post}"),
            t.render_chat(&msgs, true).unwrap()
        );
        assert_eq!(t.chat_wrap_with(None, &[]).unwrap(), t.chat_wrap().unwrap());
    }
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
    let env =
        compile_template("{{ ' a b '.strip() }}|{{ 'Hi'.upper() }}|{{ messages | length }}".into())
            .unwrap();
    let out = env
        .get_template("chat")
        .unwrap()
        .render(context! { messages => vec![1, 2] })
        .unwrap();
    assert_eq!(out, "a b|HI|2");
    let env =
        compile_template("{{ raise_exception('only user and assistant roles') }}".into()).unwrap();
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
