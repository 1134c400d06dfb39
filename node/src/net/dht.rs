//! The DHT's record store: libp2p's [`MemoryStore`], with the providers of a key
//! handed out in a fresh random order each time.
//!
//! Why: libp2p-kad answers a `GET_PROVIDERS` request with at most the replication
//! factor (K = 20) of the providers it stores for the key, and the memory store keeps
//! them in arrival order, so every node near a model's key answered with the same 20
//! earliest servers and a lookup never saw the rest (a client found 3 or 73 of 100).
//! Shuffled, each of the K nodes a lookup ends on answers with a different random 20,
//! and the union of their answers holds nearly all providers: with P providers each
//! answer misses a given one with probability 1 − 20/P, so r answers miss it with
//! (1 − 20/P)^r (P = 100, r = 20: 1%). Past a few hundred providers per key a lookup
//! sees a random few hundred of them, which is enough to route but not a census.

use libp2p::PeerId;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use rand::seq::SliceRandom;
use std::borrow::Cow;

/// A [`MemoryStore`] whose [`RecordStore::providers`] come in random order.
pub struct ProviderStore {
    inner: MemoryStore,
}

impl ProviderStore {
    /// A store for the node `local` with `config`'s caps.
    pub fn new(local: PeerId, config: MemoryStoreConfig) -> Self {
        Self {
            inner: MemoryStore::with_config(local, config),
        }
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, r: Record) -> Result<()> {
        self.inner.put(r)
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k)
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        self.inner.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut all = self.inner.providers(key);
        all.shuffle(&mut rand::rng());
        all
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.inner.remove_provider(k, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn providers_come_in_a_different_order_each_time_and_all_of_them() {
        let local = PeerId::random();
        let mut store = ProviderStore::new(
            local,
            MemoryStoreConfig {
                max_providers_per_key: 512,
                ..Default::default()
            },
        );
        let key = RecordKey::new(&[7u8; 32]);
        let peers: Vec<PeerId> = (0..100).map(|_| PeerId::random()).collect();
        for p in &peers {
            let r = ProviderRecord::new(key.clone(), *p, Vec::new());
            assert!(store.add_provider(r).is_ok());
        }
        // What libp2p-kad answers: the first 20 of `providers`.
        let mut seen = HashSet::new();
        let mut firsts = HashSet::new();
        for _ in 0..20 {
            let all = store.providers(&key);
            assert_eq!(all.len(), 100, "every provider, every time");
            firsts.insert(all[0].provider);
            seen.extend(all.iter().take(20).map(|r| r.provider));
        }
        assert!(firsts.len() > 1, "the order changes");
        // 20 answers of 20 of 100 miss a given provider with probability 0.8^20 ≈ 1%.
        assert!(seen.len() >= 90, "20 answers together hold {}", seen.len());
        store.remove_provider(&key, &peers[0]);
        assert_eq!(store.providers(&key).len(), 99);
    }
}
