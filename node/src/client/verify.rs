//! Spot checks: with probability p a step's output is computed again on a second route
//! that differs from the session's in one span only, served by another server of that
//! span. The client replays what it fed the session so far (the same inputs in the same
//! chunks, so every other server computes exactly what it computed before) and compares
//! the two outputs of the step.
//!
//! Same weight arithmetic (`compute`), same chunks and same wire dtype give bit-identical
//! numbers, so the outputs must agree within [`TOLERANCE`] (relative to the output's
//! largest value), which leaves room for nothing but rounding. When they disagree, a
//! third server of the span decides: the odd one out is banned. When the session's own
//! server was wrong, the session is re-routed with replay (the healing path), and the
//! step's output comes from the new route. No protocol message is added: the client
//! trusts only its own embeddings and the outputs that reach it, never a hop's report of
//! what another hop computed.

use super::error::{ClientError, HopFailure};
use super::route::Hop;
use super::{SwarmClient, SwarmSession};
use candle_core::Tensor;
use libp2p::PeerId;
use pollen_protocol::{ErrorCode, VerifiedAnnouncement};
use rand::seq::SliceRandom;

/// Largest disagreement tolerated between two outputs of one step, relative to the
/// largest absolute value of the output: 1e-5, about 80 f32 ulps at that value. Servers
/// of one compute mode give identical numbers; anything past this is a different
/// computation.
pub const TOLERANCE: f32 = 1e-5;

/// How old the announcements spot checks choose from may be before they are gathered
/// again.
const BOOK_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// The default probability that a step is spot-checked.
pub const DEFAULT_VERIFY: f64 = 0.05;

/// What a spot check found.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Nothing to compare with, or the check could not run.
    Skipped,
    /// The second server agreed (or was the odd one out, and is banned).
    Agreed,
    /// The session's server at `hop` was the odd one out (it is banned), or is in doubt
    /// (it backs off): the session must be re-routed.
    Wrong(ClientError),
}

/// Counts of spot checks, for reports and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyStats {
    /// Steps checked against a second server.
    pub checks: u64,
    /// Checks where the two disagreed.
    pub disagreements: u64,
    /// Servers banned for a wrong output.
    pub banned: u64,
    /// Steps run.
    pub steps: u64,
    /// The step during which a server was first banned for a wrong output.
    pub first_ban_step: Option<u64>,
}

/// Whether two outputs of one step agree within [`TOLERANCE`].
fn agree(a: &Tensor, b: &Tensor) -> bool {
    super::check::relative_gap(a, b).is_some_and(|g| g <= TOLERANCE)
}

/// The second session spot checks run on: the session's route with every span that
/// another server holds served by another, fed what the session was fed, as far as the
/// last check.
pub(super) struct Shadow {
    route: Vec<Hop>,
    /// The swapped hops and their servers' announcements.
    swapped: Vec<(usize, VerifiedAnnouncement)>,
    session: SwarmSession,
    /// Inputs fed so far.
    fed: usize,
}

impl Shadow {
    /// Whether this shadow still mirrors `route`: the same spans, the same servers where
    /// not swapped, other servers where swapped.
    fn fits(&self, route: &[Hop]) -> bool {
        self.route.len() == route.len()
            && self.route.iter().zip(route).enumerate().all(|(h, (s, r))| {
                let swapped = self.swapped.iter().any(|(i, _)| *i == h);
                s.blocks == r.blocks && (s.peer != r.peer) == swapped
            })
    }

    /// Closes its session.
    pub(super) async fn close(self) {
        self.session.close().await;
    }
}

/// How many times slower than the server it stands in for a second server of a span
/// is given time to be: its own claim is believed up to that, or up to
/// [`SWAP_SLOWEST_US`] a token ([`swap`]).
const SWAP_SLOWDOWN: u32 = 4;
/// The slowest pace believed of a second server whatever the first one claims, in µs a
/// token over its span: 50 tokens a second (a slow CPU checking a fast GPU, or a
/// first server claiming any speed, still leaves an honest second one its time).
const SWAP_SLOWEST_US: u32 = 20_000;

/// A route like `route` with `hop` served by `by` instead, paced as `by` announces
/// itself but never slower than [`SWAP_SLOWDOWN`] times the server it replaces or
/// [`SWAP_SLOWEST_US`], whichever is slower: the pace sets how long the client waits
/// for the hop, and a second server that announces itself as slow as it likes (no
/// throughput at all) would otherwise hold a check, and the answer waiting on it, for
/// hours on a long prompt.
fn swap(route: &[Hop], hop: usize, by: &VerifiedAnnouncement) -> Option<Vec<Hop>> {
    let peer = PeerId::from_bytes(&by.peer.0).ok()?;
    let mut r = route.to_vec();
    let h = r.get_mut(hop)?;
    h.peer = peer;
    h.addrs = by.addrs.iter().filter_map(|s| s.parse().ok()).collect();
    let tps = f64::from(by.throughput);
    let claimed = if tps.is_finite() && tps > 0.0 {
        (1e6 / tps).min(f64::from(u32::MAX)) as u32
    } else {
        u32::MAX
    };
    h.step_us = claimed.min(h.step_us.saturating_mul(SWAP_SLOWDOWN).max(SWAP_SLOWEST_US));
    Some(r)
}

/// Whether `peer` at `hop` of `route` would sit right after or right before a server it
/// is in a dispute with (`apart`: the first is never chained right before the second).
fn next_to_a_dispute(
    route: &[Hop],
    hop: usize,
    peer: &PeerId,
    apart: &std::collections::HashSet<(PeerId, PeerId)>,
) -> bool {
    let before = hop.checked_sub(1).and_then(|i| route.get(i));
    let after = route.get(hop + 1);
    before.is_some_and(|b| apart.contains(&(b.peer, *peer)))
        || after.is_some_and(|a| apart.contains(&(*peer, a.peer)))
}

/// Most third servers asked to settle one disagreement.
const MAX_THIRDS: usize = 3;

/// One of the two servers of a span whose outputs disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OddOne {
    /// The session's own server.
    Suspect,
    /// The server it was checked against.
    Witness,
}

/// What a third server's output says of a disagreement: the odd one out when it agrees
/// with exactly one of the two, else nothing.
fn ruling(agrees_with_suspect: bool, agrees_with_witness: bool) -> Option<OddOne> {
    match (agrees_with_suspect, agrees_with_witness) {
        (true, false) => Some(OddOne::Witness),
        (false, true) => Some(OddOne::Suspect),
        _ => None,
    }
}

/// What a disagreement leads to.
#[derive(Debug, PartialEq, Eq)]
struct Sentence {
    /// Banned as a liar: left out even of last-resort routes.
    liar: Option<OddOne>,
    /// Left out of routes for the ordinary backoff of a failed server, no more.
    backoff: &'static [OddOne],
    /// Whether the session moves off its server.
    reroute: bool,
}

/// The sentence for a disagreement that a third server decided (`Some`) or did not.
/// Undecided, either may be the honest one (a lying witness, and a third that failed or
/// is missing), so neither is called a liar: the session still moves off its server,
/// whose output is in doubt, and both sit out only the ordinary backoff.
fn sentence(decided: Option<OddOne>) -> Sentence {
    match decided {
        Some(OddOne::Suspect) => Sentence {
            liar: Some(OddOne::Suspect),
            backoff: &[],
            reroute: true,
        },
        Some(OddOne::Witness) => Sentence {
            liar: Some(OddOne::Witness),
            backoff: &[],
            reroute: false,
        },
        None => Sentence {
            liar: None,
            backoff: &[OddOne::Suspect, OddOne::Witness],
            reroute: true,
        },
    }
}

impl SwarmClient {
    /// The announcements of the latest route search, gathered again when older than
    /// [`BOOK_MAX_AGE`].
    async fn fresh_book(&self) -> Vec<VerifiedAnnouncement> {
        let stale = self
            .book
            .lock()
            .map(|b| b.1.is_none_or(|t| t.elapsed() > BOOK_MAX_AGE))
            .unwrap_or(true);
        if stale {
            let found = self
                .net
                .gather_skipping(Some(self.model.model_id), |p| self.banned(p))
                .await;
            if let (Ok(found), Ok(mut b)) = (found, self.book.lock()) {
                *b = (found, Some(tokio::time::Instant::now()));
            }
        }
        self.book.lock().map(|b| b.0.clone()).unwrap_or_default()
    }

    /// Other servers in `book` (not on `route`, not banned) that hold exactly
    /// `route[hop]`'s blocks and compute as this client does.
    fn alternatives(
        &self,
        book: &[VerifiedAnnouncement],
        route: &[Hop],
        hop: usize,
    ) -> Vec<VerifiedAnnouncement> {
        let Some(h) = route.get(hop) else {
            return Vec::new();
        };
        let on_route = |p: &PeerId| route.iter().any(|r| &r.peer == p);
        let apart = self.kept_apart(false);
        let book = book.to_vec();
        book.into_iter()
            .filter(|a| {
                a.model_id == self.model.model_id
                    && a.compute == self.model.compute
                    && a.free_sessions > 0
                    && a.blocks.start() as usize == h.blocks.start
                    && a.blocks.end() as usize == h.blocks.end
            })
            .filter(|a| {
                PeerId::from_bytes(&a.peer.0).is_ok_and(|p| {
                    !on_route(&p)
                        && !next_to_a_dispute(route, hop, &p, &apart)
                        && !self.banned_since(&p, Some(a.issued_at_ms))
                })
            })
            .collect()
    }

    /// The output of the last of `inputs` through `route`, on a new session that is
    /// closed afterwards.
    async fn recompute(
        &self,
        route: &[Hop],
        inputs: &[(usize, Vec<u32>)],
        budget: u32,
    ) -> Result<Tensor, ClientError> {
        let mut s: SwarmSession = self.open_session(route, budget).await?;
        let hidden = inputs
            .iter()
            .map(|(pos, ids)| Ok((self.model.ends.embed(ids)?, *pos)))
            .collect::<Result<Vec<_>, ClientError>>()?;
        let out = s.replay(&hidden).await;
        s.close().await;
        out
    }

    /// Spot-checks `out`, the session's output for the last of `inputs`, on `route`.
    ///
    /// The check runs on `shadow`: a second session, kept open across checks, on a route
    /// where every span another server holds is served by another (chosen at random);
    /// each check feeds it what it has not seen yet and compares the outputs. When they
    /// disagree, each swapped span is checked alone, from scratch, to find the one that
    /// differs, and a third server of that span decides.
    pub(super) async fn spot_check(
        &self,
        route: &[Hop],
        inputs: &[(usize, Vec<u32>)],
        out: &Tensor,
        budget: u32,
        shadow: &mut Option<Shadow>,
    ) -> Verdict {
        if shadow.as_ref().is_some_and(|s| !s.fits(route))
            && let Some(s) = shadow.take()
        {
            s.session.close().await;
        }
        if shadow.is_none() {
            let book = self.fresh_book().await;
            let mut r = route.to_vec();
            let mut swapped = Vec::new();
            for h in 0..route.len() {
                let mut alts = self.alternatives(&book, route, h);
                if alts.is_empty() {
                    continue;
                }
                let a = alts.swap_remove(rand::random::<u64>() as usize % alts.len());
                if let Some(next) = swap(&r, h, &a) {
                    r = next;
                    swapped.push((h, a));
                }
            }
            if swapped.is_empty() {
                tracing::debug!("spot check skipped: no span of the route has a second server");
                return Verdict::Skipped;
            }
            match self.open_session(&r, budget).await {
                Ok(session) => {
                    *shadow = Some(Shadow {
                        route: r,
                        swapped,
                        session,
                        fed: 0,
                    });
                }
                Err(e) => {
                    tracing::info!("spot check skipped: {e}");
                    self.blame(&e);
                    return Verdict::Skipped;
                }
            }
        }
        let Some(s) = shadow.as_mut() else {
            return Verdict::Skipped;
        };
        let fed = s.fed.min(inputs.len());
        let hidden = match inputs[fed..]
            .iter()
            .map(|(pos, ids)| Ok((self.model.ends.embed(ids)?, *pos)))
            .collect::<Result<Vec<_>, ClientError>>()
        {
            Ok(h) if !h.is_empty() => h,
            _ => return Verdict::Skipped,
        };
        let theirs = match s.session.replay(&hidden).await {
            Ok(t) => t,
            Err(e) => {
                tracing::info!("spot check skipped: {e}");
                self.blame(&e);
                *shadow = None;
                return Verdict::Skipped;
            }
        };
        s.fed = inputs.len();
        self.count(|s| s.checks += 1);
        if agree(out, &theirs) {
            return Verdict::Agreed;
        }
        self.count(|s| s.disagreements += 1);
        let Some(s) = shadow.take() else {
            return Verdict::Skipped;
        };
        s.session.close().await;
        let single = s.swapped.len() == 1;
        for (hop, witness) in s.swapped {
            let known = single.then(|| theirs.clone());
            match self
                .check_span(route, hop, witness, known, inputs, out, budget)
                .await
            {
                Verdict::Agreed => continue,
                other => return other,
            }
        }
        tracing::warn!("spot check: the routes disagree, but no single span does");
        Verdict::Skipped
    }

    /// Checks `route[hop]` against `witness`, another server of its blocks: `theirs` is
    /// the witness route's output when already known. On a disagreement a third server
    /// decides.
    #[allow(clippy::too_many_arguments)]
    async fn check_span(
        &self,
        route: &[Hop],
        hop: usize,
        witness: VerifiedAnnouncement,
        theirs: Option<Tensor>,
        inputs: &[(usize, Vec<u32>)],
        out: &Tensor,
        budget: u32,
    ) -> Verdict {
        let Some(second_route) = swap(route, hop, &witness) else {
            return Verdict::Skipped;
        };
        let suspect = route[hop].clone();
        let witness = second_route[hop].clone();
        let theirs = match theirs {
            Some(t) => t,
            None => match self.recompute(&second_route, inputs, budget).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::info!("spot check of {} skipped: {e}", suspect.blocks);
                    self.blame(&e);
                    return Verdict::Skipped;
                }
            },
        };
        if agree(out, &theirs) {
            return Verdict::Agreed;
        }
        let gap = super::check::relative_gap(out, &theirs);
        tracing::warn!(
            "spot check: blocks {} on {} and on {} disagree (relative gap {gap:?}); asking a third server",
            suspect.blocks,
            suspect.peer,
            witness.peer
        );
        // A third server of the span decides; another is asked when one fails or agrees
        // with neither, up to MAX_THIRDS, in random order.
        let book = self.fresh_book().await;
        let mut thirds: Vec<Vec<Hop>> = self
            .alternatives(&book, route, hop)
            .into_iter()
            .filter(|a| a.peer.0 != witness.peer.to_bytes())
            .filter_map(|a| swap(route, hop, &a))
            .collect();
        thirds.shuffle(&mut rand::rng());
        let mut decided = None;
        for third_route in thirds.into_iter().take(MAX_THIRDS) {
            match self.recompute(&third_route, inputs, budget).await {
                Ok(t) => {
                    decided = ruling(agree(&t, out), agree(&t, &theirs));
                    if decided.is_some() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::info!(
                        "spot check: a third server of {} failed: {e}",
                        suspect.blocks
                    );
                    self.blame(&e);
                }
            }
        }
        let failure = |who: &Hop, message: String| {
            ClientError::HopFailed(Box::new(HopFailure {
                hop,
                peer: who.peer,
                blocks: who.blocks,
                code: ErrorCode::BadRequest,
                message,
                reported_by: None,
                blamed_by: None,
            }))
        };
        let sentence = sentence(decided);
        let mut rerouted = None;
        if let Some(odd) = sentence.liar {
            let liar = match odd {
                OddOne::Suspect => &suspect,
                OddOne::Witness => &witness,
            };
            tracing::warn!(
                "spot check: banned peer {} (blocks {}): its output disagreed with two other servers",
                liar.peer,
                liar.blocks
            );
            self.count(|s| {
                s.banned += 1;
                s.first_ban_step.get_or_insert(s.steps);
            });
            let lied = failure(
                liar,
                format!(
                    "{} it disagreed with other servers of its blocks (spot check)",
                    super::check::WRONG_OUTPUT
                ),
            );
            match odd {
                // The session heals around it; healing bans it.
                OddOne::Suspect => rerouted = Some(lied),
                OddOne::Witness => {
                    self.blame(&lied);
                }
            }
        }
        for odd in sentence.backoff {
            let doubted = match odd {
                OddOne::Suspect => &suspect,
                OddOne::Witness => &witness,
            };
            tracing::warn!(
                "spot check: no third server of blocks {} decided between {} and {}; backing off from {} (not banned as a liar)",
                suspect.blocks,
                suspect.peer,
                witness.peer,
                doubted.peer
            );
            let doubt = failure(
                doubted,
                "its output disagreed with another server of its blocks, and no third decided (spot check)"
                    .to_string(),
            );
            match odd {
                // Healing leaves it out for the ordinary backoff.
                OddOne::Suspect => rerouted = Some(doubt),
                OddOne::Witness => {
                    self.blame(&doubt);
                }
            }
        }
        match rerouted {
            Some(e) if sentence.reroute => Verdict::Wrong(e),
            _ => Verdict::Agreed,
        }
    }

    pub(super) fn count(&self, f: impl FnOnce(&mut VerifyStats)) {
        if let Ok(mut s) = self.verify_stats.lock() {
            f(&mut s);
        }
    }

    /// Spot-check counts since this client connected.
    pub fn verify_stats(&self) -> VerifyStats {
        self.verify_stats.lock().map(|s| *s).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A spot check's second server of a span never sits next to a server it is in a
    /// dispute with, in the order of the dispute.
    #[test]
    fn a_check_keeps_the_servers_of_a_dispute_apart() {
        let route: Vec<Hop> = (0..3)
            .map(|i| Hop {
                peer: PeerId::random(),
                blocks: crate::blocks::BlockRange {
                    start: i * 10,
                    end: i * 10 + 10,
                },
                addrs: vec![],
                step_us: 1_000,
            })
            .collect();
        let x = PeerId::random();
        let none = std::collections::HashSet::new();
        assert!(!next_to_a_dispute(&route, 1, &x, &none));
        let before = std::collections::HashSet::from([(route[0].peer, x)]);
        assert!(next_to_a_dispute(&route, 1, &x, &before));
        assert!(
            !next_to_a_dispute(&route, 0, &x, &before),
            "no hop before 0"
        );
        let after = std::collections::HashSet::from([(x, route[2].peer)]);
        assert!(next_to_a_dispute(&route, 1, &x, &after));
        assert!(
            !next_to_a_dispute(&route, 2, &x, &after),
            "no hop after the last"
        );
        let reversed = std::collections::HashSet::from([(x, route[0].peer)]);
        assert!(
            !next_to_a_dispute(&route, 1, &x, &reversed),
            "the order counts"
        );
    }

    /// A second server is paced as it announces itself, but never slower than
    /// `SWAP_SLOWDOWN` times the one it stands in for or `SWAP_SLOWEST_US`: one
    /// announcing no throughput at all cannot stretch the wait for a check of a long
    /// prompt, and a first server claiming any speed leaves an honest second one time.
    #[test]
    fn a_second_server_is_given_at_most_four_times_the_first_ones_pace() {
        let route: Vec<Hop> = (0..2)
            .map(|i| Hop {
                peer: PeerId::random(),
                blocks: crate::blocks::BlockRange {
                    start: i * 15,
                    end: i * 15 + 15,
                },
                addrs: vec![],
                step_us: 10_000,
            })
            .collect();
        let now = crate::clock::unix_ms();
        let key = [9u8; 32];
        let public = ed25519_dalek::SigningKey::from_bytes(&key)
            .verifying_key()
            .to_bytes();
        let announcing = |throughput: f32| {
            let a = pollen_protocol::Announcement {
                peer: pollen_protocol::peer_id_bytes_for_ed25519(&public),
                model_id: pollen_protocol::ModelId::from_bytes([1; 32]),
                model_name: "m".into(),
                num_blocks: 30,
                blocks: pollen_protocol::BlockRange::new(15, 30).unwrap(),
                throughput,
                free_sessions: 1,
                free_cache_tokens: 1024,
                addrs: vec![],
                compute: "fast/cpu".into(),
                next_rtts: vec![],
                issued_at_ms: now,
                expires_at_ms: now + 30_000,
                seq: 1,
            };
            pollen_protocol::SignedAnnouncement::sign(a, &key)
                .unwrap()
                .verify(now, &pollen_protocol::FreshnessPolicy::default())
                .unwrap()
        };
        for (throughput, want) in [(0.0, 40_000), (10.0, 40_000), (2_000.0, 500)] {
            let r = swap(&route, 1, &announcing(throughput)).unwrap();
            assert_eq!(r[1].step_us, want, "throughput {throughput}");
            assert_eq!(r[0].step_us, 10_000);
        }
        let slowest = replay_timeout_of(&swap(&route, 1, &announcing(0.0)).unwrap());
        assert!(slowest < std::time::Duration::from_secs(240), "{slowest:?}");
        // A first server claiming any speed: the second still gets 50 tokens a second.
        let mut fast = route.clone();
        fast[1].step_us = 0;
        let r = swap(&fast, 1, &announcing(40.0)).unwrap();
        assert_eq!(r[1].step_us, SWAP_SLOWEST_US);
    }

    /// What a replay of a 1,000-token prompt may wait on `route`.
    fn replay_timeout_of(route: &[Hop]) -> std::time::Duration {
        route
            .iter()
            .map(|h| crate::serve::session::ack_timeout(1000, h.step_us))
            .sum()
    }

    #[test]
    fn a_third_opinion_names_the_one_it_disagrees_with() {
        assert_eq!(ruling(true, false), Some(OddOne::Witness));
        assert_eq!(ruling(false, true), Some(OddOne::Suspect));
        assert_eq!(ruling(false, false), None);
        assert_eq!(ruling(true, true), None);
    }

    #[test]
    fn only_a_decided_disagreement_bans_a_liar() {
        let s = sentence(Some(OddOne::Suspect));
        assert_eq!(s.liar, Some(OddOne::Suspect));
        assert!(s.backoff.is_empty() && s.reroute);
        let s = sentence(Some(OddOne::Witness));
        assert_eq!(s.liar, Some(OddOne::Witness));
        assert!(s.backoff.is_empty() && !s.reroute);
        // No third, or a third that failed: a lying witness gets no honest server banned.
        let s = sentence(None);
        assert_eq!(s.liar, None);
        assert!(s.reroute);
        assert_eq!(s.backoff, &[OddOne::Suspect, OddOne::Witness]);
    }
}
