//! Helpers for the HTTP tests: a real `samkv serve` process on loopback, a small client, and
//! a throwaway redis-server.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn model_path() -> PathBuf {
    let dir = std::env::var_os("SAMKV_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let p = dir.join(SMOLLM2);
    assert!(
        p.exists(),
        "{} is missing: run `cargo run --release -- model fetch` first",
        p.display()
    );
    p
}

pub fn example_doc(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/docs")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The samkv binary: $SAMKV_BIN if set (for worktrees sharing one target directory),
/// else the one cargo built for these tests.
pub fn bin() -> PathBuf {
    std::env::var_os("SAMKV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_samkv")))
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        // CI may set HTTP(S)_PROXY; loopback must not go through it.
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// A running `samkv serve`, killed on drop (its log is printed if the test failed).
pub struct Server {
    child: Child,
    pub url: String,
    pub log: PathBuf,
    pub agent: ureq::Agent,
    /// Sent as `Authorization: Bearer KEY` with every request when set.
    pub key: Option<String>,
}

/// Runs the samkv binary with `args`, returning (success, stdout, stderr).
pub fn samkv(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("NO_PROXY", "*")
        .output()
        .expect("run samkv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Server {
    /// `samkv --store STORE serve --model SMOLLM2 --port 0 ARGS...`; waits until it listens.
    pub fn start(store: &str, log_dir: &Path, args: &[&str]) -> Server {
        Self::start_env(store, log_dir, args, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_env(store: &str, log_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_wrapped(&[], store, log_dir, args, env)
    }

    /// [`Server::start_env`] run through `wrapper` (a command and its arguments that end by
    /// running the samkv command line appended to them, e.g. `sh -c 'ulimit -n 64; exec "$0" "$@"'`).
    pub fn start_wrapped(
        wrapper: &[&str],
        store: &str,
        log_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let model = model_path();
        let log = log_dir.join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = cmd
            .args(["--store", store, "-v", "serve", "--port", "0", "--model"])
            .arg(&model)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start samkv serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(u) = line.strip_prefix("samkv serve: listening on ") {
                    let _ = tx.send(u.to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "samkv serve did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Server {
            child,
            url,
            log,
            agent: agent(),
            key: None,
        }
    }

    fn auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.key {
            Some(k) => r.header("authorization", format!("Bearer {k}")),
            None => r,
        }
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .auth(self.agent.get(format!("{}{path}", self.url)))
            .call()
            .expect("GET");
        read_json(r)
    }

    pub fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .auth(self.agent.get(format!("{}{path}", self.url)))
            .call()
            .expect("GET");
        let s = r.status().as_u16();
        (s, r.into_body().read_to_string().expect("body"))
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        let r = self
            .auth(self.agent.delete(format!("{}{path}", self.url)))
            .call()
            .expect("DELETE");
        read_json(r)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), "application/json")
    }

    pub fn post_raw(&self, path: &str, body: &str, content_type: &str) -> (u16, Value) {
        let r = self
            .auth(self.agent.post(format!("{}{path}", self.url)))
            .header("content-type", content_type)
            .send(body)
            .expect("POST");
        read_json(r)
    }

    /// POSTs with `stream: true` and returns the `data:` payloads in order.
    pub fn stream(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let (status, lines) = self.stream_lines(path, body, usize::MAX);
        (status, lines)
    }

    /// Reads at most `max` `data:` payloads, then drops the connection.
    pub fn stream_lines(&self, path: &str, body: &Value, max: usize) -> (u16, Vec<String>) {
        let r = self
            .auth(self.agent.post(format!("{}{path}", self.url)))
            .header("content-type", "application/json")
            .send(body.to_string())
            .expect("POST");
        let status = r.status().as_u16();
        let mut out = Vec::new();
        let reader = BufReader::new(r.into_body().into_reader());
        for line in reader.lines() {
            let line = line.expect("read stream");
            if let Some(d) = line.strip_prefix("data: ") {
                out.push(d.to_string());
                if out.len() >= max {
                    break;
                }
            }
        }
        (status, out)
    }

    /// The value of an unlabelled metric (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (s, text) = self.get_text("/metrics");
        assert_eq!(s, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.trim().parse().expect("metric value"))
            .unwrap_or(0.0)
    }

    /// Waits until `f` holds (polling), failing after `secs`.
    pub fn wait_until(&self, secs: u64, what: &str, mut f: impl FnMut(&Server) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- samkv serve log ({}) ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn read_json(r: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let s = r.status().as_u16();
    let mut body = String::new();
    r.into_body()
        .into_reader()
        .read_to_string(&mut body)
        .expect("body");
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("status {s}: body is not JSON ({e}): {body}"));
    (s, v)
}

/// Checks an error response: the status and OpenAI's error shape; returns the error object.
pub fn expect_error(r: (u16, Value), status: u16) -> Value {
    assert_eq!(r.0, status, "unexpected response {}", r.1);
    let e =
        r.1.get("error")
            .unwrap_or_else(|| panic!("no error object in {}", r.1));
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error lacks `{k}`: {e}");
    }
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "empty message: {e}"
    );
    e.clone()
}

/// A redis-server on a free loopback port, without persistence; killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    /// A redis-server of this test's own on a free loopback port. Tests run in parallel, and a
    /// port found free can be taken by another test's server before ours binds it (ours then
    /// exits, and connecting reaches theirs): a server only counts once it reports our child's
    /// process id; otherwise another port is tried.
    pub fn start() -> Redis {
        Redis::spawn(0, &["--save", "", "--appendonly", "no"])
    }

    /// A redis-server with `args` on `port` (0: a free one, tried up to 10 times).
    fn spawn(port: u16, args: &[&str]) -> Redis {
        for _ in 0..10 {
            let port = if port != 0 {
                port
            } else {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("free port")
                    .port()
            };
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run redis-server ({e}); install it with .ci/redis.sh")
                });
            let mut r = Redis {
                child: Some(child),
                port,
            };
            if r.serving() {
                return r;
            }
            r.stop();
        }
        panic!("redis-server did not start on port {port} (0: any free port) in 10 tries");
    }

    /// Waits (up to 20 s) until this port answers with our child's process id; false if the
    /// child exits first or another process answers.
    fn serving(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if !matches!(child.try_wait(), Ok(None)) {
                return false;
            }
            if let Some(pid) = redis_pid(self.port) {
                return pid == child.id();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// A redis-server on `port` (0: a free one) writing every command to an append-only
    /// file in `dir` (fsync always), so that stopping and starting it again on the same
    /// port and directory keeps every write it acknowledged.
    pub fn start_persistent(dir: &Path, port: u16) -> Redis {
        let dir = dir.to_str().expect("a UTF-8 temporary directory");
        Redis::spawn(
            port,
            &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                dir,
            ],
        )
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The process id a Redis server on `port` reports (`INFO server`), if one answers.
fn redis_pid(port: u16) -> Option<u32> {
    use std::io::Write;
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    c.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n").ok()?;
    let (mut text, mut buf) = (String::new(), [0u8; 4096]);
    loop {
        // The reply is a bulk string of `field:value\r\n` lines; wait for the whole line.
        if let Some((pid, _)) = text
            .split("process_id:")
            .nth(1)
            .and_then(|r| r.split_once('\r'))
        {
            return pid.trim().parse().ok();
        }
        let n = c.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
