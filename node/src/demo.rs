//! `pollen demo`: the local mesh. Starts a bootstrap node and three servers (blocks
//! 0:10, 10:20, 20:30 of the default model) on 127.0.0.1 as separate processes, asks
//! one question through the swarm, streams the answer, and stops every process, also on
//! Ctrl-C, SIGTERM or SIGHUP.

use crate::mesh::{LocalMesh, THREE_SPANS};
use anyhow::{Context, Result, bail};
use std::time::Duration;
use tokio::process::Command;

/// Resolves on SIGTERM or SIGHUP (a closed terminal), so the mesh is stopped then too.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await
}

/// Runs the demo.
pub async fn run(prompt: String, max_tokens: usize) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the pollen binary")?;
    let model = crate::fetch::ensure_default_model(&mut |l| eprintln!("{l}"))?;
    let dir = std::env::temp_dir().join(format!("pollen-demo-{}", std::process::id()));
    eprintln!("starting a bootstrap node and three servers on 127.0.0.1");
    let (e, m, d) = (exe.clone(), model.clone(), dir.clone());
    let start = tokio::task::spawn_blocking(move || {
        LocalMesh::start(&e, &m, &d, "server", &THREE_SPANS, &[])
    });
    let mut mesh = tokio::select! {
        r = start => r.context("the mesh launcher failed")??,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = terminated() => bail!("terminated"),
    };
    eprintln!("bootstrap at {}", mesh.addr);
    for (i, (_, ready)) in mesh.servers.iter().enumerate() {
        eprintln!("server {} {ready}", i + 1);
    }
    eprintln!("asking through the swarm: {prompt}");
    let ask = Command::new(&exe)
        .args([
            "generate",
            "--chat",
            "--no-mdns",
            "--threads",
            "1",
            "--bootstrap",
            &mesh.addr,
        ])
        .args([
            "--max-tokens",
            &max_tokens.to_string(),
            "--prompt",
            &prompt,
            "--model",
        ])
        .arg(&model)
        .kill_on_drop(true)
        .status();
    let outcome = tokio::select! {
        r = ask => match r {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(anyhow::anyhow!("generation through the swarm failed ({s})")),
            Err(e) => Err(anyhow::anyhow!("cannot run the client: {e}")),
        },
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminated() => Err(anyhow::anyhow!("terminated")),
    };
    eprintln!("stopping the mesh");
    let _ = tokio::task::spawn_blocking(move || {
        mesh.stop(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
    outcome
}
