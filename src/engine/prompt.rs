//! A RAG request in text form, split into the segments whose KV caches are computed
//! separately: preamble, one segment per document, question.
//!
//! The layout is LongBench's (hotpotqa / 2wikimqa / musique): `{instruction}\n\nThe following
//! are given passages.\n{context}\n\n{instruction}\n\nQuestion: {input}\nAnswer:`. The
//! joining `\n` after each passage is put at the end of its document segment (and the
//! template's other `\n` opens the question), so a document segment has the same text, and
//! the same cached KV, wherever it sits in a request.

use crate::tokenizer::ChatMessage;

/// LongBench's instruction, said before the passages and again before the question.
pub const LONGBENCH_INSTRUCTION: &str =
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.";

/// A request's text. The engine wraps it in the model's chat template (when it has one):
/// preamble, documents and question make up the content of the last user turn, and
/// `preamble + documents.concat() + question` is that content.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prompt {
    pub preamble: String,
    pub documents: Vec<String>,
    pub question: String,
    /// The chat template's system message (`None`: the template's own default, if any).
    /// Documents' KV is computed after it, so each distinct system message has its own.
    #[serde(default)]
    pub system: Option<String>,
    /// Earlier turns (user / assistant), rendered in their roles before the last user turn.
    #[serde(default)]
    pub history: Vec<ChatMessage>,
}

impl Prompt {
    /// The layout for free-standing documents (`samkv ask`, the server, ingestion): passages
    /// are not numbered, so a document's text, and with it its cached KV, does not depend on
    /// where it sits in a request.
    pub fn for_question(documents: &[String], question: &str) -> Prompt {
        Prompt {
            preamble: Self::documents_preamble(),
            documents: documents.iter().map(|d| Self::document(d)).collect(),
            question: format!(
                "{}{LONGBENCH_INSTRUCTION}\n\nQuestion: {question}\nAnswer:",
                if documents.is_empty() { "\n\n" } else { "\n" }
            ),
            ..Default::default()
        }
    }

    /// The text before the first passage, which every stored document is computed after.
    pub fn documents_preamble() -> String {
        format!("{LONGBENCH_INSTRUCTION}\n\nThe following are given passages.\n")
    }

    /// One free-standing document segment: `Passage:\n{text}\n`.
    pub fn document(text: &str) -> String {
        format!("Passage:\n{}\n", text.trim_end())
    }

    /// The content of the last user turn (before any chat template).
    pub fn text(&self) -> String {
        let mut s = self.preamble.clone();
        for d in &self.documents {
            s.push_str(d);
        }
        s.push_str(&self.question);
        s
    }
}
