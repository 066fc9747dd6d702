//! A state-machine property test of the whole cache: random appends (prefill chunks and batched
//! decode tokens) over several sequences and layers, every page move, archive on and off, observe,
//! and attention with and without a page selection. A model predicts which calls succeed and what
//! each page holds; after every step the test checks:
//!
//! - no token is lost, duplicated or reordered unless its page was evicted on purpose (exact pages
//!   read back bit for bit, quantised pages within their quantisation bound);
//! - pages promoted from the archive read back (and so attend) bit-identically to never-demoted
//!   pages;
//! - attention equals a naive f64 reference over the pages kept and selected, computed from what
//!   the cache stores (so warm pages are compared with their dequantised values);
//! - the memory report equals what is allocated (pages per tier, payload bytes per tier, archive
//!   and cold bytes);
//! - every retention policy (`policy::NAMES`), under random token or device-byte budgets, plans
//!   only valid moves, and after the step that enforces a budget the budget holds unless the
//!   policy has no move left that it may make.
//!
//! Cases: `PROPTEST_CASES` (default 256 in CI); run longer locally with e.g. `PROPTEST_CASES=2000`.

mod common;
use common::Rng;
use kvtier::policy::{Budget, RetentionPolicy};
use kvtier::quant::WarmLayout;
use kvtier::{
    Bits, CacheConfig, Error, HotDtype, KvCache, Move, PageRef, PageSelection, Restored, Rows,
    SeqId, Tier, WarmFormat,
};
use proptest::prelude::*;

const LAYERS: usize = 2;
const QH: usize = 4;
const KVH: usize = 2;
const D: usize = 32;
const ROW: usize = KVH * D;

#[derive(Debug, Clone)]
enum Op {
    Append {
        seq: usize,
        layer: usize,
        n: usize,
    },
    Decode {
        layer: usize,
    },
    Demote {
        seq: usize,
        layer: usize,
        page: usize,
        k: Bits,
        v: Bits,
    },
    Promote {
        seq: usize,
        layer: usize,
        page: usize,
    },
    Evict {
        seq: usize,
        layer: usize,
        page: usize,
    },
    ToCold {
        seq: usize,
        layer: usize,
        page: usize,
    },
    FromCold {
        seq: usize,
        layer: usize,
        page: usize,
    },
    Pin {
        seq: usize,
        layer: usize,
        page: usize,
        on: bool,
    },
    Attend {
        layer: usize,
        select: bool,
        observe: bool,
        seed: u64,
    },
    /// A retention policy (by index into `policy::NAMES`) enforcing a budget of `frac` of the
    /// current tokens (or device bytes) of one sequence in one layer.
    Policy {
        which: usize,
        seq: usize,
        layer: usize,
        frac: f64,
        bytes: bool,
    },
}

fn bits() -> impl Strategy<Value = Bits> {
    prop_oneof![
        Just(Bits::B8),
        Just(Bits::B4),
        Just(Bits::B3),
        Just(Bits::B2)
    ]
}

fn op(seqs: usize) -> impl Strategy<Value = Op> {
    let s = 0..seqs;
    let l = 0..LAYERS;
    let p = 0usize..64;
    prop_oneof![
        4 => (s.clone(), l.clone(), 1usize..70).prop_map(|(seq, layer, n)| Op::Append { seq, layer, n }),
        2 => l.clone().prop_map(|layer| Op::Decode { layer }),
        2 => (s.clone(), l.clone(), p.clone(), bits(), bits())
            .prop_map(|(seq, layer, page, k, v)| Op::Demote { seq, layer, page, k, v }),
        2 => (s.clone(), l.clone(), p.clone()).prop_map(|(seq, layer, page)| Op::Promote { seq, layer, page }),
        1 => (s.clone(), l.clone(), p.clone()).prop_map(|(seq, layer, page)| Op::Evict { seq, layer, page }),
        2 => (s.clone(), l.clone(), p.clone()).prop_map(|(seq, layer, page)| Op::ToCold { seq, layer, page }),
        1 => (s.clone(), l.clone(), p.clone()).prop_map(|(seq, layer, page)| Op::FromCold { seq, layer, page }),
        1 => (s.clone(), l.clone(), p, any::<bool>()).prop_map(|(seq, layer, page, on)| Op::Pin { seq, layer, page, on }),
        3 => (l.clone(), any::<bool>(), any::<bool>(), any::<u64>())
            .prop_map(|(layer, select, observe, seed)| Op::Attend { layer, select, observe, seed }),
        3 => (0usize..64, s, l, 0.05f64..1.0, any::<bool>())
            .prop_map(|(which, seq, layer, frac, bytes)| Op::Policy { which, seq, layer, frac, bytes }),
    ]
}

/// What the model knows of one page.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Hot,
    Warm(WarmFormat),
    /// Cold, remembering the tier it left.
    Cold(Option<WarmFormat>),
    Evicted,
}

#[derive(Debug, Clone)]
struct PageModel {
    state: State,
    user_pin: bool,
    sink: bool,
    promoted: bool,
    /// An exact copy exists in the archive.
    archived: bool,
    /// The stored values are the appended ones exactly (hot) or were quantised from them (warm);
    /// false once a page was restored from a quantised copy.
    exact_source: bool,
    /// Quantisations the stored values went through since they were exact: bounds the error.
    lossy_steps: u32,
    /// Narrowest width each of K and V went through.
    min_bits: (usize, usize),
}

#[derive(Debug, Clone, Default)]
struct SeqModel {
    /// The appended keys and values, rounded to the hot dtype, `[len][kvh][d]`.
    keys: Vec<f32>,
    values: Vec<f32>,
    pages: Vec<PageModel>,
}

struct Model {
    cfg: CacheConfig,
    seqs: Vec<Vec<SeqModel>>,
}

fn fmt_of(k: Bits, v: Bits) -> WarmFormat {
    WarmFormat {
        k_bits: k,
        v_bits: v,
    }
}

impl Model {
    fn len(&self, s: usize, l: usize) -> usize {
        self.seqs[s][l].keys.len() / ROW
    }
    fn last_partial(&self, s: usize, l: usize, p: usize) -> bool {
        let sm = &self.seqs[s][l];
        p + 1 == sm.pages.len() && !self.len(s, l).is_multiple_of(self.cfg.page_size)
    }
    fn round(&self, x: f32) -> f32 {
        match self.cfg.hot_dtype {
            HotDtype::F32 => x,
            HotDtype::F16 => half::f16::from_f32(x).to_f32(),
            HotDtype::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
    fn append(&mut self, s: usize, l: usize, k: &[f32], v: &[f32]) {
        let ps = self.cfg.page_size;
        let (ks, vs): (Vec<f32>, Vec<f32>) = (
            k.iter().map(|&x| self.round(x)).collect(),
            v.iter().map(|&x| self.round(x)).collect(),
        );
        let sinks = self.cfg.sink_tokens;
        let sm = &mut self.seqs[s][l];
        let before = sm.keys.len() / ROW;
        sm.keys.extend(ks);
        sm.values.extend(vs);
        let after = sm.keys.len() / ROW;
        for p in before.div_ceil(ps)..after.div_ceil(ps) {
            sm.pages.push(PageModel {
                state: State::Hot,
                user_pin: false,
                sink: p * ps < sinks,
                promoted: false,
                archived: false,
                exact_source: true,
                lossy_steps: 0,
                min_bits: (32, 32),
            });
        }
        self.default_policy(s, l);
    }
    fn default_policy(&mut self, s: usize, l: usize) {
        if !self.cfg.warm_enabled {
            return;
        }
        let (ps, w) = (self.cfg.page_size, self.cfg.hot_window);
        let len = self.len(s, l);
        let fmt = WarmFormat::of(&self.cfg);
        for i in (0..self.seqs[s][l].pages.len()).rev() {
            let end = (i + 1) * ps;
            if !(end <= len && end + w <= len) {
                continue;
            }
            let pm = &self.seqs[s][l].pages[i];
            if pm.state != State::Hot {
                break;
            }
            if pm.user_pin || pm.sink || pm.promoted {
                continue;
            }
            self.demote_ok(s, l, i, fmt);
        }
    }
    fn demote_ok(&mut self, s: usize, l: usize, p: usize, fmt: WarmFormat) {
        let archive = self.cfg.archive;
        let pm = &mut self.seqs[s][l].pages[p];
        if pm.state == State::Hot && archive {
            pm.archived = true;
        }
        if !(pm.state != State::Hot && pm.archived) {
            pm.lossy_steps += 1;
        } else {
            // Requantised from the exact archive copy: one quantisation from the truth.
            pm.lossy_steps = 1;
        }
        pm.min_bits = (
            pm.min_bits.0.min(fmt.k_bits.bits()),
            pm.min_bits.1.min(fmt.v_bits.bits()),
        );
        if pm.state != State::Hot && pm.archived {
            pm.min_bits = (fmt.k_bits.bits(), fmt.v_bits.bits());
        }
        pm.state = State::Warm(fmt);
        pm.promoted = false;
    }
    fn predict_demote(&self, s: usize, l: usize, p: usize, fmt: WarmFormat) -> bool {
        let pm = &self.seqs[s][l].pages[p];
        if !self.cfg.warm_enabled || pm.user_pin || pm.sink {
            return false;
        }
        match pm.state {
            State::Hot => !self.last_partial(s, l, p),
            State::Warm(cur) => fmt != cur && fmt.no_wider_than(cur),
            _ => false,
        }
    }
    fn removable(&self, s: usize, l: usize, p: usize) -> bool {
        let pm = &self.seqs[s][l].pages[p];
        !pm.user_pin && !pm.sink && !self.last_partial(s, l, p)
    }
}

fn naive_selected(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    keep: &dyn Fn(usize, usize) -> bool,
    len: usize,
    scale: f64,
) -> Vec<f64> {
    let g = QH / KVH;
    let mut out = vec![0f64; QH * D];
    for h in 0..QH {
        let kv = h / g;
        let toks: Vec<usize> = (0..len).filter(|&t| keep(t, kv)).collect();
        if toks.is_empty() {
            continue;
        }
        let s: Vec<f64> = toks
            .iter()
            .map(|&t| {
                (0..D)
                    .map(|c| q[h * D + c] as f64 * keys[(t * KVH + kv) * D + c] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for (j, &t) in toks.iter().enumerate() {
            let w = (s[j] - m).exp() / z;
            for c in 0..D {
                out[h * D + c] += w * values[(t * KVH + kv) * D + c] as f64;
            }
        }
    }
    out
}

/// Largest quantisation error of one element: half a step of the page's range at `bits`, per
/// quantisation the values went through, with slack for f16 minimums and steps.
fn bound(range: f32, bits: usize, steps: u32) -> f32 {
    if steps == 0 {
        return 0.0;
    }
    let levels = ((1u32 << bits.min(8)) - 1) as f32;
    steps as f32 * (range / levels * 0.5 + range * 2e-3) + 2e-3
}

fn check_all(c: &KvCache, m: &Model, ids: &[SeqId]) -> Result<(), TestCaseError> {
    let ps = m.cfg.page_size;
    let (mut hot, mut warm, mut cold, mut evicted, mut archived) = (0, 0, 0, 0, 0);
    let (mut warm_bytes, mut cold_bytes) = (0usize, 0usize);
    let hot_page = 2 * KVH * ps * D * m.cfg.hot_dtype.size();
    let warm_size = |f: WarmFormat| WarmLayout::of_format(&m.cfg, f).head_bytes * KVH;
    for (s, &id) in ids.iter().enumerate() {
        for l in 0..LAYERS {
            let sm = &m.seqs[s][l];
            let len = m.len(s, l);
            prop_assert_eq!(c.seq_len(id, l).unwrap(), len);
            let table = c.page_table(id, l).unwrap();
            prop_assert_eq!(table.pages().len(), sm.pages.len());
            let (rk, rv) = c.read_tokens(id, l).unwrap();
            for (p, (e, pm)) in table.pages().iter().zip(&sm.pages).enumerate() {
                let tier = match pm.state {
                    State::Hot => Tier::Hot,
                    State::Warm(_) => Tier::Warm,
                    State::Cold(_) => Tier::Cold,
                    State::Evicted => Tier::Evicted,
                };
                prop_assert_eq!(e.tier, tier, "seq {} layer {} page {}", s, l, p);
                let n = e.n_tokens as usize;
                prop_assert_eq!(n, ps.min(len - p * ps));
                match pm.state {
                    State::Hot => hot += 1,
                    State::Warm(f) => {
                        warm += 1;
                        warm_bytes += warm_size(f);
                        prop_assert_eq!(e.format, f);
                    }
                    State::Cold(former) => {
                        cold += 1;
                        match former {
                            Some(f) => cold_bytes += warm_size(f),
                            None if !pm.archived => cold_bytes += hot_page,
                            None => {}
                        }
                    }
                    State::Evicted => evicted += 1,
                }
                if pm.archived {
                    archived += 1;
                }
                // Tokens: exact, within the bound, or zero for evicted positions.
                let r = p * ps * ROW..(p * ps + n) * ROW;
                let (gk, gv, tk, tv) = (
                    &rk[r.clone()],
                    &rv[r.clone()],
                    &sm.keys[r.clone()],
                    &sm.values[r],
                );
                if pm.state == State::Evicted {
                    prop_assert!(gk.iter().chain(gv).all(|&x| x == 0.0));
                    continue;
                }
                if pm.lossy_steps == 0 {
                    prop_assert_eq!(gk, tk, "exact keys, seq {} layer {} page {}", s, l, p);
                    prop_assert_eq!(gv, tv, "exact values, seq {} layer {} page {}", s, l, p);
                    continue;
                }
                for ch in 0..ROW {
                    let col: Vec<f32> = (0..n).map(|t| tk[t * ROW + ch]).collect();
                    let range = col.iter().copied().fold(f32::MIN, f32::max)
                        - col.iter().copied().fold(f32::MAX, f32::min);
                    let b = bound(range, pm.min_bits.0, pm.lossy_steps);
                    for t in 0..n {
                        prop_assert!(
                            (gk[t * ROW + ch] - tk[t * ROW + ch]).abs() <= b,
                            "key seq {} layer {} page {} token {} ch {}: {} vs {} (bound {})",
                            s,
                            l,
                            p,
                            t,
                            ch,
                            gk[t * ROW + ch],
                            tk[t * ROW + ch],
                            b
                        );
                    }
                }
                let vg = m.cfg.value_group;
                for t in 0..n {
                    for g0 in (0..ROW).step_by(vg) {
                        let grp = &tv[t * ROW + g0..t * ROW + g0 + vg];
                        let range = grp.iter().copied().fold(f32::MIN, f32::max)
                            - grp.iter().copied().fold(f32::MAX, f32::min);
                        let b = bound(range, pm.min_bits.1, pm.lossy_steps);
                        for j in 0..vg {
                            prop_assert!((gv[t * ROW + g0 + j] - grp[j]).abs() <= b, "value bound");
                        }
                    }
                }
            }
        }
    }
    let r = c.memory_report();
    prop_assert_eq!(
        (r.hot_pages, r.warm_pages, r.cold_pages, r.evicted_pages),
        (hot, warm, cold, evicted)
    );
    prop_assert_eq!(r.hot_bytes, hot * hot_page);
    prop_assert_eq!(r.warm_bytes, warm_bytes);
    prop_assert_eq!(r.cold_bytes, cold_bytes);
    prop_assert_eq!(r.archived_pages, archived);
    prop_assert_eq!(r.archive_bytes, archived * hot_page);
    Ok(())
}

/// Executes one move on the cache and the model; checks that it succeeds exactly when the model
/// says it may. Returns whether it succeeded.
fn do_move(c: &mut KvCache, m: &mut Model, seq: usize, mv: Move) -> Result<bool, TestCaseError> {
    let r = mv.page();
    let (layer, p) = (r.layer, r.page);
    let archive = m.cfg.archive;
    match mv {
        Move::Demote(_, fmt) => {
            let want = m.predict_demote(seq, layer, p, fmt);
            let got = c.demote(r, fmt);
            prop_assert_eq!(
                got.is_ok(),
                want,
                "demote {:?}: {:?} state {:?}",
                fmt,
                got,
                m.seqs[seq][layer].pages[p]
            );
            if want {
                m.demote_ok(seq, layer, p, fmt);
            } else {
                prop_assert!(matches!(got, Err(Error::InvalidMove { .. })), "{:?}", got);
            }
            Ok(want)
        }
        Move::Promote(_) => {
            let pm = m.seqs[seq][layer].pages[p].clone();
            let got = c.promote(r);
            match pm.state {
                State::Hot | State::Evicted => {
                    prop_assert!(matches!(got, Err(Error::InvalidMove { .. })), "{:?}", got);
                    Ok(false)
                }
                _ => {
                    let exact = pm.archived || pm.state == State::Cold(None);
                    prop_assert_eq!(
                        got.unwrap(),
                        if exact {
                            Restored::Exact
                        } else {
                            Restored::Dequantised
                        }
                    );
                    let pm = &mut m.seqs[seq][layer].pages[p];
                    if exact {
                        if pm.archived {
                            pm.lossy_steps = 0;
                            pm.min_bits = (32, 32);
                        }
                    } else {
                        // Restored from the quantised copy: stored again in the hot dtype.
                        pm.exact_source = false;
                    }
                    pm.state = State::Hot;
                    pm.archived = false;
                    pm.promoted = true;
                    Ok(true)
                }
            }
        }
        Move::Evict(_) => {
            let want =
                m.seqs[seq][layer].pages[p].state != State::Evicted && m.removable(seq, layer, p);
            prop_assert_eq!(c.evict(r).is_ok(), want);
            if want {
                let pm = &mut m.seqs[seq][layer].pages[p];
                pm.state = State::Evicted;
                pm.archived = false;
            }
            Ok(want)
        }
        Move::ToCold(_) => {
            let st = m.seqs[seq][layer].pages[p].state;
            let want = matches!(st, State::Hot | State::Warm(_)) && m.removable(seq, layer, p);
            prop_assert_eq!(c.to_cold(r).is_ok(), want);
            if want {
                let pm = &mut m.seqs[seq][layer].pages[p];
                if st == State::Hot && archive {
                    pm.archived = true;
                }
                pm.state = State::Cold(match st {
                    State::Warm(f) => Some(f),
                    _ => None,
                });
            }
            Ok(want)
        }
        Move::FromCold(_) => {
            let st = m.seqs[seq][layer].pages[p].state;
            prop_assert_eq!(c.from_cold(r).is_ok(), matches!(st, State::Cold(_)));
            if let State::Cold(former) = st {
                let pm = &mut m.seqs[seq][layer].pages[p];
                pm.state = match former {
                    Some(f) => State::Warm(f),
                    None => State::Hot,
                };
                if former.is_none() {
                    pm.archived = false;
                }
            }
            Ok(matches!(st, State::Cold(_)))
        }
        Move::Pin(_) | Move::Unpin(_) => {
            let on = matches!(mv, Move::Pin(_));
            if on {
                c.pin(r).unwrap()
            } else {
                c.unpin(r).unwrap()
            }
            m.seqs[seq][layer].pages[p].user_pin = on;
            Ok(true)
        }
    }
}

fn run(cfg: CacheConfig, seqs: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut policies: Vec<Box<dyn RetentionPolicy>> = kvtier::policy::NAMES
        .iter()
        .map(|n| kvtier::policy::by_name(n).unwrap())
        .collect();
    let mut c = KvCache::new(cfg.clone()).unwrap();
    let ids: Vec<SeqId> = (0..seqs).map(|_| c.add_sequence()).collect();
    let mut m = Model {
        cfg: cfg.clone(),
        seqs: vec![vec![SeqModel::default(); LAYERS]; seqs],
    };
    let mut rng = Rng(ops.len() as u64 + 1);
    let pick = |m: &Model, s: usize, l: usize, p: usize| -> Option<usize> {
        let n = m.seqs[s][l].pages.len();
        (n > 0).then(|| p % n)
    };
    for op in ops {
        match op {
            Op::Append { seq, layer, n } => {
                let n = n.min(cfg.max_seq_len - m.len(seq, layer));
                let (k, v) = (rng.vec(n * ROW, 2.0), rng.vec(n * ROW, 1.0));
                c.append(ids[seq], layer, &k, &v).unwrap();
                m.append(seq, layer, &k, &v);
            }
            Op::Decode { layer } => {
                if (0..seqs).any(|s| m.len(s, layer) >= cfg.max_seq_len) {
                    continue;
                }
                let (k, v) = (rng.vec(seqs * ROW, 2.0), rng.vec(seqs * ROW, 1.0));
                c.append_decode(layer, &ids, Rows::F32(&k), Rows::F32(&v))
                    .unwrap();
                for s in 0..seqs {
                    m.append(
                        s,
                        layer,
                        &k[s * ROW..(s + 1) * ROW],
                        &v[s * ROW..(s + 1) * ROW],
                    );
                }
            }
            Op::Demote {
                seq,
                layer,
                page,
                k,
                v,
            } => {
                let Some(p) = pick(&m, seq, layer, page) else {
                    continue;
                };
                let r = PageRef {
                    seq: ids[seq],
                    layer,
                    page: p,
                };
                do_move(&mut c, &mut m, seq, Move::Demote(r, fmt_of(k, v)))?;
            }
            Op::Promote { seq, layer, page }
            | Op::Evict { seq, layer, page }
            | Op::ToCold { seq, layer, page }
            | Op::FromCold { seq, layer, page }
            | Op::Pin {
                seq, layer, page, ..
            } => {
                let Some(p) = pick(&m, seq, layer, page) else {
                    continue;
                };
                let r = PageRef {
                    seq: ids[seq],
                    layer,
                    page: p,
                };
                let mv = match op {
                    Op::Promote { .. } => Move::Promote(r),
                    Op::Evict { .. } => Move::Evict(r),
                    Op::ToCold { .. } => Move::ToCold(r),
                    Op::FromCold { .. } => Move::FromCold(r),
                    Op::Pin { on: true, .. } => Move::Pin(r),
                    _ => Move::Unpin(r),
                };
                do_move(&mut c, &mut m, seq, mv)?;
            }
            Op::Policy {
                which,
                seq,
                layer,
                frac,
                bytes,
            } => {
                let np = policies.len();
                let pol = &mut policies[which % np];
                let view = c.policy_view(ids[seq], layer).unwrap();
                let full = if bytes {
                    view.device_bytes()
                } else {
                    view.kept_tokens()
                };
                let limit = (full as f64 * frac) as usize;
                let budget = if bytes {
                    Budget::device_bytes(limit)
                } else {
                    Budget::tokens(limit)
                };
                let moves = pol.plan(&view, &budget);
                for mv in &moves {
                    let ok = do_move(&mut c, &mut m, seq, *mv)?;
                    prop_assert!(ok, "policy {} planned an invalid move {:?}", pol.name(), mv);
                }
                // The budget holds after the step that enforces it, unless the policy has nothing
                // left it may do (protected pages alone exceed it): then planning again is a no-op.
                let after = c.policy_view(ids[seq], layer).unwrap();
                let used = if bytes {
                    after.device_bytes()
                } else {
                    after.kept_tokens()
                };
                if used > limit && pol.name() != "keep_all" && pol.name() != "anchor" {
                    let again = pol.plan(&after, &budget);
                    let evicts = again
                        .iter()
                        .filter(|m| {
                            matches!(m, Move::Evict(_) | Move::ToCold(_) | Move::Demote(..))
                        })
                        .count();
                    prop_assert_eq!(
                        evicts,
                        0,
                        "policy {} stopped over budget ({} > {}) with moves left: {:?}",
                        pol.name(),
                        used,
                        limit,
                        again
                    );
                }
            }
            Op::Attend {
                layer,
                select,
                observe,
                seed,
            } => {
                let mut r = Rng(seed);
                let q = r.vec(seqs * QH * D, 2.0);
                let n_pages: Vec<usize> = (0..seqs).map(|s| m.seqs[s][layer].pages.len()).collect();
                let sel = select.then(|| {
                    let mut sel = PageSelection::none(seqs, KVH);
                    for (s, &np) in n_pages.iter().enumerate() {
                        for kv in 0..KVH {
                            let pages: Vec<u32> = (0..np as u32)
                                .filter(|_| r.next_u64().is_multiple_of(2))
                                .collect();
                            sel.set(s, kv, pages).unwrap();
                        }
                    }
                    sel
                });
                let att = match &sel {
                    Some(s) => c.attend_select(layer, &ids, &q, s),
                    None => c.attend(layer, &ids, &q),
                }
                .unwrap();
                for s in 0..seqs {
                    let (k, v) = c.read_tokens(ids[s], layer).unwrap();
                    let sm = &m.seqs[s][layer];
                    let keep = |t: usize, kv: usize| {
                        let p = t / cfg.page_size;
                        sm.pages[p].state != State::Evicted
                            && sel
                                .as_ref()
                                .is_none_or(|x| x.pages(s, kv).contains(&(p as u32)))
                    };
                    let want = naive_selected(
                        &q[s * QH * D..(s + 1) * QH * D],
                        &k,
                        &v,
                        &keep,
                        m.len(s, layer),
                        cfg.scale() as f64,
                    );
                    for (i, (&a, &b)) in att.output_of(s).iter().zip(&want).enumerate() {
                        prop_assert!(
                            (a as f64 - b).abs() < 2e-4,
                            "seq {} out[{}]: {} vs {}",
                            s,
                            i,
                            a,
                            b
                        );
                    }
                    let kvm = att.kv_page_mass(s);
                    for kv in 0..KVH {
                        let total: f32 = (0..n_pages[s]).map(|p| kvm[p * KVH + kv]).sum();
                        let any = (0..m.len(s, layer)).any(|t| keep(t, kv));
                        prop_assert!(
                            if any {
                                (total - 1.0).abs() < 1e-3
                            } else {
                                total == 0.0
                            },
                            "kv head {} masses sum to {}",
                            kv,
                            total
                        );
                    }
                }
                if observe {
                    c.observe(layer, &ids, &att).unwrap();
                }
            }
        }
        check_all(&c, &m, &ids)?;
    }
    Ok(())
}

fn config() -> impl Strategy<Value = CacheConfig> {
    (
        prop_oneof![Just(8usize), Just(16), Just(32)],
        0usize..80,
        0usize..40,
        bits(),
        bits(),
        any::<bool>(),
        prop_oneof![
            Just(HotDtype::F16),
            Just(HotDtype::F32),
            Just(HotDtype::BF16)
        ],
        0u8..8,
    )
        .prop_map(|(ps, window, sinks, k, v, archive, hot, warm)| {
            let mut b = CacheConfig::builder(LAYERS, QH, KVH, D)
                .page_size(ps)
                .hot_window(window)
                .sink_tokens(sinks)
                .k_bits(k)
                .v_bits(v)
                .archive(archive)
                .hot_dtype(hot)
                .max_seq_len(600);
            if warm == 0 {
                b = b.full_precision();
            }
            b.build().unwrap()
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn cache_state_machine(
        cfg in config(),
        (seqs, ops) in (1usize..4).prop_flat_map(|s| (Just(s), proptest::collection::vec(op(s), 1..45))),
    ) {
        run(cfg, seqs, ops)?;
    }
}
