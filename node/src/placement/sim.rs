//! A deterministic simulation of placement: servers of varied speed and memory join a
//! swarm one by one, then leave and join at random, each choosing its span with
//! [`choose_span`] and the swarm moving with [`plan_move`] after every event until it
//! settles (what the once-a-minute checks do over time). No model, no network, no clock.
//!
//! The bottleneck reached is compared with an upper bound on the best possible
//! assignment: a server of block speed `d` (tokens/s through one block) holding `k`
//! blocks adds `d / k` to each of them, `d` in all, so no assignment can give every one
//! of `n` blocks more than `Σ d / n`.

use super::{Holding, bottleneck, choose_span, plan_move_with_margin, totals};

/// One simulated swarm.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Blocks of the model.
    pub num_blocks: usize,
    /// Servers that join first.
    pub servers: usize,
    /// Then this many events, each a server leaving or a new one joining.
    pub churn: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Most moves after one event (a guard: settling always ends sooner).
    pub max_moves_per_event: usize,
    /// The move margin ([`super::MARGIN`] in a real swarm).
    pub margin: f64,
}

/// What a simulation reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimReport {
    /// Servers at the end.
    pub servers: usize,
    /// The bottleneck at the end, tokens/s.
    pub bottleneck: f64,
    /// The upper bound on the best assignment at the end, tokens/s.
    pub upper_bound: f64,
    /// The worst bottleneck / bound after any churn event settled (the joins of the first
    /// servers left out: a handful of servers cannot reach the bound).
    pub worst_ratio: f64,
    /// The bottleneck at the end without any moves (servers only choose when joining).
    pub choose_only_bottleneck: f64,
    /// Moves made in all.
    pub moves: usize,
    /// Joins and leaves in all.
    pub events: usize,
    /// Events after which some move was still wanted when the guard stopped settling.
    pub unsettled: usize,
}

impl SimReport {
    /// Bottleneck over the upper bound at the end.
    pub fn ratio(&self) -> f64 {
        if self.upper_bound > 0.0 {
            self.bottleneck / self.upper_bound
        } else {
            0.0
        }
    }
}

/// splitmix64: a small, fixed generator, so the figures never change with a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi].
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// A simulated server: its block speed and how many blocks fit.
#[derive(Debug, Clone, Copy)]
struct Machine {
    id: u64,
    block_speed: f64,
    len: usize,
}

/// Speeds spread over 30× (log-uniform, laptops to GPUs); memory for 1/8 of the model up
/// to all of it.
fn machine(rng: &mut Rng, id: u64, num_blocks: usize) -> Machine {
    let block_speed = 20.0 * 30f64.powf(rng.unit());
    let len = rng.range((num_blocks / 8).max(1), num_blocks);
    Machine {
        id,
        block_speed,
        len,
    }
}

fn holding(m: &Machine, span: std::ops::Range<usize>) -> Holding<[u8; 8]> {
    Holding {
        who: m.id.to_be_bytes(),
        span,
        throughput: m.block_speed / m.len as f64,
    }
}

/// Runs one simulation.
pub fn run(cfg: SimConfig) -> SimReport {
    let n = cfg.num_blocks.max(1);
    let mut rng = Rng(cfg.seed);
    let mut next_id = 0u64;
    let mut machines: Vec<Machine> = Vec::new();
    let mut swarm: Vec<Holding<[u8; 8]>> = Vec::new();
    // The same joins and leaves with no moves, for comparison.
    let mut still: Vec<Holding<[u8; 8]>> = Vec::new();
    let mut report = SimReport {
        servers: 0,
        bottleneck: 0.0,
        upper_bound: 0.0,
        worst_ratio: f64::INFINITY,
        choose_only_bottleneck: 0.0,
        moves: 0,
        events: 0,
        unsettled: 0,
    };
    let total = cfg.servers + cfg.churn;
    for event in 0..total {
        let join = event < cfg.servers || machines.len() < 2 || rng.unit() < 0.5;
        if join {
            let m = machine(&mut rng, next_id, n);
            next_id += 1;
            let span = choose_span(
                n,
                &swarm,
                &m.id.to_be_bytes(),
                m.len,
                holding(&m, 0..0).throughput,
            );
            swarm.push(holding(&m, span));
            let span = choose_span(
                n,
                &still,
                &m.id.to_be_bytes(),
                m.len,
                holding(&m, 0..0).throughput,
            );
            still.push(holding(&m, span));
            machines.push(m);
        } else {
            let i = rng.range(0, machines.len() - 1);
            let gone = machines.swap_remove(i).id.to_be_bytes();
            swarm.retain(|h| h.who != gone);
            still.retain(|h| h.who != gone);
        }
        report.events += 1;
        let mut moved = 0;
        while let Some(m) = plan_move_with_margin(n, &swarm, cfg.margin) {
            if moved == cfg.max_moves_per_event {
                report.unsettled += 1;
                break;
            }
            if let Some(h) = swarm.iter_mut().find(|h| h.who == m.who) {
                h.span = m.to;
            }
            moved += 1;
        }
        report.moves += moved;
        let t = totals(n, &swarm);
        let bound = upper_bound(n, &machines);
        if event >= cfg.servers && bound > 0.0 {
            report.worst_ratio = report.worst_ratio.min(bottleneck(&t) / bound);
        }
    }
    let t = totals(n, &swarm);
    report.servers = machines.len();
    report.bottleneck = bottleneck(&t);
    report.upper_bound = upper_bound(n, &machines);
    report.choose_only_bottleneck = bottleneck(&totals(n, &still));
    if !report.worst_ratio.is_finite() {
        report.worst_ratio = 0.0;
    }
    report
}

fn upper_bound(num_blocks: usize, machines: &[Machine]) -> f64 {
    machines.iter().map(|m| m.block_speed).sum::<f64>() / num_blocks as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_churning_swarm_reaches_most_of_the_best_bottleneck() {
        let r = run(SimConfig {
            num_blocks: 24,
            servers: 30,
            churn: 12,
            seed: 7,
            max_moves_per_event: 60,
            margin: super::super::MARGIN,
        });
        assert_eq!(r.events, 42);
        assert_eq!(r.unsettled, 0, "{r:?}");
        assert!(
            r.ratio() >= 0.8,
            "bottleneck {:.3} of the bound: {r:?}",
            r.ratio()
        );
        assert!(r.bottleneck >= r.choose_only_bottleneck, "{r:?}");
        assert!(r.moves > 0, "{r:?}");
    }

    #[test]
    fn the_simulation_is_deterministic() {
        let cfg = SimConfig {
            num_blocks: 12,
            servers: 10,
            churn: 6,
            seed: 3,
            max_moves_per_event: 30,
            margin: super::super::MARGIN,
        };
        assert_eq!(run(cfg), run(cfg));
    }
}
