/*
 * kvtier.h: the C ABI of kvtier, a tiered, quantised KV cache for LLM inference engines.
 *
 * GENERATED from src/ffi by cbindgen (cargo check --features generate-header): do not edit.
 * See the top of src/ffi/mod.rs for the lifecycle of the handles and the rules every function keeps.
 * SPDX-License-Identifier: Apache-2.0 OR MIT
 */

#ifndef KVTIER_H
#define KVTIER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Package and ABI version, written by build.rs from Cargo.toml: do not edit. */
#define KVTIER_VERSION_MAJOR 0
#define KVTIER_VERSION_MINOR 1
#define KVTIER_VERSION_PATCH 0
#define KVTIER_VERSION_STRING "0.1.0"
/* Changes exactly when a release may break the C ABI (Cargo's semver rule): compare it
 * with kvtier_abi_version() at run time. */
#define KVTIER_ABI_VERSION 0x000100u

/* Budget value meaning "no limit" for kvtier_config_set_budgets. */
#define KVTIER_UNLIMITED SIZE_MAX


/*
 Tiers as `kvtier_page_info.tier` reports them.
 */
#define KVTIER_TIER_HOT 0

#define KVTIER_TIER_WARM 1

#define KVTIER_TIER_COLD 2

#define KVTIER_TIER_EVICTED 3

/*
 `kvtier_page_info.last_attended` of a page no observed step has attended.
 */
#define KVTIER_NEVER UINT64_MAX

/*
 The result of a kvtier call. `KVTIER_STATUS_OK` (0) is success; every other value names what
 went wrong, and `kvtier_last_error` gives the message.

 Numbers are permanent: a code is never renumbered and a retired number is never reused, so a
 program may store, log and compare them across library versions. New codes may be added in any
 release: treat an unknown value as a generic failure. Function documentation names the codes
 it can return without the `KVTIER_STATUS_` prefix.
 */
enum kvtier_status
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /*
     Success.
     */
    KVTIER_STATUS_OK = 0,
    /*
     A required pointer (handle, out-parameter, or array with a non-zero count) was NULL.
     */
    KVTIER_STATUS_NULL_PARAMETER = 1,
    /*
     kvtier panicked inside the call (a bug: please report it with the last error text).
     */
    KVTIER_STATUS_PANIC = 2,
    /*
     A value is not meaningful at the C boundary: an unknown enum value, a pointer not aligned
     for its type, or sizes whose product overflows.
     */
    KVTIER_STATUS_INVALID_ARGUMENT = 3,
    /*
     An output buffer holds fewer elements (or bytes) than the call must write.
     */
    KVTIER_STATUS_BUFFER_TOO_SMALL = 4,
    /*
     An earlier call panicked while changing this cache; it can only be freed now.
     */
    KVTIER_STATUS_POISONED = 5,
    /*
     A configuration field is out of range or inconsistent with another.
     */
    KVTIER_STATUS_INVALID_CONFIG = 100,
    /*
     An array has the wrong number of elements for the shape it must have.
     */
    KVTIER_STATUS_SHAPE = 101,
    /*
     A tensor has an element type kvtier does not accept there.
     */
    KVTIER_STATUS_DTYPE = 102,
    /*
     The sequence id is not (or no longer) in the cache.
     */
    KVTIER_STATUS_UNKNOWN_SEQUENCE = 103,
    /*
     The layer index is not below the configured number of layers.
     */
    KVTIER_STATUS_LAYER_OUT_OF_RANGE = 104,
    /*
     The same sequence appears twice in one batched call.
     */
    KVTIER_STATUS_DUPLICATE_SEQUENCE = 105,
    /*
     A sequence would grow past the configured maximum length.
     */
    KVTIER_STATUS_SEQUENCE_TOO_LONG = 106,
    /*
     A tier's byte budget would be exceeded.
     */
    KVTIER_STATUS_BUDGET_EXCEEDED = 107,
    /*
     A NaN or infinity was passed where it would poison the cache.
     */
    KVTIER_STATUS_NON_FINITE = 108,
    /*
     Host or device memory could not be allocated.
     */
    KVTIER_STATUS_OUT_OF_MEMORY = 109,
    /*
     The operation is not available on this backend or in this build (for example device
     attention on a CPU cache).
     */
    KVTIER_STATUS_UNSUPPORTED = 110,
    /*
     Tensor interop (candle) failed. Only in builds with the `candle` feature; no C call
     returns it today.
     */
    KVTIER_STATUS_CANDLE = 111,
    /*
     Retired: the real-model layer left the core (feature `model`), so no C call returns it.
     The number stays taken.
     */
    KVTIER_STATUS_MODEL = 112,
    /*
     A finite value is beyond the range of the storage dtype (for example above 65504 for f16
     hot pages); nothing was stored.
     */
    KVTIER_STATUS_OUT_OF_RANGE = 113,
    /*
     A page reference names no page (page index past the sequence's pages).
     */
    KVTIER_STATUS_UNKNOWN_PAGE = 114,
    /*
     A page move is not possible from the page's state (pinned, wrong tier, still being
     written); nothing was changed.
     */
    KVTIER_STATUS_INVALID_MOVE = 115,
    /*
     Attention statistics passed to observe do not match the cache as it is now.
     */
    KVTIER_STATUS_STALE = 116,
    /*
     Attention over finite inputs overflowed f32; no result is returned.
     */
    KVTIER_STATUS_OVERFLOW = 117,
    /*
     A broken internal invariant: a kvtier bug, never the caller's fault (please report it).
     */
    KVTIER_STATUS_INTERNAL = 118,
    /*
     Reading or writing a spilled page's file failed (disk full, permissions, I/O); nothing
     was changed.
     */
    KVTIER_STATUS_DISK = 119,
    /*
     A page read back from disk failed its integrity check (torn, truncated or corrupted).
     */
    KVTIER_STATUS_CORRUPT_PAGE = 120,
    /*
     A saved sequence file is damaged or not a kvtier sequence file; nothing was restored.
     */
    KVTIER_STATUS_CORRUPT_FILE = 121,
    /*
     A saved sequence was written under a different cache configuration; nothing was restored.
     */
    KVTIER_STATUS_CONFIG_MISMATCH = 122,
    /*
     A shared page store (memory, directory, Redis / Valkey) failed: connection, timeout,
     server or I/O error; the cache is unchanged (prefill locally instead).
     */
    KVTIER_STATUS_REMOTE = 123,
    /*
     The requested backend was not compiled into this library (for example CUDA without the
     `cuda` feature).
     */
    KVTIER_STATUS_BACKEND_NOT_COMPILED = 200,
    /*
     No such device, or no driver for it.
     */
    KVTIER_STATUS_NO_DEVICE = 201,
    /*
     The device driver reported an error.
     */
    KVTIER_STATUS_DEVICE_ERROR = 202,
    /*
     A device kernel failed to compile.
     */
    KVTIER_STATUS_KERNEL_COMPILE = 203,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum kvtier_status kvtier_status;
#else
typedef uint32_t kvtier_status;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 Named starting points (pass as `uint32_t`).
 */
enum kvtier_preset
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /*
     int4 keys and values (KIVI-4), f16 hot pages, 128-token hot window, 4 sink tokens: 3.15x
     smaller than f16 in device bytes (measured at 32K tokens, 32/8/128; the format allows at
     most 3.20x). The same as `kvtier_config_new`.
     */
    KVTIER_PRESET_BALANCED = 0,
    /*
     int8 keys and values, 256-token hot window, first and last layer exact: near-lossless,
     1.76x smaller than f16 (measured as for Balanced; the format allows at most 1.78x).
     */
    KVTIER_PRESET_QUALITY = 1,
    /*
     int4 keys, int2 values, 64-token hot window: 3.94x smaller than f16 (measured as for
     Balanced; the format allows at most 4.00x).
     */
    KVTIER_PRESET_COMPACT = 2,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum kvtier_preset kvtier_preset;
#else
typedef uint32_t kvtier_preset;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 Element type of hot (exact) pages (pass as `uint32_t`).
 */
enum kvtier_hot_dtype
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    KVTIER_HOT_DTYPE_F32 = 0,
    KVTIER_HOT_DTYPE_F16 = 1,
    KVTIER_HOT_DTYPE_BF16 = 2,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum kvtier_hot_dtype kvtier_hot_dtype;
#else
typedef uint32_t kvtier_hot_dtype;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 Which vectors a cache rotates before storing them (pass as `uint32_t`): see `Rotation`.
 */
enum kvtier_rotation
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /*
     Nothing is rotated (the default).
     */
    KVTIER_ROTATION_NONE = 0,
    /*
     Keys (and so queries) are rotated.
     */
    KVTIER_ROTATION_KEYS = 1,
    /*
     Keys, queries and values; the attention output is rotated back.
     */
    KVTIER_ROTATION_KEYS_VALUES = 2,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum kvtier_rotation kvtier_rotation;
#else
typedef uint32_t kvtier_rotation;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 The CPU kernel path of a cache's CPU storage (see `CpuKernel` in the Rust docs).
 */
enum kvtier_cpu_kernel
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /*
     `KVTIER_CPU_KERNEL` from the environment if set, else the fastest path this CPU runs (the
     default).
     */
    KVTIER_CPU_KERNEL_AUTO = 0,
    /*
     AVX-512 (F/BW/DQ/VL, VNNI): warm key scores as integer dot products with a query quantised
     to 16 bits per page (bounded extra error, below the key quantisation error).
     */
    KVTIER_CPU_KERNEL_AVX512 = 1,
    /*
     AVX2 + FMA + F16C, f32 scores.
     */
    KVTIER_CPU_KERNEL_AVX2 = 2,
    /*
     Portable code, f32 scores.
     */
    KVTIER_CPU_KERNEL_PORTABLE = 3,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum kvtier_cpu_kernel kvtier_cpu_kernel;
#else
typedef uint32_t kvtier_cpu_kernel;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 Element type of keys, values and queries handed to the `_typed` calls (pass as `uint32_t`).
 F16 and BF16 elements are 16-bit patterns (`uint16_t`, `_Float16`, `__bf16`).
 */
enum kvtier_dtype
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    KVTIER_DTYPE_F32 = 0,
    KVTIER_DTYPE_F16 = 1,
    KVTIER_DTYPE_BF16 = 2,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum kvtier_dtype kvtier_dtype;
#else
typedef uint32_t kvtier_dtype;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 A page move (pass as `uint32_t` to `kvtier_cache_move`).
 */
enum kvtier_move_op
#if defined(__cplusplus) || __STDC_VERSION__ >= 202311L
  : uint32_t
#endif // defined(__cplusplus) || __STDC_VERSION__ >= 202311L
 {
    /*
     Hot -> warm at (`k_bits`, `v_bits`), or a warm page to fewer bits.
     */
    KVTIER_MOVE_OP_DEMOTE = 0,
    /*
     Warm or cold -> hot (exactly, from the archive, when it has a copy).
     */
    KVTIER_MOVE_OP_PROMOTE = 1,
    /*
     Drop the page for good (its positions stay, never attended again).
     */
    KVTIER_MOVE_OP_EVICT = 2,
    /*
     Hot or warm -> cold (host RAM); attention still reads it.
     */
    KVTIER_MOVE_OP_TO_COLD = 3,
    /*
     Cold -> the tier it left.
     */
    KVTIER_MOVE_OP_FROM_COLD = 4,
    /*
     Pin: the page refuses demote, evict and to_cold.
     */
    KVTIER_MOVE_OP_PIN = 5,
    /*
     Remove the caller's pin.
     */
    KVTIER_MOVE_OP_UNPIN = 6,
};
#ifndef __cplusplus
#if __STDC_VERSION__ >= 202311L
typedef enum kvtier_move_op kvtier_move_op;
#else
typedef uint32_t kvtier_move_op;
#endif // __STDC_VERSION__ >= 202311L
#endif // __cplusplus

/*
 A KV cache for one model. Opaque: make one with `kvtier_cache_new` (or `_new_cuda`), free it
 with `kvtier_cache_free`. Thread-safe: calls that take `const kvtier_cache *` may run
 concurrently; calls that change it are serialised by an internal lock.
 */
typedef struct kvtier_cache kvtier_cache;

/*
 A cache configuration: model shape, page geometry, warm-tier precision, budgets. Opaque: make
 one with `kvtier_config_new` or `kvtier_config_new_preset`, adjust it with the setters, pass it
 to `kvtier_cache_new` (which copies it) and free it with `kvtier_config_free`.
 */
typedef struct kvtier_config kvtier_config;

/*
 A retention policy. Opaque: make one with `kvtier_policy_new`, free it with
 `kvtier_policy_free`. One policy may serve many caches and sequences; calls on it are
 serialised by an internal lock.
 */
typedef struct kvtier_policy kvtier_policy;

/*
 A shared page store for one model in one namespace (see `kvtier::prefix`). Safe to use from
 several threads at once.
 */
typedef struct kvtier_prefix_store kvtier_prefix_store;

/*
 A protect session for one sequence. Opaque: `kvtier_protect_new`, `kvtier_protect_free`.
 Calls on one session are serialised by an internal lock; the cache is locked for writing only
 while the session heals or releases.
 */
typedef struct kvtier_protect kvtier_protect;

/*
 Working memory of decode steps (the device plan and its staging), and at most one step queued by
 `kvtier_cache_attend_device_async` and not yet finished. Keep one per layer for steps queued
 layer after layer. Free with `kvtier_step_free`. Thread-safe (calls on one handle are
 serialised).
 */
typedef struct kvtier_step kvtier_step;

/*
 The sizes a caller needs to shape its buffers. Arrays of the ABI are row-major:
 keys and values `[n_tokens][num_kv_heads][head_dim]`, queries and outputs
 `[n][num_q_heads][head_dim]`.
 */
typedef struct kvtier_shape {
    size_t num_layers;
    size_t num_q_heads;
    size_t num_kv_heads;
    size_t head_dim;
    /*
     Token positions per page.
     */
    size_t page_size;
    /*
     Longest sequence accepted, per layer.
     */
    size_t max_seq_len;
} kvtier_shape;

/*
 Bytes a cache has actually allocated, per tier, metadata included.
 */
typedef struct kvtier_memory_report {
    /*
     Exact pages (K and V).
     */
    size_t hot_bytes;
    /*
     Quantised pages: packed codes plus their minimums and steps.
     */
    size_t warm_bytes;
    /*
     Cold tier (host RAM): pages that left the device and are not already in the archive.
     */
    size_t cold_bytes;
    /*
     Bookkeeping: slot tables, free lists, page tables, the sequence map.
     */
    size_t metadata_bytes;
    /*
     hot + warm + metadata.
     */
    size_t device_bytes;
    /*
     device + cold + archive.
     */
    size_t total_bytes;
    /*
     Tokens stored, summed over sequences and layers.
     */
    size_t tokens;
    size_t hot_pages;
    size_t warm_pages;
    /*
     What the same tokens take as plain f16 K and V.
     */
    size_t f16_equivalent_bytes;
    /*
     f16_equivalent_bytes / device_bytes (higher is smaller).
     */
    double compression;
    /*
     Lossless archive (host RAM): exact copies of pages that left the hot tier.
     */
    size_t archive_bytes;
    size_t cold_pages;
    size_t evicted_pages;
    /*
     Pages with an archive copy.
     */
    size_t archived_pages;
    /*
     Archive and cold pages spilled to disk (`kvtier_config_set_spill`): bytes of their live
     records (payload, header, checksum), and how many pages. Not in `total_bytes` (memory).
     */
    size_t disk_bytes;
    size_t disk_pages;
    /*
     Bytes of the page files: live records plus freed space not yet compacted away.
     */
    size_t disk_file_bytes;
    /*
     Tokens in evicted pages (counted in `tokens`, never attended).
     */
    size_t evicted_tokens;
    /*
     Pages named by more than one sequence (`kvtier_cache_sequence_fork`): page counts and
     bytes count each once, `tokens` counts every sequence's tokens.
     */
    size_t shared_pages;
} kvtier_memory_report;

/*
 Events that did not fail a call but that a caller may want to see.
 */
typedef struct kvtier_counters {
    /*
     Pages quantised from hot to warm (or to fewer bits).
     */
    uint64_t demotions;
    /*
     Pages the default policy left hot: not representable in the warm format, a budget was
     full, or memory ran out.
     */
    uint64_t demotions_skipped;
    /*
     Pages brought back to hot.
     */
    uint64_t promotions;
    /*
     Pages evicted.
     */
    uint64_t evictions;
    /*
     Pages moved to the cold tier.
     */
    uint64_t to_cold;
    /*
     Pages moved back from the cold tier.
     */
    uint64_t from_cold;
} kvtier_counters;

/*
 Statistics of one query head's attention distribution in one step.
 */
typedef struct kvtier_head_stats {
    /*
     Shannon entropy (nats) of the attention weights.
     */
    float entropy;
    /*
     Varentropy: variance of the surprisal `-log p` under the weights.
     */
    float varentropy;
    /*
     Largest scaled score (`-INFINITY` for an empty sequence).
     */
    float max_score;
    /*
     `log sum exp(score)` over the attended tokens (`-INFINITY` for an empty sequence).
     */
    float log_z;
} kvtier_head_stats;

/*
 Where an attention call writes its statistics: any pair with a count of 0 is not wanted (its
 pointer is ignored and may be NULL); otherwise the pointer must be non-NULL and the count at
 least what the call writes. Pass NULL instead of this struct to skip all statistics. A call
 that wants neither `page_mass` nor `page_offsets` skips the per-page results altogether (on a
 GPU: the per-page fold and its copy back); one that wants them gets page masses only (on a GPU
 folded on the device: `n_pages * num_kv_heads` floats come back).
 */
typedef struct kvtier_attention_stats {
    /*
     `[n_seqs][num_q_heads]`: per sequence of the batch, per query head.
     */
    struct kvtier_head_stats *heads;
    size_t heads_len;
    /*
     The attention mass of every page (sum of its tokens' softmax weights, averaged over the
     query heads), the pages of batch entry 0 first; each sequence's masses sum to 1. Needs the
     total page count of the batch (see `kvtier_cache_sequence_pages`).
     */
    float *page_mass;
    size_t page_mass_len;
    /*
     `[n_seqs + 1]`: batch entry `i`'s masses are `page_mass[page_offsets[i] ..
     page_offsets[i + 1]]`; `page_offsets[n_seqs]` is the total page count.
     */
    size_t *page_offsets;
    size_t page_offsets_len;
} kvtier_attention_stats;

/*
 What one eliminated decode step skipped.
 */
typedef struct kvtier_elimination_report {
    /*
     (page, kv head) pairs that could be skipped (bounded, not hot), and those skipped.
     */
    size_t candidates;
    size_t skipped_pages;
    /*
     Tokens skipped, summed over kv heads.
     */
    size_t skipped_tokens;
    /*
     Super-pages skipped whole (with `super_group >= 2`).
     */
    size_t super_skips;
    /*
     The largest proven bound on the skipped softmax mass over the batch's q heads (<= epsilon).
     */
    float max_mass_bound;
} kvtier_elimination_report;

/*
 What the cache knows about one page.
 */
typedef struct kvtier_page_info {
    /*
     `KVTIER_TIER_*`.
     */
    uint32_t tier;
    /*
     Valid tokens (page_size except for the last page).
     */
    uint32_t n_tokens;
    /*
     Code widths (warm pages and cold pages that were warm).
     */
    uint32_t k_bits;
    uint32_t v_bits;
    /*
     Pinned by the caller.
     */
    bool pinned;
    /*
     Holds attention-sink positions (never leaves the hot tier by policy).
     */
    bool sink;
    /*
     Has an exact copy in the archive.
     */
    bool archived;
    /*
     Was promoted (the default hot-window rule leaves it hot).
     */
    bool promoted;
    /*
     Accumulated attention mass summed over kv heads (see `kvtier_config_set_mass_decay`).
     */
    float mass;
    /*
     Observe step at which the page was last attended, `KVTIER_NEVER` if none.
     */
    uint64_t last_attended;
} kvtier_page_info;

/*
 Disk reads of a spilling cache, cumulative over its life. A decode step's cost is the
 difference across it (see also `kvtier_compaction`).
 */
typedef struct kvtier_disk_stats {
    /*
     Spilled pages read back (attention, promotion, from-cold), and their record bytes.
     */
    uint64_t pages_read;
    uint64_t bytes_read;
    /*
     Reads asked of the prefetch thread, and those it completed into its buffer.
     */
    uint64_t prefetch_requested;
    uint64_t prefetched;
    /*
     Reads of spilled pages served from the buffer, after waiting for a read in flight, and
     read synchronously.
     */
    uint64_t hits;
    uint64_t waited;
    uint64_t misses;
    /*
     Time readers waited for reads in flight, and spent in synchronous reads, in ns.
     */
    uint64_t wait_ns;
    uint64_t sync_read_ns;
    /*
     Host pages written to disk, and moves refused because a spill failed (nothing lost).
     */
    uint64_t spills;
    uint64_t spill_failures;
    /*
     Compactions run, and those stopped by an I/O error (nothing lost).
     */
    uint64_t compactions;
    uint64_t compaction_failures;
} kvtier_disk_stats;

/*
 What one compaction of a spilling cache's page files did.
 */
typedef struct kvtier_compaction {
    /*
     Records moved out of sparse segment files, and their bytes.
     */
    uint64_t pages_moved;
    uint64_t bytes_moved;
    /*
     File bytes given back.
     */
    uint64_t bytes_reclaimed;
    /*
     Records left in place because they failed their integrity check.
     */
    uint64_t corrupt_left;
} kvtier_compaction;

/*
 What a lookup, import, publish or flush did (fields a call does not set stay 0).
 */
typedef struct kvtier_prefix_report {
    /*
     Leading prompt tokens available (lookup) or now in the sequence (import).
     */
    uint64_t tokens;
    /*
     Pages imported (per layer).
     */
    uint64_t pages;
    /*
     Record bytes read (import) or written (publish, flush).
     */
    uint64_t bytes;
    /*
     Records that failed their check; the import stopped before the first one.
     */
    uint64_t corrupt;
    /*
     Records written, records the store already had, and full pages with no exact copy
     (publish, flush; `queued` for an asynchronous publish).
     */
    uint64_t written;
    uint64_t present;
    uint64_t not_exact;
    uint64_t queued;
    /*
     Time spent waiting for the store (import), in ns.
     */
    uint64_t fetch_ns;
} kvtier_prefix_report;

/*
 Settings of a protect session. Pass NULL to `kvtier_protect_new` for the defaults
 (`kvtier_protect_options_default`).
 */
typedef struct kvtier_protect_options {
    /*
     In `[0, 1]`: the monitor fires on about `sensitivity / 10` of the steps (default 0.85).
     */
    float sensitivity;
    /*
     Pages promoted per layer on one firing (default 4).
     */
    size_t pages_per_layer;
    /*
     Most healed pages per layer at once (default 4).
     */
    size_t max_pages_per_layer;
    /*
     Calm steps after which healed pages are released (default 32).
     */
    uint64_t hold;
} kvtier_protect_options;

/*
 The monitor's judgement of one step.
 */
typedef struct kvtier_verdict {
    /*
     `1 - H / ln(vocab)` of the logits, in `[0, 1]`.
     */
    float health;
    float logit_entropy;
    float logit_varentropy;
    /*
     Means over the head statistics passed in (NaN when none were).
     */
    float attention_entropy;
    float attention_varentropy;
    /*
     -1 during warm-up; else 0 confident, 1 uncertain, 2 branching, 3 lost (entropix).
     */
    int32_t regime;
    /*
     The monitor fired on this step and the session healed.
     */
    bool fired;
    /*
     The varentropy threshold the step was judged against (NaN during warm-up).
     */
    float threshold;
    /*
     Pages promoted by this step's healing (all layers).
     */
    size_t promoted_pages;
} kvtier_verdict;

/*
 One healing event, as `kvtier_protect_next_event` returns it.
 */
typedef struct kvtier_heal_event {
    /*
     Step of the session (0-based) after which healing ran.
     */
    uint64_t step;
    float health;
    float varentropy;
    float threshold;
    size_t promoted_pages;
    size_t promoted_bytes;
} kvtier_heal_event;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/*
 A config with the default settings (the balanced preset) for a model with `num_layers` layers,
 `num_q_heads` query heads, `num_kv_heads` key/value heads (dividing `num_q_heads`) and
 `head_dim` channels per head (a multiple of 32, at most 512). On success `*config_out` holds a
 new handle to free with `kvtier_config_free`.

 Errors: `NULL_PARAMETER` (`config_out`), `INVALID_CONFIG` (the shape).

 # Safety

 `config_out` must be valid for a write of one pointer.
 */
kvtier_status kvtier_config_new(size_t num_layers,
                                size_t num_q_heads,
                                size_t num_kv_heads,
                                size_t head_dim,
                                struct kvtier_config **config_out);

/*
 A config from a preset (`preset` is a `kvtier_preset` value), for the model shape as in
 `kvtier_config_new`.

 Errors: `NULL_PARAMETER` (`config_out`), `INVALID_ARGUMENT` (unknown preset), `INVALID_CONFIG`.

 # Safety

 `config_out` must be valid for a write of one pointer.
 */
kvtier_status kvtier_config_new_preset(uint32_t preset,
                                       size_t num_layers,
                                       size_t num_q_heads,
                                       size_t num_kv_heads,
                                       size_t head_dim,
                                       struct kvtier_config **config_out);

/*
 Frees a config. NULL is a no-op. Caches made from it are not affected (they hold a copy).

 # Safety

 `config` must be NULL or a handle from `kvtier_config_new*` that was not freed yet; it must not
 be used again, nor by another thread during this call.
 */
void kvtier_config_free(struct kvtier_config *config);

/*
 Sets the tokens per page (a multiple of 8 in 8..=256; default 32).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_page_size(struct kvtier_config *config, size_t page_size);

/*
 Sets the element type of hot pages (`dtype` is a `kvtier_hot_dtype` value; default F16).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_ARGUMENT` (unknown dtype).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_hot_dtype(struct kvtier_config *config, uint32_t dtype);

/*
 Sets how many leading tokens of every sequence stay hot forever (attention sinks; default 4).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_sink_tokens(struct kvtier_config *config, size_t sink_tokens);

/*
 Sets how many recent tokens stay hot (exact); older full pages are quantised to the warm tier.

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_hot_window(struct kvtier_config *config, size_t hot_window);

/*
 Sets the warm-tier code widths of keys and values (each 8, 4, 3 or 2; on CUDA 3-bit pages
 decode on the CUDA-core path, the others on tensor cores).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (a width is not 8, 4, 3 or 2; the config
 is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_bits(struct kvtier_config *config,
                                     uint32_t k_bits,
                                     uint32_t v_bits);

/*
 Sets the channels per value quantisation group (a multiple of 32 dividing head_dim; default 32).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_value_group(struct kvtier_config *config, size_t value_group);

/*
 Sets the layers kept entirely exact (each below num_layers), replacing the previous list.
 `layers` may be NULL when `n_layers` is 0 (no protected layer).

 Errors: `NULL_PARAMETER` (`config`, or `layers` with `n_layers > 0`), `INVALID_ARGUMENT`
 (misaligned `layers`), `INVALID_CONFIG` (the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`; `layers` must point to
 `n_layers` readable `size_t`s (or `n_layers` is 0).
 */
kvtier_status kvtier_config_set_protected_layers(struct kvtier_config *config,
                                                 const size_t *layers,
                                                 size_t n_layers);

/*
 Enables (default) or disables the warm tier. Disabled, every page stays hot and exact: the
 full-precision reference cache.

 Errors: `NULL_PARAMETER` (`config`).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_warm_enabled(struct kvtier_config *config, bool enabled);

/*
 Keeps (default) or drops the lossless archive: with it, every page that leaves the hot tier
 keeps its exact bytes in host RAM (reported as `archive_bytes`), so a promoted page is restored
 bit for bit.

 Errors: `NULL_PARAMETER` (`config`).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_archive(struct kvtier_config *config, bool enabled);

/*
 Sets the per-step decay of the attention mass accumulated per page by observing attention
 (in (0, 1]; default 1: plain accumulation, as H2O).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_mass_decay(struct kvtier_config *config, float decay);

/*
 Sets the byte budgets of the hot, warm and cold tiers (bytes actually allocated, metadata
 included); `KVTIER_UNLIMITED` (`SIZE_MAX`, the default) means no limit.

 Errors: `NULL_PARAMETER` (`config`).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_budgets(struct kvtier_config *config,
                                        size_t hot_bytes,
                                        size_t warm_bytes,
                                        size_t cold_bytes);

/*
 Sets the longest sequence accepted per layer (1..=UINT32_MAX; default 2^20).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_max_seq_len(struct kvtier_config *config, size_t max_seq_len);

/*
 Sets the softmax scale applied to q·k; 0 restores the default `1/sqrt(head_dim)`. Any other
 value must be finite and positive.

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_softmax_scale(struct kvtier_config *config, float scale);

/*
 Writes the config's shape (layers, heads, head_dim, page size, max length) to `*shape_out`.

 Errors: `NULL_PARAMETER` (`config`, `shape_out`).

 # Safety

 `config` must be NULL or a live handle; `shape_out` must be valid for a write of one
 `kvtier_shape`.
 */
kvtier_status kvtier_config_shape(const struct kvtier_config *config,
                                  struct kvtier_shape *shape_out);

/*
 Sets the seeded Walsh-Hadamard rotation applied before storage (`mode` is a `kvtier_rotation`
 value) and the seed of its per-layer sign vectors. Scores are unchanged in exact arithmetic;
 outputs and read-backs stay in model space; `kvtier_cache_attend_device` rotates the queries
 into its own device buffer (the caller's are left as they are) and the output back in place.

 Errors: `NULL_PARAMETER` (`config`), `INVALID_ARGUMENT` (unknown mode).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_rotation(struct kvtier_config *config,
                                         uint32_t mode,
                                         uint64_t seed);

/*
 Sets how many key channels per warm page and kv head are kept exact (f16) beside the codes:
 the page's widest-range channels (0, the default: none; at most head_dim / 4). On CUDA such
 pages decode on the CUDA-core path (not tensor cores).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (too many; the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_key_outliers(struct kvtier_config *config, size_t channels);

/*
 Fits each value group's range to the least squared error (`fit` true) instead of taking its
 minimum and maximum (false, the default): the same bytes, about 0.6x the squared error at
 2 bits, a value error bound of one step instead of half a step, and ~10-20x the quantisation
 work at demotion. CPU storage only: CUDA and Metal cache creation fails with `UNSUPPORTED`.

 Errors: `NULL_PARAMETER` (`config`).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_value_fit(struct kvtier_config *config, bool fit);

/*
 Sets the warm code widths of one layer (each 8, 4, 3 or 2), overriding `kvtier_config_set_bits`
 there; a second call for the same layer replaces the first.

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (a width is not 8, 4, 3 or 2, or `layer`
 is not below num_layers; the config is left unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_layer_bits(struct kvtier_config *config,
                                           size_t layer,
                                           uint32_t k_bits,
                                           uint32_t v_bits);

/*
 Removes every per-layer width: all layers use the config's widths again.

 Errors: `NULL_PARAMETER` (`config`).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_clear_layer_bits(struct kvtier_config *config);

/*
 Spills the archive and cold pages to page files in `dir` once they hold more than
 `host_ram_bytes` of RAM (least recently used first; `disk_bytes` bounds the files,
 `KVTIER_UNLIMITED` for no limit). `dir` NULL turns spilling off. The directory is created if
 missing; the cache writes only its own files there (mode 0600) and removes them when freed.
 A background thread reads the next layer's spilled pages ahead while a layer is attended.
 Disk failures later surface as `DISK` (nothing changed) and failed integrity checks of pages
 read back as `CORRUPT_PAGE`.

 Errors: `NULL_PARAMETER` (`config`), `INVALID_ARGUMENT` (`dir` not UTF-8).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`; `dir` NULL or a
 NUL-terminated string.
 */
kvtier_status kvtier_config_set_spill(struct kvtier_config *config,
                                      const char *dir,
                                      size_t host_ram_bytes,
                                      size_t disk_bytes);

/*
 Gives the cache its own pool of `threads` worker threads for attention and prefill (0, the
 default: rayon's global pool, one thread per core, shared by every cache of the process).
 Results do not depend on the count.

 Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (more than 1024; the config is left
 unchanged).

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_threads(struct kvtier_config *config, size_t threads);

/*
 Chooses the CPU kernel path (`kernel` is a `kvtier_cpu_kernel` value).

 Errors: `NULL_PARAMETER` (`config`), `INVALID_ARGUMENT` (unknown value), `INVALID_CONFIG`
 (this CPU cannot run that path); the config is unchanged on error.

 # Safety

 `config` must be NULL or a live handle from `kvtier_config_new*`.
 */
kvtier_status kvtier_config_set_cpu_kernel(struct kvtier_config *config, uint32_t kernel);

/*
 A cache on the CPU backend, configured by a copy of `config`. On success `*cache_out` holds a
 new handle to free with `kvtier_cache_free`.

 Errors: `NULL_PARAMETER` (`config`, `cache_out`), `OUT_OF_MEMORY`.

 # Safety

 `config` must be NULL or a live config handle; `cache_out` must be valid for a write of one
 pointer.
 */
kvtier_status kvtier_cache_new(const struct kvtier_config *config, struct kvtier_cache **cache_out);

/*
 A cache whose pages live on CUDA device `ordinal`. Only a library built with the `cuda`
 feature can make one; otherwise this returns `KVTIER_STATUS_BACKEND_NOT_COMPILED`.

 Errors: `NULL_PARAMETER`, `BACKEND_NOT_COMPILED`, `NO_DEVICE`, `DEVICE_ERROR`,
 `KERNEL_COMPILE`, `OUT_OF_MEMORY`.

 # Safety

 As `kvtier_cache_new`.
 */
kvtier_status kvtier_cache_new_cuda(const struct kvtier_config *config,
                                    size_t ordinal,
                                    struct kvtier_cache **cache_out);

/*
 A cache whose pages live on the system's default Metal device (macOS). Only a library built
 for macOS with the `metal` feature can make one; otherwise this returns
 `KVTIER_STATUS_BACKEND_NOT_COMPILED`. `kvtier_cache_attend_device` on it takes `id<MTLBuffer>`
 handles (shared storage) and a NULL stream.

 Errors: `NULL_PARAMETER`, `BACKEND_NOT_COMPILED`, `NO_DEVICE`, `KERNEL_COMPILE`,
 `UNSUPPORTED` (a config the Metal kernels do not handle: key outlier channels, head_dim above
 256), `OUT_OF_MEMORY`.

 # Safety

 As `kvtier_cache_new`.
 */
kvtier_status kvtier_cache_new_metal(const struct kvtier_config *config,
                                     struct kvtier_cache **cache_out);

/*
 Frees a cache and every page it holds. NULL is a no-op.

 # Safety

 `cache` must be NULL or a handle from `kvtier_cache_new*` that was not freed yet; no other
 thread may use it during or after this call.
 */
void kvtier_cache_free(struct kvtier_cache *cache);

/*
 Writes the cache's shape to `*shape_out`.

 Errors: `NULL_PARAMETER`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `shape_out` must be valid for a write of one
 `kvtier_shape`.
 */
kvtier_status kvtier_cache_shape(const struct kvtier_cache *cache, struct kvtier_shape *shape_out);

/*
 Starts a new, empty sequence and writes its id to `*seq_out`. Ids are never reused within a
 cache.

 Errors: `NULL_PARAMETER`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `seq_out` must be valid for a write of one `uint64_t`.
 */
kvtier_status kvtier_cache_sequence_add(struct kvtier_cache *cache, uint64_t *seq_out);

/*
 Removes a sequence and frees all its pages; its id becomes unknown.

 Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle.
 */
kvtier_status kvtier_cache_sequence_remove(struct kvtier_cache *cache, uint64_t seq);

/*
 Frees all pages of a sequence and sets its length to 0 in every layer; the id stays valid.

 Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle.
 */
kvtier_status kvtier_cache_sequence_reset(struct kvtier_cache *cache, uint64_t seq);

/*
 Writes the number of tokens stored for `seq` in `layer` to `*len_out`.

 Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `len_out` must be valid for a write of one `size_t`.
 */
kvtier_status kvtier_cache_sequence_len(const struct kvtier_cache *cache,
                                        uint64_t seq,
                                        size_t layer,
                                        size_t *len_out);

/*
 Writes the number of pages `seq` occupies in `layer` (`ceil(len / page_size)`) to
 `*pages_out`: the number of page masses `kvtier_cache_attend` reports for it.

 Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `pages_out` must be valid for a write of one `size_t`.
 */
kvtier_status kvtier_cache_sequence_pages(const struct kvtier_cache *cache,
                                          uint64_t seq,
                                          size_t layer,
                                          size_t *pages_out);

/*
 Appends `n` tokens' keys (after RoPE) and values to `seq` in `layer`. `keys` and `values` are
 `[n][num_kv_heads][head_dim]` row-major, `keys_len` and `values_len` their element counts (equal,
 a multiple of `num_kv_heads * head_dim`; 0 appends nothing and allows NULL). Pages that leave
 the hot window are then quantised to the warm tier.

 Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (misaligned array), `SHAPE`, `NON_FINITE`,
 `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `SEQUENCE_TOO_LONG`, `BUDGET_EXCEEDED`,
 `OUT_OF_MEMORY`, `POISONED`. On error the cache is unchanged.

 # Safety

 `cache` must be NULL or a live handle; `keys` and `values` must point to `keys_len` and
 `values_len` readable floats (or the count is 0).
 */
kvtier_status kvtier_cache_append(struct kvtier_cache *cache,
                                  uint64_t seq,
                                  size_t layer,
                                  const float *keys,
                                  size_t keys_len,
                                  const float *values,
                                  size_t values_len);

/*
 Chunked prefill of `n` new tokens of `seq` in `layer`: causal attention of each new query over
 the cached tokens (as stored) and the new tokens up to itself, then the new keys and values are
 appended. `queries` is `[n][num_q_heads][head_dim]`, `keys` and `values` are
 `[n][num_kv_heads][head_dim]`; `output` receives `[n][num_q_heads][head_dim]`, so
 `output_len >= queries_len`. `output` may alias `queries`.

 The attention runs under the handle's shared lock (prefills of different sequences compute at
 once from several threads); the append takes it exclusively.

 Errors: as `kvtier_cache_append`, plus `BUFFER_TOO_SMALL` (`output`) and `STALE` (another
 thread changed this sequence in this layer during the call). On error neither the cache nor
 `output` is changed.

 # Safety

 `cache` must be NULL or a live handle; each input array must hold its count of readable floats
 and `output` `output_len` writable floats (or the count is 0).
 */
kvtier_status kvtier_cache_prefill(struct kvtier_cache *cache,
                                   uint64_t seq,
                                   size_t layer,
                                   const float *queries,
                                   size_t queries_len,
                                   const float *keys,
                                   size_t keys_len,
                                   const float *values,
                                   size_t values_len,
                                   float *output,
                                   size_t output_len);

/*
 Writes the bytes the cache has allocated, per tier, to `*report_out`.

 Errors: `NULL_PARAMETER`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `report_out` must be valid for a write of one
 `kvtier_memory_report`.
 */
kvtier_status kvtier_cache_memory_report(const struct kvtier_cache *cache,
                                         struct kvtier_memory_report *report_out);

/*
 Writes the cache's event counters to `*counters_out`.

 Errors: `NULL_PARAMETER`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `counters_out` must be valid for a write of one
 `kvtier_counters`.
 */
kvtier_status kvtier_cache_counters(const struct kvtier_cache *cache,
                                    struct kvtier_counters *counters_out);

/*
 Decode attention in `layer` for a batch of `n_seqs` sequences, one query token each, over every
 stored token of each sequence (hot pages exact, warm pages read as quantised).

 `seqs` holds the `n_seqs` distinct sequence ids; `queries` is `[n_seqs][num_q_heads][head_dim]`
 (`queries_len` elements); `output` receives the same shape, so `output_len` must be at least
 `n_seqs * num_q_heads * head_dim`; it may alias `queries`. `stats` may be NULL, or name buffers for per-head
 statistics and per-page attention masses. `n_seqs == 0` is a no-op (NULL arrays allowed).

 Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT`, `BUFFER_TOO_SMALL`, `SHAPE`, `NON_FINITE`,
 `UNKNOWN_SEQUENCE`, `DUPLICATE_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `POISONED`. On error no buffer
 is written.

 # Safety

 `cache` must be NULL or a live handle; `seqs` and `queries` must hold their counts of readable
 elements, `output` `output_len` writable floats, and the buffers named in `*stats` (when `stats`
 is not NULL) their counts of writable elements (any array whose count is 0 may be NULL).
 */
kvtier_status kvtier_cache_attend(const struct kvtier_cache *cache,
                                  size_t layer,
                                  const uint64_t *seqs,
                                  size_t n_seqs,
                                  const float *queries,
                                  size_t queries_len,
                                  float *output,
                                  size_t output_len,
                                  const struct kvtier_attention_stats *stats);

/*
 `kvtier_cache_attend` with the queries and the output in device memory: `queries_device` and
 `output_device` are device addresses of `n_seqs * num_q_heads * head_dim` floats each, on the
 cache's device: `CUdeviceptr`s for CUDA, with `stream` the `CUstream` (NULL for the default
 stream); `id<MTLBuffer>` handles of shared-storage buffers for Metal, with `stream` NULL. Statistics are written to host buffers as for
 `kvtier_cache_attend`.

 A CPU cache returns `KVTIER_STATUS_UNSUPPORTED` (use `kvtier_cache_attend`).

 Errors: as `kvtier_cache_attend`, plus `UNSUPPORTED`, `DEVICE_ERROR`; `NULL_PARAMETER` when a
 device address is 0 and `n_seqs > 0`.

 # Safety

 As `kvtier_cache_attend` for `cache`, `seqs` and `stats`. The device addresses must be live
 allocations of the sizes above on the cache's device, usable from `stream`, and not used by
 anything else until the work queued on `stream` has finished.
 */
kvtier_status kvtier_cache_attend_device(const struct kvtier_cache *cache,
                                         size_t layer,
                                         const uint64_t *seqs,
                                         size_t n_seqs,
                                         uint64_t queries_device,
                                         uint64_t output_device,
                                         void *stream,
                                         const struct kvtier_attention_stats *stats);

/*
 A step handle. With `page_results` false its steps return head statistics only (no per-page
 masses: cheaper on a GPU, see `kvtier_attention_stats`). On success `*step_out` holds a new
 handle to free with `kvtier_step_free`.

 Errors: `NULL_PARAMETER` (`step_out`).

 # Safety

 `step_out` must be valid for a write of one pointer.
 */
kvtier_status kvtier_step_new(bool page_results, struct kvtier_step **step_out);

/*
 Frees a step handle (a step still queued completes on its stream; its result is dropped). NULL
 is a no-op.

 # Safety

 `step` must be NULL or a handle from `kvtier_step_new` not freed yet; no other thread may use it
 during or after this call.
 */
void kvtier_step_free(struct kvtier_step *step);

/*
 `kvtier_cache_attend_device` without waiting: the decode step (and, for a step handle with page
 results, the page-mass fold) is queued on `stream` and the call returns; the output appears in
 `output_device` when the stream gets there, and everything the cache later does on the device
 (appends, page moves) is ordered after the step. `kvtier_cache_finish_device` with the same
 handle and layer returns its statistics; a step never finished costs nothing more, and the next
 step on the handle replaces it.

 Errors: as `kvtier_cache_attend_device` (`UNSUPPORTED` on a CPU cache, and for a batch whose
 sequences hold cold pages: bring them back first); on error nothing is queued.

 # Safety

 As `kvtier_cache_attend_device`; `step` must be NULL or a live step handle. The device buffers
 and `stream` must stay valid until the stream has run the step.
 */
kvtier_status kvtier_cache_attend_device_async(const struct kvtier_cache *cache,
                                               const struct kvtier_step *step,
                                               size_t layer,
                                               const uint64_t *seqs,
                                               size_t n_seqs,
                                               uint64_t queries_device,
                                               uint64_t output_device,
                                               void *stream);

/*
 Waits for the step `kvtier_cache_attend_device_async` queued on `step` in `layer` and writes
 its statistics as `kvtier_cache_attend_device` does (`stats` may be NULL); the step is consumed.
 Page masses can be asked for only from a step handle made with page results.

 Errors: `NULL_PARAMETER`, `LAYER_OUT_OF_RANGE`, `STALE` (nothing pending on `step`, or it was
 queued in another layer), `INVALID_ARGUMENT` (page masses asked of a handle without page
 results), `BUFFER_TOO_SMALL`, `DEVICE_ERROR`; on error no buffer is written.

 # Safety

 `cache` and `step` must be NULL or live handles; the buffers named in `*stats` (when not NULL)
 must hold their counts of writable elements.
 */
kvtier_status kvtier_cache_finish_device(const struct kvtier_cache *cache,
                                         const struct kvtier_step *step,
                                         size_t layer,
                                         const struct kvtier_attention_stats *stats);

/*
 `kvtier_cache_attend` that skips pages whose keys cannot matter: for every q head, the softmax
 mass of the skipped tokens is at most `epsilon` (proven from each page's key bounds; the output
 then differs from full attention by at most `2 epsilon max |v|`; docs/eliminate.md). Hot pages
 are always attended. `super_group` 0 bounds single pages; 2 or more also bounds super-pages of
 that many pages and skips whole ones first (two-level). Skipped pages get mass 0 in `stats`.
 `report_out` may be NULL.

 Errors: as `kvtier_cache_attend`, plus `INVALID_CONFIG` (`epsilon` outside [0, 1),
 `super_group` 1). On error no buffer is written.

 # Safety

 As `kvtier_cache_attend`; `report_out` NULL or valid for a write of one
 `kvtier_elimination_report`.
 */
kvtier_status kvtier_cache_attend_eliminated(const struct kvtier_cache *cache,
                                             size_t layer,
                                             const uint64_t *seqs,
                                             size_t n_seqs,
                                             const float *queries,
                                             size_t queries_len,
                                             float epsilon,
                                             size_t super_group,
                                             float *output,
                                             size_t output_len,
                                             const struct kvtier_attention_stats *stats,
                                             struct kvtier_elimination_report *report_out);

/*
 [`kvtier_cache_append`](super::cache::kvtier_cache_append) for keys and values of any
 `kvtier_dtype` (`dtype`, both arrays the same type). Values beyond the hot dtype's range (above
 65504 for f16 hot pages) are refused with `OUT_OF_RANGE`.

 Errors: as `kvtier_cache_append`, plus `INVALID_ARGUMENT` (unknown dtype), `OUT_OF_RANGE`.

 # Safety

 `cache` must be NULL or a live handle; `keys` and `values` must point to `keys_len` and
 `values_len` readable elements of `dtype` (or the count is 0).
 */
kvtier_status kvtier_cache_append_typed(struct kvtier_cache *cache,
                                        uint64_t seq,
                                        size_t layer,
                                        uint32_t dtype,
                                        const void *keys,
                                        size_t keys_len,
                                        const void *values,
                                        size_t values_len);

/*
 Batched decode append: one token for each of the `n_seqs` distinct sequences `seqs` in
 `layer`. `keys` and `values` are `[n_seqs][num_kv_heads][head_dim]` of `dtype`. The whole batch
 is validated (ids, duplicates, lengths, values, the hot budget) before any sequence changes.

 Errors: as `kvtier_cache_append_typed`, plus `DUPLICATE_SEQUENCE`.

 # Safety

 `cache` must be NULL or a live handle; `seqs` must hold `n_seqs` readable ids and `keys`,
 `values` their counts of readable elements of `dtype` (any array whose count is 0 may be NULL).
 */
kvtier_status kvtier_cache_append_decode(struct kvtier_cache *cache,
                                         size_t layer,
                                         const uint64_t *seqs,
                                         size_t n_seqs,
                                         uint32_t dtype,
                                         const void *keys,
                                         size_t keys_len,
                                         const void *values,
                                         size_t values_len);

/*
 Decode attention over a page selection, with queries of any `kvtier_dtype`, optionally folding
 the step's page masses into the page statistics (`observe`: the call then takes the cache's
 lock exclusively).

 The selection is in CSR form: for batch entry `i` and kv head `h`, the pages attended are
 `sel_pages[sel_offsets[i * num_kv_heads + h] .. sel_offsets[i * num_kv_heads + h + 1]]` (page
 indices, any order, duplicates ignored); `sel_offsets` has `n_seqs * num_kv_heads + 1`
 non-decreasing entries starting at 0 and ending at `sel_pages_len`. `sel_offsets_len == 0`
 attends every page. Other arguments as `kvtier_cache_attend`; `stats.page_mass` is 0 for pages
 not attended.

 Errors: as `kvtier_cache_attend`, plus `INVALID_ARGUMENT` (unknown dtype, malformed offsets),
 `SHAPE` (a page index past the sequence), `OVERFLOW`.

 # Safety

 `cache` must be NULL or a live handle; every array must hold its count of readable (inputs) or
 writable (outputs) elements; `stats` as for `kvtier_cache_attend`.
 */
kvtier_status kvtier_cache_attend_selected(const struct kvtier_cache *cache,
                                           size_t layer,
                                           const uint64_t *seqs,
                                           size_t n_seqs,
                                           uint32_t dtype,
                                           const void *queries,
                                           size_t queries_len,
                                           const uint32_t *sel_pages,
                                           size_t sel_pages_len,
                                           const size_t *sel_offsets,
                                           size_t sel_offsets_len,
                                           float *output,
                                           size_t output_len,
                                           const struct kvtier_attention_stats *stats,
                                           bool observe);

/*
 Executes one page move on page `page` of `seq` in `layer` (`op` is a `kvtier_move_op`;
 `k_bits` and `v_bits` are read by `DEMOTE` only: 8, 4, 3 or 2). Validated completely first: an
 error changes nothing. For `PROMOTE`, `*exact_out` (may be NULL) is set to true when the page
 was restored bit for bit (from the archive) and false when it was dequantised (no archive).

 Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (unknown op, bits), `UNKNOWN_SEQUENCE`,
 `LAYER_OUT_OF_RANGE`, `UNKNOWN_PAGE`, `INVALID_MOVE` (pinned, wrong tier, still being
 written, a width the backend cannot store), `BUDGET_EXCEEDED`, `OUT_OF_MEMORY`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `exact_out` NULL or valid for a write of one `bool`.
 */
kvtier_status kvtier_cache_move(struct kvtier_cache *cache,
                                uint64_t seq,
                                size_t layer,
                                size_t page,
                                uint32_t op,
                                uint32_t k_bits,
                                uint32_t v_bits,
                                bool *exact_out);

/*
 Drops every token of `seq` at a position `>= len`, in every layer (rollback: rejected draft
 tokens, an edited history); a layer with `len` tokens or fewer is left as it is. The page that
 then holds the last token comes back to the hot tier, exactly from the archive when it has a
 copy (`*dequantised_out`, may be NULL, counts the boundary pages restored from their quantised
 bytes instead); appends continue from `len`. `*tokens_out` (may be NULL) receives the tokens
 dropped over all layers.

 Errors, with nothing changed: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `INVALID_MOVE` (`len` falls
 inside an evicted page), `BUDGET_EXCEEDED` (the hot tier), `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `tokens_out` and `dequantised_out` NULL or valid for a
 write of one `size_t`.
 */
kvtier_status kvtier_cache_sequence_truncate(struct kvtier_cache *cache,
                                             uint64_t seq,
                                             size_t len,
                                             size_t *tokens_out,
                                             size_t *dequantised_out);

/*
 Writes what the cache knows about page `page` of `seq` in `layer` to `*info_out` (pages are
 numbered from 0; `kvtier_cache_sequence_pages` gives the count).

 Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `UNKNOWN_PAGE`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `info_out` must be valid for a write of one
 `kvtier_page_info`.
 */
kvtier_status kvtier_cache_page_info(const struct kvtier_cache *cache,
                                     uint64_t seq,
                                     size_t layer,
                                     size_t page,
                                     struct kvtier_page_info *info_out);

/*
 Appends `counts[i]` tokens to sequence `seqs[i]` (distinct) in `layer`, for `i < n_seqs`, from
 keys and values in CUDA device memory: `keys_device` and `values_device` are `CUdeviceptr`s of
 `[sum of counts][num_kv_heads][head_dim]` elements of `dtype` (`kvtier_dtype`), the rows of the
 entries one after another, readable on `stream` (a `CUstream`; NULL for the legacy default
 stream). A decode step is `counts` all 1; a prefill chunk one entry with its token count. One
 launch converts the rows to the hot dtype (and rotates them for a rotated cache); the pages
 leaving the hot window are then demoted in one launch. The stored bytes equal those of
 `kvtier_cache_append_typed` with the same values.

 Every element is checked as a host append checks it; a bad one fails the whole batch
 (`NON_FINITE` or `OUT_OF_RANGE`, the last error naming its index) and no sequence changes. The
 call synchronises `stream` before it returns, so the buffers may be reused at once.

 Errors: `NULL_PARAMETER` (`cache`; `seqs` or `counts` with `n_seqs > 0`; a device address of 0
 with rows to append), `INVALID_ARGUMENT` (unknown dtype), `SHAPE` (more entries than live
 sequences, misaligned device addresses), `UNKNOWN_SEQUENCE`, `DUPLICATE_SEQUENCE`,
 `LAYER_OUT_OF_RANGE`, `SEQUENCE_TOO_LONG`, `BUDGET_EXCEEDED`, `NON_FINITE`, `OUT_OF_RANGE`,
 `UNSUPPORTED` (a cache not on a CUDA device), `DEVICE_ERROR`.

 # Safety

 `cache` must be NULL or a live handle; `seqs` and `counts` must hold `n_seqs` readable
 elements each (NULL when `n_seqs` is 0). The device addresses must be live allocations of the
 sizes above on the cache's device, usable from `stream`.
 */
kvtier_status kvtier_cache_append_device(struct kvtier_cache *cache,
                                         size_t layer,
                                         const uint64_t *seqs,
                                         const size_t *counts,
                                         size_t n_seqs,
                                         uint32_t dtype,
                                         uint64_t keys_device,
                                         uint64_t values_device,
                                         void *stream);

/*
 Writes the cache's disk counters to `*stats_out` (all zero for a cache that does not spill).

 Errors: `NULL_PARAMETER`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `stats_out` must be valid for a write of one
 `kvtier_disk_stats`.
 */
kvtier_status kvtier_cache_disk_stats(const struct kvtier_cache *cache,
                                      struct kvtier_disk_stats *stats_out);

/*
 Compacts the cache's page files now: the live records of every segment file at most half live
 move into the open segment, and the emptied files are deleted (the cache also does this by
 itself once the files hold more dead than live bytes). `result_out` may be NULL. A no-op for a
 cache that does not spill.

 Errors: `NULL_PARAMETER` (`cache`), `DISK` (a write failed: the records moved so far stand and
 every page keeps a valid record), `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `result_out` NULL or valid for a write of one
 `kvtier_compaction`.
 */
kvtier_status kvtier_cache_compact_spill(struct kvtier_cache *cache,
                                         struct kvtier_compaction *result_out);

/*
 A new sequence holding the same tokens as `seq` in every layer, sharing every full page with
 it copy-on-write (no bytes copied; freed with the last sequence naming it); only each layer's
 partial last page is copied. Moves on a shared page move it for every sequence sharing it
 (pins of any of them count); evicting drops only the caller's reference. On success
 `*seq_out` holds the new id.

 Errors, with nothing changed: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `BUDGET_EXCEEDED`,
 `OUT_OF_MEMORY`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `seq_out` valid for a write of one `uint64_t`.
 */
kvtier_status kvtier_cache_sequence_fork(struct kvtier_cache *cache,
                                         uint64_t seq,
                                         uint64_t *seq_out);

/*
 Beam-search reorder: afterwards `seqs[i]` holds what `seqs[from[i]]` held before, for every
 `i < n` (sources may repeat or be dropped), sharing pages copy-on-write.

 Errors, with nothing changed: `NULL_PARAMETER` (an array with `n > 0`), `SHAPE` (an index
 `>= n`), `UNKNOWN_SEQUENCE`, `DUPLICATE_SEQUENCE`, `BUDGET_EXCEEDED`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `seqs` and `from` must hold `n` readable elements each
 (or be NULL with `n == 0`).
 */
kvtier_status kvtier_cache_reorder(struct kvtier_cache *cache,
                                   const uint64_t *seqs,
                                   const size_t *from,
                                   size_t n);

/*
 Writes `seq` (every layer and tier, its archive copies too when `archive`) to the file at
 `path`, atomically (a temporary file beside it, mode 0600, synced, then renamed over it).
 `*bytes_out` (may be NULL) receives the file's size.

 Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (`path` not UTF-8), `UNKNOWN_SEQUENCE`, `DISK`
 (nothing is left behind; an existing file at `path` is unchanged), `CORRUPT_PAGE` (a spilled
 page failed its check), `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `path` NULL or NUL-terminated; `bytes_out` NULL or
 valid for a write of one `uint64_t`.
 */
kvtier_status kvtier_cache_sequence_save(const struct kvtier_cache *cache,
                                         uint64_t seq,
                                         const char *path,
                                         bool archive,
                                         uint64_t *bytes_out);

/*
 Reads a sequence saved by `kvtier_cache_sequence_save` into a new sequence of `cache` (whose
 config must match where the bytes depend on it: heads, head size, page size, hot dtype, value
 group, rotation); on success `*seq_out` holds its id.

 Errors, with nothing restored: `NULL_PARAMETER`, `INVALID_ARGUMENT`, `CORRUPT_FILE` (not a
 sequence file, another format version, a failed checksum, truncated), `CORRUPT_PAGE`,
 `CONFIG_MISMATCH`, `BUDGET_EXCEEDED`, `SEQUENCE_TOO_LONG`, `DISK`, `OUT_OF_MEMORY`, `POISONED`.

 # Safety

 `cache` must be NULL or a live handle; `path` NULL or NUL-terminated; `seq_out` valid for a
 write of one `uint64_t`.
 */
kvtier_status kvtier_cache_sequence_restore(struct kvtier_cache *cache,
                                            const char *path,
                                            uint64_t *seq_out);

/*
 A store in this process's memory (LRU within `budget_bytes`): shares pages between caches of
 one process. `model_fingerprint` is 32 bytes identifying the weights (see
 `kvtier_fingerprint_file`); `namespace` is 1 to 64 of `[A-Za-z0-9_-]`. On success `*store_out`
 holds a handle to free with `kvtier_prefix_store_free`.

 Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (a string not UTF-8), `INVALID_CONFIG` (the
 namespace).

 # Safety

 `namespace` must be NULL or NUL-terminated; `model_fingerprint` NULL or 32 readable bytes;
 `store_out` valid for a write of one pointer.
 */
kvtier_status kvtier_prefix_store_new_memory(uint64_t budget_bytes,
                                             const char *namespace_,
                                             const uint8_t *model_fingerprint,
                                             struct kvtier_prefix_store **store_out);

/*
 A store of one file per page record in directory `path` (created if missing): shares pages
 between processes of one machine or over a network file system.

 Errors: as `kvtier_prefix_store_new_memory`, and `REMOTE` (the directory cannot be created).

 # Safety

 As `kvtier_prefix_store_new_memory`; `path` NULL or NUL-terminated.
 */
kvtier_status kvtier_prefix_store_new_dir(const char *path,
                                          const char *namespace_,
                                          const uint8_t *model_fingerprint,
                                          struct kvtier_prefix_store **store_out);

/*
 A store on a Redis or Valkey server: `url` is `redis://[user:password@]host:port[/db]` or
 `rediss://...` (TLS). Each call waits at most `connect_timeout_ms + io_timeout_ms` (0: the
 defaults, 2000 each); `ttl_seconds > 0` makes records expire. Connects once now. Only a
 library built with the `redis` feature has it; otherwise `BACKEND_NOT_COMPILED`.

 Errors: as `kvtier_prefix_store_new_memory`, `REMOTE` (no connection, refused AUTH; the text
 names host and port, never the password), `BACKEND_NOT_COMPILED`.

 # Safety

 As `kvtier_prefix_store_new_memory`; `url` NULL or NUL-terminated.
 */
kvtier_status kvtier_prefix_store_new_redis(const char *url,
                                            uint32_t connect_timeout_ms,
                                            uint32_t io_timeout_ms,
                                            uint32_t ttl_seconds,
                                            const char *namespace_,
                                            const uint8_t *model_fingerprint,
                                            struct kvtier_prefix_store **store_out);

/*
 Frees a store; waits for its background publishing first. NULL is a no-op.

 # Safety

 `store` must be NULL or a handle from `kvtier_prefix_store_new_*` not freed yet; no other
 thread may use it during or after this call.
 */
void kvtier_prefix_store_free(struct kvtier_prefix_store *store);

/*
 SHA-256 of the file at `path` (a model's weights) into `fingerprint_out[0..32]`.

 Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT`, `REMOTE` (the file cannot be read).

 # Safety

 `path` NULL or NUL-terminated; `fingerprint_out` NULL or valid for 32 byte writes.
 */
kvtier_status kvtier_fingerprint_file(const char *path, uint8_t *fingerprint_out);

/*
 How many leading tokens of `tokens[0..n]` the store holds for every layer of `cache`'s shape
 (a multiple of the page size, less than `n`), into `report_out->tokens`. Existence only:
 `kvtier_prefix_import` verifies.

 Errors: `NULL_PARAMETER`, `REMOTE`, `POISONED`.

 # Safety

 Handles NULL or live; `tokens` `n` readable `uint32_t` (or NULL with `n == 0`);
 `report_out` valid for a write of one `kvtier_prefix_report`.
 */
kvtier_status kvtier_prefix_lookup(const struct kvtier_prefix_store *store,
                                   const struct kvtier_cache *cache,
                                   const uint32_t *tokens,
                                   size_t n,
                                   struct kvtier_prefix_report *report_out);

/*
 Imports the longest verified run of leading pages of `tokens[0..n]` into the empty sequence
 `seq` (each page quantised and tiered by the cache's own configuration); the engine prefills
 tokens `report_out->tokens ..` itself. A missing or damaged record ends the run (counted in
 `corrupt`); on an error the sequence is left empty. The cache is locked for writing during
 the store's round trips.

 Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `SHAPE` (the sequence is not empty), `REMOTE`,
 `BUDGET_EXCEEDED`, `POISONED`.

 # Safety

 As `kvtier_prefix_lookup`.
 */
kvtier_status kvtier_prefix_import(const struct kvtier_prefix_store *store,
                                   struct kvtier_cache *cache,
                                   uint64_t seq,
                                   const uint32_t *tokens,
                                   size_t n,
                                   struct kvtier_prefix_report *report_out);

/*
 Publishes the full pages of `seq`, whose first tokens are `tokens[0..n]`, that the store
 lacks (each layer up to its first page with no exact copy). `background != 0` copies the
 records now and sends them from the store's thread (`report_out->queued`; see
 `kvtier_prefix_flush`); otherwise waits for the store.

 Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `REMOTE`, `POISONED`.

 # Safety

 As `kvtier_prefix_lookup`.
 */
kvtier_status kvtier_prefix_publish(const struct kvtier_prefix_store *store,
                                    const struct kvtier_cache *cache,
                                    uint64_t seq,
                                    const uint32_t *tokens,
                                    size_t n,
                                    uint8_t background,
                                    struct kvtier_prefix_report *report_out);

/*
 Waits for every background publish so far; their totals since the last flush go to
 `*report_out`, or the first store error among them is returned.

 Errors: `NULL_PARAMETER`, `REMOTE`.

 # Safety

 `store` NULL or live; `report_out` valid for a write of one `kvtier_prefix_report`.
 */
kvtier_status kvtier_prefix_flush(const struct kvtier_prefix_store *store,
                                  struct kvtier_prefix_report *report_out);

/*
 Makes the built-in policy named `name` (NUL-terminated: "keep_all", "recent", "streaming_llm",
 "h2o", "tova", "scissorhands", "snapkv", "pyramidkv", "heavy_hitter", "hybrid", "anchor",
 "tiered", "tiered_int2") with its documented defaults, and writes its handle to `*policy_out`.

 Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (not UTF-8), `INVALID_CONFIG` (unknown name).

 # Safety

 `name` must be NULL or a NUL-terminated string; `policy_out` must be valid for a write of one
 pointer.
 */
kvtier_status kvtier_policy_new(const char *name, struct kvtier_policy **policy_out);

/*
 Frees a policy (NULL is a no-op).

 # Safety

 `policy` must be NULL or a handle from `kvtier_policy_new` not yet freed.
 */
void kvtier_policy_free(struct kvtier_policy *policy);

/*
 Asks `policy` for the moves that bring `seq` in `layer` within the budget (`max_tokens` kept
 tokens and/or `max_device_bytes` device bytes; `KVTIER_UNLIMITED` for no limit) and executes
 them; writes the number of moves run to `*moves_out` (may be NULL). Moves are validated by the
 cache: one the cache refuses stops the call with its status, the moves before it applied.

 Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `INVALID_MOVE`,
 `BUDGET_EXCEEDED`, `OUT_OF_MEMORY`, `POISONED`.

 # Safety

 `cache` and `policy` must be NULL or live handles; `moves_out` NULL or valid for a write of one
 `size_t`.
 */
kvtier_status kvtier_cache_enforce(struct kvtier_cache *cache,
                                   struct kvtier_policy *policy,
                                   uint64_t seq,
                                   size_t layer,
                                   size_t max_tokens,
                                   size_t max_device_bytes,
                                   size_t *moves_out);

/*
 The default options (sensitivity 0.85, 4 pages per layer, at most 4 healed per layer, hold 32).
 */
struct kvtier_protect_options kvtier_protect_options_default(void);

/*
 Makes a protect session for sequence `seq` (of whichever cache later steps pass) and writes
 its handle to `*session_out`. `options` may be NULL (the defaults).

 Errors: `NULL_PARAMETER`, `INVALID_CONFIG` (sensitivity outside `[0, 1]` or NaN,
 `pages_per_layer` above `max_pages_per_layer`).

 # Safety

 `options` must be NULL or valid for a read of one `kvtier_protect_options`; `session_out` valid
 for a write of one pointer.
 */
kvtier_status kvtier_protect_new(const struct kvtier_protect_options *options,
                                 uint64_t seq,
                                 struct kvtier_protect **session_out);

/*
 Frees a session (NULL is a no-op). Healed pages stay as they are (hot) in the cache; a policy
 or `kvtier_cache_move` may demote them.

 # Safety

 `session` must be NULL or a handle from `kvtier_protect_new` not yet freed.
 */
void kvtier_protect_free(struct kvtier_protect *session);

/*
 Judges one decode step from its next-token `logits[vocab]` and, optionally, the step's
 attention statistics `heads[n_heads]` (NULL with 0), heals `cache` when the monitor fires and
 releases healed pages after the hold; writes the verdict to `*verdict_out` (may be NULL).

 Errors: `NULL_PARAMETER`, `SHAPE` (`vocab` 0), `NON_FINITE` (a NaN or infinite logit),
 `INVALID_ARGUMENT` (counts whose byte size overflows), `UNKNOWN_SEQUENCE`, `POISONED`; moves
 the cache refuses stop healing with their status (the pages before them stay promoted).

 # Safety

 `session` and `cache` must be NULL or live handles; `logits` valid for `vocab` reads; `heads`
 NULL or valid for `n_heads` reads; `verdict_out` NULL or valid for one write.
 */
kvtier_status kvtier_protect_step(struct kvtier_protect *session,
                                  struct kvtier_cache *cache,
                                  const float *logits,
                                  size_t vocab,
                                  const struct kvtier_head_stats *heads,
                                  size_t n_heads,
                                  struct kvtier_verdict *verdict_out);

/*
 Takes the oldest queued healing event: writes it to `*event_out` and `true` to `*has_event`,
 or `false` when the queue is empty (the session keeps the last 1024).

 Errors: `NULL_PARAMETER`.

 # Safety

 `session` must be NULL or a live handle; `event_out` and `has_event` valid for one write each.
 */
kvtier_status kvtier_protect_next_event(struct kvtier_protect *session,
                                        struct kvtier_heal_event *event_out,
                                        bool *has_event);

/*
 Copies the message of this thread's most recent failed kvtier call into `buf` as a
 NUL-terminated string. The message names the function and the offending input; it stays until
 the next failing call on this thread (successful calls do not clear it). Before any failure it
 is the empty string.

 At most `buf_len - 1` bytes of text are copied, cut at a UTF-8 character boundary, followed by
 a NUL. `*len_out` (when `len_out` is not NULL) receives the length of the whole message in
 bytes, without the NUL, so `kvtier_last_error(NULL, 0, &len)` asks for the size to allocate
 (`len + 1`).

 Returns `KVTIER_STATUS_OK` when the whole message fit, `KVTIER_STATUS_BUFFER_TOO_SMALL` when it
 was cut (or `buf_len` is 0 and the message is not empty), `KVTIER_STATUS_NULL_PARAMETER` when
 `buf` is NULL but `buf_len` is not 0, `KVTIER_STATUS_INVALID_ARGUMENT` when `len_out` is
 misaligned. This function never changes the last error.

 # Safety

 `buf` must be valid for writes of `buf_len` bytes (or `buf_len` is 0); `len_out` must be NULL
 or valid for a write of one `size_t`.
 */
kvtier_status kvtier_last_error(char *buf, size_t buf_len, size_t *len_out);

/*
 The name of a status code (`"KVTIER_STATUS_SHAPE"` for 101), or `"KVTIER_STATUS_UNKNOWN"` for a
 number that is not a status of this library version. The string is static: never free it.
 */
const char *kvtier_status_name(uint32_t status);

/*
 The library version, `"MAJOR.MINOR.PATCH"` (as `KVTIER_VERSION_STRING` in the header this
 library was built with). The string is static: never free it.
 */
const char *kvtier_version(void);

/*
 The ABI version of the library. A program compiled against the header should check
 `kvtier_abi_version() == KVTIER_ABI_VERSION` before any other call: different values mean the
 structs or signatures may differ.
 */
uint32_t kvtier_abi_version(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* KVTIER_H */
