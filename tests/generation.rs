//! Distributed generation on a real 3-server swarm (spans 0:10, 10:20, 20:30,
//! separate processes, a bootstrap node): greedy text equals `--local` token
//! for token for chat and plain prompts, and eight clients at once each get
//! their own correct text.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;

const PROMPTS: [(&str, bool); 4] = [
    ("Give me three tips for staying healthy.", true),
    ("What is the capital of France? Answer briefly.", true),
    ("The history of the printing press begins", false),
    ("def fibonacci(n):", false),
];

#[test]
fn swarm_text_equals_local_text_and_eight_clients_share_the_servers() {
    let dir = temp_dir("gen");
    let (_boot, addr) = bootstrap(&dir, false);
    let (_s0, _) = server(Some(&addr), "0:10", &dir.join("g0.key"), &[]);
    let (_s1, _) = server(Some(&addr), "10:20", &dir.join("g1.key"), &[]);
    let (_s2, _) = server(Some(&addr), "20:30", &dir.join("g2.key"), &[]);

    let mut local = Vec::new();
    for (prompt, chat) in PROMPTS {
        let want = generate(None, prompt, chat, 24);
        let got = generate(Some(&addr), prompt, chat, 24);
        assert!(!want.trim().is_empty());
        assert_eq!(got, want, "swarm vs local for {prompt:?}");
        local.push(want);
    }

    // Eight clients at once, two per prompt.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let (prompt, chat) = PROMPTS[i % PROMPTS.len()];
                (i, generate(Some(&addr), prompt, chat, 24))
            })
        })
        .collect();
    for h in handles {
        let (i, got) = h.join().unwrap();
        assert_eq!(got, local[i % PROMPTS.len()], "client {i}");
    }
}
