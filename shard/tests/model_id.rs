//! The default model's digest, pinned: the hashes feed the model id peers
//! announce, so a change to how any of them is computed (the tokenizer
//! metadata's encoding, the order or framing of tensors) must show up here
//! first, not as peers that silently stop finding each other.
#![allow(clippy::unwrap_used)]

/// The default model's fetch and the cache folder, shared with the node (which owns them).
#[path = "../../node/src/fetch.rs"]
#[allow(dead_code, unreachable_pub)]
mod fetch;

use anyhow::Result;
use pollen_shard::ModelFile;
use pollen_shard::digest::{Hash, ModelDigest, digest};

fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// blake3 over every hash of the digest, in order: blocks, embeddings,
/// head, final norm, tokenizer.
fn whole(d: &ModelDigest) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&(d.blocks.len() as u64).to_le_bytes());
    for b in &d.blocks {
        h.update(b);
    }
    for x in [&d.embeddings, &d.head, &d.final_norm, &d.tokenizer] {
        h.update(x);
    }
    *h.finalize().as_bytes()
}

#[test]
fn default_model_digest_is_pinned() -> Result<()> {
    let path = fetch::ensure_default_model(&mut |l| eprintln!("{l}"))?;
    let file = ModelFile::open(&path)?;
    let d = digest(&file, &mut |_, _| {})?;
    assert_eq!(d.blocks.len(), 30);
    assert_eq!(
        hex(&d.tokenizer),
        "5c92192e5df227888be921a67b0a524aaccae6f618775b72231f2d53e5b60ae6"
    );
    assert_eq!(
        hex(&d.embeddings),
        "b0e915cb604aded0eab1439fc8f017949ab7d805f65e09e137821fae2ebdf2c7"
    );
    // Tied: the head is the embeddings.
    assert_eq!(d.head, d.embeddings);
    assert_eq!(
        hex(&d.final_norm),
        "76b49a0eace42159693471e49794617a88ad04114a6248dd1ebe47c2be547953"
    );
    assert_eq!(
        hex(&d.blocks[0]),
        "b208d1455436dac67d9818b2cd7b3bbc16652096a69d07e338eea9753abafcf3"
    );
    assert_eq!(
        hex(&d.blocks[29]),
        "06e87d43391e57c5dcf20318deac3f6a2c2d2290cd6c89974c0c5d4c71a1d66a"
    );
    assert_eq!(
        hex(&whole(&d)),
        "4111974c406f6bbae680906d9a65b761670b58e5f250b750bfb614d93e7858c7"
    );
    Ok(())
}
