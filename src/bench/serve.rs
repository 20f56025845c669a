//! `samkv bench-serve`: a load generator for `samkv serve`, over loopback only.
//!
//! It targets a running server (`--url`) or starts one (`samkv serve --port 0` on the given
//! model and store), uploads a corpus of N documents (passages of a QA data file, or seeded
//! synthetic text), then for each method and client count runs that many clients for a
//! bounded time (or request count). Each request names 10 documents drawn from the corpus by
//! a seeded Zipf distribution (a few documents are popular, as in RAG traffic) and asks a
//! question, streamed. It reports requests/s, time to first token and inter-token latency
//! p50/p99, the KV bytes the server held (from /metrics), errors and 429s.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::{Error, Result};

#[derive(clap::Args, Clone, Debug)]
pub struct BenchServeArgs {
    /// A running server (http://127.0.0.1:PORT; loopback only). Without it one is started
    /// with --model (and the global --store).
    #[arg(long)]
    pub url: Option<String>,
    /// Model of the server to start (as `samkv serve --model`).
    #[arg(long)]
    pub model: Option<String>,
    /// More flags for the started server (e.g. --serve-arg=--kv-budget=2GiB), repeatable.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
    /// Methods to measure, each a `kv` object's method with knobs as in bench specs
    /// (`reuse`, `samkv:keep=0.15`, `cacheblend:ratio=0.15`).
    #[arg(long, value_delimiter = ',', default_value = "reuse,samkv:keep=0.15")]
    pub methods: Vec<String>,
    /// Concurrent clients, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub clients: Vec<usize>,
    /// Seconds per run (clients stop sending then; requests in flight finish).
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Stop a run after this many requests (0: only the time bound).
    #[arg(long, default_value_t = 0)]
    pub requests: usize,
    /// Documents in the corpus.
    #[arg(long, default_value_t = 40)]
    pub docs: usize,
    /// Words per synthetic document or passage chunk (about 1.3 tokens each in English).
    #[arg(long, default_value_t = 150)]
    pub doc_words: usize,
    /// Passages from this QA data file instead of synthetic text.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub docs_per_request: usize,
    /// Zipf exponent of document popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One run: a method at a client count.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub method: String,
    pub clients: usize,
    pub seconds: f64,
    pub completed: usize,
    pub requests_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    /// Largest `samkv_active_kv_bytes` and `samkv_kv_reserved_bytes` sampled.
    pub kv_bytes_max: u64,
    pub kv_reserved_max: u64,
    pub errors: usize,
    pub rejected_429: usize,
    pub first_error: Option<String>,
}

#[derive(Default)]
struct Tally {
    ttft: Vec<f64>,
    itl: Vec<f64>,
    completed: usize,
    sent: usize,
    errors: usize,
    rejected: usize,
    first_error: Option<String>,
}

/// Refuses anything but a loopback http URL: this tool generates load, and only against a
/// server on this machine.
pub fn check_loopback(url: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        Error::InvalidInput(format!(
            "--url {url}: give http://127.0.0.1:PORT (bench-serve only targets loopback)"
        ))
    })?;
    let host_port = rest.split('/').next().unwrap_or_default();
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if !loopback {
        return Err(Error::InvalidInput(format!(
            "--url {url}: `{host}` is not a loopback address; bench-serve only loads a server \
             on this machine (127.0.0.1, ::1 or localhost)"
        )));
    }
    Ok(format!("http://{host_port}"))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

fn http(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("bench-serve: {e}"))
}

/// A server this run started, killed on drop.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(a: &BenchServeArgs, store: &str) -> Result<(Started, String)> {
    let model = a.model.as_deref().ok_or_else(|| {
        Error::InvalidInput("give --url of a running server, or --model to start one".into())
    })?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "--store",
            store,
            "serve",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
        ])
        .args(["--model", model])
        .args(&a.serve_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().ok_or_else(|| http("no stdout"))?;
    let guard = Started(child);
    for line in BufReader::new(out).lines() {
        let line = line?;
        if let Some(u) = line.strip_prefix("samkv serve: listening on ") {
            return Ok((guard, u.trim().to_string()));
        }
    }
    Err(http(
        "the server exited before listening; run the same `samkv serve` by hand to see why",
    ))
}

/// The corpus' texts: passages of `data` joined into chunks, or synthetic text.
fn corpus(a: &BenchServeArgs) -> Result<Vec<String>> {
    let words: Vec<String> = match &a.data {
        Some(p) => crate::eval::load_examples(p)?
            .iter()
            .flat_map(|e| e.documents.iter())
            .flat_map(|d| {
                d.text
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect(),
        None => Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(a.seed);
    const VOCAB: [&str; 24] = [
        "river", "bridge", "harbour", "market", "library", "garden", "tower", "museum", "the",
        "old", "city", "kept", "its", "many", "known", "north", "south", "built", "in", "year",
        "trade", "stone", "road", "hall",
    ];
    Ok((0..a.docs)
        .map(|i| {
            let body: Vec<String> = if words.len() >= a.doc_words {
                let start = (i * a.doc_words) % (words.len() - a.doc_words + 1);
                words[start..start + a.doc_words].to_vec()
            } else {
                (0..a.doc_words)
                    .map(|_| VOCAB[rng.random_range(0..VOCAB.len())].to_string())
                    .collect()
            };
            // A distinct head, so that no two documents share a content address.
            format!("Document {i} ({}). {}", a.seed, body.join(" "))
        })
        .collect())
}

/// Samples ranks 0..n with P(k) proportional to 1/(k+1)^s.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let cdf = (0..n)
            .map(|k| {
                acc += 1.0 / ((k + 1) as f64).powf(s);
                acc
            })
            .collect::<Vec<_>>();
        Zipf(cdf.iter().map(|c| c / acc).collect())
    }

    fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }

    /// `k` distinct ranks.
    fn distinct(&self, rng: &mut StdRng, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k.min(self.0.len()) {
            let r = self.sample(rng);
            if !out.contains(&r) {
                out.push(r);
            }
        }
        out
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The `kv` object of a method spec (`samkv:keep=0.15` -> {"method": "samkv", "keep": 0.15}).
fn kv_object(spec: &str) -> Result<Value> {
    let mut parts = spec.split(':');
    let mut o = serde_json::Map::new();
    o.insert("method".into(), json!(parts.next().unwrap_or_default()));
    for p in parts {
        let (k, v) = p.split_once('=').ok_or_else(|| {
            Error::InvalidInput(format!(
                "`{p}` in --methods `{spec}` is not key=value (e.g. samkv:keep=0.15)"
            ))
        })?;
        let v = serde_json::from_str(v).unwrap_or_else(|_| json!(v));
        o.insert(k.into(), v);
    }
    Ok(Value::Object(o))
}

/// One streamed request: its TTFT and gaps between content chunks, or (status, message).
fn one(
    ag: &ureq::Agent,
    url: &str,
    body: &Value,
) -> std::result::Result<(f64, Vec<f64>), (u16, String)> {
    let t0 = Instant::now();
    let r = ag
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .map_err(|e| (0, e.to_string()))?;
    let status = r.status().as_u16();
    if status != 200 {
        return Err((status, r.into_body().read_to_string().unwrap_or_default()));
    }
    let (mut first, mut last, mut gaps) = (None, None::<Instant>, Vec::new());
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line.map_err(|e| (0, e.to_string()))?;
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            let ttft = first.unwrap_or_else(|| t0.elapsed().as_secs_f64());
            return Ok((ttft, gaps));
        }
        let v: Value = serde_json::from_str(d).map_err(|e| (0, e.to_string()))?;
        if v.get("error").is_some() {
            return Err((200, d.to_string()));
        }
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            let now = Instant::now();
            match last {
                None => first = Some((now - t0).as_secs_f64()),
                Some(l) => gaps.push((now - l).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    Err((0, "the stream ended without [DONE]".into()))
}

fn metric(ag: &ureq::Agent, url: &str, name: &str) -> Option<u64> {
    let text = ag
        .get(format!("{url}/metrics"))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Runs the benchmark; returns its rows (also printed as a table).
pub fn run(a: &BenchServeArgs, store: &str) -> Result<Vec<Row>> {
    if a.clients.is_empty() || a.clients.contains(&0) || a.docs < a.docs_per_request.max(1) {
        return Err(Error::InvalidInput(
            "--clients must be at least 1 each, and --docs at least --docs-per-request".into(),
        ));
    }
    if a.seconds == 0 || a.seconds > 3600 {
        return Err(Error::InvalidInput(
            "--seconds must be between 1 and 3600".into(),
        ));
    }
    let (_server, url) = match &a.url {
        Some(u) => (None, check_loopback(u)?),
        None => {
            let (s, u) = start_server(a, store)?;
            (Some(s), check_loopback(&u)?)
        }
    };
    let ag = agent();
    let texts = corpus(a)?;
    let bar = indicatif::ProgressBar::new(texts.len() as u64).with_message("uploading corpus");
    let mut ids = Vec::with_capacity(texts.len());
    for t in &texts {
        let r = ag
            .post(format!("{url}/v1/documents"))
            .header("content-type", "application/json")
            .send(json!({"text": t}).to_string())
            .map_err(http)?;
        let status = r.status().as_u16();
        let v: Value = r.into_body().read_json().map_err(http)?;
        if status != 200 && status != 201 {
            return Err(http(format!("upload answered {status}: {v}")));
        }
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
        bar.inc(1);
    }
    bar.finish_and_clear();
    let zipf = Zipf::new(ids.len(), a.zipf);
    let mut rows = Vec::new();
    for spec in &a.methods {
        let kv = kv_object(spec)?;
        for &clients in &a.clients {
            rows.push(run_one(a, &url, &ids, &zipf, spec, &kv, clients)?);
        }
    }
    print!("{}", table(&rows));
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows).map_err(http)?)?;
    }
    Ok(rows)
}

fn run_one(
    a: &BenchServeArgs,
    url: &str,
    ids: &[String],
    zipf: &Zipf,
    spec: &str,
    kv: &Value,
    clients: usize,
) -> Result<Row> {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let end = Instant::now() + Duration::from_secs(a.seconds);
    let bar =
        indicatif::ProgressBar::new(a.seconds).with_message(format!("{spec}, {clients} clients"));
    let (kv_max, reserved_max) = std::thread::scope(|sc| {
        for c in 0..clients {
            let tally = tally.clone();
            let seed = a.seed ^ ((c as u64 + 1) << 32) ^ (clients as u64);
            sc.spawn(move || {
                let ag = agent();
                let mut rng = StdRng::seed_from_u64(seed);
                while Instant::now() < end {
                    {
                        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                        if a.requests > 0 && t.sent >= a.requests {
                            break;
                        }
                        t.sent += 1;
                    }
                    let docs: Vec<Value> = zipf
                        .distinct(&mut rng, a.docs_per_request)
                        .into_iter()
                        .map(|r| json!({"id": ids[r]}))
                        .collect();
                    let q = format!(
                        "Which documents mention item {}?",
                        rng.random_range(0..1000)
                    );
                    let body = json!({"messages": [{"role": "user", "content": q}],
                        "documents": docs, "kv": kv, "max_tokens": a.max_tokens,
                        "ignore_eos": true, "temperature": 0, "stream": true});
                    let r = one(&ag, url, &body);
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    match r {
                        Ok((ttft, gaps)) => {
                            t.completed += 1;
                            t.ttft.push(ttft);
                            t.itl.extend(gaps);
                        }
                        Err((429, _)) => {
                            t.rejected += 1;
                            drop(t);
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err((s, m)) => {
                            t.errors += 1;
                            t.first_error.get_or_insert(format!("{s}: {m}"));
                        }
                    }
                }
            });
        }
        // Samples the server's KV use while the clients run.
        let ag = agent();
        let (mut kv_max, mut res_max) = (0, 0);
        while Instant::now() < end {
            kv_max = kv_max.max(metric(&ag, url, "samkv_active_kv_bytes").unwrap_or(0));
            res_max = res_max.max(metric(&ag, url, "samkv_kv_reserved_bytes").unwrap_or(0));
            bar.set_position(a.seconds - (end - Instant::now()).as_secs().min(a.seconds));
            std::thread::sleep(Duration::from_millis(250));
        }
        (kv_max, res_max)
    });
    bar.finish_and_clear();
    let started = end - Duration::from_secs(a.seconds);
    let secs = started.elapsed().as_secs_f64();
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |v: f64| (v * 1e4).round() / 10.0;
    Ok(Row {
        method: spec.to_string(),
        clients,
        seconds: (secs * 10.0).round() / 10.0,
        completed: t.completed,
        requests_per_s: (t.completed as f64 / secs * 100.0).round() / 100.0,
        ttft_p50_ms: ms(pct(&mut t.ttft, 0.5)),
        ttft_p99_ms: ms(pct(&mut t.ttft, 0.99)),
        itl_p50_ms: ms(pct(&mut t.itl, 0.5)),
        itl_p99_ms: ms(pct(&mut t.itl, 0.99)),
        kv_bytes_max: kv_max,
        kv_reserved_max: reserved_max,
        errors: t.errors,
        rejected_429: t.rejected,
        first_error: t.first_error.clone(),
    })
}

/// The rows as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| method | clients | completed | requests/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 \
         | KV in use (max) | KV reserved (max) | errors | 429 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.0} ms | {:.0} ms | {:.1} ms | {:.1} ms | {} | {} | {} | {} |\n",
            r.method,
            r.clients,
            r.completed,
            r.requests_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.itl_p50_ms,
            r.itl_p99_ms,
            mib(r.kv_bytes_max),
            mib(r.kv_reserved_max),
            r.errors,
            r.rejected_429
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        assert_eq!(
            check_loopback("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(check_loopback("http://localhost:1").is_ok());
        assert!(check_loopback("http://[::1]:9000").is_ok());
        for bad in [
            "http://10.0.0.1:80",
            "https://127.0.0.1:1",
            "http://example.com",
            "127.0.0.1:1",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zipf_is_seeded_skewed_and_distinct() {
        let z = Zipf::new(40, 1.0);
        let mut r1 = StdRng::seed_from_u64(7);
        let mut r2 = StdRng::seed_from_u64(7);
        let a = z.distinct(&mut r1, 10);
        assert_eq!(a, z.distinct(&mut r2, 10));
        let mut s = a.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 10);
        let mut counts = [0usize; 40];
        for _ in 0..5000 {
            counts[z.sample(&mut r1)] += 1;
        }
        assert!(counts[0] > 4 * counts[20], "{counts:?}");
    }

    #[test]
    fn method_specs_become_kv_objects() {
        assert_eq!(
            kv_object("samkv:keep=0.15").unwrap(),
            json!({"method": "samkv", "keep": 0.15})
        );
        assert_eq!(kv_object("reuse").unwrap(), json!({"method": "reuse"}));
        assert!(kv_object("samkv:keep").is_err());
    }
}
