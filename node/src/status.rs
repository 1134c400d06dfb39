//! What the swarm serves: per model, which peers hold which blocks, and the gaps.

use crate::net::{NetHandle, Path};
use pollen_protocol::VerifiedAnnouncement;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Most servers [`reach`] connects to.
const MAX_REACH_PROBES: usize = 256;

/// How this node reaches each server of `book`, by peer id: `public` (a direct
/// connection, and the server announces no relayed address), `direct` (it is behind NAT
/// and hole punching gave a direct connection), `relayed` (only through a relay), or
/// `unreachable`. Connects to each server (at most [`MAX_REACH_PROBES`]) and gives hole
/// punching up to `patience`.
pub async fn reach(
    net: &NetHandle,
    book: &[VerifiedAnnouncement],
    patience: Duration,
) -> HashMap<String, &'static str> {
    let servers: Vec<(libp2p::PeerId, Vec<libp2p::Multiaddr>, bool)> = book
        .iter()
        .filter_map(|a| {
            let peer = libp2p::PeerId::from_bytes(&a.peer.0).ok()?;
            let addrs: Vec<libp2p::Multiaddr> =
                a.addrs.iter().filter_map(|s| s.parse().ok()).collect();
            let behind_nat = a.addrs.iter().any(|s| s.contains("/p2p-circuit"));
            Some((peer, addrs, behind_nat))
        })
        .take(MAX_REACH_PROBES)
        .collect();
    let probes = servers.iter().map(|(peer, addrs, behind_nat)| async move {
        let _ = net.add_addresses(*peer, addrs.clone(), false).await;
        let connected = tokio::time::timeout(patience, net.connect(*peer)).await;
        let deadline = tokio::time::Instant::now() + patience;
        let mut path = match connected {
            Ok(Ok(p)) => Some(p),
            _ => None,
        };
        while path == Some(Path::Relayed) && tokio::time::Instant::now() < deadline {
            match net.path(*peer).await {
                Ok((p, true)) => path = p,
                Ok((p, false)) => {
                    path = p;
                    break;
                }
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let label = match (path, behind_nat) {
            (Some(Path::Direct), false) => "public",
            (Some(Path::Direct), true) => "direct",
            (Some(Path::Relayed), _) => "relayed",
            (None, _) => "unreachable",
        };
        (peer.to_string(), label)
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .collect()
}

/// Adds each server's `reach` (from [`reach`]) to a status from [`to_json`].
pub fn with_reach(status: &mut Value, reach: &HashMap<String, &'static str>) {
    let Some(models) = status["models"].as_array_mut() else {
        return;
    };
    for m in models {
        let Some(servers) = m["servers"].as_array_mut() else {
            continue;
        };
        for s in servers {
            let label = s["peer"].as_str().and_then(|p| reach.get(p)).copied();
            if let Some(label) = label {
                s["reach"] = json!(label);
            }
        }
    }
}

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
            "  {:<54} {:>9} {:>12} {:>14} {:>8} {:>11}\n",
            "peer", "blocks", "tokens/s", "compute", "age", "reach"
        ));
        for s in m["servers"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "  {:<54} {:>9} {:>12.1} {:>14} {:>7.0}s {:>11}\n",
                s["peer"].as_str().unwrap_or("?"),
                format!("{}:{}", s["blocks"][0], s["blocks"][1]),
                s["throughput"].as_f64().unwrap_or(0.0),
                s["compute"].as_str().unwrap_or("?"),
                s["age_s"].as_f64().unwrap_or(0.0),
                s["reach"].as_str().unwrap_or("-")
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
