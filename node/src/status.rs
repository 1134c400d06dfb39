//! What the swarm serves: per model, which peers hold which blocks, and the gaps.

use pollen_protocol::VerifiedAnnouncement;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Maximal runs of `false` in `covered`, as half-open ranges.
pub fn gaps(covered: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, &c) in covered.iter().enumerate() {
        match (c, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, covered.len()));
    }
    out
}

/// The swarm as JSON: `{"models":[{"id", "name", "num_blocks", "servers":[...], "uncovered":[[a,b]]}]}`.
pub fn to_json(book: &[VerifiedAnnouncement], now_ms: u64) -> Value {
    let mut models: BTreeMap<String, Vec<&VerifiedAnnouncement>> = BTreeMap::new();
    for a in book {
        models.entry(a.model_id.to_string()).or_default().push(a);
    }
    let models: Vec<Value> = models
        .into_iter()
        .map(|(id, anns)| {
            let num_blocks = anns.iter().map(|a| a.num_blocks).max().unwrap_or(0) as usize;
            let mut covered = vec![false; num_blocks];
            for a in &anns {
                for b in a.blocks.start()..a.blocks.end() {
                    if let Some(c) = covered.get_mut(b as usize) {
                        *c = true;
                    }
                }
            }
            let servers: Vec<Value> = anns
                .iter()
                .map(|a| {
                    let peer = libp2p::PeerId::from_bytes(&a.peer.0)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|_| "?".into());
                    json!({
                        "peer": peer,
                        "blocks": [a.blocks.start(), a.blocks.end()],
                        "throughput": a.throughput,
                        "free_sessions": a.free_sessions,
                        "free_cache_tokens": a.free_cache_tokens,
                        "addrs": a.addrs,
                        "compute": a.compute,
                        "age_s": now_ms.saturating_sub(a.issued_at_ms) as f64 / 1000.0,
                        "expires_in_s": a.expires_at_ms.saturating_sub(now_ms) as f64 / 1000.0,
                    })
                })
                .collect();
            let name = anns
                .first()
                // Chosen by a peer: no control character reaches a terminal or a page.
                .map(|a| pollen_protocol::printable(&a.model_name))
                .unwrap_or_default();
            json!({
                "id": id,
                "name": name,
                "num_blocks": num_blocks,
                "servers": servers,
                "uncovered": gaps(&covered).into_iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "models": models })
}

/// The swarm as a table for a terminal; gaps in red when `color`.
pub fn to_text(status: &Value, color: bool) -> String {
    let mut out = String::new();
    let models = status["models"].as_array().cloned().unwrap_or_default();
    if models.is_empty() {
        out.push_str("no servers announced\n");
    }
    for m in models {
        out.push_str(&format!(
            "model {} ({}, {} blocks)\n",
            m["id"].as_str().unwrap_or("?"),
            m["name"].as_str().unwrap_or("?"),
            m["num_blocks"]
        ));
        out.push_str(&format!(
            "  {:<54} {:>9} {:>12} {:>14} {:>8}\n",
            "peer", "blocks", "tokens/s", "compute", "age"
        ));
        for s in m["servers"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "  {:<54} {:>9} {:>12.1} {:>14} {:>7.0}s\n",
                s["peer"].as_str().unwrap_or("?"),
                format!("{}:{}", s["blocks"][0], s["blocks"][1]),
                s["throughput"].as_f64().unwrap_or(0.0),
                s["compute"].as_str().unwrap_or("?"),
                s["age_s"].as_f64().unwrap_or(0.0)
            ));
        }
        let gaps = m["uncovered"].as_array().cloned().unwrap_or_default();
        if gaps.is_empty() {
            out.push_str("  every block is served\n");
        } else {
            let text: Vec<String> = gaps.iter().map(|g| format!("{}:{}", g[0], g[1])).collect();
            let line = format!("  uncovered blocks: {}", text.join(", "));
            if color {
                out.push_str(&format!("\x1b[31m{line}\x1b[0m\n"));
            } else {
                out.push_str(&format!("{line}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_maximal_runs() {
        assert_eq!(
            gaps(&[true, false, false, true, false]),
            vec![(1, 3), (4, 5)]
        );
        assert!(gaps(&[true, true]).is_empty());
        assert_eq!(gaps(&[false, false]), vec![(0, 2)]);
    }
}
