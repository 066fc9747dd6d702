//! Prefix sharing: exact pages of a prompt's prefix published to a shared [`ColdStore`] under a
//! content address, so another cache (another process, another node) imports them instead of
//! prefilling the same tokens again.
//!
//! Owns: the key schema ([`PrefixStore::keys`]), model and config fingerprints, [`PrefixStore`]'s
//! `lookup` / `import` / `publish` (and the background publisher), and the record checks on import.
//! Must never: import a page it has not verified (checksum, identity, shape), leave a sequence
//! half-imported after an error, or block a decode step (stores are only touched from
//! `lookup` / `import` before a prefill and from `publish`, which can hand its work to a thread).
//!
//! # Key schema
//!
//! `kvtier:<namespace>:p1:<64 hex digits>`, the digits being
//! `SHA-256("kvtier-page-v1" ‖ model fingerprint ‖ config fingerprint ‖ layer (u32 LE) ‖ T_p)` with
//! `T_p = SHA-256(T_{p-1} ‖ token ids of page p (u32 LE))`, `T_{-1}` 32 zero bytes: a hash of
//! every token up to the page's end. The namespace (`[A-Za-z0-9_-]{1,64}`, per deployment) is the
//! only caller text in a key, and it is checked, never escaped.
//!
//! - model fingerprint: the caller's (for a GGUF file, [`Fingerprint::of_file`]: SHA-256 of the
//!   file), so different weights never match;
//! - config fingerprint ([`config_fingerprint`]): what the stored bytes depend on: layers, kv
//!   heads, head size, page size, hot dtype, rotation and its seed. Warm bits, hot window and
//!   sinks are not in it: the stored pages are exact, and each importer quantises them by its own
//!   configuration, so caches of different compression share pages.
//!
//! # Record
//!
//! The disk tier's record (`cold::disk`: magic, version, tier, formats, identity, token count,
//! payload, CRC-32) with the page's exact hot bytes as the cache holds them (archive copy or hot
//! page; storage layout, hot dtype, rotated basis when the config rotates). Its identity fields
//! are the first 8 bytes of the key's digest, the page index and the layer, so a record stored
//! under another key, a torn write or a flipped bit fails the check on import.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::backend::cpu::CpuStorage;
use crate::backend::{BackendStorage, PageBytes};
use crate::cache::{KvCache, PageEntry, PageRef, Rows, SeqId, Tier};
use crate::cold::disk::{decode, encode};
use crate::cold::store::ColdStore;
use crate::config::{CacheConfig, HotDtype};
use crate::error::{Error, Result};

/// A 32-byte identity (SHA-256).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// SHA-256 of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Fingerprint(Sha256::digest(bytes).into())
    }

    /// SHA-256 of a file's contents (for model weights: a GGUF or safetensors file), streamed.
    pub fn of_file(path: &std::path::Path) -> Result<Self> {
        use std::io::Read;
        let err = |e: std::io::Error| Error::Remote {
            op: "fingerprint",
            reason: format!("{}: {e}", path.display()),
        };
        let mut f = std::fs::File::open(path).map_err(err)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(err)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(Fingerprint(h.finalize().into()))
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a page's stored bytes depend on (see the module docs).
pub fn config_fingerprint(cfg: &CacheConfig) -> Fingerprint {
    let mut h = Sha256::new();
    h.update(b"kvtier-config-v1");
    for x in [
        cfg.num_layers as u64,
        cfg.num_kv_heads as u64,
        cfg.head_dim as u64,
        cfg.page_size as u64,
        match cfg.hot_dtype {
            HotDtype::F32 => 1,
            HotDtype::F16 => 2,
            HotDtype::BF16 => 3,
        },
        match (cfg.rotation.keys(), cfg.rotation.values()) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        },
        if cfg.rotation.keys() {
            cfg.rotation_seed
        } else {
            0
        },
    ] {
        h.update(x.to_le_bytes());
    }
    Fingerprint(h.finalize().into())
}

/// What [`PrefixStore::import`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Imported {
    /// Time spent waiting for the store (the rest of the import is checking, converting and
    /// appending the pages).
    pub fetch_time: std::time::Duration,
    /// Leading tokens now in the sequence (a multiple of the page size).
    pub tokens: usize,
    pub pages: usize,
    /// Record bytes read from the store.
    pub bytes: usize,
    /// Pages (over all layers) whose record failed its check; the import stopped before the
    /// first page with one.
    pub corrupt: usize,
}

/// What [`PrefixStore::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Published {
    /// Records written (over all layers).
    pub written: usize,
    /// Records the store already had (not sent again).
    pub present: usize,
    /// Full pages with no exact copy (evicted, or warm without an archive), per layer summed:
    /// each layer publishes up to its first such page.
    pub not_exact: usize,
    pub bytes: usize,
}

/// A keyed page record.
type Record = (String, Vec<u8>);
type Job = (Vec<Record>, Option<mpsc::Sender<()>>);

/// The background thread of [`PrefixStore::publish_async`].
struct Publisher {
    tx: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    result: Arc<Mutex<(Published, Option<Error>)>>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A shared store of exact prefix pages for one model in one deployment namespace.
pub struct PrefixStore {
    store: Arc<dyn ColdStore>,
    namespace: String,
    model: Fingerprint,
    /// Pages per store round trip.
    batch_pages: usize,
    publisher: Mutex<Option<Publisher>>,
}

/// Pages fetched per round trip on import and lookup (times the layers).
const BATCH_PAGES: usize = 16;

fn check_namespace(ns: &str) -> Result<()> {
    if ns.is_empty()
        || ns.len() > 64
        || !ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::config(
            "namespace",
            format!(
                "a namespace of {} bytes: need 1 to 64 of [A-Za-z0-9_-]",
                ns.len()
            ),
        ));
    }
    Ok(())
}

impl PrefixStore {
    /// Pages of `model` in `store`, under `namespace` (`[A-Za-z0-9_-]{1,64}`).
    pub fn new(store: Arc<dyn ColdStore>, namespace: &str, model: Fingerprint) -> Result<Self> {
        check_namespace(namespace)?;
        Ok(PrefixStore {
            store,
            namespace: namespace.to_string(),
            model,
            batch_pages: BATCH_PAGES,
            publisher: Mutex::new(None),
        })
    }

    /// The store's description.
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The keys of the first `pages` full pages of `tokens`, `[page][layer]` (see the module
    /// docs), with each key's record identity.
    pub fn keys(&self, cfg: &CacheConfig, tokens: &[u32], pages: usize) -> Vec<Vec<(String, u64)>> {
        let ps = cfg.page_size;
        let pages = pages.min(tokens.len() / ps);
        let cfp = config_fingerprint(cfg);
        let mut chain = [0u8; 32];
        let mut out = Vec::with_capacity(pages);
        for p in 0..pages {
            let mut h = Sha256::new();
            h.update(chain);
            for t in &tokens[p * ps..(p + 1) * ps] {
                h.update(t.to_le_bytes());
            }
            chain = h.finalize().into();
            out.push(
                (0..cfg.num_layers)
                    .map(|layer| {
                        let mut h = Sha256::new();
                        h.update(b"kvtier-page-v1");
                        h.update(self.model.0);
                        h.update(cfp.0);
                        h.update((layer as u32).to_le_bytes());
                        h.update(chain);
                        let d: [u8; 32] = h.finalize().into();
                        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
                        let mut id = [0u8; 8];
                        id.copy_from_slice(&d[..8]);
                        (
                            format!("kvtier:{}:p1:{hex}", self.namespace),
                            u64::from_le_bytes(id),
                        )
                    })
                    .collect(),
            );
        }
        out
    }

    /// Full pages of `tokens` that can be imported: the last token is always left to prefill (its
    /// logits start the answer).
    fn importable_pages(cfg: &CacheConfig, tokens: &[u32]) -> usize {
        tokens.len().saturating_sub(1) / cfg.page_size
    }

    /// How many leading tokens of `tokens` the store holds for every layer (a multiple of the
    /// page size, less than `tokens.len()`). Existence only: [`PrefixStore::import`] verifies.
    pub fn lookup(&self, cfg: &CacheConfig, tokens: &[u32]) -> Result<usize> {
        let keys = self.keys(cfg, tokens, Self::importable_pages(cfg, tokens));
        let mut pages = 0;
        for chunk in keys.chunks(self.batch_pages) {
            let flat: Vec<String> = chunk.iter().flatten().map(|(k, _)| k.clone()).collect();
            let have = self.store.exists_many(&flat)?;
            let layers = cfg.num_layers;
            for p in 0..chunk.len() {
                if !have[p * layers..(p + 1) * layers].iter().all(|&b| b) {
                    return Ok(pages * cfg.page_size);
                }
                pages += 1;
            }
        }
        Ok(pages * cfg.page_size)
    }

    /// Imports the longest verified run of leading pages of `tokens` into the empty sequence
    /// `seq` of `cache` (as if those tokens' keys and values had been appended: each page is
    /// quantised, archived and tiered by the cache's own configuration). A missing or corrupt
    /// record ends the run (the rest is the caller's to prefill); a store error is returned with
    /// the sequence left empty.
    pub fn import(&self, cache: &mut KvCache, seq: SeqId, tokens: &[u32]) -> Result<Imported> {
        let cfg = cache.config().clone();
        for layer in 0..cfg.num_layers {
            let n = cache.seq_len(seq, layer)?;
            if n != 0 {
                return Err(Error::shape(
                    "prefix import",
                    "an empty sequence",
                    format!("{n} tokens in layer {layer}"),
                ));
            }
        }
        let keys = self.keys(&cfg, tokens, Self::importable_pages(&cfg, tokens));
        let mut done = Imported::default();
        let res = (|| -> Result<()> {
            for chunk in keys.chunks(self.batch_pages) {
                let flat: Vec<String> = chunk.iter().flatten().map(|(k, _)| k.clone()).collect();
                let t = std::time::Instant::now();
                let recs = self.store.get_many(&flat)?;
                done.fetch_time += t.elapsed();
                let first = done.pages;
                let mut good = 0;
                let mut rows: Vec<(Vec<f32>, Vec<f32>)> =
                    vec![(Vec::new(), Vec::new()); cfg.num_layers];
                'pages: for (i, page_keys) in chunk.iter().enumerate() {
                    let mut page_rows = Vec::with_capacity(cfg.num_layers);
                    for (layer, (_, id)) in page_keys.iter().enumerate() {
                        let Some(rec) = &recs[i * cfg.num_layers + layer] else {
                            break 'pages;
                        };
                        match page_rows_of(&cfg, cache, layer, rec, *id, (first + i) as u32) {
                            Ok(r) => page_rows.push((r, rec.len())),
                            Err(_) => {
                                done.corrupt += 1;
                                break 'pages;
                            }
                        }
                    }
                    for (layer, ((k, v), n)) in page_rows.into_iter().enumerate() {
                        rows[layer].0.extend_from_slice(&k);
                        rows[layer].1.extend_from_slice(&v);
                        done.bytes += n;
                    }
                    good += 1;
                }
                for (layer, (k, v)) in rows.iter().enumerate() {
                    if !k.is_empty() {
                        cache.append_rows(seq, layer, Rows::F32(k), Rows::F32(v))?;
                    }
                }
                done.pages += good;
                if good < chunk.len() {
                    break;
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            // Nothing half-imported survives an error: the sequence was empty.
            cache.reset_sequence(seq)?;
            return Err(e);
        }
        done.tokens = done.pages * cfg.page_size;
        Ok(done)
    }

    /// The records of the full pages of `tokens` held exactly by `seq` (each layer up to its
    /// first page without an exact copy), keyed.
    fn records(&self, cache: &KvCache, seq: SeqId, tokens: &[u32]) -> Result<(Vec<Record>, usize)> {
        let cfg = cache.config();
        let mut full = tokens.len() / cfg.page_size;
        for layer in 0..cfg.num_layers {
            full = full.min(cache.seq_len(seq, layer)? / cfg.page_size);
        }
        let keys = self.keys(cfg, tokens, full);
        let mut out = Vec::new();
        let mut not_exact = 0;
        for layer in 0..cfg.num_layers {
            for (p, page_keys) in keys.iter().enumerate() {
                let pr = PageRef {
                    seq,
                    layer,
                    page: p,
                };
                match cache.exact_page(pr)? {
                    Some(b) if b.tier == Tier::Hot && b.n_tokens as usize == cfg.page_size => {
                        let (key, id) = &page_keys[layer];
                        out.push((key.clone(), encode(&b, *id, p as u32, layer as u32)));
                    }
                    _ => {
                        not_exact += full - p;
                        break;
                    }
                }
            }
        }
        Ok((out, not_exact))
    }

    /// Publishes the full pages of `seq` (whose first tokens are `tokens`) that the store lacks;
    /// waits for the store.
    pub fn publish(&self, cache: &KvCache, seq: SeqId, tokens: &[u32]) -> Result<Published> {
        let (recs, not_exact) = self.records(cache, seq, tokens)?;
        let mut p = put_missing(self.store.as_ref(), recs)?;
        p.not_exact = not_exact;
        Ok(p)
    }

    /// [`PrefixStore::publish`] on a background thread: the records are copied out of the cache
    /// now (memory copies only) and sent by the thread; returns the number of records queued.
    /// [`PrefixStore::flush`] waits for them and reports.
    pub fn publish_async(&self, cache: &KvCache, seq: SeqId, tokens: &[u32]) -> Result<usize> {
        let (recs, not_exact) = self.records(cache, seq, tokens)?;
        let n = recs.len();
        let mut g = self
            .publisher
            .lock()
            .map_err(|_| Error::internal("publisher lock poisoned"))?;
        if g.is_none() {
            *g = Some(self.spawn_publisher()?);
        }
        let p = g.as_ref().expect("just set");
        if let Ok(mut r) = p.result.lock() {
            r.0.not_exact += not_exact;
        }
        p.tx.as_ref()
            .expect("sender lives until drop")
            .send((recs, None))
            .map_err(|_| Error::internal("the publisher thread has stopped"))?;
        Ok(n)
    }

    fn spawn_publisher(&self) -> Result<Publisher> {
        let (tx, rx) = mpsc::channel::<Job>();
        let store = self.store.clone();
        let result: Arc<Mutex<(Published, Option<Error>)>> = Arc::default();
        let res = result.clone();
        let handle = std::thread::Builder::new()
            .name("kvtier-publish".into())
            .spawn(move || {
                for (recs, done) in rx {
                    if !recs.is_empty() {
                        let r = put_missing(store.as_ref(), recs);
                        if let Ok(mut g) = res.lock() {
                            match r {
                                Ok(p) => {
                                    g.0.written += p.written;
                                    g.0.present += p.present;
                                    g.0.bytes += p.bytes;
                                }
                                Err(e) => {
                                    if g.1.is_none() {
                                        g.1 = Some(e);
                                    }
                                }
                            }
                        }
                    }
                    if let Some(d) = done {
                        let _ = d.send(());
                    }
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the publisher thread: {e}")))?;
        Ok(Publisher {
            tx: Some(tx),
            handle: Some(handle),
            result,
        })
    }

    /// Waits for every [`PrefixStore::publish_async`] so far; returns their totals since the last
    /// flush, or the first store error among them.
    pub fn flush(&self) -> Result<Published> {
        let g = self
            .publisher
            .lock()
            .map_err(|_| Error::internal("publisher lock poisoned"))?;
        let Some(p) = g.as_ref() else {
            return Ok(Published::default());
        };
        let (dtx, drx) = mpsc::channel();
        p.tx.as_ref()
            .expect("sender lives until drop")
            .send((Vec::new(), Some(dtx)))
            .map_err(|_| Error::internal("the publisher thread has stopped"))?;
        drx.recv()
            .map_err(|_| Error::internal("the publisher thread has stopped"))?;
        let mut r = p
            .result
            .lock()
            .map_err(|_| Error::internal("publisher result lock poisoned"))?;
        let out = std::mem::take(&mut r.0);
        match r.1.take() {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// Sends the records the store does not have yet.
fn put_missing(store: &dyn ColdStore, recs: Vec<Record>) -> Result<Published> {
    let keys: Vec<String> = recs.iter().map(|(k, _)| k.clone()).collect();
    let have = store.exists_many(&keys)?;
    let todo: Vec<Record> = recs
        .into_iter()
        .zip(&have)
        .filter(|(_, &h)| !h)
        .map(|(r, _)| r)
        .collect();
    let bytes = todo.iter().map(|(_, v)| v.len()).sum();
    for chunk in todo.chunks(64) {
        store.put_many(chunk)?;
    }
    Ok(Published {
        written: todo.len(),
        present: have.iter().filter(|&&h| h).count(),
        not_exact: 0,
        bytes,
    })
}

/// Checks one record and returns its page's keys and values as `[page_size][kv_heads][head_dim]`
/// f32 rows in the engine's basis (rotation undone), ready to append.
fn page_rows_of(
    cfg: &CacheConfig,
    cache: &KvCache,
    layer: usize,
    rec: &[u8],
    id: u64,
    page: u32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let b: PageBytes = decode(rec, id, page, layer as u32)?;
    let (ps, kvh, d) = (cfg.page_size, cfg.num_kv_heads, cfg.head_dim);
    let want = 2 * kvh * ps * d * cfg.hot_dtype.size();
    if b.tier != Tier::Hot || b.n_tokens as usize != ps || b.data.len() != want {
        return Err(Error::CorruptPage {
            layer,
            page,
            reason: format!(
                "a {:?} page of {} tokens and {} bytes, expected a hot page of {ps} tokens and {want} bytes",
                b.tier,
                b.n_tokens,
                b.data.len()
            ),
        });
    }
    let mut tmp = CpuStorage::new(cfg);
    let slot = tmp.import_page(&b)?;
    let (k, v) = tmp.read_page(&PageEntry {
        tier: Tier::Hot,
        slot,
        n_tokens: b.n_tokens,
        format: b.format,
    })?;
    // read_page gives [kv_heads][n][d]; appends take [n][kv_heads][d].
    let mut kr = vec![0f32; ps * kvh * d];
    let mut vr = vec![0f32; ps * kvh * d];
    for h in 0..kvh {
        for t in 0..ps {
            let (src, dst) = ((h * ps + t) * d, (t * kvh + h) * d);
            kr[dst..dst + d].copy_from_slice(&k[src..src + d]);
            vr[dst..dst + d].copy_from_slice(&v[src..src + d]);
        }
    }
    if cfg.rotation.keys() {
        cache.rotator().inverse(layer, &mut kr);
    }
    if cfg.rotation.values() {
        cache.rotator().inverse(layer, &mut vr);
    }
    Ok((kr, vr))
}
