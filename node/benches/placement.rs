//! Automatic placement, simulated: 100 servers of varied speed (20 to 600 tokens/s through
//! one block, log-uniform) and memory (1/8 of the model to all of it) join one by one,
//! then leave and join at random; after every event the swarm moves until it settles (at the default margin, then at
//! others, to show what the margin trades).
//! Prints the bottleneck reached against an upper bound on the best assignment (total
//! block speed over blocks), the same swarm without moves, and the moves made.
//!
//! `cargo bench -p pollen-node --bench placement`. Deterministic: no model, no network.

use pollen_node::placement::MARGIN;
use pollen_node::placement::sim::{SimConfig, run};
use std::time::Instant;

fn main() {
    println!(
        "| margin | blocks | servers joined | churn events | servers at end | bottleneck tok/s | bound tok/s | bottleneck / bound | worst after an event | no moves / bound | moves | moves per event | sim time |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rows = [
        (30, 100, 100, 1),
        (30, 100, 100, 2),
        (30, 100, 100, 3),
        (80, 100, 100, 1),
        (80, 100, 100, 2),
    ];
    // The default margin first, then the trade between margin and moves.
    let runs = rows.iter().map(|r| (MARGIN, *r)).chain(
        [0.10, 0.02, 0.0]
            .into_iter()
            .flat_map(|m| rows.iter().take(3).map(move |r| (m, *r))),
    );
    for (margin, (num_blocks, servers, churn, seed)) in runs {
        let started = Instant::now();
        let r = run(SimConfig {
            num_blocks,
            servers,
            churn,
            seed,
            max_moves_per_event: 500,
            margin,
        });
        let took = started.elapsed();
        println!(
            "| {:.0}% | {num_blocks} | {servers} | {churn} | {} | {:.1} | {:.1} | {:.3} | {:.3} | {:.3} | {} | {:.2} | {:.1} s |",
            margin * 100.0,
            r.servers,
            r.bottleneck,
            r.upper_bound,
            r.ratio(),
            r.worst_ratio,
            r.choose_only_bottleneck / r.upper_bound,
            r.moves,
            r.moves as f64 / r.events as f64,
            took.as_secs_f64(),
        );
        if r.unsettled > 0 {
            println!(
                "  ({} events stopped settling at the guard of 500 moves)",
                r.unsettled
            );
        }
    }
}
