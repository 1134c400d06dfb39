//! Command-line numbers and medians for the bench binaries
//! (`node/benches/{batch,discovery,healing,hostile,nat,private,swarm,verify}.rs` include this file with `#[path]`).
#![allow(dead_code, missing_docs, unreachable_pub)]

/// The number after `name` on the command line (`--trials 20`), or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (the upper one of an even count), NaN when empty; sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
