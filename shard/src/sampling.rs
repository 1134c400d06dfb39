//! Choosing the next token from logits: greedy, temperature, top-k, top-p,
//! repetition penalty, with a seed so the same seed gives the same text.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) is greedy; higher is more random.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1 = off).
    pub top_p: f32,
    /// Divide (or multiply, for negative logits) recent tokens' logits by this (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

/// Picks tokens according to [`SamplingParams`].
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value; the first one on ties; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token, given the logits and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        let p = &self.params;
        if p.repeat_penalty != 1.0 && p.repeat_penalty > 0.0 {
            let start = context.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &context[start..] {
                if !seen.insert(t) {
                    continue;
                }
                if let Some(l) = logits.get_mut(t as usize) {
                    if *l >= 0.0 {
                        *l /= p.repeat_penalty;
                    } else {
                        *l *= p.repeat_penalty;
                    }
                }
            }
        }
        if p.temperature <= 0.0 || !p.temperature.is_finite() {
            return argmax(&logits);
        }
        let max = logits
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let e = if l.is_nan() {
                    0.0
                } else {
                    ((l - max) / p.temperature).exp()
                };
                (i as u32, e)
            })
            .filter(|(_, e)| *e > 0.0)
            .collect();
        if probs.is_empty() {
            return argmax(&logits);
        }
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && probs.len() > p.top_k {
            probs.truncate(p.top_k);
        }
        let total: f32 = probs.iter().map(|x| x.1).sum();
        if p.top_p < 1.0 && p.top_p > 0.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, (_, e)) in probs.iter().enumerate() {
                acc += e / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().map(|x| x.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(id, e) in &probs {
            if r < e {
                return id;
            }
            r -= e;
        }
        probs.last().map(|x| x.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max_and_ignores_nan() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, f32::NAN]), 1);
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[f32::NAN, -1.0, 2.0], &[]), 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 / 3.0).collect();
        let params = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 20,
            seed: 7,
            ..Default::default()
        };
        let run = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone());
            (0..32).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        let other = SamplingParams {
            seed: 8,
            ..params.clone()
        };
        assert_ne!(run(&params), run(&other));
    }

    #[test]
    fn top_k_one_is_greedy_and_penalty_demotes_repeats() {
        let logits = [1.0, 5.0, 4.9];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[1]), 2);
    }
}
