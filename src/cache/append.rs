//! Appends: prefill chunks, decode tokens and batched decode tokens, in the dtypes engines hold.
//!
//! Owns: [`Rows`] (f32 / f16 / bf16 input slices), input validation (counts checked against the
//! config before any element is read, finiteness, the hot dtype's range), hot-page allocation
//! under the hot budget, the key-bounds summary of hot pages, and the call into the default
//! policy after an append. Must never: store a value the hot dtype cannot hold (an f16 hot page
//! would turn 1e5 into inf: such input is refused with [`Error::OutOfRange`]).

use super::meta::{PageMeta, Pins};
use super::{KvCache, PageEntry, SeqId, SeqLayer, Tier};
use crate::backend::{hot_page_bytes, BackendStorage};
use crate::config::HotDtype;
use crate::error::{Error, Result};
use crate::quant::WarmFormat;
use half::{bf16, f16};
use std::borrow::Cow;

/// A row-major input slice in one of the dtypes engines hold.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Rows<'a> {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::F16(x) => x.len(),
            Rows::BF16(x) => x.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The elements as f32 (borrowed when already f32).
    pub fn to_f32(&self) -> Cow<'a, [f32]> {
        match *self {
            Rows::F32(x) => Cow::Borrowed(x),
            Rows::F16(x) => Cow::Owned(x.iter().map(|v| v.to_f32()).collect()),
            Rows::BF16(x) => Cow::Owned(x.iter().map(|v| v.to_f32()).collect()),
        }
    }
    fn get(&self, i: usize) -> f32 {
        match self {
            Rows::F32(x) => x[i],
            Rows::F16(x) => x[i].to_f32(),
            Rows::BF16(x) => x[i].to_f32(),
        }
    }
}

impl<'a> From<&'a [f32]> for Rows<'a> {
    fn from(x: &'a [f32]) -> Self {
        Rows::F32(x)
    }
}

/// The largest magnitude a hot page of `dtype` stores without overflow.
fn dtype_max(dtype: HotDtype) -> (f32, &'static str) {
    match dtype {
        HotDtype::F32 => (f32::MAX, "f32"),
        HotDtype::F16 => (f16::MAX.to_f32(), "f16"),
        // Values just below bf16::MAX round up to inf; bf16::MAX itself is exact.
        HotDtype::BF16 => (bf16::MAX.to_f32(), "bf16"),
    }
}

/// Keys and values as stored (f32, rotated when the config says so).
type KeysValues<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>);

impl KvCache {
    /// Rows of `heads * head_dim` elements in `data`, checking only the count (no element read).
    pub(crate) fn count_rows(&self, what: &'static str, len: usize, heads: usize) -> Result<usize> {
        let row = heads * self.cfg.head_dim;
        if !len.is_multiple_of(row) {
            return Err(Error::shape(
                what,
                format!("a multiple of {heads} heads x {} dims", self.cfg.head_dim),
                len,
            ));
        }
        Ok(len / row)
    }

    /// Checks every element: finite, and (when `stored`) within the hot dtype's range.
    pub(crate) fn check_values(&self, what: &'static str, data: Rows, stored: bool) -> Result<()> {
        let (max, dtype) = dtype_max(self.cfg.hot_dtype);
        for i in 0..data.len() {
            let x = data.get(i);
            if !x.is_finite() {
                return Err(Error::NonFinite { what, index: i });
            }
            if stored && x.abs() > max {
                return Err(Error::OutOfRange {
                    what,
                    index: i,
                    value: x,
                    dtype,
                    max,
                });
            }
        }
        Ok(())
    }

    /// Checks the element counts of an append of `keys_len` key and `values_len` value elements
    /// to `seq` in `layer` against the config and the sequence, reading no element: what a caller
    /// holding raw pointers (the C ABI) checks before it forms slices. Returns the token count.
    pub fn check_append_len(
        &self,
        seq: SeqId,
        layer: usize,
        keys_len: usize,
        values_len: usize,
    ) -> Result<usize> {
        self.check_layer(layer)?;
        let kvh = self.cfg.num_kv_heads;
        let n = self.count_rows("keys", keys_len, kvh)?;
        let nv = self.count_rows("values", values_len, kvh)?;
        if n != nv {
            return Err(Error::shape(
                "values",
                format!("{n} tokens (as keys)"),
                format!("{nv} tokens"),
            ));
        }
        let len = self.seq_layer(seq, layer)?.table.len();
        if n > self.cfg.max_seq_len || len + n > self.cfg.max_seq_len {
            return Err(Error::SequenceTooLong {
                seq: seq.0,
                layer,
                requested: len.saturating_add(n),
                max: self.cfg.max_seq_len,
            });
        }
        Ok(n)
    }

    /// Validates one append of keys and values to `seq` in `layer`; returns the token count.
    fn check_append(&self, seq: SeqId, layer: usize, keys: Rows, values: Rows) -> Result<usize> {
        // Counts first: nothing is read from the caller's buffers before this check.
        let n = self.check_append_len(seq, layer, keys.len(), values.len())?;
        self.check_values("keys", keys, true)?;
        self.check_values("values", values, true)?;
        Ok(n)
    }

    /// Keys and values as they are stored: f32, rotated when the config rotates them. A rotated
    /// vector is range-checked again (rotation can raise one channel's magnitude up to
    /// `sqrt(block)` times), so an error still leaves the cache unchanged.
    fn stored_rows<'a>(
        &self,
        layer: usize,
        keys: Rows<'a>,
        values: Rows<'a>,
    ) -> Result<KeysValues<'a>> {
        let (mut k, mut v) = (keys.to_f32(), values.to_f32());
        let rot = self.cfg.rotation;
        if rot.keys() {
            self.rotator.forward(layer, k.to_mut());
            self.check_values("rotated keys", Rows::F32(&k), true)?;
        }
        if rot.values() {
            self.rotator.forward(layer, v.to_mut());
            self.check_values("rotated values", Rows::F32(&v), true)?;
        }
        Ok((k, v))
    }

    /// Hot payload bytes allocated over all layers (from the storages' own counters).
    pub(crate) fn hot_bytes_allocated(&self) -> usize {
        self.layers.iter().map(|s| s.bytes().hot).sum()
    }

    /// Warm payload bytes allocated over all layers.
    pub(crate) fn warm_bytes_allocated(&self) -> usize {
        self.layers.iter().map(|s| s.bytes().warm).sum()
    }

    /// Checks that `new_pages` more hot pages fit the hot budget.
    pub(crate) fn check_hot_budget(&self, new_pages: usize) -> Result<()> {
        super::moves::within(Tier::Hot, self.cfg.budgets.hot_bytes, || {
            self.hot_bytes_allocated() + new_pages * hot_page_bytes(&self.cfg, self.cfg.hot_dtype)
        })
    }

    fn new_pages(&self, len: usize, n: usize) -> usize {
        let ps = self.cfg.page_size;
        (len + n).div_ceil(ps) - len.div_ceil(ps)
    }

    /// Appends `n` tokens' keys (post-RoPE) and values, each `[n, num_kv_heads, head_dim]`
    /// row-major f32, to `seq` in `layer`; then runs the default policy (pages that left the hot
    /// window are demoted). Prefill appends many tokens at once; decode appends one.
    pub fn append(&mut self, seq: SeqId, layer: usize, keys: &[f32], values: &[f32]) -> Result<()> {
        self.append_rows(seq, layer, Rows::F32(keys), Rows::F32(values))
    }

    /// [`KvCache::append`] for f32, f16 or bf16 input (see [`Rows`]).
    pub fn append_rows(
        &mut self,
        seq: SeqId,
        layer: usize,
        keys: Rows,
        values: Rows,
    ) -> Result<()> {
        let n = self.check_append(seq, layer, keys, values)?;
        let len = self.seq_layer(seq, layer)?.table.len();
        self.check_hot_budget(self.new_pages(len, n))?;
        let (k, v) = self.stored_rows(layer, keys, values)?;
        self.append_checked(seq, layer, &k, &v, n)?;
        self.tier_pages(seq, layer);
        Ok(())
    }

    /// Batched decode append: one token for each sequence of `seqs` in `layer`. `keys` and
    /// `values` are `[seqs.len(), num_kv_heads, head_dim]`. Validated for the whole batch (ids,
    /// duplicates, lengths, values, the hot budget) before any sequence changes.
    pub fn append_decode(
        &mut self,
        layer: usize,
        seqs: &[SeqId],
        keys: Rows,
        values: Rows,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let kvh = self.cfg.num_kv_heads;
        let n = self.count_rows("keys", keys.len(), kvh)?;
        let nv = self.count_rows("values", values.len(), kvh)?;
        if n != seqs.len() || nv != seqs.len() {
            return Err(Error::shape(
                "keys/values",
                format!("{} rows (one per sequence)", seqs.len()),
                format!("{n}/{nv} rows"),
            ));
        }
        let mut new_pages = 0;
        for (i, s) in seqs.iter().enumerate() {
            if seqs[..i].contains(s) {
                return Err(Error::DuplicateSequence(s.0));
            }
            let len = self.seq_layer(*s, layer)?.table.len();
            if len + 1 > self.cfg.max_seq_len {
                return Err(Error::SequenceTooLong {
                    seq: s.0,
                    layer,
                    requested: len + 1,
                    max: self.cfg.max_seq_len,
                });
            }
            new_pages += self.new_pages(len, 1);
        }
        self.check_values("keys", keys, true)?;
        self.check_values("values", values, true)?;
        self.check_hot_budget(new_pages)?;
        let (k, v) = self.stored_rows(layer, keys, values)?;
        let row = kvh * self.cfg.head_dim;
        for (i, &s) in seqs.iter().enumerate() {
            let r = i * row..(i + 1) * row;
            self.append_checked(s, layer, &k[r.clone()], &v[r], 1)?;
        }
        self.tier_batch(layer, seqs);
        Ok(())
    }

    /// Writes `n` validated tokens (budget already checked).
    pub(crate) fn append_checked(
        &mut self,
        seq: SeqId,
        layer: usize,
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let ps = self.cfg.page_size;
        let (kvh, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let row = kvh * d;
        let len = self.seq_layer(seq, layer)?.table.len();
        let new_pages = self.new_pages(len, n);
        // Allocate first so a failure changes nothing.
        let storage = &mut self.layers[layer];
        let mut fresh = Vec::with_capacity(new_pages);
        for _ in 0..new_pages {
            match storage.alloc_hot() {
                Ok(slot) => fresh.push(slot),
                Err(e) => {
                    for slot in fresh {
                        storage.free(Tier::Hot, slot);
                    }
                    return Err(e);
                }
            }
        }
        let protected = self.cfg.protected_layers.contains(&layer);
        let sinks = self.cfg.sink_tokens;
        let fmt = self.cfg.warm_format(layer);
        let sl = &mut self
            .seqs
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence(seq.0))?
            .layers[layer];
        let mut fresh = fresh.into_iter();
        let mut pos = len;
        while pos < len + n {
            let in_page = pos % ps;
            if in_page == 0 {
                let slot = fresh
                    .next()
                    .ok_or_else(|| Error::internal("fewer fresh pages than page starts"))?;
                start_page(sl, slot, fmt, pos < sinks, protected, (kvh, d));
            }
            let take = (ps - in_page).min(len + n - pos);
            let page = sl
                .table
                .pages_mut()
                .last_mut()
                .ok_or_else(|| Error::internal("no page to append to"))?;
            if page.tier != Tier::Hot {
                return Err(Error::internal(format!(
                    "append into a {:?} page (only full pages leave the hot tier)",
                    page.tier
                )));
            }
            let src = (pos - len) * row;
            let (ks, vs) = (&keys[src..src + take * row], &values[src..src + take * row]);
            storage.write_hot(page.slot, in_page, ks, vs, take)?;
            page.n_tokens += take as u32;
            if let Some(b) = sl.meta.last_mut().and_then(|m| m.bounds.as_mut()) {
                b.extend(ks);
            }
            pos += take;
        }
        sl.table.set_len(len + n);
        Ok(())
    }

    /// Chunked prefill: causal attention of `n` new tokens over the cached pages of `seq` (as
    /// stored, so earlier chunks may already be quantised; evicted pages are skipped) plus the new
    /// tokens (exact), then appends the new keys and values. `queries` is `[n, num_q_heads,
    /// head_dim]`, keys and values `[n, num_kv_heads, head_dim]`. Returns `[n, num_q_heads,
    /// head_dim]`. Cold pages must be brought back first ([`KvCache::from_cold`]).
    pub fn prefill(
        &mut self,
        seq: SeqId,
        layer: usize,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
    ) -> Result<Vec<f32>> {
        let (out, (k, v), n) = self.prefill_compute(seq, layer, queries, keys, values)?;
        self.append_checked(seq, layer, &k, &v, n)?;
        self.tier_pages(seq, layer);
        Ok(out)
    }

    /// The attention half of [`KvCache::prefill`], without the append: `&self`, so prefills of
    /// different sequences can compute at once (from several threads) and then append one at a
    /// time with [`KvCache::append`]. The result equals `prefill`'s as long as the sequence does
    /// not change in `layer` in between (the C ABI checks its length and reports `Stale`).
    pub fn prefill_attend(
        &self,
        seq: SeqId,
        layer: usize,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
    ) -> Result<Vec<f32>> {
        Ok(self.prefill_compute(seq, layer, queries, keys, values)?.0)
    }

    /// Validates a prefill completely (the hot budget of its append included) and computes its
    /// output; returns it with the keys and values as stored and the token count.
    fn prefill_compute<'a>(
        &self,
        seq: SeqId,
        layer: usize,
        queries: &[f32],
        keys: &'a [f32],
        values: &'a [f32],
    ) -> Result<(Vec<f32>, KeysValues<'a>, usize)> {
        self.check_layer(layer)?;
        let nq = self.count_rows("queries", queries.len(), self.cfg.num_q_heads)?;
        let n = self.check_append(seq, layer, Rows::F32(keys), Rows::F32(values))?;
        if nq != n {
            return Err(Error::shape(
                "prefill",
                format!("{nq} tokens in queries, keys and values"),
                format!("{nq}/{n}"),
            ));
        }
        self.check_values("queries", Rows::F32(queries), false)?;
        let table = &self.seq_layer(seq, layer)?.table;
        if table.count(Tier::Cold) > 0 {
            return Err(Error::Unsupported(
                "prefill over cold pages: bring them back with from_cold first",
            ));
        }
        let len = table.len();
        self.check_hot_budget(self.new_pages(len, n))?;
        let (k, v) = self.stored_rows(layer, Rows::F32(keys), Rows::F32(values))?;
        let q = self.queries_in_key_basis(layer, queries);
        let storage = &self.layers[layer];
        let mut out = self.in_pool(|| storage.prefill(table, &q, &k, &v, nq))?;
        if out.iter().any(|x| !x.is_finite()) {
            return Err(Error::Overflow(
                "prefill scores overflow f32 for these queries and keys".into(),
            ));
        }
        if self.cfg.rotation.values() {
            self.rotator.inverse(layer, &mut out);
        }
        Ok((out, (k, v), n))
    }
}

/// Starts a new, empty hot page in hot slot `slot` at the end of `sl` (format `fmt` for its later
/// demotion), pinned as a sink page (`sink`) and as a page of a protected layer (`protected`).
pub(super) fn start_page(
    sl: &mut SeqLayer,
    slot: u32,
    fmt: WarmFormat,
    sink: bool,
    protected: bool,
    (kvh, d): (usize, usize),
) {
    sl.table.push(PageEntry {
        tier: Tier::Hot,
        slot,
        n_tokens: 0,
        format: fmt,
    });
    let mut pins = Pins::none();
    if sink {
        pins.insert(Pins::SINK);
    }
    if protected {
        pins.insert(Pins::PROTECTED);
    }
    sl.meta.push(PageMeta::new(kvh, d, pins));
}
