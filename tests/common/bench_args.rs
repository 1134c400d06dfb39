//! Command-line numbers and medians for the bench binaries
//! (`node/benches/{batch,discovery,healing,hostile,nat,private,prompt,swarm,verify}.rs` and
//! `shard/benches/engine.rs` include this file with `#[path]`).
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

/// The CPU's model name and the flags the kernels care about.
pub fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let have: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| {
            [
                "avx2",
                "fma",
                "f16c",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512_vnni",
                "avx_vnni",
                "amx_tile",
                "amx_int8",
            ]
            .contains(f)
        })
        .collect();
    format!("{}; flags: {}", field("model name"), have.join(" "))
}

/// Seconds of CPU that process `pid` has run so far, all its live threads together
/// (the first field of each `/proc/<pid>/task/*/schedstat`, in nanoseconds); `None`
/// where the kernel does not say.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}
