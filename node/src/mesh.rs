//! A local mesh: a bootstrap node and servers as separate `pollen` processes on
//! 127.0.0.1. The demo, the swarm bench and the multi-process tests all start theirs
//! here, so there is one way to launch, wait for and stop a mesh.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// How long a process may take to print the line that says it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a mesh process could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The process could not be started.
    #[error("cannot start {name}: {source}")]
    Spawn {
        /// Which process.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It did not print the awaited line in time (or exited first).
    #[error("{name}: no line starting with {prefix:?} within {timeout:?}")]
    NotReady {
        /// Which process.
        name: String,
        /// The line awaited.
        prefix: String,
        /// How long.
        timeout: Duration,
    },
}

/// A child process whose stdout lines arrive on a channel; killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Its `metrics http://…` line's address, kept aside whoever reads the lines.
    metrics: Arc<OnceLock<String>>,
    /// A name for messages.
    pub name: String,
}

impl Proc {
    /// Starts `cmd` with its stdout captured line by line (stderr inherited).
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc, MeshError> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| MeshError::Spawn {
                name: name.into(),
                source,
            })?;
        // Pollen prints a few lines to stdout (its logs go to stderr): a small bound.
        let (tx, rx) = mpsc::sync_channel(1024);
        let metrics = Arc::new(OnceLock::new());
        if let Some(stdout) = child.stdout.take() {
            let metrics = metrics.clone();
            // Ends when the child closes its stdout (it exits).
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(url) = line.strip_prefix("metrics ") {
                        let _ = metrics.set(url.trim().to_string());
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Proc {
            child,
            lines: rx,
            metrics,
            name: name.into(),
        })
    }

    /// The address of its `/metrics` page, once it has printed it (a server started
    /// with `--metrics` prints it before its `ready` line).
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics.get().cloned()
    }

    /// The first stdout line starting with `prefix`, within `timeout`.
    pub fn line_with(&self, prefix: &str, timeout: Duration) -> Result<String, MeshError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => {}
                Err(_) => {
                    return Err(MeshError::NotReady {
                        name: self.name.clone(),
                        prefix: prefix.into(),
                        timeout,
                    });
                }
            }
        }
    }

    /// SIGKILL, like a machine that dies.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a polite stop).
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGTERM, then the exit status within `timeout` (`None` if still running).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal_term();
        self.wait_for(timeout)
    }

    /// The exit status within `timeout` (`None` if still running).
    pub fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a bootstrap node on 127.0.0.1 (no mDNS), its key in `dir`; with `http`, its
/// status page on a free port too. Returns it and its dialable address.
pub fn bootstrap(exe: &Path, dir: &Path, http: bool) -> Result<(Proc, String), MeshError> {
    let mut cmd = Command::new(exe);
    cmd.args([
        "bootstrap",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--identity",
    ])
    .arg(dir.join("bootstrap.key"));
    if http {
        cmd.args(["--http", "127.0.0.1:0"]);
    }
    let p = Proc::spawn("bootstrap", &mut cmd)?;
    let addr = p.line_with("/ip4/", Duration::from_secs(30))?;
    Ok((p, addr))
}

/// Starts a server of `blocks` on 127.0.0.1 with 1 thread, joined through `bootstrap`
/// (or, without one, found by mDNS); returns it and its `ready` line.
pub fn server(
    exe: &Path,
    model: &Path,
    bootstrap: Option<&str>,
    blocks: &str,
    key: &Path,
    extra: &[&str],
) -> Result<(Proc, String), MeshError> {
    let mut cmd = Command::new(exe);
    cmd.args([
        "serve",
        "--threads",
        "1",
        "--blocks",
        blocks,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ])
    .arg("--model")
    .arg(model)
    .arg("--identity")
    .arg(key)
    .args(extra);
    if let Some(b) = bootstrap {
        cmd.args(["--no-mdns", "--bootstrap", b]);
    }
    let p = Proc::spawn(&format!("server {blocks}"), &mut cmd)?;
    let ready = p.line_with("ready", READY_TIMEOUT)?;
    Ok((p, ready))
}

/// The peer id in a server's `ready` line.
pub fn peer_of(ready: &str) -> &str {
    ready.split_whitespace().nth(2).unwrap_or("")
}

/// The spans of the standard three-server mesh of the default model.
pub const THREE_SPANS: [&str; 3] = ["0:10", "10:20", "20:30"];

/// A bootstrap node and servers, stopped (politely, then for good) on drop.
#[derive(Debug)]
pub struct LocalMesh {
    /// The bootstrap node.
    pub bootstrap: Proc,
    /// Its dialable address.
    pub addr: String,
    /// The servers with their `ready` lines, in the order of their spans.
    pub servers: Vec<(Proc, String)>,
    /// Where the keys are.
    pub dir: PathBuf,
}

impl LocalMesh {
    /// A bootstrap and one server per span (keys `{tag}{i}.key` in `dir`, each with its
    /// own extra arguments), all ready on return.
    pub fn start(
        exe: &Path,
        model: &Path,
        dir: &Path,
        tag: &str,
        spans: &[&str],
        extra: &[&[&str]],
    ) -> Result<Self, MeshError> {
        std::fs::create_dir_all(dir).map_err(|source| MeshError::Spawn {
            name: format!("the mesh folder {}", dir.display()),
            source,
        })?;
        let (bootstrap, addr) = bootstrap(exe, dir, false)?;
        let mut mesh = LocalMesh {
            bootstrap,
            addr,
            servers: Vec::new(),
            dir: dir.to_path_buf(),
        };
        for (i, blocks) in spans.iter().enumerate() {
            let key = dir.join(format!("{tag}{i}.key"));
            let args = extra.get(i).copied().unwrap_or(&[]);
            mesh.servers
                .push(server(exe, model, Some(&mesh.addr), blocks, &key, args)?);
        }
        Ok(mesh)
    }

    /// Stops every process: SIGTERM (servers drain), then SIGKILL for any still running
    /// after `patience`.
    pub fn stop(&mut self, patience: Duration) {
        for (p, _) in &self.servers {
            p.signal_term();
        }
        self.bootstrap.signal_term();
        for (p, _) in &mut self.servers {
            if p.wait_for(patience).is_none() {
                p.kill9();
            }
        }
        if self.bootstrap.wait_for(patience).is_none() {
            self.bootstrap.kill9();
        }
    }
}
