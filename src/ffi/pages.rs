//! Pages through the C ABI: typed and batched appends, page moves and page information, and
//! attention over a page selection (optionally folded into the page statistics).
//!
//! Owns: [`kvtier_dtype`], [`kvtier_move_op`], [`kvtier_page_info`] and their entry points. Every
//! count is checked against the config (and the other counts) before a slice is formed or memory
//! allocated; a failing call writes nothing and changes nothing. Must never: decide a move itself
//! (the caller's policy does; the core validates and executes), or read a buffer as a dtype other
//! than the one the caller named.

use super::attention::StatsOut;
use super::boundary::{handle, input, Out, OutParam};
use super::cache::kvtier_cache;
use super::status::{kvtier_status, FfiError};
use crate::attention::PageSelection;
use crate::cache::{KvCache, PageRef, Pins, Restored, Rows, SeqId, Tier};
use crate::config::Bits;
use crate::quant::WarmFormat;
use half::{bf16, f16};
use std::ffi::c_void;

/// Element type of keys, values and queries handed to the `_typed` calls (pass as `uint32_t`).
/// F16 and BF16 elements are 16-bit patterns (`uint16_t`, `_Float16`, `__bf16`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kvtier_dtype {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

/// A page move (pass as `uint32_t` to `kvtier_cache_move`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kvtier_move_op {
    /// Hot -> warm at (`k_bits`, `v_bits`), or a warm page to fewer bits.
    Demote = 0,
    /// Warm or cold -> hot (exactly, from the archive, when it has a copy).
    Promote = 1,
    /// Drop the page for good (its positions stay, never attended again).
    Evict = 2,
    /// Hot or warm -> cold (host RAM); attention still reads it.
    ToCold = 3,
    /// Cold -> the tier it left.
    FromCold = 4,
    /// Pin: the page refuses demote, evict and to_cold.
    Pin = 5,
    /// Remove the caller's pin.
    Unpin = 6,
}

/// Tiers as `kvtier_page_info.tier` reports them.
pub const KVTIER_TIER_HOT: u32 = 0;
pub const KVTIER_TIER_WARM: u32 = 1;
pub const KVTIER_TIER_COLD: u32 = 2;
pub const KVTIER_TIER_EVICTED: u32 = 3;
/// `kvtier_page_info.last_attended` of a page no observed step has attended.
pub const KVTIER_NEVER: u64 = u64::MAX;

/// What the cache knows about one page.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct kvtier_page_info {
    /// `KVTIER_TIER_*`.
    pub tier: u32,
    /// Valid tokens (page_size except for the last page).
    pub n_tokens: u32,
    /// Code widths (warm pages and cold pages that were warm).
    pub k_bits: u32,
    pub v_bits: u32,
    /// Pinned by the caller.
    pub pinned: bool,
    /// Holds attention-sink positions (never leaves the hot tier by policy).
    pub sink: bool,
    /// Has an exact copy in the archive.
    pub archived: bool,
    /// Was promoted (the default hot-window rule leaves it hot).
    pub promoted: bool,
    /// Accumulated attention mass summed over kv heads (see `kvtier_config_set_mass_decay`).
    pub mass: f32,
    /// Observe step at which the page was last attended, `KVTIER_NEVER` if none.
    pub last_attended: u64,
}

pub(super) fn dtype_of(dtype: u32) -> Result<kvtier_dtype, FfiError> {
    match dtype {
        0 => Ok(kvtier_dtype::F32),
        1 => Ok(kvtier_dtype::F16),
        2 => Ok(kvtier_dtype::BF16),
        d => Err(FfiError::invalid(format!("unknown kvtier_dtype {d}"))),
    }
}

/// `len` elements of `dtype` at `ptr` as [`Rows`].
///
/// # Safety
///
/// `ptr` must point to `len` readable elements of `dtype` (or `len` is 0).
unsafe fn rows<'a>(
    dtype: kvtier_dtype,
    ptr: *const c_void,
    len: usize,
    what: &str,
) -> Result<Rows<'a>, FfiError> {
    Ok(match dtype {
        // SAFETY: forwarded from the caller.
        kvtier_dtype::F32 => Rows::F32(unsafe { input(ptr as *const f32, len, what) }?),
        kvtier_dtype::F16 => {
            // SAFETY: forwarded from the caller.
            let bits: &[u16] = unsafe { input(ptr as *const u16, len, what) }?;
            Rows::F16(bytemuck::cast_slice::<u16, f16>(bits))
        }
        kvtier_dtype::BF16 => {
            // SAFETY: forwarded from the caller.
            let bits: &[u16] = unsafe { input(ptr as *const u16, len, what) }?;
            Rows::BF16(bytemuck::cast_slice::<u16, bf16>(bits))
        }
    })
}

/// [`kvtier_cache_append`](super::cache::kvtier_cache_append) for keys and values of any
/// `kvtier_dtype` (`dtype`, both arrays the same type). Values beyond the hot dtype's range (above
/// 65504 for f16 hot pages) are refused with `OUT_OF_RANGE`.
///
/// Errors: as `kvtier_cache_append`, plus `INVALID_ARGUMENT` (unknown dtype), `OUT_OF_RANGE`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `keys` and `values` must point to `keys_len` and
/// `values_len` readable elements of `dtype` (or the count is 0).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvtier_cache_append_typed(
    cache: *mut kvtier_cache,
    seq: u64,
    layer: usize,
    dtype: u32,
    keys: *const c_void,
    keys_len: usize,
    values: *const c_void,
    values_len: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_append_typed", {
        let dtype = dtype_of(dtype)?;
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        c.check_append_len(SeqId(seq), layer, keys_len, values_len)?;
        // SAFETY: each array holds its count of readable elements (this function's contract).
        let (k, v) = unsafe {
            (
                rows(dtype, keys, keys_len, "keys")?,
                rows(dtype, values, values_len, "values")?,
            )
        };
        c.append_rows(SeqId(seq), layer, k, v)?;
        Ok(())
    })
}

/// Batched decode append: one token for each of the `n_seqs` distinct sequences `seqs` in
/// `layer`. `keys` and `values` are `[n_seqs][num_kv_heads][head_dim]` of `dtype`. The whole batch
/// is validated (ids, duplicates, lengths, values, the hot budget) before any sequence changes.
///
/// Errors: as `kvtier_cache_append_typed`, plus `DUPLICATE_SEQUENCE`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `seqs` must hold `n_seqs` readable ids and `keys`,
/// `values` their counts of readable elements of `dtype` (any array whose count is 0 may be NULL).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvtier_cache_append_decode(
    cache: *mut kvtier_cache,
    layer: usize,
    seqs: *const u64,
    n_seqs: usize,
    dtype: u32,
    keys: *const c_void,
    keys_len: usize,
    values: *const c_void,
    values_len: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_append_decode", {
        let dtype = dtype_of(dtype)?;
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        let row = c.config().num_kv_heads * c.config().head_dim;
        let live = c.sequences().count();
        let want = n_seqs
            .checked_mul(row)
            .ok_or_else(|| FfiError::invalid("n_seqs * num_kv_heads * head_dim overflows"))?;
        if n_seqs > live || keys_len != want || values_len != want {
            return Err(crate::Error::shape(
                "append_decode",
                format!("n_seqs <= {live} live sequences and {want} keys and values"),
                format!("n_seqs {n_seqs}, {keys_len} keys, {values_len} values"),
            )
            .into());
        }
        // SAFETY: each array holds its count of readable elements (this function's contract).
        let (ids, k, v) = unsafe {
            (
                input(seqs, n_seqs, "seqs")?,
                rows(dtype, keys, keys_len, "keys")?,
                rows(dtype, values, values_len, "values")?,
            )
        };
        let ids: Vec<SeqId> = ids.iter().map(|&s| SeqId(s)).collect();
        c.append_decode(layer, &ids, k, v)?;
        Ok(())
    })
}

/// Decode attention over a page selection, with queries of any `kvtier_dtype`, optionally folding
/// the step's page masses into the page statistics (`observe`: the call then takes the cache's
/// lock exclusively).
///
/// The selection is in CSR form: for batch entry `i` and kv head `h`, the pages attended are
/// `sel_pages[sel_offsets[i * num_kv_heads + h] .. sel_offsets[i * num_kv_heads + h + 1]]` (page
/// indices, any order, duplicates ignored); `sel_offsets` has `n_seqs * num_kv_heads + 1`
/// non-decreasing entries starting at 0 and ending at `sel_pages_len`. `sel_offsets_len == 0`
/// attends every page. Other arguments as `kvtier_cache_attend`; `stats.page_mass` is 0 for pages
/// not attended.
///
/// Errors: as `kvtier_cache_attend`, plus `INVALID_ARGUMENT` (unknown dtype, malformed offsets),
/// `SHAPE` (a page index past the sequence), `OVERFLOW`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; every array must hold its count of readable (inputs) or
/// writable (outputs) elements; `stats` as for `kvtier_cache_attend`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvtier_cache_attend_selected(
    cache: *const kvtier_cache,
    layer: usize,
    seqs: *const u64,
    n_seqs: usize,
    dtype: u32,
    queries: *const c_void,
    queries_len: usize,
    sel_pages: *const u32,
    sel_pages_len: usize,
    sel_offsets: *const usize,
    sel_offsets_len: usize,
    output: *mut f32,
    output_len: usize,
    stats: *const super::attention::kvtier_attention_stats,
    observe: bool,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_attend_selected", {
        let dtype = dtype_of(dtype)?;
        // SAFETY: `cache` is NULL or live (this function's contract).
        let h = unsafe { handle(cache, "cache") }?;
        // Observing changes the statistics: hold the lock exclusively for the whole step so the
        // result cannot go stale between attention and observe.
        let mut wg = if observe { Some(h.write()?) } else { None };
        let rg = if observe { None } else { Some(h.read()?) };
        let c: &KvCache = match (&wg, &rg) {
            (Some(w), _) => w,
            (_, Some(r)) => r,
            _ => return Err(crate::Error::internal("no lock held").into()),
        };
        let cfg = c.config();
        let (qh, kvh, d) = (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
        let needed = n_seqs
            .checked_mul(qh * d)
            .ok_or_else(|| FfiError::invalid("n_seqs * num_q_heads * head_dim overflows"))?;
        if queries_len != needed {
            return Err(crate::Error::shape("queries", needed, queries_len).into());
        }
        let out = Out::new(output, output_len, needed, "output")?;
        // SAFETY: `seqs` holds `n_seqs` readable ids (this function's contract).
        let (ids, pages) = unsafe { super::attention::batch(c, layer, seqs, n_seqs) }?;
        // SAFETY: `stats` is NULL or initialised (this function's contract).
        let stats_out = unsafe { StatsOut::check(stats, n_seqs, qh, &pages) }?;
        let selection = if sel_offsets_len == 0 {
            None
        } else {
            let lists = n_seqs * kvh;
            if sel_offsets_len != lists + 1 {
                return Err(FfiError::invalid(format!(
                    "sel_offsets has {sel_offsets_len} entries, needs n_seqs * num_kv_heads + 1 = {}",
                    lists + 1
                )));
            }
            // SAFETY: both arrays hold their counts of readable elements (this function's contract).
            let (offs, idx) = unsafe {
                (
                    input(sel_offsets, sel_offsets_len, "sel_offsets")?,
                    input(sel_pages, sel_pages_len, "sel_pages")?,
                )
            };
            if offs[0] != 0 || offs[lists] != sel_pages_len || offs.windows(2).any(|w| w[0] > w[1])
            {
                return Err(FfiError::invalid(
                    "sel_offsets must start at 0, not decrease, and end at sel_pages_len",
                ));
            }
            let mut sel = PageSelection::none(n_seqs, kvh);
            for i in 0..n_seqs {
                for kv in 0..kvh {
                    let j = i * kvh + kv;
                    sel.set(i, kv, idx[offs[j]..offs[j + 1]].iter().copied())?;
                }
            }
            Some(sel)
        };
        let att = {
            // SAFETY: `queries` holds `queries_len` readable elements of `dtype` (contract).
            let q = unsafe { rows(dtype, queries, queries_len, "queries") }?;
            // `observe` needs the per-page results even when the caller did not ask for them.
            let mut scratch = stats_out.scratch();
            if wg.is_some() {
                scratch.set_page_results(crate::backend::PageResults::Masses);
            }
            c.attend_with(&mut scratch, layer, &ids, q, selection.as_ref())?
        };
        if let Some(w) = wg.as_mut() {
            w.observe(layer, &ids, &att)?;
        }
        // The input borrows have ended: `output` may alias `queries`.
        // SAFETY: `out` was checked for `needed == att.output.len()` elements; the stats buffers
        // for their counts; all writable (this function's contract).
        unsafe {
            out.write(&att.output);
            stats_out.write(&att)
        }
    })
}

/// Executes one page move on page `page` of `seq` in `layer` (`op` is a `kvtier_move_op`;
/// `k_bits` and `v_bits` are read by `DEMOTE` only: 8, 4, 3 or 2). Validated completely first: an
/// error changes nothing. For `PROMOTE`, `*exact_out` (may be NULL) is set to true when the page
/// was restored bit for bit (from the archive) and false when it was dequantised (no archive).
///
/// Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (unknown op, bits), `UNKNOWN_SEQUENCE`,
/// `LAYER_OUT_OF_RANGE`, `UNKNOWN_PAGE`, `INVALID_MOVE` (pinned, wrong tier, still being
/// written, a width the backend cannot store), `BUDGET_EXCEEDED`, `OUT_OF_MEMORY`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `exact_out` NULL or valid for a write of one `bool`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvtier_cache_move(
    cache: *mut kvtier_cache,
    seq: u64,
    layer: usize,
    page: usize,
    op: u32,
    k_bits: u32,
    v_bits: u32,
    exact_out: *mut bool,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_move", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        let exact = if exact_out.is_null() {
            None
        } else {
            Some(OutParam::new(exact_out, "exact_out")?)
        };
        let p = PageRef {
            seq: SeqId(seq),
            layer,
            page,
        };
        match op {
            0 => {
                let bits = |b| Bits::from_bits(b).map_err(|e| FfiError::invalid(e.to_string()));
                let fmt = WarmFormat {
                    k_bits: bits(k_bits)?,
                    v_bits: bits(v_bits)?,
                };
                c.demote(p, fmt)?
            }
            1 => {
                let how = c.promote(p)?;
                if let Some(out) = exact {
                    // SAFETY: checked non-NULL and aligned; writable (this function's contract).
                    unsafe { out.write(how == Restored::Exact) };
                }
            }
            2 => c.evict(p)?,
            3 => c.to_cold(p)?,
            4 => c.from_cold(p)?,
            5 => c.pin(p)?,
            6 => c.unpin(p)?,
            o => return Err(FfiError::invalid(format!("unknown kvtier_move_op {o}"))),
        }
        Ok(())
    })
}

/// Drops every token of `seq` at a position `>= len`, in every layer (rollback: rejected draft
/// tokens, an edited history); a layer with `len` tokens or fewer is left as it is. The page that
/// then holds the last token comes back to the hot tier, exactly from the archive when it has a
/// copy (`*dequantised_out`, may be NULL, counts the boundary pages restored from their quantised
/// bytes instead); appends continue from `len`. `*tokens_out` (may be NULL) receives the tokens
/// dropped over all layers.
///
/// Errors, with nothing changed: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `INVALID_MOVE` (`len` falls
/// inside an evicted page), `BUDGET_EXCEEDED` (the hot tier), `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `tokens_out` and `dequantised_out` NULL or valid for a
/// write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_truncate(
    cache: *mut kvtier_cache,
    seq: u64,
    len: usize,
    tokens_out: *mut usize,
    dequantised_out: *mut usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_truncate", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        let opt = |p: *mut usize, name| -> Result<Option<OutParam<usize>>, FfiError> {
            if p.is_null() {
                Ok(None)
            } else {
                Ok(Some(OutParam::new(p, name)?))
            }
        };
        let (tokens, deq) = (
            opt(tokens_out, "tokens_out")?,
            opt(dequantised_out, "dequantised_out")?,
        );
        let t = c.truncate(SeqId(seq), len)?;
        // SAFETY: checked non-NULL and aligned; writable (this function's contract).
        unsafe {
            if let Some(o) = tokens {
                o.write(t.tokens);
            }
            if let Some(o) = deq {
                o.write(t.restored_dequantised);
            }
        }
        Ok(())
    })
}

/// Writes what the cache knows about page `page` of `seq` in `layer` to `*info_out` (pages are
/// numbered from 0; `kvtier_cache_sequence_pages` gives the count).
///
/// Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `UNKNOWN_PAGE`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `info_out` must be valid for a write of one
/// `kvtier_page_info`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_page_info(
    cache: *const kvtier_cache,
    seq: u64,
    layer: usize,
    page: usize,
    info_out: *mut kvtier_page_info,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_page_info", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let out = OutParam::new(info_out, "info_out")?;
        let p = PageRef {
            seq: SeqId(seq),
            layer,
            page,
        };
        let e = c.page(p)?;
        let m = c
            .page_meta(p.seq, layer)?
            .get(page)
            .ok_or_else(|| crate::Error::internal("page table and metadata disagree"))?;
        let info = kvtier_page_info {
            tier: match e.tier {
                Tier::Hot => KVTIER_TIER_HOT,
                Tier::Warm => KVTIER_TIER_WARM,
                Tier::Cold => KVTIER_TIER_COLD,
                Tier::Evicted => KVTIER_TIER_EVICTED,
            },
            n_tokens: e.n_tokens,
            k_bits: e.format.k_bits.bits() as u32,
            v_bits: e.format.v_bits.bits() as u32,
            pinned: m.pins.contains(Pins::USER),
            sink: m.pins.contains(Pins::SINK),
            archived: m.archive.is_some(),
            promoted: m.promoted,
            mass: m.total_mass(),
            last_attended: m.last_attended.unwrap_or(KVTIER_NEVER),
        };
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(info) };
        Ok(())
    })
}
