//! Fault injection for tests: a server that starts lying after some steps. Compiled only
//! with the `fault-injection` feature, which the test and bench builds turn on (the
//! crate's dev-dependency on itself); `cargo build --release` has neither this module
//! nor `pollen serve --fault`.
//!
//! A faulty server also claims [`CLAIM_FACTOR`] times its measured throughput, so that
//! fresh clients route through it. A fault is process-wide: one server per process, as
//! in the multi-process tests.

use candle_core::Tensor;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a faulty server corrupts its outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Adds this much to every value.
    Perturb(f32),
    /// Replaces every value with NaN.
    Nan,
    /// Computes honestly but reports that the hop before sent it non-finite hidden
    /// states (a false accusation), refusing the step.
    Accuse,
    /// Instead of computing a step, sends up a report in the name of the route's last
    /// hop that the last hop failed, signed with its own key (all a hop can sign with).
    Forge,
    /// Answers every `Open` saying the session has room for no tokens.
    NoRoom,
}

/// A fault: from step `after + 1` on, every `every`-th step is corrupted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    /// What is done to an output.
    pub kind: Kind,
    /// Steps computed honestly first.
    pub after: u64,
    /// Of the later steps, one in this many is corrupted (1: all).
    pub every: u64,
}

static FAULT: OnceLock<Fault> = OnceLock::new();
static STEPS: AtomicU64 = AtomicU64::new(0);

/// The amount a `perturb` fault adds to every value: small next to hidden states of
/// magnitude 1 to 100, far beyond the spot-check tolerance.
pub const PERTURBATION: f32 = 0.05;

impl Fault {
    /// Parses `KIND:AFTER[:EVERY]`, KIND `perturb`, `nan`, `accuse`, `forge` or `noroom`: for example `perturb:5`
    /// (every step after the fifth) or `perturb:0:100` (one step in a hundred).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut parts = spec.split(':');
        let kind = match parts.next() {
            Some("perturb") => Kind::Perturb(PERTURBATION),
            Some("nan") => Kind::Nan,
            Some("accuse") => Kind::Accuse,
            Some("forge") => Kind::Forge,
            Some("noroom") => Kind::NoRoom,
            other => {
                return Err(format!(
                    "unknown fault kind {other:?} (perturb, nan, accuse, forge or noroom)"
                ));
            }
        };
        let num = |p: Option<&str>, default: u64| -> Result<u64, String> {
            p.map_or(Ok(default), |s| {
                s.parse().map_err(|e| format!("bad number {s:?}: {e}"))
            })
        };
        let after = num(parts.next(), 0)?;
        let every = num(parts.next(), 1)?.max(1);
        if parts.next().is_some() {
            return Err(format!("fault {spec:?}: expected KIND:AFTER[:EVERY]"));
        }
        Ok(Self { kind, after, every })
    }

    /// Whether the `n`-th step (from 1) is corrupted.
    pub fn hits(&self, n: u64) -> bool {
        n > self.after && (n - self.after).is_multiple_of(self.every)
    }
}

/// Makes this process's server faulty; an error if it already is.
pub fn install(fault: Fault) -> Result<(), String> {
    tracing::warn!("fault injection: {fault:?}");
    FAULT
        .set(fault)
        .map_err(|_| "a fault is already installed".to_string())
}

/// How much faster than it measured a faulty server claims to be: a liar also wants
/// the traffic.
pub const CLAIM_FACTOR: f32 = 100.0;

/// The throughput this server announces: `measured`, or [`CLAIM_FACTOR`] times it when
/// a fault is installed.
pub fn claim(measured: f32) -> f32 {
    if FAULT.get().is_some() {
        measured * CLAIM_FACTOR
    } else {
        measured
    }
}

/// One step's input as a faulty server pretends it arrived: non-finite, if the installed
/// fault is [`Kind::Accuse`] and says so for this step.
pub fn received(input: Tensor) -> Tensor {
    let Some(f) = FAULT.get().filter(|f| f.kind == Kind::Accuse) else {
        return input;
    };
    let n = STEPS.fetch_add(1, Ordering::Relaxed) + 1;
    if !f.hits(n) {
        return input;
    }
    input.affine(0.0, f64::NAN).unwrap_or(input)
}

/// The room for tokens this server says a session it opened has: `free`, or none
/// ([`Kind::NoRoom`]).
pub fn room(free: u32) -> u32 {
    match FAULT.get() {
        Some(f) if f.kind == Kind::NoRoom => 0,
        _ => free,
    }
}

/// Whether this step is answered with a forged report ([`Kind::Forge`]) instead of
/// being computed.
pub fn forges() -> bool {
    let Some(f) = FAULT.get().filter(|f| f.kind == Kind::Forge) else {
        return false;
    };
    f.hits(STEPS.fetch_add(1, Ordering::Relaxed) + 1)
}

/// One step's output, corrupted if the installed fault says so.
pub fn apply(out: Tensor) -> Tensor {
    let Some(f) = FAULT
        .get()
        .filter(|f| matches!(f.kind, Kind::Perturb(_) | Kind::Nan))
    else {
        return out;
    };
    let n = STEPS.fetch_add(1, Ordering::Relaxed) + 1;
    if !f.hits(n) {
        return out;
    }
    let bad = match f.kind {
        Kind::Perturb(by) => out.affine(1.0, f64::from(by)),
        _ => out.affine(0.0, f64::NAN),
    };
    bad.unwrap_or(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn specs_parse_and_hit_the_right_steps() {
        let f = Fault::parse("perturb:5").unwrap();
        assert_eq!(f.kind, Kind::Perturb(PERTURBATION));
        assert!(!(1..=5).any(|n| f.hits(n)));
        assert!((6..=20).all(|n| f.hits(n)));
        let f = Fault::parse("nan:0:100").unwrap();
        assert_eq!(f.kind, Kind::Nan);
        assert_eq!((1..=1000).filter(|&n| f.hits(n)).count(), 10);
        assert_eq!(Fault::parse("accuse:2").unwrap().kind, Kind::Accuse);
        assert_eq!(Fault::parse("forge:2").unwrap().kind, Kind::Forge);
        assert_eq!(Fault::parse("noroom:0").unwrap().kind, Kind::NoRoom);
        assert!(Fault::parse("melt:1").is_err());
        assert!(Fault::parse("nan:x").is_err());
        assert!(Fault::parse("nan:1:2:3").is_err());
    }
}
