//! What the swarm serves: per model, which peers hold which blocks, and the gaps.

use crate::net::{NetHandle, Path};
use pollen_protocol::VerifiedAnnouncement;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Most servers [`reach`] connects to.
const MAX_REACH_PROBES: usize = 256;

/// How this node reaches each server of `book`, by peer id: `public` (a direct
/// connection, and the server announces no relayed address), `local` (the same, and it
/// announces loopback addresses only: a server on this machine), `direct` (it is behind
/// NAT and hole punching gave a direct connection), `relayed` (only through a relay), or
/// `unreachable`. Connects to each server (at most [`MAX_REACH_PROBES`]) and gives hole
/// punching up to `patience`.
pub async fn reach(
    net: &NetHandle,
    book: &[VerifiedAnnouncement],
    patience: Duration,
) -> HashMap<String, &'static str> {
    let servers: Vec<(libp2p::PeerId, Vec<libp2p::Multiaddr>, bool, bool)> = book
        .iter()
        .filter_map(|a| {
            let peer = libp2p::PeerId::from_bytes(&a.peer.0).ok()?;
            let addrs: Vec<libp2p::Multiaddr> =
                a.addrs.iter().filter_map(|s| s.parse().ok()).collect();
            let behind_nat = a.addrs.iter().any(|s| s.contains("/p2p-circuit"));
            let loopback = !addrs.is_empty() && addrs.iter().all(is_loopback);
            Some((peer, addrs, behind_nat, loopback))
        })
        .take(MAX_REACH_PROBES)
        .collect();
    let probes = servers
        .iter()
        .map(|(peer, addrs, behind_nat, loopback)| async move {
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
                (Some(Path::Direct), false) if *loopback => "local",
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

/// Whether `addr` is on a loopback address.
fn is_loopback(addr: &libp2p::Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
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

/// Runs of blocks `0..num_blocks` that no announcement in `anns` serves.
fn uncovered(anns: &[&VerifiedAnnouncement], num_blocks: usize) -> Vec<(usize, usize)> {
    let mut covered = vec![false; num_blocks];
    for a in anns {
        for b in a.blocks.start()..a.blocks.end() {
            if let Some(c) = covered.get_mut(b as usize) {
                *c = true;
            }
        }
    }
    gaps(&covered)
}

/// The swarm as JSON: `{"models":[{"id", "name", "num_blocks", "servers":[...],
/// "uncovered":[[a,b]]}]}`; where a model's servers announce more than one compute mode
/// (a client routes through one), also `"uncovered_by_compute": {mode: [[a,b]]}`.
pub fn to_json(book: &[VerifiedAnnouncement], now_ms: u64) -> Value {
    let mut models: BTreeMap<String, Vec<&VerifiedAnnouncement>> = BTreeMap::new();
    for a in book {
        models.entry(a.model_id.to_string()).or_default().push(a);
    }
    let models: Vec<Value> = models
        .into_iter()
        .map(|(id, anns)| {
            let num_blocks = anns.iter().map(|a| a.num_blocks).max().unwrap_or(0) as usize;
            let mut by_compute: BTreeMap<&str, Vec<&VerifiedAnnouncement>> = BTreeMap::new();
            for a in &anns {
                by_compute.entry(a.compute.as_str()).or_default().push(a);
            }
            let pairs =
                |g: Vec<(usize, usize)>| g.into_iter().map(|(a, b)| [a, b]).collect::<Vec<_>>();
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
                        // Chosen by a peer: printable only, and never equal to
                        // another mode's name when shown.
                        "compute": shown_mode(&a.compute),
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
            let mut model = json!({
                "id": id,
                "name": name,
                "num_blocks": num_blocks,
                "servers": servers,
                "uncovered": pairs(uncovered(&anns, num_blocks)),
            });
            if by_compute.len() > 1 {
                let each: serde_json::Map<String, Value> = by_compute
                    .iter()
                    .map(|(mode, anns)| {
                        (shown_mode(mode), json!(pairs(uncovered(anns, num_blocks))))
                    })
                    .collect();
                model["uncovered_by_compute"] = Value::Object(each);
            }
            model
        })
        .collect();
    json!({ "models": models })
}

/// A compute mode a peer announced, as shown: Pollen's names are ASCII letters, digits
/// and `._/-`, shown as they are; any other character (and `\`) is written as `\u{..}`,
/// so that a name padded with invisible characters, or spelled with look-alike letters,
/// can neither hide nor pass for the mode it imitates (clients compare names as sent).
pub(crate) fn shown_mode(mode: &str) -> String {
    mode.chars()
        .map(|c| {
            if is_mode_char(c) {
                c.to_string()
            } else {
                format!("\\u{{{:x}}}", u32::from(c))
            }
        })
        .collect()
}

/// Whether `c` is one of the characters Pollen's compute-mode names are made of.
pub(crate) fn is_mode_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')
}

/// Runs of blocks from the JSON's `[[a, b], ...]` as `a:b, c:d`; `None` where there
/// are none.
pub(crate) fn gap_list(gaps: &Value) -> Option<String> {
    let gaps = gaps.as_array()?;
    let text: Vec<String> = gaps.iter().map(|g| format!("{}:{}", g[0], g[1])).collect();
    (!text.is_empty()).then(|| text.join(", "))
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
            "  {:<54} {:>9} {:>12} {:>18} {:>8} {:>11}\n",
            "peer", "blocks", "tokens/s", "compute", "age", "reach"
        ));
        for s in m["servers"].as_array().cloned().unwrap_or_default() {
            out.push_str(&format!(
                "  {:<54} {:>9} {:>12.1} {:>18} {:>7.0}s {:>11}\n",
                s["peer"].as_str().unwrap_or("?"),
                format!("{}:{}", s["blocks"][0], s["blocks"][1]),
                s["throughput"].as_f64().unwrap_or(0.0),
                s["compute"].as_str().unwrap_or("?"),
                s["age_s"].as_f64().unwrap_or(0.0),
                s["reach"].as_str().unwrap_or("-")
            ));
        }
        let mut coverage = |prefix: &str, gaps: &Value| {
            let Some(text) = gap_list(gaps) else {
                out.push_str(&format!("  {prefix}every block is served\n"));
                return;
            };
            let line = format!("  {prefix}uncovered blocks: {text}");
            if color {
                out.push_str(&format!("\x1b[31m{line}\x1b[0m\n"));
            } else {
                out.push_str(&format!("{line}\n"));
            }
        };
        // A client routes through servers of its own compute mode only.
        match m["uncovered_by_compute"].as_object() {
            Some(each) => {
                coverage("in any mode: ", &m["uncovered"]);
                for (mode, gaps) in each {
                    coverage(&format!("{mode}: "), gaps);
                }
            }
            None => coverage("", &m["uncovered"]),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_padded_mode_name_never_shows_as_the_mode_it_imitates() {
        assert_eq!(shown_mode("fast/cpu"), "fast/cpu");
        assert_eq!(shown_mode("q8_0/cpu-aarch64-i8mm"), "q8_0/cpu-aarch64-i8mm");
        assert_eq!(shown_mode("fast/cpu\u{200e}"), "fast/cpu\\u{200e}");
        assert_eq!(shown_mode("fast/cpu\u{200b}"), "fast/cpu\\u{200b}");
        assert_eq!(shown_mode("f\u{430}st/cpu"), "f\\u{430}st/cpu");
        assert_eq!(shown_mode("\u{1b}[2Jfast/cpu"), "\\u{1b}\\u{5b}2Jfast/cpu");
        // A literal escape cannot pass for an escaped character either.
        assert_eq!(shown_mode("x\\u{200e}"), "x\\u{5c}u\\u{7b}200e\\u{7d}");
    }

    #[test]
    fn gaps_are_maximal_runs() {
        assert_eq!(
            gaps(&[true, false, false, true, false]),
            vec![(1, 3), (4, 5)]
        );
        assert!(gaps(&[true, true]).is_empty());
        assert_eq!(gaps(&[false, false]), vec![(0, 2)]);
    }

    /// A signed, verified announcement of blocks `start..end` of 30 in `compute` by
    /// the peer of key `[n; 32]`.
    fn ann(n: u8, start: u32, end: u32, compute: &str, now: u64) -> VerifiedAnnouncement {
        use ed25519_dalek::SigningKey;
        use pollen_protocol::{
            Announcement, BlockRange, FreshnessPolicy, ModelId, SignedAnnouncement,
            peer_id_bytes_for_ed25519,
        };
        let key = [n; 32];
        let a = Announcement {
            peer: peer_id_bytes_for_ed25519(
                &SigningKey::from_bytes(&key).verifying_key().to_bytes(),
            ),
            model_id: ModelId::from_bytes([7; 32]),
            model_name: "m".into(),
            num_blocks: 30,
            blocks: BlockRange::new(start, end).unwrap(),
            throughput: 10.0,
            free_sessions: 1,
            free_cache_tokens: 1000,
            addrs: vec![],
            compute: compute.into(),
            next_rtts: vec![],
            issued_at_ms: now,
            expires_at_ms: now + 30_000,
            seq: 1,
        };
        SignedAnnouncement::sign(a, &key)
            .unwrap()
            .verify(now, &FreshnessPolicy::default())
            .unwrap()
    }

    /// Blocks served only in another compute mode are not served for a client of
    /// this one: with two modes, each mode's coverage is shown.
    #[test]
    fn coverage_is_shown_per_compute_mode_where_modes_differ() {
        let now = crate::clock::unix_ms();
        let one = [
            ann(1, 0, 15, "exact/cpu", now),
            ann(2, 15, 30, "exact/cpu", now),
        ];
        let status = to_json(&one, now);
        assert!(status["models"][0].get("uncovered_by_compute").is_none());
        let text = to_text(&status, false);
        assert!(text.contains("  every block is served\n"), "{text}");
        let mixed = [
            ann(1, 0, 15, "exact/cpu", now),
            ann(2, 15, 30, "exact/cpu-aarch64", now),
            ann(3, 0, 30, "fast/cpu", now),
        ];
        let status = to_json(&mixed, now);
        let each = &status["models"][0]["uncovered_by_compute"];
        assert_eq!(each["exact/cpu"], json!([[15, 30]]));
        assert_eq!(each["exact/cpu-aarch64"], json!([[0, 15]]));
        assert_eq!(each["fast/cpu"], json!([]));
        let text = to_text(&status, false);
        assert!(
            text.contains("  in any mode: every block is served\n"),
            "{text}"
        );
        assert!(
            text.contains("  exact/cpu: uncovered blocks: 15:30\n"),
            "{text}"
        );
        assert!(
            text.contains("  exact/cpu-aarch64: uncovered blocks: 0:15\n"),
            "{text}"
        );
        assert!(
            text.contains("  fast/cpu: every block is served\n"),
            "{text}"
        );
        assert!(
            text.contains(" exact/cpu-aarch64 "),
            "the column fits the mode: {text}"
        );
    }
}
