//! The C ABI: opaque handles, numbered status codes and plain buffers over [`crate::KvCache`].
//!
//! Owns: every `extern "C"` symbol of the library (all named `kvtier_<noun>_<verb>`), the handle
//! types behind them, the status codes ([`status`], the only place where [`crate::Error`] becomes
//! a number), the thread-local last-error text, and the checks that turn any input the header
//! allows into either a result or a status. `include/kvtier.h` is generated from this module by
//! cbindgen (`cargo check --features generate-header`) and committed; CI fails when it drifts.
//! Must never: let a panic cross into C, build a slice from an unchecked pointer or length, write to
//! a caller's buffer before the call is known to succeed, or keep a pointer the caller passed in
//! past the call.
//!
//! # Lifecycle
//!
//! ```c
//! #include "kvtier.h"
//!
//! // 0. Check that the header and the library agree.
//! if (kvtier_abi_version() != KVTIER_ABI_VERSION) abort();
//!
//! // 1. A config: the defaults or a preset, tuned by setters. It is valid at all times: a setter
//! //    that would make it invalid returns KVTIER_STATUS_INVALID_CONFIG and changes nothing.
//! kvtier_config *cfg = NULL;
//! kvtier_status st = kvtier_config_new_preset(KVTIER_PRESET_BALANCED, 30, 9, 3, 64, &cfg);
//! kvtier_config_set_hot_window(cfg, 256);
//!
//! // 2. A cache (CPU; kvtier_cache_new_cuda for a CUDA build). It copies the config, which may be
//! //    freed right away.
//! kvtier_cache *cache = NULL;
//! st = kvtier_cache_new(cfg, &cache);
//! kvtier_config_free(cfg);
//!
//! // 3. One sequence per request. Prefill the prompt layer by layer (causal attention over what is
//! //    cached plus the new tokens, then append), or append keys and values you attended yourself.
//! uint64_t seq;
//! st = kvtier_cache_sequence_add(cache, &seq);
//! st = kvtier_cache_prefill(cache, seq, layer, q, q_len, k, k_len, v, v_len, out, out_len);
//!
//! // 4. Decode: per step and layer, append the new token's K and V, then attend for a batch of
//! //    sequences; per-head entropy / varentropy / max score and per-page attention mass come back
//! //    in caller buffers when a kvtier_attention_stats names them.
//! st = kvtier_cache_append(cache, seq, layer, k, k_len, v, v_len);
//! kvtier_head_stats heads[9];
//! kvtier_attention_stats stats = { .heads = heads, .heads_len = 9 };
//! st = kvtier_cache_attend(cache, layer, &seq, 1, q, q_len, out, out_len, &stats);
//!
//! // 4b. Engines with their own retention policy: attention over a page selection (CSR, per kv
//! //     head), folded into per-page statistics, then page moves; f16 / bf16 inputs through the
//! //     `_typed` calls; one decode token for many sequences with kvtier_cache_append_decode.
//! st = kvtier_cache_attend_selected(cache, layer, &seq, 1, KVTIER_DTYPE_F32, q, q_len,
//!                                   pages, n_sel, offsets, kv_heads + 1, out, out_len, NULL, true);
//! kvtier_page_info info;
//! st = kvtier_cache_page_info(cache, seq, layer, 3, &info);
//! st = kvtier_cache_move(cache, seq, layer, 3, KVTIER_MOVE_OP_DEMOTE, 4, 2, NULL);
//!
//! // 4c. On a GPU, steps queued without a host wait (one step handle per layer); finishing one
//! //     (optional) waits for it and writes its statistics.
//! kvtier_step *step = NULL;
//! st = kvtier_step_new(false, &step);
//! st = kvtier_cache_attend_device_async(cache, step, layer, &seq, 1, q_dev, out_dev, stream);
//! st = kvtier_cache_finish_device(cache, step, layer, &stats);
//!
//! // 5. Observe: bytes per tier, counters.
//! kvtier_memory_report report;
//! st = kvtier_cache_memory_report(cache, &report);
//!
//! // 6. A request ends: remove (or reset, to reuse the id) its sequence. Then free the cache.
//! st = kvtier_cache_sequence_remove(cache, seq);
//! kvtier_cache_free(cache);
//!
//! // On any status other than KVTIER_STATUS_OK, the message of this thread's last failure:
//! char msg[256]; size_t len;
//! kvtier_last_error(msg, sizeof msg, &len);
//! ```
//!
//! A protect session (cache + monitor + healer bound to one model) will be a third handle,
//! `kvtier_protect`, made from a cache; status codes 300..=399 are kept for it.
//!
//! # Rules every function keeps
//!
//! - **Status.** Every function that can fail returns a [`status::kvtier_status`]; `KVTIER_STATUS_OK`
//!   is 0. The numbers are permanent (see [`status`]). On failure, nothing was changed: no output
//!   buffer or out-parameter was written and the cache is as it was; the thread-local last error
//!   (see [`kvtier_last_error`]) holds a message naming the function and the offending input.
//! - **Panics** never unwind into C: every entry point runs inside `ffi_panic_boundary!`, which
//!   returns `KVTIER_STATUS_PANIC` (or a neutral value for functions without a status). A cache
//!   whose mutation panicked is poisoned: later calls on it return `KVTIER_STATUS_POISONED`; only
//!   `kvtier_cache_free` is still meaningful.
//! - **Pointers.** Handles and out-parameters must be non-NULL (`KVTIER_STATUS_NULL_PARAMETER`
//!   otherwise). Every array comes with its element count; a count of 0 accepts any pointer, NULL
//!   included; a non-zero count with NULL is `KVTIER_STATUS_NULL_PARAMETER`; a pointer not aligned
//!   for its element type is `KVTIER_STATUS_INVALID_ARGUMENT`. Output arrays must hold at least the
//!   elements the call writes (`KVTIER_STATUS_BUFFER_TOO_SMALL` otherwise), and may alias inputs:
//!   outputs are written only after every input has been read.
//! - **Enums** (`kvtier_preset`, `kvtier_hot_dtype`) are passed as `uint32_t`; an unknown value is
//!   `KVTIER_STATUS_INVALID_ARGUMENT`, never undefined behaviour.
//! - **Threads.** Handles are `Send` and `Sync`: a cache may be shared between threads. Calls that
//!   take `const kvtier_cache *` (attention, reports) run concurrently; calls that change it take a
//!   lock. A config is locked per call. The last error is per thread.
//! - **Ownership.** `_new` functions hand out handles that the caller frees exactly once with the
//!   matching `_free` (NULL is a no-op). No function keeps a caller pointer after it returns.

// C names (`kvtier_cache`, `kvtier_status`) are the ABI; Rust's naming lints do not apply.
#![allow(non_camel_case_types)]

#[macro_use]
mod boundary;

// The header lists functions in the order cbindgen meets them: config, cache, attention, then the
// rest. rustfmt sorts `mod` lines only within a group, hence one group each.
mod config;
mod quant;

mod cache;

mod attention;

mod step;

mod eliminate;

mod pages;

mod append_device;

mod disk;

mod sequence;

mod prefix;

mod policy;
mod protect;

mod last_error;
pub mod status;
mod version;

pub use append_device::kvtier_cache_append_device;
pub use attention::{
    kvtier_attention_stats, kvtier_cache_attend, kvtier_cache_attend_device, kvtier_head_stats,
};
pub use cache::{
    kvtier_cache, kvtier_cache_append, kvtier_cache_counters, kvtier_cache_free,
    kvtier_cache_memory_report, kvtier_cache_new, kvtier_cache_new_cuda, kvtier_cache_prefill,
    kvtier_cache_sequence_add, kvtier_cache_sequence_len, kvtier_cache_sequence_pages,
    kvtier_cache_sequence_remove, kvtier_cache_sequence_reset, kvtier_cache_shape, kvtier_counters,
    kvtier_memory_report,
};
pub use config::{
    kvtier_config, kvtier_config_free, kvtier_config_new, kvtier_config_new_preset,
    kvtier_config_set_archive, kvtier_config_set_bits, kvtier_config_set_budgets,
    kvtier_config_set_hot_dtype, kvtier_config_set_hot_window, kvtier_config_set_mass_decay,
    kvtier_config_set_max_seq_len, kvtier_config_set_page_size, kvtier_config_set_protected_layers,
    kvtier_config_set_sink_tokens, kvtier_config_set_softmax_scale, kvtier_config_set_value_group,
    kvtier_config_set_warm_enabled, kvtier_config_shape, kvtier_hot_dtype, kvtier_preset,
    kvtier_shape, KVTIER_UNLIMITED,
};
pub use disk::{
    kvtier_cache_compact_spill, kvtier_cache_disk_stats, kvtier_compaction, kvtier_disk_stats,
};
pub use eliminate::{kvtier_cache_attend_eliminated, kvtier_elimination_report};
pub use last_error::kvtier_last_error;
pub use pages::{
    kvtier_cache_append_decode, kvtier_cache_append_typed, kvtier_cache_attend_selected,
    kvtier_cache_move, kvtier_cache_page_info, kvtier_cache_sequence_truncate, kvtier_dtype,
    kvtier_move_op, kvtier_page_info, KVTIER_NEVER, KVTIER_TIER_COLD, KVTIER_TIER_EVICTED,
    KVTIER_TIER_HOT, KVTIER_TIER_WARM,
};
pub use policy::{kvtier_cache_enforce, kvtier_policy, kvtier_policy_free, kvtier_policy_new};
pub use prefix::{
    kvtier_fingerprint_file, kvtier_prefix_flush, kvtier_prefix_import, kvtier_prefix_lookup,
    kvtier_prefix_publish, kvtier_prefix_report, kvtier_prefix_store, kvtier_prefix_store_free,
    kvtier_prefix_store_new_dir, kvtier_prefix_store_new_memory, kvtier_prefix_store_new_redis,
};
pub use protect::{
    kvtier_heal_event, kvtier_protect, kvtier_protect_free, kvtier_protect_new,
    kvtier_protect_next_event, kvtier_protect_options, kvtier_protect_options_default,
    kvtier_protect_step, kvtier_verdict,
};
pub use quant::{
    kvtier_config_clear_layer_bits, kvtier_config_set_cpu_kernel, kvtier_config_set_key_outliers,
    kvtier_config_set_layer_bits, kvtier_config_set_rotation, kvtier_config_set_spill,
    kvtier_config_set_threads, kvtier_config_set_value_fit, kvtier_rotation,
};
pub use sequence::{
    kvtier_cache_reorder, kvtier_cache_sequence_fork, kvtier_cache_sequence_restore,
    kvtier_cache_sequence_save,
};
pub use status::{kvtier_status, kvtier_status_name};
pub use step::{
    kvtier_cache_attend_device_async, kvtier_cache_finish_device, kvtier_step, kvtier_step_free,
    kvtier_step_new,
};
pub use version::{kvtier_abi_version, kvtier_version};
