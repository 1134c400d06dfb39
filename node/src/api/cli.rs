//! `pollen api`: its command-line arguments and its start.

use super::{ApiState, web::SwarmViewCache};
use crate::backend_args::BackendArgs;
use anyhow::{Context, Result};
use clap::Args;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `pollen api [--bootstrap MULTIADDR]... [--listen 127.0.0.1:8080] [--local]`.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// Address to serve HTTP on. Port 0 picks a free one; the address is printed as
    /// `api http://ADDR`. Without --http-token anyone who can reach it may use it: keep
    /// it on a private address. In a private mesh (--swarm-key) it must be a loopback
    /// address unless --http-token is given. Requests naming a host it does not know
    /// (DNS rebinding: another site's page re-pointed at this address) are refused
    /// with 403: it knows `localhost` and IP addresses (on a loopback address only
    /// loopback ones), names given with --allow-host, and, with --http-token on an
    /// address other than loopback, every name.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// A host name this server answers besides `localhost` and IP addresses (e.g. the
    /// machine's name on the LAN, or a reverse proxy's), without a port; repeat for more.
    #[arg(long = "allow-host", value_name = "NAME", value_parser = host_name)]
    pub allow_hosts: Vec<String>,
    /// Require this bearer token on every route (`Authorization: Bearer TOKEN`, or
    /// `?token=TOKEN`); others get 401. Open the web page as `/?token=TOKEN`: the answer
    /// sets it as a cookie for the page's own requests. At least 16 characters.
    /// Default: none.
    #[arg(long, env = "POLLEN_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// The model, and where and how its blocks run.
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Seconds a request waits for servers covering every block before it fails with 503.
    #[arg(long, default_value_t = 10)]
    pub route_wait: u64,
    /// Most generations at once; more are refused with 429.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent: u16,
}

/// An `--allow-host` name: letters, digits, `-` and `.`, no port; a final `.` dropped,
/// as [`super::Hosts`] drops it from `Host`.
fn host_name(s: &str) -> Result<String, String> {
    let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "`{s}` is not a host name (letters, digits, `-` and `.`, without a port)"
        ))
    }
}

/// Loads the model (or joins the swarm), then serves until Ctrl-C or SIGTERM.
pub async fn run(args: ApiArgs) -> Result<()> {
    let prepared = args.backend.prepare()?;
    // A private mesh's swarm view (peer ids, addresses, spans) and its generation are for
    // its members: not on an open address without a token.
    crate::net::private::check_page(
        args.listen,
        &crate::net::private::process_mesh(),
        args.http_token.as_deref(),
    )
    .context("pollen api --listen")?;
    // Bind first: a taken port fails before minutes of loading.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let backend = args
        .backend
        .open(
            prepared,
            Duration::from_secs(args.route_wait),
            usize::from(args.max_concurrent),
        )
        .await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(ApiState {
        backend,
        swarm_view: SwarmViewCache::default(),
        shutdown: CancellationToken::new(),
    });
    println!("api http://{addr}");
    println!("model {}", state.backend.name());
    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    crate::signals::watch(stop.clone(), kill.clone());
    super::serve(
        state,
        listener,
        args.http_token.clone(),
        &args.allow_hosts,
        stop,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn allowed_host_names_are_names_without_ports() {
        assert_eq!(super::host_name("MyBox.LAN.").as_deref(), Ok("mybox.lan"));
        assert_eq!(
            super::host_name("api-1.example").as_deref(),
            Ok("api-1.example")
        );
        for bad in ["mybox:8080", "", ".", "http://mybox", "my box"] {
            assert!(super::host_name(bad).is_err(), "{bad}");
        }
    }
}
