//! Per-page metadata: the side table that policies, eliminators and the monitor read.
//!
//! Owns: [`PageMeta`] (accumulated attention mass per kv head, last attended step, the key bounds
//! summary of exact pages, pins, the archive entry, a host copy of a device warm page's bounds)
//! and [`KeyBounds`]. The cache keeps one
//! `PageMeta` per page, parallel to the page table. Must never: hold page payload (bounds are a
//! summary: two f16 per channel per kv head) or change a page's tier.

use half::f16;

/// Why a page may not be moved off the hot tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Pins(u8);

impl Pins {
    /// Holds attention-sink positions (`sink_tokens`): set by the cache.
    pub const SINK: Pins = Pins(1);
    /// Pinned by the caller (`KvCache::pin`).
    pub const USER: Pins = Pins(2);
    /// In one of the config's `protected_layers` (kept exact: never quantised): set by the cache.
    pub const PROTECTED: Pins = Pins(4);

    /// No pin.
    pub const fn none() -> Self {
        Pins(0)
    }
    /// True when any pin is set.
    pub const fn any(self) -> bool {
        self.0 != 0
    }
    /// True when a pin keeps the page on the device and present (sink or caller pin): it refuses
    /// evict and to_cold. Every pin refuses demote (protected layers stay exact).
    pub const fn blocks_removal(self) -> bool {
        self.0 & (Pins::SINK.0 | Pins::USER.0) != 0
    }
    /// True when every pin of `other` is set.
    pub const fn contains(self, other: Pins) -> bool {
        self.0 & other.0 == other.0
    }
    pub(crate) fn insert(&mut self, other: Pins) {
        self.0 |= other.0;
    }
    pub(crate) fn remove(&mut self, other: Pins) {
        self.0 &= !other.0;
    }
}

/// Per kv head, per channel bounds of a page's keys as stored: every key `k[t][c]` of head `h`
/// satisfies `lo[h][c] <= k <= hi[h][c]`. Kept in f16, rounded outward, for exact (hot) pages
/// and cold pages that were hot; warm pages carry their own bounds (`quant::keys::key_bounds`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyBounds {
    /// `[kv_heads][head_dim]`.
    pub lo: Box<[f16]>,
    /// `[kv_heads][head_dim]`.
    pub hi: Box<[f16]>,
}

/// The largest f16 not above `x` (`-inf` below the f16 range).
pub(crate) fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() <= x {
        h
    } else {
        prev_f16(h)
    }
}

/// The smallest f16 not below `x` (`inf` above the f16 range).
pub(crate) fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        h
    } else {
        next_f16(h)
    }
}

fn next_f16(h: f16) -> f16 {
    let b = h.to_bits();
    if h.to_f32() == 0.0 {
        return f16::from_bits(1);
    }
    f16::from_bits(if b & 0x8000 == 0 { b + 1 } else { b - 1 })
}

fn prev_f16(h: f16) -> f16 {
    let b = h.to_bits();
    if h.to_f32() == 0.0 {
        return f16::from_bits(0x8001);
    }
    f16::from_bits(if b & 0x8000 == 0 { b - 1 } else { b + 1 })
}

impl KeyBounds {
    /// Empty bounds (lo = +inf, hi = -inf) for `n` = kv_heads * head_dim channels.
    pub(crate) fn empty(n: usize) -> Self {
        KeyBounds {
            lo: vec![f16::INFINITY; n].into_boxed_slice(),
            hi: vec![f16::NEG_INFINITY; n].into_boxed_slice(),
        }
    }

    /// Widens the bounds by `rows` of `kv_heads * head_dim` keys each. The rows' per-channel
    /// minimum and maximum come first, in f32, then one f16 comparison per channel: the same
    /// bounds as widening row by row (rounding down / up is monotone), with one f16 conversion per
    /// channel instead of one per key.
    pub(crate) fn extend(&mut self, rows: &[f32]) {
        let n = self.lo.len();
        let mut chunks = rows.chunks_exact(n);
        let Some(first) = chunks.next() else {
            return;
        };
        let (mut mn, mut mx) = (first.to_vec(), first.to_vec());
        for row in chunks {
            for ((a, b), &x) in mn.iter_mut().zip(mx.iter_mut()).zip(row) {
                *a = a.min(x);
                *b = b.max(x);
            }
        }
        for c in 0..n {
            if mn[c] < self.lo[c].to_f32() {
                self.lo[c] = f16_down(mn[c]);
            }
            if mx[c] > self.hi[c].to_f32() {
                self.hi[c] = f16_up(mx[c]);
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.lo.len() + self.hi.len()) * 2
    }
}

/// What the cache knows about one page besides its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct PageMeta {
    /// Accumulated attention mass per kv head (`mass = decay * mass + step mass` at each observe).
    pub mass: Box<[f32]>,
    /// The page's mass at the latest observe step, summed over kv heads (TOVA reads it).
    pub last_mass: f32,
    /// The observe step (of this sequence and layer) at which any head last attended the page.
    pub last_attended: Option<u64>,
    /// Key bounds summary (exact pages; `None` for warm pages, whose bytes hold their bounds).
    pub bounds: Option<KeyBounds>,
    /// Pins.
    pub pins: Pins,
    /// Id of the page's exact copy in the archive, if it has one.
    pub archive: Option<u32>,
    /// Set when the page was promoted: the default hot-window rule leaves it hot (a policy that
    /// brought it back decides when it leaves again).
    pub promoted: bool,
    /// The share group when other sequences name the same page ([`crate::KvCache::fork`]).
    pub shared: Option<u32>,
    /// Host copy of a device-resident warm page's bounds, read from the device once.
    pub(crate) warm_bounds: WarmBoundsCache,
}

/// A host copy of the key bounds and value error bounds of a warm page whose bytes live on a
/// device (CUDA, Metal), so that elimination and certification read the page's parameters from
/// the device once, not at every step. Exactly the values the backend reports (f32), keyed by
/// the entry they were read for (slot, format, tokens): an entry that changed since (demoted
/// again, moved, truncated, synced from a sharer) misses and is read again. A cache, not page
/// state: it takes no part in equality and is not saved.
#[derive(Debug, Default)]
pub(crate) struct WarmBoundsCache(std::sync::Mutex<Option<Box<CachedBounds>>>);
// Boxed: every page carries the (usually empty) cache, so it costs one pointer until filled.

#[derive(Debug, Clone)]
struct CachedBounds {
    slot: u32,
    format: crate::quant::WarmFormat,
    n_tokens: u32,
    /// `(lo, hi)`, `[kv_heads][head_dim]` each.
    keys: Option<[Box<[f32]>; 2]>,
    values: Option<Box<[f32]>>,
}

impl CachedBounds {
    fn bytes(&self) -> usize {
        4 * (self.keys.as_ref().map_or(0, |[l, h]| l.len() + h.len())
            + self.values.as_ref().map_or(0, |v| v.len()))
    }
}

impl WarmBoundsCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<CachedBounds>>> {
        // A panic while holding the lock cannot leave a torn entry (each update is one store).
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry's slot for `e`, reset when it was read for another entry.
    fn entry<'a>(
        g: &'a mut Option<Box<CachedBounds>>,
        e: &crate::cache::PageEntry,
    ) -> &'a mut CachedBounds {
        let fresh =
            |g: &CachedBounds| g.slot == e.slot && g.format == e.format && g.n_tokens == e.n_tokens;
        if !g.as_deref().is_some_and(fresh) {
            *g = Some(Box::new(CachedBounds {
                slot: e.slot,
                format: e.format,
                n_tokens: e.n_tokens,
                keys: None,
                values: None,
            }));
        }
        g.as_mut().expect("set above")
    }

    /// Copies the key bounds read for entry `e` into `lo` / `hi`; false when none are held.
    pub(crate) fn keys(&self, e: &crate::cache::PageEntry, lo: &mut [f32], hi: &mut [f32]) -> bool {
        let mut g = self.lock();
        match &Self::entry(&mut g, e).keys {
            Some([l, h]) if l.len() == lo.len() && h.len() == hi.len() => {
                lo.copy_from_slice(l);
                hi.copy_from_slice(h);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn put_keys(&self, e: &crate::cache::PageEntry, lo: &[f32], hi: &[f32]) {
        let mut g = self.lock();
        Self::entry(&mut g, e).keys = Some([lo.into(), hi.into()]);
    }

    /// Copies the value error bounds read for entry `e` into `out`; false when none are held.
    pub(crate) fn values(&self, e: &crate::cache::PageEntry, out: &mut [f32]) -> bool {
        let mut g = self.lock();
        match &Self::entry(&mut g, e).values {
            Some(v) if v.len() == out.len() => {
                out.copy_from_slice(v);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn put_values(&self, e: &crate::cache::PageEntry, v: &[f32]) {
        let mut g = self.lock();
        Self::entry(&mut g, e).values = Some(v.into());
    }

    /// Drops what is held (the page left the tier or changed).
    pub(crate) fn clear(&mut self) {
        *self.0.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Heap bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.lock()
            .as_deref()
            .map_or(0, |c| std::mem::size_of::<CachedBounds>() + c.bytes())
    }
}

impl Clone for WarmBoundsCache {
    fn clone(&self) -> Self {
        WarmBoundsCache(std::sync::Mutex::new(self.lock().clone()))
    }
}

impl PartialEq for WarmBoundsCache {
    /// Always equal: what a cache holds is not part of the page's state.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl PageMeta {
    pub(crate) fn new(kv_heads: usize, head_dim: usize, pins: Pins) -> Self {
        PageMeta {
            mass: vec![0.0; kv_heads].into_boxed_slice(),
            last_mass: 0.0,
            last_attended: None,
            bounds: Some(KeyBounds::empty(kv_heads * head_dim)),
            pins,
            archive: None,
            promoted: false,
            shared: None,
            warm_bounds: WarmBoundsCache::default(),
        }
    }

    /// Heap bytes held by this entry (the entry itself is counted by its table).
    pub fn heap_bytes(&self) -> usize {
        self.mass.len() * 4
            + self.bounds.as_ref().map_or(0, KeyBounds::bytes)
            + self.warm_bounds.bytes()
    }

    /// Total accumulated mass over kv heads.
    pub fn total_mass(&self) -> f32 {
        self.mass.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outward_rounding_bounds_every_value() {
        for &x in &[
            0.1f32,
            -0.1,
            1.0 / 3.0,
            -7.77,
            0.0,
            65504.0,
            -65504.0,
            1e-7,
            -1e-7,
        ] {
            assert!(f16_down(x).to_f32() <= x, "{x}");
            assert!(f16_up(x).to_f32() >= x, "{x}");
        }
        let mut b = KeyBounds::empty(2);
        b.extend(&[0.3, -1.1, -0.2, 2.5]);
        assert!(b.lo[0].to_f32() <= -0.2 && b.hi[0].to_f32() >= 0.3);
        assert!(b.lo[1].to_f32() <= -1.1 && b.hi[1].to_f32() >= 2.5);
    }
}
