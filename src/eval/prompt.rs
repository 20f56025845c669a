//! The LongBench hotpotqa / 2wikimqa / musique prompt of a dataset example, in the layout of
//! [`Prompt`] (see engine/prompt.rs), with the passages numbered `Passage {n}:` as LongBench
//! numbers them.

use super::data::Example;
use crate::engine::prompt::LONGBENCH_INSTRUCTION;
use crate::engine::Prompt;

/// The text of passage `n` (1-based) as it appears inside the context, without the joining
/// newline: `Passage {n}:\n{title}\n{text}`, or `Passage {n}:\n{text}` when the title is empty
/// (CacheBlend data, and LongBench data whose passage text already starts with the title).
pub fn passage(n: usize, title: &str, text: &str) -> String {
    if title.is_empty() {
        format!("Passage {n}:\n{text}")
    } else {
        format!("Passage {n}:\n{title}\n{text}")
    }
}

/// Builds the LongBench prompt for `ex`, one document segment per passage.
pub fn longbench_prompt(ex: &Example) -> Prompt {
    Prompt {
        preamble: Prompt::documents_preamble(),
        documents: ex
            .documents
            .iter()
            .enumerate()
            .map(|(i, d)| format!("{}\n", passage(i + 1, &d.title, &d.text)))
            .collect(),
        // With no passages there is no document newline before the template's `\n\n`.
        question: format!(
            "{}{LONGBENCH_INSTRUCTION}\n\nQuestion: {}\nAnswer:",
            if ex.documents.is_empty() {
                "\n\n"
            } else {
                "\n"
            },
            ex.question
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::data::{load_examples, Document};
    use std::path::Path;

    /// LongBench's `dataset2prompt` entry for hotpotqa / 2wikimqa / musique, written out.
    fn template(context: &str, input: &str) -> String {
        format!(
            "Answer the question based on the given passages. Only give me the answer and do not \
             output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer \
             the question based on the given passages. Only give me the answer and do not output \
             any other words.\n\nQuestion: {input}\nAnswer:"
        )
    }

    fn example(docs: &[(&str, &str)], question: &str) -> Example {
        Example {
            id: "0".into(),
            question: question.into(),
            documents: docs
                .iter()
                .map(|(t, x)| Document {
                    title: t.to_string(),
                    text: x.to_string(),
                })
                .collect(),
            answers: vec!["a".into()],
        }
    }

    #[test]
    fn segments_concatenate_to_the_template_untitled() {
        let ex = example(
            &[("", "first doc."), ("", "second\ndoc."), ("", "third")],
            "Who?",
        );
        let p = longbench_prompt(&ex);
        let context = "Passage 1:\nfirst doc.\nPassage 2:\nsecond\ndoc.\nPassage 3:\nthird";
        assert_eq!(p.text(), template(context, "Who?"));
        assert_eq!(
            p.preamble,
            "Answer the question based on the given passages. Only give me the answer and do not \
             output any other words.\n\nThe following are given passages.\n"
        );
        assert_eq!(p.documents[1], "Passage 2:\nsecond\ndoc.\n");
        assert!(p.question.starts_with("\nAnswer the question"));
        assert!(p.question.ends_with("\n\nQuestion: Who?\nAnswer:"));
    }

    #[test]
    fn titles_go_on_their_own_line() {
        let ex = example(
            &[("Ed Wood", "Ed Wood was a director."), ("", "no title")],
            "Q",
        );
        let p = longbench_prompt(&ex);
        assert_eq!(
            p.documents[0],
            "Passage 1:\nEd Wood\nEd Wood was a director.\n"
        );
        let context = "Passage 1:\nEd Wood\nEd Wood was a director.\nPassage 2:\nno title";
        assert_eq!(p.text(), template(context, "Q"));
    }

    #[test]
    fn no_documents() {
        let p = longbench_prompt(&example(&[], "Q"));
        assert!(p.documents.is_empty());
        assert_eq!(p.text(), template("", "Q"));
    }

    #[test]
    fn longbench_record_round_trips_to_its_template() {
        let context =
            "Passage 1:\nAnn Roe\nAnn Roe was born in Oslo.\nPassage 2:\nOslo\nOslo is a city.\n";
        let rec = serde_json::json!({
            "input": "Where was Ann Roe born?", "context": context,
            "answers": ["Oslo"], "_id": "x1"
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.jsonl");
        std::fs::write(&path, format!("{rec}\n")).unwrap();
        let ex = load_examples(&path).unwrap();
        let p = longbench_prompt(&ex[0]);
        assert_eq!(p.documents.len(), 2);
        assert_eq!(p.text(), template(context, "Where was Ann Roe born?"));
    }

    #[test]
    fn real_cacheblend_example_matches_template() {
        let ex = load_examples(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/musique_s.jsonl"),
        )
        .unwrap();
        let p = longbench_prompt(&ex[0]);
        assert_eq!(p.documents.len(), 10);
        let context: Vec<String> = ex[0]
            .documents
            .iter()
            .enumerate()
            .map(|(i, d)| format!("Passage {}:\n{}", i + 1, d.text))
            .collect();
        assert_eq!(p.text(), template(&context.join("\n"), &ex[0].question));
    }
}
