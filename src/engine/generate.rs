//! Decoding: greedy or seeded sampling (temperature, top-k, top-p), stop on EOS or stop
//! strings, tokens streamed as they come.

use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::kv::KvCache;
use crate::model::{Logits, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_new_tokens: 32,
            stop: Vec::new(),
        }
    }
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidInput(m.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS token or a stop string.
    Stop,
    /// max_new_tokens reached.
    Length,
    /// The caller's callback asked to stop (e.g. a client disconnected).
    Cancelled,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// Decode time after the first token (which comes from the assembly's logits).
    pub decode_ms: f64,
}

impl Generation {
    /// Decode tokens per second (tokens after the first, over the decode time).
    pub fn decode_tok_s(&self) -> f64 {
        if self.tokens.len() < 2 || self.decode_ms <= 0.0 {
            return 0.0;
        }
        (self.tokens.len() - 1) as f64 / (self.decode_ms / 1e3)
    }
}

pub struct Sampler {
    params: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: Sampling) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        if self.params.temperature == 0.0 {
            return Ok(argmax(&logits));
        }
        let t = self.params.temperature;
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.params.top_k > 0 {
            idx.truncate(self.params.top_k);
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / t).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        // Nucleus: the smallest prefix whose mass reaches top_p.
        let mut acc = 0.0;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= self.params.top_p {
                cut = i + 1;
                break;
            }
        }
        let mass: f32 = probs[..cut].iter().sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (i, p) in probs[..cut].iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return Ok(idx[i] as u32);
            }
        }
        Ok(idx[cut - 1] as u32)
    }
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates from `first_logits` over `cache` (which may have position gaps), appending each
/// new token at the next position. `on_text` receives text deltas and returns false to stop.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    first_logits: &Tensor,
    params: &Sampling,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    params.validate()?;
    let mut sampler = Sampler::new(params.clone());
    let mut stream = tokenizer.stream_decoder();
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut logits = first_logits.clone();
    let mut pos = cache.next_position();
    let t0 = Instant::now();
    let mut finish = FinishReason::Length;
    while tokens.len() < params.max_new_tokens {
        let tok = sampler.sample(&logits)?;
        if tokenizer.is_eos(tok) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(tok);
        if let Some(delta) = stream.push(tok)? {
            text.push_str(&delta);
            if let Some(cut) = params
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(cut);
                finish = FinishReason::Stop;
                break;
            }
            if !on_text(&delta) {
                finish = FinishReason::Cancelled;
                break;
            }
        }
        if tokens.len() == params.max_new_tokens {
            break;
        }
        if pos as usize >= model.cfg.max_context {
            break;
        }
        let out = model.forward(&[tok], &[pos], cache, Logits::Last, &[])?;
        logits = crate::methods::last_logits(out.logits)?;
        pos += 1;
    }
    if finish != FinishReason::Stop {
        if let Some(rest) = stream.finish()? {
            text.push_str(&rest);
            on_text(&rest);
        }
    }
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(Generation {
        text,
        tokens,
        finish,
        decode_ms,
    })
}
