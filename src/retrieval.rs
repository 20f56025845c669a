//! BM25 retrieval over ingested documents: a tantivy index in a directory, one entry per
//! document (its user-visible id and its text). `samkv ingest --index DIR` adds to it,
//! `samkv ask --index DIR` and `samkv serve --index DIR` pick documents from it.
//!
//! The index writer is opened per batch of additions and released after its commit, so an
//! `ingest` can add documents while a server reads (and writes to) the same index.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, Schema, Value, STORED, STRING, TEXT};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::{Error, Result};

/// Memory of the per-batch writer (tantivy's minimum for one thread is 15 MB).
const WRITER_BYTES: usize = 32 << 20;
/// How long to wait for another process's writer to finish before giving up.
const LOCK_RETRIES: usize = 100;
const LOCK_WAIT: Duration = Duration::from_millis(100);

fn index_err(e: impl std::fmt::Display) -> Error {
    Error::Index(e.to_string())
}

/// The default user-visible id of a document: its content hash (32 hex characters).
pub fn text_id(text: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"samkv.text.v1");
    h.update(text.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// One search result.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: String,
    pub text: String,
    pub score: f32,
}

pub struct Retriever {
    index: Index,
    reader: IndexReader,
    id: Field,
    text: Field,
    /// One writer per process at a time (tantivy's lock file covers other processes).
    writing: Mutex<()>,
}

impl Retriever {
    /// Opens the index in `dir`, creating the directory and an empty index if needed.
    pub fn open(dir: &Path) -> Result<Retriever> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Index(format!(
                "cannot create index directory {}: {e}",
                dir.display()
            ))
        })?;
        let mut sb = Schema::builder();
        let id = sb.add_text_field("id", STRING | STORED);
        let text = sb.add_text_field("text", TEXT | STORED);
        let schema = sb.build();
        let mdir = MmapDirectory::open(dir).map_err(|e| {
            Error::Index(format!(
                "cannot open index directory {}: {e}",
                dir.display()
            ))
        })?;
        let index = Index::open_or_create(mdir, schema).map_err(|e| {
            Error::Index(format!(
                "{} does not hold a samkv document index ({e}); use an empty directory",
                dir.display()
            ))
        })?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::OnCommitWithDelay)
            .try_into()
            .map_err(index_err)?;
        Ok(Retriever {
            index,
            reader,
            id,
            text,
            writing: Mutex::new(()),
        })
    }

    fn writer(&self) -> Result<IndexWriter> {
        let mut tries = 0;
        loop {
            match self
                .index
                .writer_with_num_threads::<TantivyDocument>(1, WRITER_BYTES)
            {
                Ok(w) => return Ok(w),
                Err(tantivy::TantivyError::LockFailure(..)) if tries < LOCK_RETRIES => {
                    tries += 1;
                    std::thread::sleep(LOCK_WAIT);
                }
                Err(e) => {
                    return Err(Error::Index(format!(
                    "cannot open the index for writing ({e}); is another samkv ingesting into it?"
                )))
                }
            }
        }
    }

    /// Adds (or replaces, by id) documents, then commits once.
    pub fn add(&self, docs: &[(String, String)]) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        let _g = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.writer()?;
        for (id, text) in docs {
            w.delete_term(Term::from_field_text(self.id, id));
            let mut d = TantivyDocument::new();
            d.add_text(self.id, id);
            d.add_text(self.text, text);
            w.add_document(d).map_err(index_err)?;
        }
        w.commit().map_err(index_err)?;
        self.reader.reload().map_err(index_err)?;
        Ok(())
    }

    /// Removes a document; false if the index did not hold it.
    pub fn remove(&self, id: &str) -> Result<bool> {
        if self.get(id)?.is_none() {
            return Ok(false);
        }
        let _g = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.writer()?;
        w.delete_term(Term::from_field_text(self.id, id));
        w.commit().map_err(index_err)?;
        self.reader.reload().map_err(index_err)?;
        Ok(true)
    }

    /// The text stored under `id`.
    pub fn get(&self, id: &str) -> Result<Option<String>> {
        let q = TermQuery::new(Term::from_field_text(self.id, id), IndexRecordOption::Basic);
        Ok(self.run(&q, 1)?.into_iter().next().map(|h| h.text))
    }

    /// Number of documents.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` best documents for `query` by BM25, best first. The query is plain text: it
    /// goes through the index's own tokenizer, so no character in it has a special meaning.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let mut analyzer = self
            .index
            .tokenizer_for_field(self.text)
            .map_err(index_err)?;
        let mut stream = analyzer.token_stream(query);
        let mut words = Vec::new();
        while stream.advance() {
            words.push(stream.token().text.clone());
        }
        words.sort();
        words.dedup();
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let clauses: Vec<(Occur, Box<dyn Query>)> = words
            .iter()
            .map(|w| {
                let q = TermQuery::new(
                    Term::from_field_text(self.text, w),
                    IndexRecordOption::WithFreqs,
                );
                (Occur::Should, Box::new(q) as Box<dyn Query>)
            })
            .collect();
        self.run(&BooleanQuery::new(clauses), k)
    }

    fn run(&self, q: &dyn Query, k: usize) -> Result<Vec<Hit>> {
        let searcher = self.reader.searcher();
        let top = searcher
            .search(q, &TopDocs::with_limit(k))
            .map_err(index_err)?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let d: TantivyDocument = searcher.doc(addr).map_err(index_err)?;
            let field = |f: Field| {
                d.get_first(f)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            hits.push(Hit {
                id: field(self.id),
                text: field(self.text),
                score,
            });
        }
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<(String, String)> {
        [
            "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
            "The Louvre is the world's most-visited museum and houses the Mona Lisa.",
            "Photosynthesis converts light energy into chemical energy in plants.",
        ]
        .iter()
        .map(|t| (text_id(t), t.to_string()))
        .collect()
    }

    #[test]
    fn ranks_by_bm25_and_persists() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let r = Retriever::open(dir.path())?;
        assert!(r.is_empty());
        r.add(&docs())?;
        assert_eq!(r.len(), 3);
        let hits = r.search("Where is the Mona Lisa museum?", 2)?;
        assert_eq!(hits[0].id, docs()[1].0);
        assert!(hits[0].text.contains("Louvre"));
        assert!(hits.len() == 1 || hits[0].score >= hits[1].score);
        // Re-adding replaces instead of duplicating.
        r.add(&docs()[..1])?;
        assert_eq!(r.len(), 3);
        drop(r);
        let r = Retriever::open(dir.path())?;
        assert_eq!(r.len(), 3);
        let hits = r.search("wrought iron tower", 1)?;
        assert_eq!(hits[0].id, docs()[0].0);
        assert!(r.remove(&docs()[0].0)?);
        assert!(!r.remove(&docs()[0].0)?);
        assert_eq!(r.len(), 2);
        assert!(r
            .search("wrought iron tower", 3)?
            .iter()
            .all(|h| h.id != docs()[0].0));
        assert_eq!(r.get(&docs()[2].0)?.as_deref(), Some(docs()[2].1.as_str()));
        Ok(())
    }

    #[test]
    fn query_syntax_characters_are_plain_text() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let r = Retriever::open(dir.path())?;
        r.add(&docs())?;
        let hits = r.search("what's (the) AND* \"light\" -energy? [plants]:", 3)?;
        assert_eq!(hits[0].id, docs()[2].0);
        assert!(r.search("?!", 3)?.is_empty());
        assert!(r.search("", 3)?.is_empty());
        assert!(r.search("louvre", 0)?.is_empty());
        Ok(())
    }

    #[test]
    fn text_id_is_stable_and_short() {
        assert_eq!(text_id("a"), text_id("a"));
        assert_ne!(text_id("a"), text_id("b"));
        assert_eq!(text_id("a").len(), 32);
    }

    #[test]
    fn a_foreign_directory_is_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // An index with another schema.
        let mut sb = Schema::builder();
        sb.add_text_field("other", TEXT);
        Index::create_in_dir(dir.path(), sb.build()).map_err(index_err)?;
        let e = Retriever::open(dir.path()).err().expect("foreign schema");
        assert!(e.to_string().contains("does not hold a samkv"), "{e}");
        Ok(())
    }
}
