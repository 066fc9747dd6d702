//! Prefix sharing through a content-addressed store (`kvtier::prefix`) on the host-memory and
//! directory stores: a cache that imports a published prefix attends exactly as one that appended
//! the same keys and values; a different model, config or token never matches; damaged, missing
//! and foreign records end the import early with nothing wrong in the cache; store errors leave
//! the sequence empty. (The Redis store's faults: tests/redis.rs.)

use std::sync::Arc;

use kvtier::cold::store::{ColdStore, DirStore, MemoryStore};
use kvtier::prefix::{config_fingerprint, Fingerprint, PrefixStore};
use kvtier::{Bits, CacheConfig, HotDtype, KvCache, Rotation, SeqId};

const L: usize = 3;
const QH: usize = 4;
const KVH: usize = 2;
const D: usize = 32;

fn cfg() -> CacheConfig {
    CacheConfig::builder(L, QH, KVH, D)
        .page_size(16)
        .hot_window(32)
        .sink_tokens(4)
        .hot_dtype(HotDtype::F16)
        .build()
        .unwrap()
}

/// Keys and values of token `t` in `layer` (depend on the token id and its position only).
fn kv(layer: usize, tokens: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut k = Vec::new();
    let mut v = Vec::new();
    for (pos, &t) in tokens.iter().enumerate() {
        for i in 0..KVH * D {
            let x = (t as f32 * 0.37 + pos as f32 * 0.011 + i as f32 * 0.13 + layer as f32).sin();
            k.push(x);
            v.push((x * 1.7 + 0.3).cos());
        }
    }
    (k, v)
}

fn fill(cache: &mut KvCache, seq: SeqId, tokens: &[u32]) {
    for layer in 0..L {
        let (k, v) = kv(layer, tokens);
        cache.append(seq, layer, &k, &v).unwrap();
    }
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + salt) % 500).collect()
}

fn model() -> Fingerprint {
    Fingerprint::of_bytes(b"test model weights")
}

fn attend_all(cache: &KvCache, seq: SeqId) -> Vec<Vec<f32>> {
    let q: Vec<f32> = (0..QH * D).map(|i| (i as f32 * 0.07).cos()).collect();
    (0..L)
        .map(|l| cache.attend(l, &[seq], &q).unwrap().output)
        .collect()
}

/// Imports `prompt` from `store` into a fresh cache and appends the rest locally.
fn import_then_rest(
    px: &PrefixStore,
    cfg: &CacheConfig,
    prompt: &[u32],
) -> (KvCache, SeqId, usize) {
    let mut c = KvCache::new(cfg.clone()).unwrap();
    let s = c.add_sequence();
    let got = px.import(&mut c, s, prompt).unwrap();
    for layer in 0..L {
        let (k, v) = kv(layer, prompt);
        let n = got.tokens * KVH * D;
        c.append(s, layer, &k[n..], &v[n..]).unwrap();
    }
    (c, s, got.tokens)
}

#[test]
fn imported_prefix_attends_exactly_as_appended() {
    for rotation in [Rotation::None, Rotation::KeysValues] {
        let cfg = CacheConfig { rotation, ..cfg() };
        let store: Arc<dyn ColdStore> = Arc::new(MemoryStore::new(64 << 20));
        let px = PrefixStore::new(store, "test", model()).unwrap();
        let prompt = tokens(200, 1);
        let mut a = KvCache::new(cfg.clone()).unwrap();
        let sa = a.add_sequence();
        fill(&mut a, sa, &prompt);
        assert_eq!(
            px.lookup(&cfg, &prompt).unwrap(),
            0,
            "nothing published yet"
        );
        let p = px.publish(&a, sa, &prompt).unwrap();
        // 200 tokens: 12 full pages per layer, all exact (archive on).
        assert_eq!(p.written, 12 * L);
        assert_eq!(p.not_exact, 0);
        // The last token is always left to prefill: 192 tokens (12 pages) are importable.
        assert_eq!(px.lookup(&cfg, &prompt).unwrap(), 192);
        // Publishing again sends nothing.
        assert_eq!(px.publish(&a, sa, &prompt).unwrap().present, 12 * L);

        let (b, sb, imported) = import_then_rest(&px, &cfg, &prompt);
        assert_eq!(imported, 192);
        let (oa, ob) = (attend_all(&a, sa), attend_all(&b, sb));
        for l in 0..L {
            let err = oa[l]
                .iter()
                .zip(&ob[l])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            // Bit-identical without rotation; rotation undone and redone in f32 (within f16's
            // rounding of the stored value, which it recovers).
            let tol = if rotation == Rotation::None {
                0.0
            } else {
                1e-5
            };
            assert!(err <= tol, "{rotation:?} layer {l}: max |a - b| = {err}");
        }
        assert_eq!(a.memory_report().warm_bytes, b.memory_report().warm_bytes);
    }
}

#[test]
fn different_model_config_or_tokens_never_match() {
    let store: Arc<dyn ColdStore> = Arc::new(MemoryStore::new(64 << 20));
    let px = PrefixStore::new(store.clone(), "test", model()).unwrap();
    let prompt = tokens(100, 3);
    let cfg = cfg();
    let mut a = KvCache::new(cfg.clone()).unwrap();
    let sa = a.add_sequence();
    fill(&mut a, sa, &prompt);
    px.publish(&a, sa, &prompt).unwrap();
    assert_eq!(px.lookup(&cfg, &prompt).unwrap(), 96);
    // Another model.
    let other = PrefixStore::new(store.clone(), "test", Fingerprint::of_bytes(b"other")).unwrap();
    assert_eq!(other.lookup(&cfg, &prompt).unwrap(), 0);
    // Another namespace.
    let ns = PrefixStore::new(store.clone(), "staging", model()).unwrap();
    assert_eq!(ns.lookup(&cfg, &prompt).unwrap(), 0);
    // A config whose stored bytes differ (hot dtype, page size, rotation).
    for c in [
        CacheConfig {
            hot_dtype: HotDtype::F32,
            ..cfg.clone()
        },
        CacheConfig {
            page_size: 32,
            ..cfg.clone()
        },
        CacheConfig {
            rotation: Rotation::Keys,
            ..cfg.clone()
        },
    ] {
        assert_ne!(config_fingerprint(&c), config_fingerprint(&cfg));
        assert_eq!(px.lookup(&c, &prompt).unwrap(), 0);
    }
    // ... but warm bits and the hot window do not change the bytes: those caches share pages.
    let int2 = CacheConfig {
        k_bits: Bits::B2,
        v_bits: Bits::B2,
        hot_window: 64,
        ..cfg.clone()
    };
    assert_eq!(config_fingerprint(&int2), config_fingerprint(&cfg));
    assert_eq!(px.lookup(&int2, &prompt).unwrap(), 96);
    // A prompt that differs in one token of page 2 matches pages 0 and 1 only.
    let mut changed = prompt.clone();
    changed[40] += 1;
    assert_eq!(px.lookup(&cfg, &changed).unwrap(), 32);
    // A prefix of the prompt matches its own full pages.
    assert_eq!(px.lookup(&cfg, &prompt[..50]).unwrap(), 48);
}

#[test]
fn damaged_missing_and_foreign_records_end_the_import() {
    let store = Arc::new(MemoryStore::new(64 << 20));
    let dynstore: Arc<dyn ColdStore> = store.clone();
    let px = PrefixStore::new(dynstore, "test", model()).unwrap();
    let cfg = cfg();
    let prompt = tokens(160, 5);
    let mut a = KvCache::new(cfg.clone()).unwrap();
    let sa = a.add_sequence();
    fill(&mut a, sa, &prompt);
    px.publish(&a, sa, &prompt).unwrap();
    let keys = px.keys(&cfg, &prompt, 10);
    let key = |p: usize, l: usize| keys[p][l].0.clone();
    let get = |k: &str| store.get_many(&[k.to_string()]).unwrap().remove(0).unwrap();

    // A flipped bit in page 6 of layer 1.
    let mut rec = get(&key(6, 1));
    let mid = rec.len() / 2;
    rec[mid] ^= 0x10;
    store.put_many(&[(key(6, 1), rec)]).unwrap();
    // Page 4 of layer 2's record stored under page 3's key (a contaminated entry: valid checksum,
    // wrong identity).
    let foreign = get(&key(4, 2));
    store.put_many(&[(key(3, 2), foreign)]).unwrap();

    let (b, sb, imported) = import_then_rest(&px, &cfg, &prompt);
    assert_eq!(
        imported,
        3 * 16,
        "pages 0-2 verified; page 3 carries a foreign record"
    );
    let oa = attend_all(&a, sa);
    let ob = attend_all(&b, sb);
    assert_eq!(oa, ob, "the rest prefilled locally: same attention");

    // Restore page 3; page 6 is still damaged.
    let good = {
        let mut c = KvCache::new(cfg.clone()).unwrap();
        let s = c.add_sequence();
        fill(&mut c, s, &prompt);
        let fresh: Arc<dyn ColdStore> = Arc::new(MemoryStore::new(64 << 20));
        let p2 = PrefixStore::new(fresh.clone(), "test", model()).unwrap();
        p2.publish(&c, s, &prompt).unwrap();
        fresh.get_many(&[key(3, 2)]).unwrap().remove(0).unwrap()
    };
    store.put_many(&[(key(3, 2), good)]).unwrap();
    let mut c = KvCache::new(cfg.clone()).unwrap();
    let s = c.add_sequence();
    let got = px.import(&mut c, s, &prompt).unwrap();
    assert_eq!((got.tokens, got.corrupt), (6 * 16, 1));
    // A missing record (evicted) ends it the same way, without counting as corrupt.
    let small = Arc::new(MemoryStore::new(1));
    let dyn_small: Arc<dyn ColdStore> = small.clone();
    let empty = PrefixStore::new(dyn_small, "test", model()).unwrap();
    let mut c = KvCache::new(cfg.clone()).unwrap();
    let s = c.add_sequence();
    assert_eq!(empty.import(&mut c, s, &prompt).unwrap().tokens, 0);
    assert_eq!(c.seq_len(s, 0).unwrap(), 0);
}

#[test]
fn bad_calls_are_typed_errors() {
    let store: Arc<dyn ColdStore> = Arc::new(MemoryStore::new(1 << 20));
    for ns in ["", "a:b", "x/y", &"n".repeat(65)] {
        assert!(
            PrefixStore::new(store.clone(), ns, model()).is_err(),
            "{ns:?}"
        );
    }
    let px = PrefixStore::new(store, "ok", model()).unwrap();
    let cfg = cfg();
    let mut c = KvCache::new(cfg.clone()).unwrap();
    let s = c.add_sequence();
    fill(&mut c, s, &tokens(20, 0));
    // Import into a sequence that already holds tokens.
    let e = px.import(&mut c, s, &tokens(40, 0)).unwrap_err();
    assert!(e.to_string().contains("empty sequence"), "{e}");
    assert_eq!(c.seq_len(s, 0).unwrap(), 20, "nothing changed");
    // An unknown sequence.
    assert!(px.publish(&c, SeqId(999), &tokens(40, 0)).is_err());
    // Tiny prompts: nothing to import, nothing to publish.
    assert_eq!(px.lookup(&cfg, &[]).unwrap(), 0);
    assert_eq!(
        px.lookup(&cfg, &tokens(16, 0)).unwrap(),
        0,
        "the last token stays to prefill"
    );
}

#[test]
fn directory_store_shares_between_caches_and_publishes_in_the_background() {
    let dir = std::env::temp_dir().join(format!("kvtier-prefix-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = cfg();
    let prompt = tokens(300, 9);
    {
        let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(&dir).unwrap());
        let px = PrefixStore::new(store, "node-a", model()).unwrap();
        let mut a = KvCache::new(cfg.clone()).unwrap();
        let sa = a.add_sequence();
        fill(&mut a, sa, &prompt);
        let queued = px.publish_async(&a, sa, &prompt).unwrap();
        assert_eq!(queued, 18 * L);
        let done = px.flush().unwrap();
        assert_eq!(done.written, 18 * L);
    }
    // Another "node": a new store object on the same directory.
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(&dir).unwrap());
    let px = PrefixStore::new(store, "node-a", model()).unwrap();
    assert_eq!(px.lookup(&cfg, &prompt).unwrap(), 288);
    let (b, sb, n) = import_then_rest(&px, &cfg, &prompt);
    assert_eq!(n, 288);
    let mut a = KvCache::new(cfg.clone()).unwrap();
    let sa = a.add_sequence();
    fill(&mut a, sa, &prompt);
    assert_eq!(attend_all(&a, sa), attend_all(&b, sb));
    // A truncated file is a damaged record: the import stops there.
    let k = px.keys(&cfg, &prompt, 5)[4][0].0.replace(':', "_");
    let path = dir.join(format!("{k}.kvr"));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let mut c = KvCache::new(cfg.clone()).unwrap();
    let s = c.add_sequence();
    let got = px.import(&mut c, s, &prompt).unwrap();
    assert_eq!((got.tokens, got.corrupt), (64, 1));
    std::fs::remove_dir_all(&dir).unwrap();
}
