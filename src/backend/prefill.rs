//! The host half of accelerator prefill, shared by the CUDA and Metal backends.
//!
//! Owns: the shape checks of [`crate::backend::BackendStorage::prefill`], the page selection of
//! a table's device-resident pages, and [`merge_causal`]: the causal block of the new tokens over
//! themselves (exact, f32) merged with the cached pages' attention computed on the device.
//! Must never: read page storage (the device part arrives as an [`Attention`]).

use crate::attention::{combine_parts, Attention, OnlineSoftmax, PageSelection};
use crate::backend::AttendInput;
use crate::cache::{PageTable, Tier};
use crate::error::{Error, Result};

/// [`crate::backend::BackendStorage::prefill`] on an accelerator: the cached part through
/// `attend` (one decode query per new token, every one over `table`; pages without device bytes
/// are not attended; output and statistics only), the causal block of the new tokens exact on the
/// host, merged by the shared combine. The trait gives prefill no scratch: `attend` plans per call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prefill_with(
    table: &PageTable,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    (qh, kvh, d): (usize, usize, usize),
    scale: f32,
    attend: impl FnOnce(&AttendInput) -> Result<Attention>,
) -> Result<Vec<f32>> {
    check_shapes(queries, keys, values, n, qh, kvh, d)?;
    let cached = if table.pages().is_empty() || n == 0 {
        None
    } else {
        let tabs = vec![table; n];
        let sel = device_pages(table, n, kvh)?;
        Some(attend(&AttendInput {
            tables: &tabs,
            queries,
            selection: sel.as_ref(),
            rotation: None,
        })?)
    };
    Ok(merge_causal(
        cached.as_ref(),
        queries,
        keys,
        values,
        n,
        (qh, kvh, d),
        scale,
    ))
}

/// Checks prefill's `[n, qh, d]` queries and `[n, kvh, d]` keys and values.
fn check_shapes(
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    qh: usize,
    kvh: usize,
    d: usize,
) -> Result<()> {
    if queries.len() != n * qh * d {
        return Err(Error::shape("queries", n * qh * d, queries.len()));
    }
    if keys.len() != n * kvh * d || values.len() != n * kvh * d {
        return Err(Error::shape(
            "keys/values",
            n * kvh * d,
            keys.len().max(values.len()),
        ));
    }
    Ok(())
}

/// For `n` queries over `table`: `None` when every page is on the device, else a selection of
/// the hot and warm pages only (cold and evicted pages have no device bytes).
fn device_pages(table: &PageTable, n: usize, kvh: usize) -> Result<Option<PageSelection>> {
    let pages = table.pages();
    if pages
        .iter()
        .all(|p| matches!(p.tier, Tier::Hot | Tier::Warm))
    {
        return Ok(None);
    }
    let keep: Vec<u32> = (0..pages.len() as u32)
        .filter(|&i| matches!(pages[i as usize].tier, Tier::Hot | Tier::Warm))
        .collect();
    let mut sel = PageSelection::none(n, kvh);
    for i in 0..n {
        sel.set_all_heads(i, &keep)?;
    }
    Ok(Some(sel))
}

/// Prefill's output `[n, qh, d]`: for new token `tok` and q head `h`, the softmax over the cached
/// pages (`cached`: one decode query per new token, `None` without cached pages) and the new
/// tokens `0..=tok` (exact), merged with the shared combine.
fn merge_causal(
    cached: Option<&Attention>,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    (qh, kvh, d): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let g = qh / kvh;
    let mut out = vec![0f32; n * qh * d];
    use rayon::prelude::*;
    out.par_chunks_mut(d).enumerate().for_each_init(
        || (Vec::new(), vec![0f32; d], vec![0f32; d], vec![0f32; d]),
        |(s, q, acc, cacc), (i, o)| {
            let (tok, kv) = (i / qh, (i % qh) / g);
            for (x, y) in q.iter_mut().zip(&queries[i * d..(i + 1) * d]) {
                *x = y * scale;
            }
            s.clear();
            s.extend((0..=tok).map(|j| {
                let k = &keys[(j * kvh + kv) * d..(j * kvh + kv + 1) * d];
                q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>()
            }));
            // The new tokens' part: softmax state relative to its own max, unnormalised sum.
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut blk = OnlineSoftmax {
                m,
                ..OnlineSoftmax::default()
            };
            acc.fill(0.0);
            for (j, &sj) in s.iter().enumerate() {
                let x = sj - m;
                let e = x.exp();
                blk.l += e;
                blk.s1 += e * x;
                blk.s2 += e * x * x;
                let v = &values[(j * kvh + kv) * d..(j * kvh + kv + 1) * d];
                for (a, vv) in acc.iter_mut().zip(v) {
                    *a += e * vv;
                }
            }
            match cached {
                Some(a) => {
                    // The cached part's state and unnormalised sum (output times l).
                    let cst = OnlineSoftmax::from_stats(&a.heads[i]);
                    for (c, &x) in cacc.iter_mut().zip(&a.output[i * d..(i + 1) * d]) {
                        *c = x * cst.l;
                    }
                    combine_parts([(cst, &cacc[..]), (blk, &acc[..])], o);
                }
                None => {
                    combine_parts([(blk, &acc[..])], o);
                }
            }
        },
    );
    out
}
