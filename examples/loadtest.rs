//! A bounded load test for `samkv serve`: concurrent streaming chat clients on one server for
//! a fixed time, reporting throughput, time to first token and errors.
//!
//! ```text
//! samkv serve --model smollm2 --method reuse --port 8080 &
//! cargo run --release --example loadtest -- --url http://127.0.0.1:8080 --clients 32 --seconds 60
//! ```

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Run time, at most 60 s.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Method for every request (the server's default when absent).
    #[arg(long)]
    method: Option<String>,
}

#[derive(Default)]
struct Tally {
    ok: usize,
    rejected: usize,
    errors: usize,
    cut: usize,
    tokens: usize,
    ttft: Vec<f64>,
    latency: Vec<f64>,
    first_error: Option<String>,
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

const QUESTIONS: [(&str, usize); 4] = [
    ("When was the Eiffel Tower completed?", 0),
    ("How tall is the Eiffel Tower?", 0),
    ("Which painting is in the Louvre?", 1),
    ("How many people visit the Louvre?", 1),
];

/// Sends one streaming request; returns (ttft, latency, chunks) or what went wrong.
fn one(a: &ureq::Agent, url: &str, body: &Value) -> Result<(f64, f64, usize), (u16, String)> {
    let t0 = Instant::now();
    let r = a
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .map_err(|e| (0, e.to_string()))?;
    let status = r.status().as_u16();
    if status != 200 {
        let msg = r.into_body().read_to_string().unwrap_or_default();
        return Err((status, msg));
    }
    let mut ttft = None;
    let mut chunks = 0;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line.map_err(|e| (0, e.to_string()))?;
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            let lat = t0.elapsed().as_secs_f64();
            return Ok((ttft.unwrap_or(lat), lat, chunks));
        }
        let v: Value = serde_json::from_str(d).map_err(|e| (0, e.to_string()))?;
        if v.get("error").is_some() {
            return Err((200, d.to_string()));
        }
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            chunks += 1;
            ttft.get_or_insert(t0.elapsed().as_secs_f64());
        }
    }
    Err((0, "stream ended without [DONE]".into()))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secs = args.seconds.clamp(1, 60);
    let setup = agent(Duration::from_secs(120));
    let mut ids = Vec::new();
    for name in ["eiffel.txt", "louvre.txt"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/docs")
            .join(name);
        let text = std::fs::read_to_string(&path)?;
        let r = setup
            .post(format!("{}/v1/documents", args.url))
            .header("content-type", "application/json")
            .send(json!({"text": text}).to_string())?;
        let v: Value = serde_json::from_str(&r.into_body().read_to_string()?)?;
        let id = v["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("upload failed: {v}"))?;
        ids.push(id.to_string());
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let threads: Vec<_> = (0..args.clients)
        .map(|c| {
            let (tally, ids, url) = (tally.clone(), ids.clone(), args.url.clone());
            let (max_tokens, method) = (args.max_tokens, args.method.clone());
            std::thread::spawn(move || {
                let mut n = c;
                while Instant::now() < deadline {
                    // In-flight requests are cut at the deadline, so the run stays bounded.
                    let a = agent(deadline.saturating_duration_since(Instant::now()));
                    let (q, d) = QUESTIONS[n % QUESTIONS.len()];
                    n += 1;
                    let mut body = json!({
                        "messages": [{"role": "user", "content": q}],
                        "documents": [ids[d]],
                        "max_tokens": max_tokens, "temperature": 0, "stream": true,
                    });
                    if let Some(m) = &method {
                        body["kv"] = json!({"method": m});
                    }
                    let r = one(&a, &url, &body);
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    match r {
                        Ok((ttft, lat, chunks)) => {
                            t.ok += 1;
                            t.tokens += chunks;
                            t.ttft.push(ttft);
                            t.latency.push(lat);
                        }
                        Err((429, _)) => {
                            t.rejected += 1;
                            drop(t);
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(_) if Instant::now() >= deadline => t.cut += 1,
                        Err((s, m)) => {
                            t.errors += 1;
                            t.first_error.get_or_insert(format!("status {s}: {m}"));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let el = start.elapsed().as_secs_f64();
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "clients {}, {:.1} s, max_tokens {}",
        args.clients, el, args.max_tokens
    );
    println!(
        "completed {} ({:.2} req/s), rejected 429: {}, errors: {}, cut at the deadline: {}",
        t.ok,
        t.ok as f64 / el,
        t.rejected,
        t.errors,
        t.cut
    );
    println!(
        "streamed chunks {} ({:.1}/s)",
        t.tokens,
        t.tokens as f64 / el
    );
    let (p50, p99) = (pct(&mut t.ttft, 0.5), pct(&mut t.ttft, 0.99));
    println!(
        "time to first token: p50 {:.0} ms, p99 {:.0} ms",
        p50 * 1e3,
        p99 * 1e3
    );
    let (l50, l99) = (pct(&mut t.latency, 0.5), pct(&mut t.latency, 0.99));
    println!(
        "request latency:     p50 {:.0} ms, p99 {:.0} ms",
        l50 * 1e3,
        l99 * 1e3
    );
    if let Some(e) = &t.first_error {
        println!("first error: {e}");
    }
    Ok(())
}
