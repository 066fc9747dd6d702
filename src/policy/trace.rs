//! Attention traces: a versioned file of per-step page masses captured from a real decode, and the
//! replay of any policy over it.
//!
//! Owns: the trace format ([`TraceHeader`], [`TraceStep`], [`TraceWriter`], [`read_trace`]) and
//! [`replay`]. Must never: read a trace it cannot validate (a bad magic, version, shape or length
//! is a typed error naming the record), or need the model to replay (masses are in the trace).
//!
//! # Format, version 1 (little-endian)
//!
//! ```text
//! header:  magic "KVTTRACE" (8 bytes) | version u32 = 1 | num_layers u32 | num_q_heads u32 |
//!          num_kv_heads u32 | head_dim u32 | page_size u32 | flags u32 (bit 0: records carry q, k)
//! record:  layer u32 | step u32 | len u32 (tokens attended) | n_pages u32 |
//!          entropy f32[num_q_heads] | mass f32[n_pages * num_kv_heads] (page-major; each kv head's
//!          masses sum to 1) | if flags & 1: q f32[num_q_heads * head_dim], k f32[num_kv_heads * head_dim]
//! ```
//!
//! Records come in decode order; a capture from a full (nothing evicted) cache gives every page's
//! mass, which is what replay needs to measure what a policy would have kept.

use super::{Budget, PageView, RetentionPolicy, SeqView};
use crate::cache::{Move, Pins, SeqId, Tier};
use crate::error::{Error, Result};
use crate::quant::WarmFormat;
use std::io::{Read, Write};

const MAGIC: &[u8; 8] = b"KVTTRACE";
/// The format version this build writes and reads.
pub const TRACE_VERSION: u32 = 1;

/// The shape a trace was captured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceHeader {
    pub num_layers: u32,
    pub num_q_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub page_size: u32,
    /// Records carry the step's query and new key.
    pub with_qk: bool,
}

/// One decode step of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceStep {
    pub layer: u32,
    pub step: u32,
    pub len: u32,
    /// Attention entropy per q head.
    pub entropy: Vec<f32>,
    /// `[n_pages][num_kv_heads]`.
    pub mass: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
}

fn bad(what: impl Into<String>) -> Error {
    Error::shape("trace", "a kvtier trace (version 1)", what.into())
}

/// Writes a trace.
pub struct TraceWriter<W: Write> {
    out: W,
    header: TraceHeader,
}

impl<W: Write> TraceWriter<W> {
    /// Writes the header.
    pub fn new(mut out: W, header: TraceHeader) -> Result<Self> {
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(MAGIC);
        for x in [
            TRACE_VERSION,
            header.num_layers,
            header.num_q_heads,
            header.num_kv_heads,
            header.head_dim,
            header.page_size,
            header.with_qk as u32,
        ] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        out.write_all(&b).map_err(io)?;
        Ok(TraceWriter { out, header })
    }

    /// Appends one record (checked against the header).
    pub fn write(&mut self, s: &TraceStep) -> Result<()> {
        let h = &self.header;
        let kvh = h.num_kv_heads as usize;
        if s.entropy.len() != h.num_q_heads as usize
            || kvh == 0
            || !s.mass.len().is_multiple_of(kvh)
        {
            return Err(Error::shape(
                "trace step",
                "entropy per q head, masses per kv head",
                s.mass.len(),
            ));
        }
        if h.with_qk
            && (s.q.len() != (h.num_q_heads * h.head_dim) as usize
                || s.k.len() != (h.num_kv_heads * h.head_dim) as usize)
        {
            return Err(Error::shape("trace step", "q and k of the step", s.q.len()));
        }
        let mut b =
            Vec::with_capacity(16 + 4 * (s.entropy.len() + s.mass.len() + s.q.len() + s.k.len()));
        for x in [s.layer, s.step, s.len, (s.mass.len() / kvh) as u32] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        let floats = s.entropy.iter().chain(&s.mass);
        let qk = s.q.iter().chain(&s.k).filter(|_| h.with_qk);
        for x in floats.chain(qk) {
            b.extend_from_slice(&x.to_le_bytes());
        }
        self.out.write_all(&b).map_err(io)
    }

    /// The header written.
    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    /// Flushes and returns the writer.
    pub fn finish(mut self) -> Result<W> {
        self.out.flush().map_err(io)?;
        Ok(self.out)
    }
}

fn io(e: std::io::Error) -> Error {
    Error::Unsupported(if e.kind() == std::io::ErrorKind::WriteZero {
        "trace output is full"
    } else {
        "trace I/O failed"
    })
}

fn u32s<const N: usize>(r: &mut impl Read) -> Result<Option<[u32; N]>> {
    let mut b = vec![0u8; 4 * N];
    let mut got = 0;
    while got < b.len() {
        let n = r.read(&mut b[got..]).map_err(io)?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(bad("a truncated record"))
            };
        }
        got += n;
    }
    let mut out = [0u32; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    }
    Ok(Some(out))
}

fn f32s(r: &mut impl Read, n: usize) -> Result<Vec<f32>> {
    let mut b = Vec::new();
    b.try_reserve_exact(4 * n).map_err(|_| Error::OutOfMemory {
        what: "trace record",
        bytes: 4 * n,
    })?;
    b.resize(4 * n, 0);
    r.read_exact(&mut b)
        .map_err(|_| bad("a truncated record"))?;
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads a whole trace.
pub fn read_trace(mut r: impl Read) -> Result<(TraceHeader, Vec<TraceStep>)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|_| bad("no header"))?;
    if &magic != MAGIC {
        return Err(bad("a file without the KVTTRACE magic"));
    }
    let [ver, layers, qh, kvh, d, ps, flags] =
        u32s::<7>(&mut r)?.ok_or_else(|| bad("a truncated header"))?;
    if ver != TRACE_VERSION {
        return Err(bad(format!("version {ver}")));
    }
    if layers == 0 || qh == 0 || kvh == 0 || d == 0 || ps == 0 || qh > 4096 || kvh > qh || d > 512 {
        return Err(bad(format!("shape {layers}/{qh}/{kvh}/{d}/{ps}")));
    }
    let h = TraceHeader {
        num_layers: layers,
        num_q_heads: qh,
        num_kv_heads: kvh,
        head_dim: d,
        page_size: ps,
        with_qk: flags & 1 == 1,
    };
    let mut steps = Vec::new();
    while let Some([layer, step, len, n_pages]) = u32s::<4>(&mut r)? {
        if layer >= layers || n_pages as u64 != (len as u64).div_ceil(ps as u64) {
            return Err(bad(format!(
                "record {}: layer {layer}, {len} tokens in {n_pages} pages",
                steps.len()
            )));
        }
        let entropy = f32s(&mut r, qh as usize)?;
        let mass = f32s(&mut r, n_pages as usize * kvh as usize)?;
        let (q, k) = if h.with_qk {
            (
                f32s(&mut r, (qh * d) as usize)?,
                f32s(&mut r, (kvh * d) as usize)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        steps.push(TraceStep {
            layer,
            step,
            len,
            entropy,
            mass,
            q,
            k,
        });
    }
    Ok((h, steps))
}

/// What a policy would have kept over a trace: means over the trace's records.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReplayReport {
    pub steps: usize,
    pub kept_ratio: f64,
    /// Fraction of the top 10% pages by accumulated mass kept.
    pub heavy_hitter_recall: f64,
    /// The trace's attention mass (averaged over kv heads) on the pages kept.
    pub mass_retained: f64,
    /// Pages moved off the hot tier (demoted or cold) per record.
    pub demoted_pages: f64,
}

/// Replays `policy` under `budget` over `steps` (from [`read_trace`]): per layer a simulated page
/// table (hot pages; policy moves evict, demote or move them cold) gets the trace's masses as
/// its statistics; after the policy's moves of each record, the kept pages are scored against the
/// record's masses. Device bytes are counted with f16 hot pages and int4/int2 warm pages of the
/// trace's shape (value group 32).
pub fn replay(
    header: &TraceHeader,
    steps: &[TraceStep],
    policy: &mut dyn RetentionPolicy,
    budget: &Budget,
) -> Result<ReplayReport> {
    let (kvh, d, ps) = (
        header.num_kv_heads as usize,
        header.head_dim as usize,
        header.page_size as usize,
    );
    let hot_bytes = 2 * kvh * ps * d * 2;
    let warm_bytes = |bits: usize| {
        let l = crate::quant::WarmLayout::new(
            ps,
            d,
            crate::Bits::from_bits(bits as u32).unwrap_or(crate::Bits::B4),
            crate::Bits::from_bits(bits as u32).unwrap_or(crate::Bits::B4),
            32.min(d),
        );
        l.head_bytes * kvh
    };
    let ladder = vec![
        WarmFormat::uniform(crate::Bits::B4),
        WarmFormat::uniform(crate::Bits::B2),
    ];
    let mut layers: Vec<Vec<PageView>> = vec![Vec::new(); header.num_layers as usize];
    let mut step_of = vec![0u64; header.num_layers as usize];
    let mut r = ReplayReport::default();
    for s in steps {
        let l = s.layer as usize;
        let n_pages = s.mass.len() / kvh;
        let pages = &mut layers[l];
        while pages.len() < n_pages {
            let i = pages.len();
            pages.push(PageView {
                index: i,
                start: i * ps,
                n_tokens: 0,
                tier: Tier::Hot,
                format: ladder[0],
                mass: vec![0.0; kvh],
                last_mass: 0.0,
                last_attended: None,
                pins: if i == 0 { Pins::SINK } else { Pins::none() },
                promoted: false,
                archived: false,
                device_bytes: hot_bytes,
                writing: false,
            });
        }
        let len = s.len as usize;
        for (i, p) in pages.iter_mut().enumerate() {
            p.n_tokens = ps.min(len.saturating_sub(i * ps));
            p.writing = i + 1 == n_pages && !len.is_multiple_of(ps);
            p.last_mass = 0.0;
            for kv in 0..kvh {
                let m = s.mass[i * kvh + kv];
                if p.tier != Tier::Evicted {
                    p.mass[kv] += m;
                    p.last_mass += m;
                }
            }
            if p.last_mass > 0.0 {
                p.last_attended = Some(step_of[l]);
            }
        }
        step_of[l] += 1;
        let view = SeqView {
            seq: SeqId(0),
            layer: l,
            num_layers: header.num_layers as usize,
            len,
            page_size: ps,
            step: step_of[l],
            pages: pages.clone(),
            ladder: ladder.clone(),
            hot_page_bytes: hot_bytes,
            warm_page_bytes: vec![warm_bytes(4), warm_bytes(2)],
            warm_enabled: true,
            f16_token_bytes: 2 * kvh * d * 2,
        };
        for m in policy.plan(&view, &budget.resolve(&view)) {
            let Some(p) = pages.get_mut(m.page().page) else {
                continue;
            };
            match m {
                Move::Evict(_) => {
                    p.tier = Tier::Evicted;
                    p.device_bytes = 0;
                }
                Move::Demote(_, f) => {
                    p.tier = Tier::Warm;
                    p.format = f;
                    p.device_bytes = warm_bytes(f.v_bits.bits());
                    r.demoted_pages += 1.0;
                }
                Move::ToCold(_) => {
                    p.tier = Tier::Cold;
                    p.device_bytes = 0;
                    r.demoted_pages += 1.0;
                }
                Move::Promote(_) | Move::FromCold(_) => {
                    p.tier = Tier::Hot;
                    p.device_bytes = hot_bytes;
                    p.promoted = true;
                }
                Move::Pin(_) => p.pins.insert(Pins::USER),
                Move::Unpin(_) => p.pins.remove(Pins::USER),
            }
        }
        let kept: Vec<bool> = pages.iter().map(|p| p.tier != Tier::Evicted).collect();
        let tokens: usize = pages
            .iter()
            .filter(|p| p.tier != Tier::Evicted)
            .map(|p| p.n_tokens)
            .sum();
        r.kept_ratio += tokens as f64 / len.max(1) as f64;
        r.mass_retained += (0..n_pages)
            .filter(|&i| kept[i])
            .map(|i| {
                s.mass[i * kvh..(i + 1) * kvh]
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / kvh as f64
            })
            .sum::<f64>();
        let mut order: Vec<usize> = (0..n_pages).collect();
        order.sort_by(|&a, &b| pages[b].total_mass().total_cmp(&pages[a].total_mass()));
        let top = (n_pages / 10).max(1).min(n_pages.max(1));
        if n_pages > 0 {
            r.heavy_hitter_recall +=
                order[..top].iter().filter(|&&i| kept[i]).count() as f64 / top as f64;
        }
        r.steps += 1;
    }
    let n = r.steps.max(1) as f64;
    r.kept_ratio /= n;
    r.heavy_hitter_recall /= n;
    r.mass_retained /= n;
    r.demoted_pages /= n;
    Ok(r)
}
