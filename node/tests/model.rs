//! The default model's id is pinned: a change to the manifest, the digest or their
//! encodings (an upgrade of candle or of Rust included) would silently split the swarm,
//! so it must show up here first. The id is cached by path, size and modification time.
#![allow(clippy::unwrap_used, missing_docs)]

use pollen_node::model::{compute_mode, model_id};
use pollen_shard::{LoadOptions, WeightMode};

/// blake3 of the default model's manifest (SmolLM2-135M-Instruct, Q4_1).
const DEFAULT_MODEL_ID: &str = "db758bee81bc054f0374e6e340c6947f29fbae77c41cd6ad0f289f78134292ba";

#[test]
fn the_default_model_id_is_pinned_and_cached() {
    let path = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let key = pollen_node::fetch::file_key(&path).unwrap();
    // Forget the cached id, so that the first call really hashes the file.
    let cached = pollen_node::fetch::cache_dir().join("model-ids").join(&key);
    let _ = std::fs::remove_file(&cached);
    let mut hashed = 0u64;
    let id = model_id(&path, &mut |done, _| hashed = done).unwrap();
    assert_eq!(id.to_string(), DEFAULT_MODEL_ID);
    assert!(hashed > 0, "the first call hashes the file");
    assert_eq!(
        pollen_node::fetch::read_cached("model-ids", &key).as_deref(),
        Some(DEFAULT_MODEL_ID)
    );
    let mut hashed_again = 0u64;
    let again = model_id(&path, &mut |done, _| hashed_again = done).unwrap();
    assert_eq!(again, id);
    assert_eq!(hashed_again, 0, "the second call reads the cache");
}

#[test]
fn compute_modes_name_the_arithmetic() {
    let exact = LoadOptions {
        mode: WeightMode::Exact,
        ..LoadOptions::default()
    };
    assert_eq!(compute_mode(&exact), "exact/cpu");
    let fast = compute_mode(&LoadOptions::default());
    assert!(
        fast == "fast/cpu" || fast == "q8_0/cpu",
        "fast runs as its kernels or as q8_0: {fast}"
    );
    let q8 = LoadOptions {
        mode: WeightMode::parse("q8_0").unwrap(),
        ..LoadOptions::default()
    };
    assert_eq!(compute_mode(&q8), "q8_0/cpu");
}
