//! The backend flags `pollen api` and `pollen chat` share: which model, where its blocks
//! run (here with `--local`, or through the swarm) and how, and how they become a
//! [`Backend`].

use crate::backend::{Backend, BackendError};
use crate::client::ClientConfig;
use anyhow::{Context, Result, bail};
use pollen_protocol::WireDType;
use pollen_shard::{LoadOptions, WeightMode};
use std::path::PathBuf;
use std::time::Duration;

/// The model and the way to run it, for `pollen api` and `pollen chat`.
#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// Bootstrap peer to join the swarm through, with its /p2p/ id (repeatable).
    #[arg(long = "bootstrap", value_parser = crate::bootstrap::parse_bootstrap_addr)]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// Do not look for peers on the local network with mDNS (on by default).
    #[arg(long)]
    pub no_mdns: bool,
    /// Run every block in this process instead of through the swarm.
    #[arg(long)]
    pub local: bool,
    /// Model file (.gguf) or safetensors folder; its file name is the model's name (as the
    /// API lists it). Default: SmolLM2-135M-Instruct Q4_1, fetched into $POLLEN_CACHE_DIR
    /// on first use.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device: cpu, cuda, cuda:N or metal (GPU builds need the cuda/metal feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for the model's kernels. Default: every core this process may use.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Weights in memory: fast (default), exact, q8_0, q4_0, q4k or q6k (as for
    /// `pollen generate`).
    #[arg(long, default_value = "fast")]
    pub weights: String,
    /// Hidden states on the wire: f32 (exact, default), f16 or bf16 (half the bytes).
    #[arg(long, default_value = "f32")]
    pub wire_dtype: String,
    /// Route through servers of this compute mode, as `pollen status` shows it (e.g. a
    /// GPU swarm's `exact/cuda-...` from a CPU), instead of the one --device and --weights
    /// compute. The text then need not equal local text.
    #[arg(long, value_name = "MODE", value_parser = crate::client::parse_compute, conflicts_with = "local")]
    pub compute: Option<String>,
}

/// What [`BackendArgs::prepare`] settled: the model file and how to load it.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The model file (or folder), fetched if it was the default and absent.
    pub model: PathBuf,
    /// Device and weight mode.
    pub load: LoadOptions,
}

impl BackendArgs {
    /// Checks the flags and finds the model (fetching the default on first use), without
    /// loading it: a command can fail on its own flags before minutes of loading.
    pub fn prepare(&self) -> Result<Prepared> {
        let model = match &self.model {
            Some(p) => p.clone(),
            None => crate::fetch::ensure_default_model(&mut |line| eprintln!("{line}"))?,
        };
        let load = LoadOptions {
            device: pollen_shard::device::parse_device(&self.device)?,
            mode: WeightMode::parse(&self.weights)?,
        };
        Ok(Prepared { model, load })
    }

    /// Loads the whole model here (`--local`, with a progress bar) or joins the swarm,
    /// waiting up to `route_wait` for servers covering every block on each generation.
    /// At most `max_concurrent` generations run at once.
    pub async fn open(
        &self,
        prepared: Prepared,
        route_wait: Duration,
        max_concurrent: usize,
    ) -> Result<Backend> {
        let Prepared { model, load } = prepared;
        if self.local {
            let pb = crate::progress::bar("loading", 0);
            let bar = pb.clone();
            let b = Backend::local(model.clone(), load, max_concurrent, move |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })
            .await;
            pb.finish_and_clear();
            b.with_context(|| format!("loading {}", model.display()))
        } else {
            let cfg = ClientConfig {
                model: model.clone(),
                load,
                bootstrap: self.bootstrap.clone(),
                listen: Vec::new(),
                mdns: !self.no_mdns,
                wire_dtype: wire_dtype(&self.wire_dtype)?,
                route_wait,
                verify: crate::client::DEFAULT_VERIFY,
                compute: self.compute.clone(),
            };
            // Not reaching the swarm is no fault of the model file: said as such, with
            // the private-mesh hint `generate` gives.
            Backend::swarm(cfg, max_concurrent)
                .await
                .map_err(|e| match e {
                    BackendError::NoBlocks(text) => {
                        let mesh = crate::net::private::process_mesh();
                        anyhow::anyhow!("{text}\n{}", crate::net::private::unreachable_hint(&mesh))
                    }
                    other => {
                        anyhow::Error::new(other).context(format!("loading {}", model.display()))
                    }
                })
        }
    }
}

/// Parses `--wire-dtype`.
fn wire_dtype(s: &str) -> Result<WireDType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" => WireDType::F32,
        "f16" => WireDType::F16,
        "bf16" => WireDType::BF16,
        other => bail!("unknown --wire-dtype `{other}` (expected f32, f16 or bf16)"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wire_dtype_names_are_case_insensitive_and_others_refused() {
        assert_eq!(wire_dtype("F16").unwrap(), WireDType::F16);
        assert_eq!(wire_dtype("bf16").unwrap(), WireDType::BF16);
        assert_eq!(wire_dtype("f32").unwrap(), WireDType::F32);
        let e = wire_dtype("f8").unwrap_err().to_string();
        assert!(e.contains("--wire-dtype `f8`"), "{e}");
    }

    /// `pollen api` and `pollen chat` take `--compute` as `pollen generate` does.
    #[test]
    fn compute_is_checked_and_only_for_the_swarm() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            backend: BackendArgs,
        }
        let parse = |args: &[&str]| Cli::try_parse_from([&["api"], args].concat());
        let cli = parse(&["--compute", "exact/cuda-sm90-132-3f0a1c"]).unwrap();
        assert_eq!(
            cli.backend.compute.as_deref(),
            Some("exact/cuda-sm90-132-3f0a1c")
        );
        assert_eq!(parse(&[]).unwrap().backend.compute, None);
        for bad in [
            &["--compute", "exact cpu"][..],
            &["--local", "--compute", "exact/cpu"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
