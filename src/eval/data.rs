//! Multi-document QA loaders. The format is recognised from the content of the first record,
//! never from the file name, and every record of the file is then read with that format:
//!
//! - CacheBlend (`inputs/*.json` of the CacheBlend repo): `ctxs` = [{title, text}], `question`,
//!   `answers` = list[str] or list[list[str]]. For list[list[str]] CacheBlend's
//!   `blend_wikimqa.py` scores `max(f1(pred, answer[0]) for answer in answers)`, so the first
//!   string of each inner list is kept.
//! - LongBench (`hotpotqa.jsonl`, `2wikimqa.jsonl`, `musique.jsonl`): `context` is one string
//!   of `Passage N:\n...` blocks joined by `\n`, `input`, `answers`, `_id`.
//! - Official HotpotQA / 2WikiMultihopQA: `context` = [[title, [sentence, ...]], ...],
//!   `question`, `answer`, `_id`.
//! - Official MuSiQue: `paragraphs` = [{idx, title, paragraph_text, is_supporting}],
//!   `question`, `answer`, `answer_aliases`, `id`.
//!
//! A file is either a JSON array of records or JSON Lines (one record a line; blank lines are
//! skipped). An example's id is the source id when there is one, else its 0-based position
//! among the file's records.
//!
//! Errors are `Error::Data { path, line, msg }`: `line` is the 1-based line of a JSON Lines
//! file, or the 1-based element number of a JSON array (its syntax errors give the file line
//! instead); `line` 0 means the file as a whole (unreadable).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Document {
    pub title: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub id: String,
    pub question: String,
    pub documents: Vec<Document>,
    pub answers: Vec<String>,
}

/// The source formats `load_examples` understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    CacheBlend,
    LongBench,
    /// Official HotpotQA and 2WikiMultihopQA share one schema.
    HotpotWiki,
    Musique,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::CacheBlend => "CacheBlend",
            Format::LongBench => "LongBench",
            Format::HotpotWiki => "HotpotQA/2WikiMultihopQA",
            Format::Musique => "MuSiQue",
        }
    }

    /// Recognises the format from one record's keys.
    pub fn detect(record: &Map<String, Value>) -> Option<Format> {
        if record.contains_key("ctxs") {
            return Some(Format::CacheBlend);
        }
        if record.contains_key("paragraphs") {
            return Some(Format::Musique);
        }
        match record.get("context") {
            Some(Value::String(_)) => Some(Format::LongBench),
            Some(Value::Array(_)) => Some(Format::HotpotWiki),
            _ => None,
        }
    }
}

/// One record as read from the file, with where it came from (for error messages).
struct Raw {
    /// 1-based file line (JSON Lines) or element number (JSON array).
    line: usize,
    value: Value,
}

/// Loads every example of a CacheBlend, LongBench, HotpotQA, 2WikiMultihopQA or MuSiQue file.
pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: 0,
        msg: format!("cannot read the file as UTF-8 text: {e}"),
    })?;
    parse_examples(path, &text)
}

/// Parses the text of a data file; `path` only names the file in errors.
pub fn parse_examples(path: &Path, text: &str) -> Result<Vec<Example>> {
    let err = |line: usize, msg: String| Error::Data {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(err(
            1,
            "the file is empty; expected a JSON array or JSON Lines of QA records".into(),
        ));
    }
    let is_array = trimmed.starts_with('[');
    let records = if is_array {
        read_array(text).map_err(|(line, msg)| err(line, msg))?
    } else {
        read_jsonl(text).map_err(|(line, msg)| err(line, msg))?
    };
    let where_ = |line: usize| {
        if is_array {
            format!("JSON array element {line} (counting from 1)")
        } else {
            "record".to_string()
        }
    };

    let first = records
        .first()
        .ok_or_else(|| err(1, "the file holds no QA records".into()))?;
    let first_obj = as_object(&first.value)
        .map_err(|m| err(first.line, format!("{}: {m}", where_(first.line))))?;
    let format = Format::detect(first_obj).ok_or_else(|| {
        let keys: Vec<&str> = first_obj.keys().map(String::as_str).collect();
        err(
            first.line,
            format!(
                "{}: unknown format (keys: {keys:?}); expected CacheBlend (`ctxs`), LongBench \
                 (`context` string), HotpotQA/2WikiMultihopQA (`context` list) or MuSiQue \
                 (`paragraphs`)",
                where_(first.line)
            ),
        )
    })?;

    records
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            parse_record(format, index, &raw.value).map_err(|m| {
                err(
                    raw.line,
                    format!(
                        "{}: {m} (file read as {} format, recognised from its first record)",
                        where_(raw.line),
                        format.name()
                    ),
                )
            })
        })
        .collect()
}

fn read_jsonl(text: &str) -> std::result::Result<Vec<Raw>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(line).map_err(|e| {
            (
                i + 1,
                format!("invalid JSON: {e} (JSON Lines needs one complete record per line)"),
            )
        })?;
        out.push(Raw { line: i + 1, value });
    }
    Ok(out)
}

fn read_array(text: &str) -> std::result::Result<Vec<Raw>, (usize, String)> {
    let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        (
            e.line().max(1),
            format!("invalid JSON array: {e} (the line is the file line)"),
        )
    })?;
    if values.is_empty() {
        return Err((1, "the JSON array is empty; it has no QA records".into()));
    }
    Ok(values
        .into_iter()
        .enumerate()
        .map(|(i, value)| Raw { line: i + 1, value })
        .collect())
}

fn parse_record(
    format: Format,
    index: usize,
    value: &Value,
) -> std::result::Result<Example, String> {
    let obj = as_object(value)?;
    let id = source_id(obj, index)?;
    match format {
        Format::CacheBlend => {
            let documents = array_field(obj, "ctxs")?
                .iter()
                .enumerate()
                .map(|(i, ctx)| {
                    let ctx = as_object(ctx).map_err(|m| format!("`ctxs[{i}]`: {m}"))?;
                    let title = match ctx.get("title") {
                        None | Some(Value::Null) => String::new(),
                        Some(_) => {
                            str_field(ctx, "title").map_err(|m| format!("`ctxs[{i}]`: {m}"))?
                        }
                    };
                    let text = str_field(ctx, "text").map_err(|m| format!("`ctxs[{i}]`: {m}"))?;
                    Ok(Document { title, text })
                })
                .collect::<std::result::Result<Vec<_>, String>>()?;
            let answers = array_field(obj, "answers")?
                .iter()
                .enumerate()
                .map(|(i, a)| match a {
                    Value::String(s) => Ok(s.clone()),
                    // CacheBlend scores against answer[0] of each inner list.
                    Value::Array(inner) => match inner.first() {
                        Some(Value::String(s)) => Ok(s.clone()),
                        Some(other) => Err(format!(
                            "`answers[{i}][0]` must be a string, found {}",
                            kind(other)
                        )),
                        None => Err(format!("`answers[{i}]` is an empty list")),
                    },
                    other => Err(format!(
                        "`answers[{i}]` must be a string or a list of strings, found {}",
                        kind(other)
                    )),
                })
                .collect::<std::result::Result<Vec<_>, String>>()?;
            finish(id, str_field(obj, "question")?, documents, answers)
        }
        Format::LongBench => {
            let context = str_field(obj, "context")?;
            let documents = split_passages(&context)?
                .into_iter()
                .map(|text| Document {
                    title: String::new(),
                    text,
                })
                .collect();
            let answers = string_list(obj, "answers")?;
            finish(id, str_field(obj, "input")?, documents, answers)
        }
        Format::HotpotWiki => {
            let documents = array_field(obj, "context")?
                .iter()
                .enumerate()
                .map(|(i, pair)| hotpot_paragraph(pair).map_err(|m| format!("`context[{i}]`: {m}")))
                .collect::<std::result::Result<Vec<_>, String>>()?;
            let answers = vec![str_field(obj, "answer")?];
            finish(id, str_field(obj, "question")?, documents, answers)
        }
        Format::Musique => {
            let documents = array_field(obj, "paragraphs")?
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let p = as_object(p).map_err(|m| format!("`paragraphs[{i}]`: {m}"))?;
                    let title =
                        str_field(p, "title").map_err(|m| format!("`paragraphs[{i}]`: {m}"))?;
                    let text = str_field(p, "paragraph_text")
                        .map_err(|m| format!("`paragraphs[{i}]`: {m}"))?;
                    Ok(Document { title, text })
                })
                .collect::<std::result::Result<Vec<_>, String>>()?;
            let mut answers = vec![str_field(obj, "answer")?];
            if obj.contains_key("answer_aliases") {
                for alias in string_list(obj, "answer_aliases")? {
                    if !answers.contains(&alias) {
                        answers.push(alias);
                    }
                }
            }
            finish(id, str_field(obj, "question")?, documents, answers)
        }
    }
}

fn finish(
    id: String,
    question: String,
    documents: Vec<Document>,
    answers: Vec<String>,
) -> std::result::Result<Example, String> {
    if answers.is_empty() {
        return Err("no gold answers (the answer list is empty)".into());
    }
    Ok(Example {
        id,
        question,
        documents,
        answers,
    })
}

/// `_id` (LongBench, HotpotQA, 2Wiki) or `id` (MuSiQue), else the record's position.
fn source_id(obj: &Map<String, Value>, index: usize) -> std::result::Result<String, String> {
    for key in ["_id", "id"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => return Ok(s.clone()),
            Some(Value::Number(n)) => return Ok(n.to_string()),
            Some(other) => {
                return Err(format!(
                    "field `{key}` must be a string or number, found {}",
                    kind(other)
                ))
            }
        }
    }
    Ok(index.to_string())
}

/// One official HotpotQA/2Wiki paragraph: `[title, [sentence, ...]]`.
fn hotpot_paragraph(pair: &Value) -> std::result::Result<Document, String> {
    let items = match pair {
        Value::Array(items) if items.len() == 2 => items,
        other => {
            return Err(format!(
                "must be a [title, [sentences]] pair, found {}",
                describe(other)
            ))
        }
    };
    let title = match &items[0] {
        Value::String(s) => s.clone(),
        other => return Err(format!("title must be a string, found {}", kind(other))),
    };
    let sentences = match &items[1] {
        Value::Array(s) => s,
        other => return Err(format!("sentences must be a list, found {}", kind(other))),
    };
    let mut text = String::new();
    for (j, s) in sentences.iter().enumerate() {
        let s = match s {
            Value::String(s) => s,
            other => {
                return Err(format!(
                    "sentence {j} must be a string, found {}",
                    kind(other)
                ))
            }
        };
        // HotpotQA sentences carry their leading space, 2Wiki's do not: add one only where
        // neither side already has whitespace, so both read as the original paragraph.
        let needs_space = !text.is_empty()
            && !text.ends_with(char::is_whitespace)
            && !s.starts_with(char::is_whitespace);
        if needs_space {
            text.push(' ');
        }
        text.push_str(s);
    }
    Ok(Document { title, text })
}

/// Splits a LongBench context into its passages. LongBench builds the context as
/// `"\n".join(f"Passage {n}:\n{passage}")`, so each marker is searched in order (1, 2, ...)
/// at a line start, and the `\n` joining two passages is dropped; the last passage keeps
/// everything to the end, so re-joining the passages with `\n` reproduces the context.
fn split_passages(context: &str) -> std::result::Result<Vec<String>, String> {
    let first = "Passage 1:\n";
    if !context.starts_with(first) {
        if context.contains(first) {
            return Err("`context` has text before `Passage 1:`".into());
        }
        // No markers: the whole context is one passage.
        return Ok(vec![context.to_string()]);
    }
    let mut starts = vec![0usize];
    let mut n = 2;
    let mut from = first.len();
    loop {
        let marker = format!("\nPassage {n}:\n");
        match context[from..].find(&marker) {
            Some(off) => {
                let at = from + off + 1; // the marker's own line start
                starts.push(at);
                from = at + marker.len() - 1;
                n += 1;
            }
            None => break,
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (i, &s) in starts.iter().enumerate() {
        let header = format!("Passage {}:\n", i + 1);
        let body_start = s + header.len();
        let body = match starts.get(i + 1) {
            Some(&next) => &context[body_start..next - 1],
            None => &context[body_start..],
        };
        out.push(body.to_string());
    }
    Ok(out)
}

fn as_object(v: &Value) -> std::result::Result<&Map<String, Value>, String> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(format!("expected a JSON object, found {}", kind(other))),
    }
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a Value, String> {
    obj.get(key).ok_or_else(|| format!("missing field `{key}`"))
}

fn str_field(obj: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match get(obj, key)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!(
            "field `{key}` must be a string, found {}",
            kind(other)
        )),
    }
}

fn array_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a Vec<Value>, String> {
    match get(obj, key)? {
        Value::Array(a) => Ok(a),
        other => Err(format!(
            "field `{key}` must be a list, found {}",
            kind(other)
        )),
    }
}

fn string_list(obj: &Map<String, Value>, key: &str) -> std::result::Result<Vec<String>, String> {
    array_field(obj, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!(
                "`{key}[{i}]` must be a string, found {}",
                kind(other)
            )),
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("a list of {} items", a.len()),
        other => kind(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");

    fn write_temp(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(content.as_bytes()).expect("write temp file");
        f
    }

    /// Loads `content` and returns the error's (line, msg), failing if it loaded.
    fn load_err(content: &str) -> (usize, String) {
        let f = write_temp(content);
        match load_examples(f.path()) {
            Ok(ex) => panic!("expected an error, loaded {} examples", ex.len()),
            Err(Error::Data { path, line, msg }) => {
                assert_eq!(path, f.path());
                (line, msg)
            }
            Err(other) => panic!("expected Error::Data, got {other}"),
        }
    }

    #[test]
    fn cacheblend_musique_real_file() {
        let ex = load_examples(&Path::new(SHARED).join("musique_s.jsonl")).unwrap();
        assert_eq!(ex.len(), 150);
        assert!(ex.iter().all(|e| e.documents.len() == 10));
        assert!(ex
            .iter()
            .all(|e| !e.answers.is_empty() && !e.question.is_empty()));
        assert_eq!(ex[0].id, "0");
        assert_eq!(ex[149].id, "149");
        assert_eq!(
            ex[0].question,
            "Where was the author of Hannibal and Scipio educated at?"
        );
        assert_eq!(ex[0].answers, vec!["Exeter College".to_string()]);
        assert_eq!(ex[0].documents[0].title, "");
        assert!(ex[0].documents[0]
            .text
            .starts_with("thriller television series developed by bryan fuller"));
    }

    #[test]
    fn cacheblend_wikimqa_real_file_nested_answers() {
        let ex = load_examples(&Path::new(SHARED).join("wikimqa_s_clean.jsonl")).unwrap();
        assert_eq!(ex.len(), 102);
        assert!(ex.iter().all(|e| e.documents.len() == 10));
        assert_eq!(ex[0].answers, vec!["Croatia".to_string()]);
        assert_eq!(ex[1].answers, vec!["John the Baptist".to_string()]);
        // The one row with two inner lists keeps answer[0] of each.
        let two: Vec<&Example> = ex.iter().filter(|e| e.answers.len() > 1).collect();
        assert_eq!(two.len(), 1);
        assert_eq!(two[0].answers, vec!["Iranian hospital Dubai", "Dubai"]);
    }

    #[test]
    fn cacheblend_json_array_equals_jsonl() {
        let path = Path::new(SHARED).join("musique_s.jsonl");
        let jsonl = load_examples(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let first3: Vec<&str> = text.lines().take(3).collect();
        let f = write_temp(&format!("[\n{}\n]", first3.join(",\n")));
        let arr = load_examples(f.path()).unwrap();
        assert_eq!(arr, jsonl[..3].to_vec());
    }

    #[test]
    fn longbench_jsonl_splits_passages() {
        let rec1 = serde_json::json!({
            "input": "Who is the mother of the director of film Wind Over The Lake?",
            "context": "Passage 1:\nWind Over The Lake\nWind Over The Lake is a 1950 film directed by Ann Roe.\nPassage 2:\nAnn Roe\nAnn Roe was born in Oslo.\nHer mother was Kari Roe.\nPassage 3:\nOslo\nOslo is the capital of Norway; see Passage 2: above.",
            "answers": ["Kari Roe"],
            "length": 42,
            "dataset": "2wikimqa",
            "language": "en",
            "all_classes": null,
            "_id": "e5a2f0c1b1d94e3c8a7f"
        });
        let rec2 = serde_json::json!({
            "input": "Which band formed first?",
            "context": "Passage 1:\nThe Aardvarks\nFormed in 1961.\nPassage 2:\nThe Badgers\nFormed in 1965.\n",
            "answers": ["The Aardvarks", "Aardvarks"],
            "length": 10, "dataset": "hotpotqa", "language": "en", "all_classes": null,
            "_id": "0b7d"
        });
        let f = write_temp(&format!("{rec1}\n\n{rec2}\n"));
        let ex = load_examples(f.path()).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].id, "e5a2f0c1b1d94e3c8a7f");
        assert_eq!(ex[0].answers, vec!["Kari Roe"]);
        let texts: Vec<&str> = ex[0].documents.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "Wind Over The Lake\nWind Over The Lake is a 1950 film directed by Ann Roe.",
                "Ann Roe\nAnn Roe was born in Oslo.\nHer mother was Kari Roe.",
                "Oslo\nOslo is the capital of Norway; see Passage 2: above.",
            ]
        );
        // Re-joining reproduces the context exactly, trailing newline included.
        let rejoined: Vec<String> = ex[1]
            .documents
            .iter()
            .enumerate()
            .map(|(i, d)| format!("Passage {}:\n{}", i + 1, d.text))
            .collect();
        assert_eq!(rejoined.join("\n"), rec2["context"].as_str().unwrap());
        assert_eq!(ex[1].answers, vec!["The Aardvarks", "Aardvarks"]);
    }

    #[test]
    fn hotpotqa_official_array() {
        let text = r#"[
 {"_id": "5a8b57f25542995d1e6f1371", "answer": "yes",
  "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
  "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
  "context": [
    ["Ed Wood (film)", ["Ed Wood is a 1994 American biographical film directed by Tim Burton.", " It stars Johnny Depp."]],
    ["Scott Derrickson", ["Scott Derrickson (born July 16, 1966) is an American director.", " He lives in Los Angeles."]]
  ],
  "type": "comparison", "level": "hard"},
 {"_id": "5a8c7595554299585d9e36b6", "answer": "Chief of Protocol",
  "question": "What government position was held by the woman who portrayed Corliss Archer?",
  "supporting_facts": [["Kiss and Tell (1945 film)", 0]],
  "context": [["Kiss and Tell (1945 film)", ["Kiss and Tell is a 1945 film starring Shirley Temple."]]],
  "type": "bridge", "level": "medium"}
]"#;
        let f = write_temp(text);
        let ex = load_examples(f.path()).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].id, "5a8b57f25542995d1e6f1371");
        assert_eq!(ex[0].answers, vec!["yes"]);
        assert_eq!(ex[0].documents.len(), 2);
        assert_eq!(ex[0].documents[1].title, "Scott Derrickson");
        assert_eq!(
            ex[0].documents[1].text,
            "Scott Derrickson (born July 16, 1966) is an American director. He lives in Los Angeles."
        );
        assert_eq!(ex[1].answers, vec!["Chief of Protocol"]);
    }

    #[test]
    fn twowiki_official_array_sentences_without_leading_space() {
        let text = r#"[{"_id": "13f5ad2c088c11ebbd6fac1f6bf848b6", "type": "compositional",
  "question": "Who is the mother of the director of film Polish-Russian War?",
  "context": [
    ["Polish-Russian War (film)", ["Polish-Russian War is a 2009 Polish film.", "It was directed by Xawery Żuławski."]],
    ["Xawery Żuławski", ["Xawery Żuławski is a Polish film director.", "He is the son of Małgorzata Braunek."]]
  ],
  "supporting_facts": [["Polish-Russian War (film)", 1], ["Xawery Żuławski", 1]],
  "evidences": [["Polish-Russian War", "director", "Xawery Żuławski"], ["Xawery Żuławski", "mother", "Małgorzata Braunek"]],
  "answer": "Małgorzata Braunek"}]"#;
        let f = write_temp(text);
        let ex = load_examples(f.path()).unwrap();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].id, "13f5ad2c088c11ebbd6fac1f6bf848b6");
        assert_eq!(ex[0].documents[0].title, "Polish-Russian War (film)");
        assert_eq!(
            ex[0].documents[0].text,
            "Polish-Russian War is a 2009 Polish film. It was directed by Xawery Żuławski."
        );
        assert_eq!(ex[0].answers, vec!["Małgorzata Braunek"]);
    }

    #[test]
    fn musique_official_jsonl() {
        let rec = serde_json::json!({
            "id": "2hop__482757_12019",
            "paragraphs": [
                {"idx": 0, "title": "Pakistan Super League", "paragraph_text": "The Pakistan Super League is a T20 league.", "is_supporting": false},
                {"idx": 1, "title": "Lahore Qalandars", "paragraph_text": "Lahore Qalandars is a franchise based in Lahore.", "is_supporting": true}
            ],
            "question": "Where is the franchise based?",
            "question_decomposition": [{"id": 482757, "question": "which franchise?", "answer": "Lahore Qalandars", "paragraph_support_idx": 1}],
            "answer": "Lahore",
            "answer_aliases": ["Lahore, Pakistan", "Lahore"],
            "answerable": true
        });
        let rec2 = serde_json::json!({
            "id": "3hop1__1_2_3",
            "paragraphs": [{"idx": 0, "title": "T", "paragraph_text": "P", "is_supporting": true}],
            "question": "Q?", "answer": "A", "answer_aliases": [], "answerable": true
        });
        let f = write_temp(&format!("{rec}\n{rec2}\n"));
        let ex = load_examples(f.path()).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].id, "2hop__482757_12019");
        assert_eq!(ex[0].documents[1].title, "Lahore Qalandars");
        assert_eq!(
            ex[0].documents[1].text,
            "Lahore Qalandars is a franchise based in Lahore."
        );
        // answer first, then aliases, duplicates dropped.
        assert_eq!(ex[0].answers, vec!["Lahore", "Lahore, Pakistan"]);
        assert_eq!(ex[1].answers, vec!["A"]);
    }

    #[test]
    fn missing_field_names_line_and_field() {
        let good = r#"{"ctxs": [{"title": "", "text": "t"}], "question": "q", "answers": ["a"]}"#;
        let bad = r#"{"ctxs": [{"title": "", "text": "t"}], "answers": ["a"]}"#;
        let (line, msg) = load_err(&format!("{good}\n{good}\n{bad}\n"));
        assert_eq!(line, 3);
        assert!(msg.contains("missing field `question`"), "{msg}");
        assert!(msg.contains("CacheBlend"), "{msg}");
    }

    #[test]
    fn wrong_type_names_line_and_field() {
        let good = r#"{"input": "q", "context": "Passage 1:\nx", "answers": ["a"], "_id": "1"}"#;
        let bad = r#"{"input": "q", "context": "Passage 1:\nx", "answers": "a", "_id": "2"}"#;
        let (line, msg) = load_err(&format!("{good}\n{bad}\n"));
        assert_eq!(line, 2);
        assert!(
            msg.contains("`answers` must be a list, found a string"),
            "{msg}"
        );

        let bad_ctx = r#"{"ctxs": [{"title": "", "text": 7}], "question": "q", "answers": ["a"]}"#;
        let (line, msg) = load_err(bad_ctx);
        assert_eq!(line, 1);
        assert!(
            msg.contains("`ctxs[0]`: field `text` must be a string, found a number"),
            "{msg}"
        );
    }

    #[test]
    fn array_errors_name_the_element() {
        let text = r#"[{"_id": "a", "question": "q", "answer": "x", "context": [["T", ["s"]]]},
            {"_id": "b", "question": "q", "answer": "x", "context": [["T", "not a list"]]}]"#;
        let (line, msg) = load_err(text);
        assert_eq!(line, 2);
        assert!(msg.contains("element 2"), "{msg}");
        assert!(
            msg.contains("`context[0]`: sentences must be a list"),
            "{msg}"
        );
    }

    #[test]
    fn empty_and_blank_files() {
        let (line, msg) = load_err("");
        assert_eq!(line, 1);
        assert!(msg.contains("empty"), "{msg}");
        let (_, msg) = load_err("  \n\n ");
        assert!(msg.contains("empty"), "{msg}");
        let (_, msg) = load_err("[]");
        assert!(msg.contains("empty"), "{msg}");
    }

    #[test]
    fn truncated_json_line() {
        let good = r#"{"ctxs": [], "question": "q", "answers": ["a"]}"#;
        let (line, msg) = load_err(&format!(
            "{good}\n{good}\n{{\"ctxs\": [{{\"title\": \"\", \"te\n"
        ));
        assert_eq!(line, 3);
        assert!(msg.contains("invalid JSON"), "{msg}");
        // A truncated JSON array reports the file line where parsing stopped.
        let (line, msg) = load_err("[\n{\"ctxs\": [],\n\"question\": ");
        assert_eq!(line, 3);
        assert!(msg.contains("invalid JSON array"), "{msg}");
    }

    #[test]
    fn unknown_format_and_non_object() {
        let (line, msg) = load_err("{\"prompt\": \"x\", \"completion\": \"y\"}\n");
        assert_eq!(line, 1);
        assert!(msg.contains("unknown format"), "{msg}");
        assert!(msg.contains("prompt"), "{msg}");
        let (line, msg) = load_err("[1, 2]");
        assert_eq!(line, 1);
        assert!(
            msg.contains("expected a JSON object, found a number"),
            "{msg}"
        );
    }

    #[test]
    fn unreadable_file() {
        let path = Path::new("/nonexistent/samkv/data.jsonl");
        match load_examples(path) {
            Err(Error::Data { line, msg, .. }) => {
                assert_eq!(line, 0);
                assert!(msg.contains("cannot read"), "{msg}");
            }
            other => panic!("expected Error::Data, got {other:?}"),
        }
    }
}
