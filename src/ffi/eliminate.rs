//! Query-time elimination through C: decode attention that skips pages with a proven bound on
//! the skipped softmax mass.
//!
//! Owns: `kvtier_cache_attend_eliminated` and the `#[repr(C)]` [`kvtier_elimination_report`].
//! Must never: write an output buffer before every count and pointer is checked.

use super::attention::{batch, kvtier_attention_stats, query_len, StatsOut};
use super::boundary::{handle, input, Out, OutParam};
use super::cache::kvtier_cache;
use super::status::kvtier_status;
use crate::eliminate::{EliminationInput, EliminationScratch, Eliminator, SuperPageEliminator};

/// What one eliminated decode step skipped.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct kvtier_elimination_report {
    /// (page, kv head) pairs that could be skipped (bounded, not hot), and those skipped.
    pub candidates: usize,
    pub skipped_pages: usize,
    /// Tokens skipped, summed over kv heads.
    pub skipped_tokens: usize,
    /// Super-pages skipped whole (with `super_group >= 2`).
    pub super_skips: usize,
    /// The largest proven bound on the skipped softmax mass over the batch's q heads (<= epsilon).
    pub max_mass_bound: f32,
}

/// `kvtier_cache_attend` that skips pages whose keys cannot matter: for every q head, the softmax
/// mass of the skipped tokens is at most `epsilon` (proven from each page's key bounds; the output
/// then differs from full attention by at most `2 epsilon max |v|`; docs/eliminate.md). Hot pages
/// are always attended. `super_group` 0 bounds single pages; 2 or more also bounds super-pages of
/// that many pages and skips whole ones first (two-level). Skipped pages get mass 0 in `stats`.
/// `report_out` may be NULL.
///
/// Errors: as `kvtier_cache_attend`, plus `INVALID_CONFIG` (`epsilon` outside [0, 1),
/// `super_group` 1). On error no buffer is written.
///
/// # Safety
///
/// As `kvtier_cache_attend`; `report_out` NULL or valid for a write of one
/// `kvtier_elimination_report`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_attend_eliminated(
    cache: *const kvtier_cache,
    layer: usize,
    seqs: *const u64,
    n_seqs: usize,
    queries: *const f32,
    queries_len: usize,
    epsilon: f32,
    super_group: usize,
    output: *mut f32,
    output_len: usize,
    stats: *const kvtier_attention_stats,
    report_out: *mut kvtier_elimination_report,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_attend_eliminated", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let cfg = c.config();
        let needed = query_len(cfg, n_seqs, queries_len)?;
        let out = Out::new(output, output_len, needed, "output")?;
        let report = (!report_out.is_null())
            .then(|| OutParam::new(report_out, "report_out"))
            .transpose()?;
        let plain = Eliminator::new(epsilon)?;
        let two_level = match super_group {
            0 => None,
            g => Some(SuperPageEliminator::new(epsilon, g)?),
        };
        // SAFETY: `seqs` holds `n_seqs` readable ids (this function's contract).
        let (ids, pages) = unsafe { batch(&c, layer, seqs, n_seqs) }?;
        // SAFETY: `stats` is NULL or initialised (this function's contract).
        let stats_out = unsafe { StatsOut::check(stats, n_seqs, cfg.num_q_heads, &pages) }?;
        let (att, rep) = {
            // SAFETY: `queries` holds `queries_len` readable floats (this function's contract).
            let q = unsafe { input(queries, queries_len, "queries") }?;
            let input = EliminationInput {
                layer,
                seqs: &ids,
                queries: q,
            };
            let mut scratch = EliminationScratch::default();
            match two_level {
                Some(e) => e.attend(&c, &mut scratch, &input)?,
                None => plain.attend(&c, &mut scratch, &input)?,
            }
        };
        if !att.is_finite() {
            return Err(crate::Error::Overflow(
                "scores overflow f32 for these queries and keys".into(),
            )
            .into());
        }
        // The input borrow has ended: `output` may alias `queries`.
        // SAFETY: `out` was checked for `needed == att.output.len()` elements, the stats buffers
        // and `report` for theirs; all writable (this function's contract).
        unsafe {
            out.write(&att.output);
            stats_out.write(&att)?;
            if let Some(r) = report {
                r.write(kvtier_elimination_report {
                    candidates: rep.candidates,
                    skipped_pages: rep.skipped_pages,
                    skipped_tokens: rep.skipped_tokens,
                    super_skips: rep.super_skips,
                    max_mass_bound: rep.mass_bound.iter().copied().fold(0.0, f32::max),
                });
            }
        }
        Ok(())
    })
}
