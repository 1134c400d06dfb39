//! Automatic placement: which contiguous span of blocks a server should hold so that the
//! swarm's weakest block (the smallest total throughput over all blocks) is as strong as
//! it can be, and when moving is worth it.
//!
//! Pure: no I/O, no clock, no network. The server role ([`crate::serve`]) feeds it the
//! swarm's announcements and acts on its answers; [`sim`] replays a swarm of servers
//! joining and leaving to measure it.
//!
//! ## The rule
//!
//! A server's *span throughput* (tokens/s through its whole span, what it announces)
//! adds to every block of its span; a block's *total* is the sum over the servers
//! holding it, and the swarm's *bottleneck* is the smallest total. Spans are compared by
//! the *profile* they leave: the per-block totals sorted ascending, compared
//! lexicographically (leximin). The better profile has the stronger weakest block; on a
//! tie, fewer blocks at that level; and so on. Uncovered blocks (total 0) come first, so
//! covering them wins every tie.
//!
//! - **Choose** ([`choose_span`]): a joining server takes the window of its length with
//!   the best resulting profile. Among equal windows it prefers one aligned to the ends
//!   of the model or to other spans (it leaves no sliver), then a pseudo-random one keyed
//!   by its own id, so that servers joining at once spread out.
//! - **Move** ([`plan_move`]): every server evaluates, for *every* server of the swarm
//!   (itself included), the best window that server could move to, and keeps the moves
//!   that improve the profile *clearly*: at the first place where the sorted profiles
//!   differ, the new value is at least [`MARGIN`] (5%) above the old one, or the old one
//!   was an uncovered block. Of those it picks one mover: the best resulting profile,
//!   ties to the smallest id. A server moves only when that mover is itself.
//!
//! No oscillation: each accepted move raises the profile strictly in leximin order, which
//! takes finitely many values for a given set of servers, so moves stop, and a span never
//! comes back to a profile it left (two servers cannot keep swapping). Every server that
//! sees the same announcements picks the same single mover, so they do not all jump at
//! once; the server adds jitter before acting and re-reads the swarm, so a stale view
//! costs at most a round.

pub mod memory;
pub mod sim;

use std::cmp::Ordering;
use std::ops::Range;

/// How much better the weakest changed place must get for a move: 5%. Smaller margins
/// reach closer to the optimum with many more moves (the placement bench prints the
/// trade: at 0 a swarm of 100 moves about 4 times per join or leave, at 5% once per
/// ten).
pub const MARGIN: f64 = 0.05;

/// Totals within this relative distance count as equal (float noise).
const TOLERANCE: f64 = 1e-9;

/// The most a single server's throughput counts for (tokens/s): a peer that claims more
/// cannot drag the swarm's placement around by itself.
pub const MAX_CLAIMED_THROUGHPUT: f64 = 1e6;

/// One server's place in the swarm.
#[derive(Debug, Clone, PartialEq)]
pub struct Holding<K> {
    /// Who holds it (a peer id's bytes, in a swarm).
    pub who: K,
    /// Its blocks, `[start, end)`.
    pub span: Range<usize>,
    /// Tokens/s through its whole span; added to every block of the span.
    pub throughput: f64,
}

/// A server's throughput as placement counts it: finite, at least 0, at most
/// [`MAX_CLAIMED_THROUGHPUT`].
pub fn sane_throughput(t: f64) -> f64 {
    if t.is_finite() {
        t.clamp(0.0, MAX_CLAIMED_THROUGHPUT)
    } else {
        0.0
    }
}

/// Per-block totals of `holdings` over `num_blocks` blocks (spans are clipped to the model).
pub fn totals<K>(num_blocks: usize, holdings: &[Holding<K>]) -> Vec<f64> {
    let mut t = vec![0.0; num_blocks];
    for h in holdings {
        add(&mut t, &h.span, sane_throughput(h.throughput));
    }
    t
}

fn add(t: &mut [f64], span: &Range<usize>, v: f64) {
    let end = span.end.min(t.len());
    for x in &mut t[span.start.min(end)..end] {
        *x += v;
    }
}

/// The smallest per-block total (0 when a block is uncovered or there are no blocks).
pub fn bottleneck(totals: &[f64]) -> f64 {
    totals.iter().copied().reduce(f64::min).unwrap_or(0.0)
}

/// Blocks that no one holds.
pub fn uncovered(totals: &[f64]) -> usize {
    totals.iter().filter(|t| **t <= 0.0).count()
}

/// Totals sorted ascending: the profile placement compares.
pub fn profile(totals: &[f64]) -> Vec<f64> {
    let mut p = totals.to_vec();
    p.sort_by(f64::total_cmp);
    p
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOLERANCE * a.abs().max(b.abs()).max(1e-12)
}

/// Leximin order of two profiles (each sorted ascending, of equal length).
pub fn compare_profiles(a: &[f64], b: &[f64]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        if !same(*x, *y) {
            return x.total_cmp(y);
        }
    }
    Ordering::Equal
}

/// Whether profile `new` is clearly better than `old`: at the first place they differ,
/// `new` is higher by at least `margin` (a fraction), or `old` had an uncovered block
/// there.
pub fn clearly_better(new: &[f64], old: &[f64], margin: f64) -> bool {
    for (n, o) in new.iter().zip(old) {
        if !same(*n, *o) {
            return *n > *o && (*o <= 0.0 || *n >= *o * (1.0 + margin));
        }
    }
    false
}

fn seed_of(who: &[u8]) -> [u8; 32] {
    *blake3::hash(who).as_bytes()
}

fn tie_rank(seed: &[u8; 32], start: usize) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(seed);
    h.update(&(start as u64).to_le_bytes());
    *h.finalize().as_bytes()
}

/// The best window of `len` blocks for a server of span throughput `throughput` and id
/// `who`, given the other servers' `totals`; with the profile it leaves.
pub fn best_window(
    totals: &[f64],
    len: usize,
    throughput: f64,
    who: &[u8],
    boundaries: &[usize],
) -> (Range<usize>, Vec<f64>) {
    let n = totals.len();
    let len = len.clamp(1, n.max(1));
    let throughput = sane_throughput(throughput);
    let seed = seed_of(who);
    // The best window so far: span, profile, aligned, tie rank.
    type Best = (Range<usize>, Vec<f64>, bool, [u8; 32]);
    let mut best: Option<Best> = None;
    let mut scratch = totals.to_vec();
    for start in 0..=n.saturating_sub(len) {
        let span = start..start + len;
        scratch.copy_from_slice(totals);
        add(&mut scratch, &span, throughput);
        let p = profile(&scratch);
        let aligned = start == 0
            || span.end == n
            || boundaries.contains(&start)
            || boundaries.contains(&span.end);
        let rank = tie_rank(&seed, start);
        let better = match &best {
            None => true,
            Some((_, bp, ba, br)) => match compare_profiles(&p, bp) {
                Ordering::Greater => true,
                Ordering::Less => false,
                Ordering::Equal => {
                    (aligned, std::cmp::Reverse(rank)) > (*ba, std::cmp::Reverse(*br))
                }
            },
        };
        if better {
            best = Some((span, p, aligned, rank));
        }
    }
    match best {
        Some((span, p, _, _)) => (span, p),
        None => (0..0, profile(totals)),
    }
}

/// Where spans start or end, other than the model's own ends.
fn boundaries<K>(holdings: &[Holding<K>]) -> Vec<usize> {
    let mut b: Vec<usize> = holdings
        .iter()
        .flat_map(|h| [h.span.start, h.span.end])
        .collect();
    b.sort_unstable();
    b.dedup();
    b
}

/// The span a joining server should take: `len` blocks of a model of `num_blocks`, given
/// the other servers' holdings (its own left out).
pub fn choose_span<K: AsRef<[u8]>>(
    num_blocks: usize,
    others: &[Holding<K>],
    who: &K,
    len: usize,
    throughput: f64,
) -> Range<usize> {
    let t = totals(num_blocks, others);
    best_window(&t, len, throughput, who.as_ref(), &boundaries(others)).0
}

/// A move [`plan_move`] found worth making.
#[derive(Debug, Clone, PartialEq)]
pub struct Move<K> {
    /// Who should move.
    pub who: K,
    /// From where.
    pub from: Range<usize>,
    /// To where.
    pub to: Range<usize>,
    /// The swarm's bottleneck before, tokens/s.
    pub bottleneck_before: f64,
    /// And after.
    pub bottleneck_after: f64,
    /// Blocks at the bottleneck before (a move may leave the bottleneck as it is and
    /// lift some of its blocks).
    pub weakest_before: usize,
    /// And after.
    pub weakest_after: usize,
}

/// How many blocks of a profile (sorted ascending) are at its first value.
fn at_bottleneck(profile: &[f64]) -> usize {
    profile
        .first()
        .map_or(0, |b| profile.iter().take_while(|x| same(**x, *b)).count())
}

/// The one move the swarm should make now, if any clearly helps: see the module's rule.
/// Every server of the swarm computes the same answer from the same `holdings`; the
/// one it names moves.
pub fn plan_move<K: AsRef<[u8]> + Ord + Clone>(
    num_blocks: usize,
    holdings: &[Holding<K>],
) -> Option<Move<K>> {
    plan_move_with_margin(num_blocks, holdings, MARGIN)
}

/// [`plan_move`] with another margin than [`MARGIN`] (the bench compares them).
pub fn plan_move_with_margin<K: AsRef<[u8]> + Ord + Clone>(
    num_blocks: usize,
    holdings: &[Holding<K>],
    margin: f64,
) -> Option<Move<K>> {
    plan_move_among(num_blocks, holdings, margin, |_| true)
}

/// [`plan_move_with_margin`], naming only servers that `movable` accepts (a server that
/// was named and stayed put, pinned with `--blocks`, still counts for coverage).
pub fn plan_move_among<K: AsRef<[u8]> + Ord + Clone>(
    num_blocks: usize,
    holdings: &[Holding<K>],
    margin: f64,
    movable: impl Fn(&K) -> bool,
) -> Option<Move<K>> {
    let now = totals(num_blocks, holdings);
    let old = profile(&now);
    let bounds = boundaries(holdings);
    let mut best: Option<(Move<K>, Vec<f64>)> = None;
    for h in holdings.iter().filter(|h| movable(&h.who)) {
        let t = sane_throughput(h.throughput);
        let mut without = now.clone();
        add(&mut without, &h.span, -t);
        let len = h.span.end.min(num_blocks).saturating_sub(h.span.start);
        if len == 0 {
            continue;
        }
        let (to, p) = best_window(&without, len, t, h.who.as_ref(), &bounds);
        if to == h.span || !clearly_better(&p, &old, margin) {
            continue;
        }
        let better = match &best {
            None => true,
            Some((m, bp)) => match compare_profiles(&p, bp) {
                Ordering::Greater => true,
                Ordering::Less => false,
                Ordering::Equal => h.who < m.who,
            },
        };
        if better {
            let after = p.first().copied().unwrap_or(0.0);
            best = Some((
                Move {
                    who: h.who.clone(),
                    from: h.span.clone(),
                    to,
                    bottleneck_before: bottleneck(&now),
                    bottleneck_after: after,
                    weakest_before: at_bottleneck(&old),
                    weakest_after: at_bottleneck(&p),
                },
                p,
            ));
        }
    }
    best.map(|(m, _)| m)
}

/// How many blocks a server holds: `override_blocks` when given, else as many as fit in
/// `budget` bytes at `per_block` bytes each; at least 1, at most `num_blocks`.
pub fn blocks_that_fit(
    num_blocks: usize,
    budget: u64,
    per_block: u64,
    override_blocks: Option<usize>,
) -> usize {
    let fit = override_blocks
        .unwrap_or_else(|| usize::try_from(budget / per_block.max(1)).unwrap_or(usize::MAX));
    fit.clamp(1, num_blocks.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(who: u8, span: Range<usize>, throughput: f64) -> Holding<[u8; 1]> {
        Holding {
            who: [who],
            span,
            throughput,
        }
    }

    #[test]
    fn a_joiner_covers_uncovered_blocks_first() {
        let others = [h(1, 0..15, 10.0)];
        assert_eq!(choose_span(30, &others, &[2], 15, 10.0), 15..30);
        // A faster server elsewhere does not distract it from the gap.
        let others = [h(1, 0..10, 10.0), h(2, 20..30, 50.0)];
        assert_eq!(choose_span(30, &others, &[3], 10, 1.0), 10..20);
        // Longer than the gap: the gap is covered, aligned to a boundary.
        let span = choose_span(30, &others, &[3], 15, 1.0);
        assert!(span.start <= 10 && span.end >= 20, "{span:?}");
    }

    #[test]
    fn a_joiner_strengthens_the_weakest_blocks() {
        // Full coverage; blocks 10..20 are weakest.
        let others = [h(1, 0..10, 30.0), h(2, 10..20, 5.0), h(3, 20..30, 30.0)];
        assert_eq!(choose_span(30, &others, &[4], 10, 5.0), 10..20);
    }

    #[test]
    fn the_empty_swarm_is_split_at_the_ends() {
        for who in 0..20u8 {
            let span = choose_span::<[u8; 1]>(30, &[], &[who], 15, 1.0);
            assert!(span == (0..15) || span == (15..30), "{span:?}");
        }
        // And different ids do not all pick the same end.
        let starts: std::collections::HashSet<usize> = (0..20u8)
            .map(|w| choose_span::<[u8; 1]>(30, &[], &[w], 15, 1.0).start)
            .collect();
        assert_eq!(starts.len(), 2);
    }

    #[test]
    fn one_server_moves_to_fill_a_gap_left_by_another() {
        // B (15..30) left; A and C both hold 0..15: exactly one of them moves.
        let swarm = [h(1, 0..15, 10.0), h(3, 0..15, 10.0)];
        let m = plan_move(30, &swarm).expect("a move");
        assert_eq!(m.who, [1]);
        assert_eq!(m.to, 15..30);
        assert_eq!(m.bottleneck_before, 0.0);
        assert_eq!(m.bottleneck_after, 10.0);
        assert_eq!((m.weakest_before, m.weakest_after), (15, 30));
        // After it moved, nobody moves again.
        let swarm = [h(1, 15..30, 10.0), h(3, 0..15, 10.0)];
        assert_eq!(plan_move(30, &swarm), None);
    }

    #[test]
    fn small_gains_do_not_move_anyone() {
        // 0..15 has 10, 15..30 has 10.5: moving one of the 0..15 pair would not help,
        // and equal swarms stay put.
        let swarm = [h(1, 0..15, 5.0), h(2, 0..15, 5.0), h(3, 15..30, 10.5)];
        assert_eq!(plan_move(30, &swarm), None);
        let swarm = [h(1, 0..15, 10.0), h(2, 15..30, 10.0)];
        assert_eq!(plan_move(30, &swarm), None);
    }

    #[test]
    fn a_clear_imbalance_moves_the_server_that_helps_most() {
        // 0..15 holds 30, 15..30 holds 10: one of the 0..15 servers joins the weak half.
        let swarm = [
            h(1, 0..15, 10.0),
            h(2, 0..15, 10.0),
            h(3, 0..15, 10.0),
            h(4, 15..30, 10.0),
        ];
        let m = plan_move(30, &swarm).expect("a move");
        assert_eq!(m.to, 15..30);
        assert!([[1], [2], [3]].contains(&m.who));
        assert!(m.bottleneck_after >= 20.0 - 1e-9);
    }

    /// Applies `plan_move` until nothing moves; the number of moves, or `None` when a
    /// state repeats (an oscillation).
    fn settle(num_blocks: usize, swarm: &mut [Holding<[u8; 1]>], cap: usize) -> Option<usize> {
        let mut seen = vec![swarm.to_vec()];
        for moves in 0..cap {
            let Some(m) = plan_move(num_blocks, swarm) else {
                return Some(moves);
            };
            let who = swarm.iter_mut().find(|x| x.who == m.who)?;
            who.span = m.to;
            if seen.contains(&swarm.to_vec()) {
                return None;
            }
            seen.push(swarm.to_vec());
        }
        None
    }

    #[test]
    fn moves_settle_without_oscillation() {
        // Two servers over-covering one half, with near-equal speeds (the classic swap).
        let mut swarm = vec![h(1, 0..15, 10.0), h(2, 0..15, 10.5)];
        assert_eq!(settle(30, &mut swarm, 10), Some(1));
        // Many servers, all piled on one end, with varied speeds and lengths.
        let mut swarm: Vec<_> = (0..12u8)
            .map(|i| {
                h(
                    i,
                    0..(5 + (i as usize * 7) % 20),
                    3.0 + (i as f64 * 1.7) % 11.0,
                )
            })
            .collect();
        let moves = settle(40, &mut swarm, 200).expect("settles without repeating a state");
        assert!(moves > 0);
        let t = totals(40, &swarm);
        assert_eq!(uncovered(&t), 0);
        // Settled means stable: another round changes nothing.
        assert_eq!(plan_move(40, &swarm), None);
    }

    #[test]
    fn a_server_that_stays_put_is_passed_over() {
        // 0..15 holds three, 15..30 one: server 1 would be named, but it is pinned.
        let swarm = [
            h(1, 0..15, 10.0),
            h(2, 0..15, 10.0),
            h(3, 0..15, 10.0),
            h(4, 15..30, 10.0),
        ];
        assert_eq!(plan_move(30, &swarm).map(|m| m.who), Some([1]));
        let m = plan_move_among(30, &swarm, MARGIN, |w| *w != [1]).expect("a move");
        assert_eq!((m.who, m.to), ([2], 15..30));
        assert_eq!(plan_move_among(30, &swarm, MARGIN, |w| *w == [4]), None);
    }

    #[test]
    fn hostile_throughputs_are_bounded() {
        assert_eq!(sane_throughput(f64::NAN), 0.0);
        assert_eq!(sane_throughput(-5.0), 0.0);
        assert_eq!(sane_throughput(f64::INFINITY), 0.0);
        assert_eq!(sane_throughput(1e300), MAX_CLAIMED_THROUGHPUT);
        // A span past the model's end is clipped, not a panic.
        let t = totals(10, &[h(1, 5..50, 1.0), h(2, 40..60, 1.0)]);
        assert_eq!(uncovered(&t), 5);
    }

    #[test]
    fn blocks_fit_the_budget() {
        assert_eq!(blocks_that_fit(30, 10 << 20, 1 << 20, None), 10);
        assert_eq!(blocks_that_fit(30, 100 << 20, 1 << 20, None), 30);
        assert_eq!(blocks_that_fit(30, 100, 1 << 20, None), 1);
        assert_eq!(blocks_that_fit(30, 100, 1 << 20, Some(15)), 15);
        assert_eq!(blocks_that_fit(30, 100, 0, Some(99)), 30);
    }
}
