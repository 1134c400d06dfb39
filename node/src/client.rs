//! The client role: find servers for a model, route a chain over them, open a
//! session and run generation with only the model's ends in this process.

use crate::net::{self, NetConfig, NetHandle, Role};
use crate::wire::{from_wire, to_wire};
use anyhow::{Result, anyhow, bail};
use candle_core::{Device, Tensor};
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::{
    InferRequest, InferResponse, ModelId, RouteHop, SessionBudget, SessionId, VerifiedAnnouncement,
    WireDType,
};
use pollen_shard::ShardError;
use pollen_shard::generate::Blocks;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One server on a route.
#[derive(Debug, Clone)]
pub struct Hop {
    /// The server.
    pub peer: PeerId,
    /// Its blocks.
    pub start: usize,
    /// One past its last block.
    pub end: usize,
    /// Where to reach it.
    pub addrs: Vec<Multiaddr>,
}

/// Estimated seconds per token for a server over `blocks`, plus the round trip.
fn hop_cost(a: &VerifiedAnnouncement, rtt: Option<Duration>) -> f64 {
    let tps = f64::from(a.throughput).max(0.01);
    1.0 / tps + rtt.map(|r| r.as_secs_f64()).unwrap_or(0.002)
}

/// The cheapest chain of announced spans covering blocks `[0, num_blocks)`:
/// a shortest path over block boundaries, skipping full servers.
pub fn route(
    announcements: &[VerifiedAnnouncement],
    num_blocks: usize,
    rtts: &HashMap<PeerId, Duration>,
) -> Result<Vec<Hop>> {
    let mut best: Vec<Option<(f64, usize)>> = vec![None; num_blocks + 1];
    best[0] = Some((0.0, usize::MAX));
    let usable: Vec<(usize, &VerifiedAnnouncement, PeerId)> = announcements
        .iter()
        .enumerate()
        .filter(|(_, a)| a.free_sessions > 0 && a.num_blocks as usize == num_blocks)
        .filter_map(|(i, a)| PeerId::from_bytes(&a.peer.0).ok().map(|p| (i, a, p)))
        .collect();
    for b in 0..num_blocks {
        let Some((cost, _)) = best[b] else { continue };
        for (i, a, peer) in &usable {
            if a.blocks.start() as usize != b {
                continue;
            }
            let end = a.blocks.end() as usize;
            if end > num_blocks {
                continue;
            }
            let c = cost + hop_cost(a, rtts.get(peer).copied());
            if best[end].is_none_or(|(old, _)| c < old) {
                best[end] = Some((c, *i));
            }
        }
    }
    if best[num_blocks].is_none() {
        let covered: Vec<bool> = (0..num_blocks)
            .map(|b| usable.iter().any(|(_, a, _)| a.blocks.contains(b as u32)))
            .collect();
        let gaps = crate::status::gaps(&covered);
        bail!(
            "no chain of servers covers blocks 0:{num_blocks} (uncovered: {})",
            if gaps.is_empty() {
                "none, but spans do not line up".to_string()
            } else {
                gaps.iter()
                    .map(|(a, b)| format!("{a}:{b}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    let mut hops = Vec::new();
    let mut at = num_blocks;
    while at > 0 {
        let (_, i) = best[at].ok_or_else(|| anyhow!("route reconstruction failed"))?;
        let a = &announcements[i];
        hops.push(Hop {
            peer: PeerId::from_bytes(&a.peer.0).map_err(|e| anyhow!("{e}"))?,
            start: a.blocks.start() as usize,
            end: a.blocks.end() as usize,
            addrs: a.addrs.iter().filter_map(|s| s.parse().ok()).collect(),
        });
        at = a.blocks.start() as usize;
    }
    hops.reverse();
    Ok(hops)
}

/// A started client network with its bootstrap peers dialed.
pub async fn connect(
    bootstrap: &[Multiaddr],
    mdns: bool,
    cancel: CancellationToken,
) -> Result<NetHandle> {
    if bootstrap.is_empty() && !mdns {
        bail!("no way to find the swarm: give --bootstrap ADDR or allow mDNS");
    }
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let net = net::start(
        NetConfig {
            keypair,
            listen: Vec::new(),
            bootstrap: bootstrap.to_vec(),
            mdns,
            role: Role::Client,
            infer_timeout: Duration::from_secs(120),
            protocol_version: pollen_protocol::PROTOCOL_VERSION,
        },
        cancel,
    )
    .await?;
    let handle = net.handle;
    // A client answers no inference requests; dropping the queue makes the
    // network task refuse them with `busy`.
    drop(net.inbound);
    let dials = bootstrap
        .iter()
        .map(|a| handle.dial_with_retry(a, Duration::from_secs(15)));
    let results = futures::future::join_all(dials).await;
    if !bootstrap.is_empty() && results.iter().all(|r| r.is_err()) {
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        bail!(
            "cannot reach any bootstrap peer:\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(handle)
}

/// Gathers announcements until blocks `[0, num_blocks)` of `model` are covered
/// by a route, or `patience` runs out.
pub async fn discover_route(
    handle: &NetHandle,
    model: ModelId,
    num_blocks: usize,
    patience: Duration,
) -> Result<Vec<Hop>> {
    let deadline = Instant::now() + patience;
    loop {
        let book = handle.gather(Some(model)).await?;
        let rtts: HashMap<PeerId, Duration> = handle
            .peers()
            .await?
            .into_iter()
            .filter_map(|p| p.rtt.map(|r| (p.peer, r)))
            .collect();
        match route(&book, num_blocks, &rtts) {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("model {model}: {} servers announced", book.len())));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// An open session along a route; runs blocks through the swarm.
pub struct SwarmSession {
    handle: NetHandle,
    rt: tokio::runtime::Handle,
    session: SessionId,
    first: Hop,
    wire_dtype: WireDType,
    hidden_size: usize,
    step: u64,
    timeout: Duration,
}

impl SwarmSession {
    /// Opens a session for `model` along `hops`.
    pub async fn open(
        handle: NetHandle,
        model: ModelId,
        hops: &[Hop],
        max_tokens: u32,
        hidden_size: usize,
        wire_dtype: WireDType,
    ) -> Result<Self> {
        let first = hops
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("empty route"))?;
        let route: Vec<RouteHop> = hops
            .iter()
            .map(|h| -> Result<RouteHop> {
                Ok(RouteHop {
                    peer: pollen_protocol::PeerIdBytes(h.peer.to_bytes()),
                    blocks: pollen_protocol::BlockRange::new(h.start as u32, h.end as u32)
                        .map_err(|e| anyhow!("{e}"))?,
                    addrs: h.addrs.iter().take(16).map(|a| a.to_string()).collect(),
                })
            })
            .collect::<Result<_>>()?;
        let session = SessionId(rand::random());
        let req = InferRequest::Open {
            session,
            model_id: model,
            route,
            hop: 0,
            budget: SessionBudget {
                max_tokens,
                max_message_bytes: pollen_protocol::limits::MAX_INFER_REQUEST_BYTES as u32,
                idle_timeout_ms: 120_000,
            },
            wire_dtype,
        };
        match handle
            .infer(
                first.peer,
                first.addrs.clone(),
                req,
                Duration::from_secs(60),
            )
            .await?
        {
            InferResponse::Opened { free_tokens, .. } if free_tokens < max_tokens => {
                let _ = handle
                    .infer(
                        first.peer,
                        first.addrs.clone(),
                        InferRequest::Close { session },
                        Duration::from_secs(5),
                    )
                    .await;
                bail!(
                    "the servers on this route allow {free_tokens} tokens per session, and this request \
                     needs up to {max_tokens} (prompt plus --max-tokens): ask for fewer tokens"
                );
            }
            InferResponse::Opened { .. } => {}
            InferResponse::Error(e) => bail!("opening the session: {:?}: {}", e.code, e.message),
            other => bail!("unexpected answer to open: {other:?}"),
        }
        Ok(Self {
            handle,
            rt: tokio::runtime::Handle::current(),
            session,
            first,
            wire_dtype,
            hidden_size,
            step: 0,
            timeout: Duration::from_secs(120),
        })
    }

    /// Runs one step through the whole chain.
    pub async fn step(&mut self, hidden: &Tensor, pos: usize) -> Result<Tensor> {
        self.step += 1;
        let req = InferRequest::Forward {
            session: self.session,
            position: pos as u32,
            step: self.step,
            hidden: to_wire(hidden, self.wire_dtype)?,
        };
        match self
            .handle
            .infer(self.first.peer, self.first.addrs.clone(), req, self.timeout)
            .await?
        {
            InferResponse::Output {
                session,
                step,
                position,
                hidden: out,
            } => {
                if session != self.session || step != self.step || position as usize != pos {
                    bail!(
                        "the route answered session {} step {step} at {position}, \
                         but we asked for session {} step {} at {pos}",
                        session.0,
                        self.session.0,
                        self.step
                    );
                }
                let out = from_wire(&out, self.hidden_size, &Device::Cpu)?;
                if out.dims() != hidden.dims() {
                    bail!(
                        "the route answered {:?} hidden states for {:?}",
                        out.dims(),
                        hidden.dims()
                    );
                }
                Ok(out)
            }
            InferResponse::Error(e) => bail!("{:?}: {}", e.code, e.message),
            other => bail!("unexpected answer to a step: {other:?}"),
        }
    }

    /// Closes the session on every server.
    pub async fn close(&self) {
        self.closer().close().await;
    }

    /// A handle that can close this session from elsewhere (on Ctrl-C, say).
    pub fn closer(&self) -> SessionCloser {
        SessionCloser {
            handle: self.handle.clone(),
            session: self.session,
            first: self.first.clone(),
        }
    }
}

/// Closes one session along its route.
#[derive(Debug, Clone)]
pub struct SessionCloser {
    handle: NetHandle,
    session: SessionId,
    first: Hop,
}

impl SessionCloser {
    /// Asks the route's first server to close the session (it tells the rest).
    pub async fn close(&self) {
        let _ = self
            .handle
            .infer(
                self.first.peer,
                self.first.addrs.clone(),
                InferRequest::Close {
                    session: self.session,
                },
                Duration::from_secs(5),
            )
            .await;
    }
}

impl Blocks for SwarmSession {
    fn forward(&mut self, hidden: &Tensor, pos: usize) -> pollen_shard::Result<Tensor> {
        let rt = self.rt.clone();
        rt.block_on(self.step(hidden, pos))
            .map_err(|e| ShardError::Pipeline(format!("{e:#}")))
    }
}
