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

/// What [`TextDecoder::step`] decided about the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Feed this token to the model (at the next position) and step again.
    Feed(u32),
    /// The sequence is done.
    Done(FinishReason),
}

/// One sequence's decoding: sampling, detokenizing, EOS and stop strings, and what text may
/// be released. Text that could be the start of a stop string is held back until the next
/// tokens show it is not, so a caller never sees part of a stop string. Shared by
/// [`generate`] and the server's batched loop, so both stop the same way.
pub struct TextDecoder {
    sampler: Sampler,
    stream: crate::tokenizer::StreamDecoder,
    params: Sampling,
    ignore_eos: bool,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` already released.
    released: usize,
}

impl TextDecoder {
    pub fn new(tokenizer: &Tokenizer, params: &Sampling, ignore_eos: bool) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            sampler: Sampler::new(params.clone()),
            stream: tokenizer.stream_decoder(),
            params: params.clone(),
            ignore_eos,
            tokens: Vec::new(),
            text: String::new(),
            released: 0,
        })
    }

    /// Samples the next token from `logits`. Returns the text that may now be released (maybe
    /// empty) and whether to go on. `at_context_end`: the model has no position left for the
    /// token, so it ends the sequence (as `Length`) instead of being fed.
    pub fn step(
        &mut self,
        tokenizer: &Tokenizer,
        logits: &Tensor,
        at_context_end: bool,
    ) -> Result<(String, Step)> {
        let tok = self.sampler.sample(logits)?;
        if !self.ignore_eos && tokenizer.is_eos(tok) {
            return Ok((
                self.finish(FinishReason::Stop)?,
                Step::Done(FinishReason::Stop),
            ));
        }
        self.tokens.push(tok);
        if let Some(delta) = self.stream.push(tok)? {
            self.text.push_str(&delta);
            if self.cut_at_stop() {
                return Ok((
                    self.release(self.text.len()),
                    Step::Done(FinishReason::Stop),
                ));
            }
        }
        if self.tokens.len() >= self.params.max_new_tokens || at_context_end {
            return Ok((
                self.finish(FinishReason::Length)?,
                Step::Done(FinishReason::Length),
            ));
        }
        Ok((self.release(self.safe_len()), Step::Feed(tok)))
    }

    /// Ends the sequence: for `Stop` (EOS) and `Length` the detokenizer's pending text is
    /// added (stop strings still apply to it) and everything not yet released is returned;
    /// for `Cancelled`, nothing.
    pub fn finish(&mut self, reason: FinishReason) -> Result<String> {
        if reason == FinishReason::Cancelled {
            return Ok(String::new());
        }
        if let Some(rest) = self.stream.finish()? {
            self.text.push_str(&rest);
            self.cut_at_stop();
        }
        Ok(self.release(self.text.len()))
    }

    /// Truncates the text at the first stop string; whether there was one.
    fn cut_at_stop(&mut self) -> bool {
        let cut = self
            .params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(cut) = cut {
            self.text.truncate(cut);
        }
        cut.is_some()
    }

    /// Length of the text that can be released: all but a tail that could begin a stop string.
    fn safe_len(&self) -> usize {
        let mut hold = 0;
        for s in &self.params.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        self.text.len() - hold
    }

    fn release(&mut self, end: usize) -> String {
        // A stop string cannot cut below what was released (safe_len held any tail that could
        // begin one), but nothing here may panic if it did.
        if end <= self.released {
            return String::new();
        }
        let s = self.text[self.released..end].to_string();
        self.released = end;
        s
    }

    /// Tokens sampled so far (EOS not included).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The text so far, stop string removed.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_parts(self) -> (String, Vec<u32>) {
        (self.text, self.tokens)
    }
}

/// Generates from `first_logits` over `cache` (which may have position gaps), appending each
/// new token at the next position. `on_text` receives text deltas (never part of a stop
/// string) and returns false to stop.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    first_logits: &Tensor,
    params: &Sampling,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let mut dec = TextDecoder::new(tokenizer, params, false)?;
    let mut logits = first_logits.clone();
    let mut pos = cache.next_position();
    let t0 = Instant::now();
    let finish = loop {
        let at_end = pos as usize >= model.cfg.max_context;
        let (delta, step) = dec.step(tokenizer, &logits, at_end)?;
        if !delta.is_empty() && !on_text(&delta) {
            break FinishReason::Cancelled;
        }
        match step {
            Step::Done(reason) => break reason,
            Step::Feed(tok) => {
                let out = model.forward(&[tok], &[pos], cache, Logits::Last, &[])?;
                logits = crate::methods::last_logits(out.logits)?;
                pos += 1;
            }
        }
    };
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (text, tokens) = dec.into_parts();
    Ok(Generation {
        text,
        tokens,
        finish,
        decode_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use candle_core::Device;

    fn smol() -> Tokenizer {
        let path = crate::fetch::test_model_path("smollm2");
        let mut f = std::fs::File::open(&path).expect("open model");
        let content = gguf_file::Content::read(&mut f).expect("read GGUF header");
        Tokenizer::from_gguf(&content).expect("build tokenizer")
    }

    /// Logits that make greedy sampling pick `tok`.
    fn one_hot(tok: u32, vocab: usize) -> Tensor {
        let mut v = vec![0f32; vocab];
        v[tok as usize] = 1.0;
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    /// Decodes `text`'s tokens one by one with `stop`; returns the released pieces, the final
    /// text and how it finished.
    fn drive(t: &Tokenizer, text: &str, stop: &[&str], max: usize) -> (Vec<String>, String, Step) {
        let params = Sampling {
            max_new_tokens: max,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..Sampling::default()
        };
        let ids = t.encode(text).unwrap();
        let vocab = ids.iter().max().unwrap() + 1;
        let mut dec = TextDecoder::new(t, &params, false).unwrap();
        let mut pieces = Vec::new();
        for &id in &ids {
            let (delta, step) = dec.step(t, &one_hot(id, vocab as usize), false).unwrap();
            pieces.push(delta);
            if let Step::Done(_) = step {
                return (pieces, dec.text().to_string(), step);
            }
        }
        let rest = dec.finish(FinishReason::Length).unwrap();
        pieces.push(rest);
        (
            pieces,
            dec.text().to_string(),
            Step::Done(FinishReason::Length),
        )
    }

    #[test]
    fn no_released_piece_holds_part_of_a_stop_string() {
        let t = smol();
        let text = "The tower was designed by Gustave Eiffel.\nQuestion: who else?";
        // A stop string that spans several tokens: its first tokens ("\n", "Question") must
        // be held back until the whole string is seen, and then dropped.
        let (pieces, out, step) = drive(&t, text, &["\nQuestion:"], 64);
        assert_eq!(step, Step::Done(FinishReason::Stop));
        assert_eq!(out, "The tower was designed by Gustave Eiffel.");
        assert_eq!(pieces.concat(), out);
        for p in &pieces {
            assert!(!p.contains('\n') && !p.contains("Question"), "{pieces:?}");
        }
    }

    #[test]
    fn a_held_tail_that_is_no_stop_string_is_released() {
        let t = smol();
        // "\nQ" begins the stop string, "\nQuick" does not: it must come out in full.
        let text = "Fine.\nQuick answer.";
        let (pieces, out, step) = drive(&t, text, &["\nQuestion:"], 64);
        assert_eq!(step, Step::Done(FinishReason::Length));
        assert_eq!(out, text);
        assert_eq!(pieces.concat(), text);
        // And the length limit releases a held tail too.
        let (pieces, out, _) = drive(&t, "Fine.\nQuestion", &["\nQuestion:"], 64);
        assert_eq!(out, "Fine.\nQuestion");
        assert_eq!(pieces.concat(), out);
    }

    #[test]
    fn eos_and_length_finish() {
        let t = smol();
        let (pieces, out, step) = drive(&t, "one two three four", &[], 2);
        assert_eq!(step, Step::Done(FinishReason::Length));
        assert_eq!(pieces.concat(), out);
        assert_eq!(t.encode(&out).unwrap().len(), 2);
        let params = Sampling::default();
        let mut dec = TextDecoder::new(&t, &params, false).unwrap();
        let eos = (0..t.vocab_size() as u32).find(|&i| t.is_eos(i)).unwrap();
        let (delta, step) = dec.step(&t, &one_hot(eos, t.vocab_size()), false).unwrap();
        assert_eq!((delta.as_str(), step), ("", Step::Done(FinishReason::Stop)));
        assert!(dec.tokens().is_empty());
        // At the end of the context the sampled token is the last.
        let mut dec = TextDecoder::new(&t, &params, false).unwrap();
        let id = t.encode("Hi").unwrap()[0];
        let (_, step) = dec.step(&t, &one_hot(id, t.vocab_size()), true).unwrap();
        assert_eq!(step, Step::Done(FinishReason::Length));
    }
}
