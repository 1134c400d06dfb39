//! A Python virtual environment with the `openai` client and a WebSocket client (for
//! Chromium's DevTools protocol), made once under the test cache folder and reused.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The packages the API and web tests drive Pollen with.
const PACKAGES: [&str; 2] = ["openai", "websocket-client"];

/// The venv's `python`, after making the venv if it is missing or incomplete.
pub fn python() -> PathBuf {
    let dir = pollen_node::fetch::cache_dir().join("test-venv");
    let py = dir.join("bin").join("python");
    let ready = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai, websocket"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&py) {
        return py;
    }
    eprintln!(
        "making a Python venv with {PACKAGES:?} in {}",
        dir.display()
    );
    let st = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&dir)
        .status()
        .expect("python3 runs");
    assert!(
        st.success(),
        "python3 -m venv failed (install python3-venv)"
    );
    let st = Command::new(&py)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(PACKAGES)
        .status()
        .expect("pip runs");
    assert!(st.success(), "pip install {PACKAGES:?} failed");
    assert!(ready(&py), "the venv cannot import {PACKAGES:?}");
    py
}

/// The folder of the Python scripts.
pub fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/py")
}
