//! The protect session through the C ABI: the monitor and healer for one sequence of a cache that
//! the engine attends itself.
//!
//! Owns: the opaque [`kvtier_protect`] (monitor calibration, healed pages, event queue, behind a
//! mutex), [`kvtier_protect_options`], [`kvtier_verdict`], [`kvtier_heal_event`] and their entry
//! points. Must never: keep a pointer the caller passed past the call, or change a page except
//! through the cache's moves (promotion from the archive, release back to the warm format).
//!
//! A step: the engine attends (asking for head statistics if it wants the attention signal),
//! computes the next-token logits, and calls `kvtier_protect_step` with both. When the verdict
//! says `fired`, the session has promoted the heaviest pages exactly; the engine should attend
//! every page on its next step (no page selection).

use super::attention::kvtier_head_stats;
use super::boundary::{handle, OutParam};
use super::cache::kvtier_cache;
use super::status::kvtier_status;
use crate::cache::SeqId;
use crate::monitor::{Healer, Monitor, Reason, Regime};
use crate::protect::{CacheSequence, Healing};
use crate::HeadStats;
use std::sync::Mutex;

/// Settings of a protect session. Pass NULL to `kvtier_protect_new` for the defaults
/// (`kvtier_protect_options_default`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct kvtier_protect_options {
    /// In `[0, 1]`: the monitor fires on about `sensitivity / 10` of the steps (default 0.85).
    pub sensitivity: f32,
    /// Pages promoted per layer on one firing (default 4).
    pub pages_per_layer: usize,
    /// Most healed pages per layer at once (default 4).
    pub max_pages_per_layer: usize,
    /// Calm steps after which healed pages are released (default 32).
    pub hold: u64,
}

/// The monitor's judgement of one step.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct kvtier_verdict {
    /// `1 - H / ln(vocab)` of the logits, in `[0, 1]`.
    pub health: f32,
    pub logit_entropy: f32,
    pub logit_varentropy: f32,
    /// Means over the head statistics passed in (NaN when none were).
    pub attention_entropy: f32,
    pub attention_varentropy: f32,
    /// -1 during warm-up; else 0 confident, 1 uncertain, 2 branching, 3 lost (entropix).
    pub regime: i32,
    /// The monitor fired on this step and the session healed.
    pub fired: bool,
    /// The varentropy threshold the step was judged against (NaN during warm-up).
    pub threshold: f32,
    /// Pages promoted by this step's healing (all layers).
    pub promoted_pages: usize,
}

/// One healing event, as `kvtier_protect_next_event` returns it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct kvtier_heal_event {
    /// Step of the session (0-based) after which healing ran.
    pub step: u64,
    pub health: f32,
    pub varentropy: f32,
    pub threshold: f32,
    pub promoted_pages: usize,
    pub promoted_bytes: usize,
}

/// A protect session for one sequence. Opaque: `kvtier_protect_new`, `kvtier_protect_free`.
/// Calls on one session are serialised by an internal lock; the cache is locked for writing only
/// while the session heals or releases.
pub struct kvtier_protect {
    inner: Mutex<Session>,
}

struct Session {
    seq: SeqId,
    healing: Healing,
    healed: Vec<Vec<usize>>,
    heads: Vec<HeadStats>,
}

/// The default options (sensitivity 0.85, 4 pages per layer, at most 4 healed per layer, hold 32).
#[no_mangle]
pub extern "C" fn kvtier_protect_options_default() -> kvtier_protect_options {
    let h = Healer::default();
    kvtier_protect_options {
        sensitivity: 0.85,
        pages_per_layer: h.pages_per_layer,
        max_pages_per_layer: h.max_pages_per_layer,
        hold: h.hold,
    }
}

/// Makes a protect session for sequence `seq` (of whichever cache later steps pass) and writes
/// its handle to `*session_out`. `options` may be NULL (the defaults).
///
/// Errors: `NULL_PARAMETER`, `INVALID_CONFIG` (sensitivity outside `[0, 1]` or NaN,
/// `pages_per_layer` above `max_pages_per_layer`).
///
/// # Safety
///
/// `options` must be NULL or valid for a read of one `kvtier_protect_options`; `session_out` valid
/// for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn kvtier_protect_new(
    options: *const kvtier_protect_options,
    seq: u64,
    session_out: *mut *mut kvtier_protect,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_protect_new", {
        let out = OutParam::new(session_out, "session_out")?;
        // SAFETY: NULL or valid for one read (this function's contract).
        let o = unsafe { super::boundary::optional_struct(options, "options") }?
            .unwrap_or_else(|| kvtier_protect_options_default());
        if o.pages_per_layer > o.max_pages_per_layer {
            return Err(crate::Error::config(
                "pages_per_layer",
                format!(
                    "{} is above max_pages_per_layer ({})",
                    o.pages_per_layer, o.max_pages_per_layer
                ),
            )
            .into());
        }
        let monitor = Monitor::new(o.sensitivity)?;
        let healer = Healer {
            pages_per_layer: o.pages_per_layer,
            hold: o.hold,
            max_pages_per_layer: o.max_pages_per_layer,
        };
        let ptr = Box::into_raw(Box::new(kvtier_protect {
            inner: Mutex::new(Session {
                seq: SeqId(seq),
                healing: Healing::new(monitor, healer),
                healed: Vec::new(),
                heads: Vec::new(),
            }),
        }));
        // SAFETY: checked non-NULL and aligned; writable (this function's contract).
        unsafe { out.write(ptr) };
        Ok(())
    })
}

/// Frees a session (NULL is a no-op). Healed pages stay as they are (hot) in the cache; a policy
/// or `kvtier_cache_move` may demote them.
///
/// # Safety
///
/// `session` must be NULL or a handle from `kvtier_protect_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvtier_protect_free(session: *mut kvtier_protect) {
    ffi_panic_boundary_or!((), "kvtier_protect_free", {
        if !session.is_null() {
            // SAFETY: a live handle (this function's contract), freed once.
            drop(unsafe { Box::from_raw(session) });
        }
        Ok(())
    })
}

/// Judges one decode step from its next-token `logits[vocab]` and, optionally, the step's
/// attention statistics `heads[n_heads]` (NULL with 0), heals `cache` when the monitor fires and
/// releases healed pages after the hold; writes the verdict to `*verdict_out` (may be NULL).
///
/// Errors: `NULL_PARAMETER`, `SHAPE` (`vocab` 0), `NON_FINITE` (a NaN or infinite logit),
/// `INVALID_ARGUMENT` (counts whose byte size overflows), `UNKNOWN_SEQUENCE`, `POISONED`; moves
/// the cache refuses stop healing with their status (the pages before them stay promoted).
///
/// # Safety
///
/// `session` and `cache` must be NULL or live handles; `logits` valid for `vocab` reads; `heads`
/// NULL or valid for `n_heads` reads; `verdict_out` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn kvtier_protect_step(
    session: *mut kvtier_protect,
    cache: *mut kvtier_cache,
    logits: *const f32,
    vocab: usize,
    heads: *const kvtier_head_stats,
    n_heads: usize,
    verdict_out: *mut kvtier_verdict,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_protect_step", {
        // SAFETY: NULL or live (this function's contract).
        let s = unsafe { handle(session, "session") }?;
        // SAFETY: NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?;
        if vocab == 0 {
            return Err(crate::Error::shape("logits", "at least one value", 0).into());
        }
        // SAFETY: valid for `vocab` reads (this function's contract); `input` checks NULL,
        // alignment and size.
        let logits = unsafe { super::boundary::input(logits, vocab, "logits") }?;
        // SAFETY: as above, for `n_heads` reads (an empty slice when 0).
        let heads = unsafe { super::boundary::input(heads, n_heads, "heads") }?;
        let out = if verdict_out.is_null() {
            None
        } else {
            Some(OutParam::new(verdict_out, "verdict_out")?)
        };
        let mut st = s.inner.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        st.heads.clear();
        st.heads.extend(heads.iter().map(|h| HeadStats {
            entropy: h.entropy,
            varentropy: h.varentropy,
            max_score: h.max_score,
            log_z: h.log_z,
        }));
        let mut guard = c.write()?;
        guard.seq_len(st.seq, 0)?;
        let before = st.healing.promoted_pages;
        let mut target = CacheSequence {
            cache: &mut guard,
            seq: st.seq,
            healed: &mut st.healed,
            heads: &st.heads,
        };
        let v = st.healing.after_step(&mut target, logits)?;
        let promoted = (st.healing.promoted_pages - before) as usize;
        if let Some(o) = out {
            let (threshold, fired) = match v.fire {
                Some(
                    Reason::Varentropy { threshold, .. } | Reason::KeyVariance { threshold, .. },
                ) => (threshold, true),
                Some(Reason::Critic) => (f32::NAN, true),
                None => (f32::NAN, false),
            };
            let verdict = kvtier_verdict {
                health: v.health,
                logit_entropy: v.logits.entropy,
                logit_varentropy: v.logits.varentropy,
                attention_entropy: v.attention.map_or(f32::NAN, |a| a.entropy),
                attention_varentropy: v.attention.map_or(f32::NAN, |a| a.varentropy),
                regime: match v.regime {
                    None => -1,
                    Some(Regime::Confident) => 0,
                    Some(Regime::Uncertain) => 1,
                    Some(Regime::Branching) => 2,
                    Some(Regime::Lost) => 3,
                },
                fired,
                threshold,
                promoted_pages: promoted,
            };
            // SAFETY: checked; writable (this function's contract).
            unsafe { o.write(verdict) };
        }
        Ok(())
    })
}

/// Takes the oldest queued healing event: writes it to `*event_out` and `true` to `*has_event`,
/// or `false` when the queue is empty (the session keeps the last 1024).
///
/// Errors: `NULL_PARAMETER`.
///
/// # Safety
///
/// `session` must be NULL or a live handle; `event_out` and `has_event` valid for one write each.
#[no_mangle]
pub unsafe extern "C" fn kvtier_protect_next_event(
    session: *mut kvtier_protect,
    event_out: *mut kvtier_heal_event,
    has_event: *mut bool,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_protect_next_event", {
        // SAFETY: NULL or live (this function's contract).
        let s = unsafe { handle(session, "session") }?;
        let ev_out = OutParam::new(event_out, "event_out")?;
        let has = OutParam::new(has_event, "has_event")?;
        let mut st = s.inner.lock().unwrap_or_else(|e| e.into_inner());
        let ev = st.healing.pop_event();
        if let Some(e) = ev {
            let (value, threshold) = match e.reason {
                // The C session fires on logit varentropy; a key-variance reason carries the same
                // (value, threshold) pair of its own signal.
                Reason::Varentropy { value, threshold }
                | Reason::KeyVariance { value, threshold } => (value, threshold),
                Reason::Critic => (f32::NAN, f32::NAN),
            };
            // SAFETY: checked; writable (this function's contract).
            unsafe {
                ev_out.write(kvtier_heal_event {
                    step: e.step,
                    health: e.health,
                    varentropy: value,
                    threshold,
                    promoted_pages: e.promoted_pages,
                    promoted_bytes: e.promoted_bytes,
                })
            };
        }
        // SAFETY: checked; writable (this function's contract).
        unsafe { has.write(ev.is_some()) };
        Ok(())
    })
}
