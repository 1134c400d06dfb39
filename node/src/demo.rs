//! `pollen demo`: the local mesh. Starts a bootstrap node and three servers
//! (blocks 0:10, 10:20, 20:30 of the default model) on 127.0.0.1 as separate
//! processes, asks one question through the swarm, streams the answer, and
//! stops every process, also on Ctrl-C.

use anyhow::{Context, Result, bail};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct Mesh {
    children: Vec<Child>,
}

impl Mesh {
    async fn stop(&mut self) {
        for c in &mut self.children {
            if let Some(pid) = c.id() {
                // SIGTERM lets servers drain; kill_on_drop is the backstop.
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
        }
        for c in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}

async fn first_line_with(child: &mut Child, prefix: &str, what: &str) -> Result<String> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with(prefix) {
                return Ok::<_, anyhow::Error>(Some(line));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("{what} did not become ready within 120 s"))??;
    // Keep draining so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found.with_context(|| format!("{what} exited before it was ready"))
}

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
    let model = pollen_shard::fetch::ensure_default_model(&mut |l| eprintln!("{l}"))?;
    let dir = std::env::temp_dir().join(format!("pollen-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut mesh = Mesh {
        children: Vec::new(),
    };
    let result = async {
        eprintln!("starting a bootstrap node on 127.0.0.1");
        let mut boot = Command::new(&exe)
            .args([
                "bootstrap",
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--identity",
            ])
            .arg(dir.join("bootstrap.key"))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let addr = first_line_with(&mut boot, "/ip4/", "the bootstrap node").await?;
        mesh.children.push(boot);
        eprintln!("bootstrap at {addr}");
        for (i, blocks) in ["0:10", "10:20", "20:30"].iter().enumerate() {
            let mut server = Command::new(&exe)
                .args([
                    "serve",
                    "--threads",
                    "1",
                    "--no-mdns",
                    "--blocks",
                    blocks,
                    "--bootstrap",
                    &addr,
                ])
                .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--model"])
                .arg(&model)
                .arg("--identity")
                .arg(dir.join(format!("server{i}.key")))
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let ready = first_line_with(&mut server, "ready", "a server").await?;
            eprintln!("server {} {ready}", i + 1);
            mesh.children.push(server);
        }
        eprintln!("asking through the swarm: {prompt}");
        let status = Command::new(&exe)
            .args([
                "generate",
                "--chat",
                "--no-mdns",
                "--threads",
                "1",
                "--bootstrap",
                &addr,
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
            .status()
            .await?;
        if !status.success() {
            bail!("generation through the swarm failed ({status})");
        }
        Ok(())
    };
    let outcome = tokio::select! {
        r = result => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminated() => Err(anyhow::anyhow!("terminated")),
    };
    eprintln!("stopping the mesh");
    mesh.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}
