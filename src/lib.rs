//! # kvtier
//!
//! A tiered, quantised KV cache that an inference engine hands its keys and values to, layer by
//! layer, and asks for decode attention over them.
//!
//! - **hot** pages: exact (f32/f16/bf16): attention sinks and the recent window.
//! - **warm** pages: KIVI-style quantised (keys per channel, values per token in groups), really
//!   packed at 8/4/2 bits; attention reads the codes directly, no dequantised copy exists.
//! - attention returns, for free, per-head entropy / varentropy / max score and per-page attention
//!   mass: the signals that retention policies and the monitor use.
//!
//! ```
//! use kvtier::{CacheConfig, KvCache};
//! let cfg = CacheConfig::balanced(2, 8, 2, 64).unwrap();
//! let mut cache = KvCache::new(cfg).unwrap();
//! let seq = cache.add_sequence();
//! let (kv, q) = (vec![0.1f32; 300 * 2 * 64], vec![0.2f32; 8 * 64]);
//! cache.append(seq, 0, &kv, &kv).unwrap();        // 300 tokens, [n, kv_heads, head_dim]
//! let att = cache.attend(0, &[seq], &q).unwrap(); // [n_seqs, q_heads, head_dim]
//! assert_eq!(att.output.len(), 8 * 64);
//! println!("{}", cache.memory_report());
//! ```
//!
//! Module map (see docs/architecture.md): [`config`] → [`cache`] (sequences, page tables, tiering)
//! → [`backend`] (page bytes and kernels; [`backend::cpu`] is the oracle) using [`quant`] (formats)
//! and [`attention`] (online softmax algebra), with [`tiers`] (vocabulary, demotion rule) and
//! [`memory`] (accounting). Decisions on top read statistics and return moves or selections:
//! [`policy`] (retention), [`eliminate`] (query-time page choice), [`monitor`] (uncertainty and
//! healing). [`ffi`] is the C ABI (`include/kvtier.h`).

#[cfg(feature = "mistralrs")]
pub mod adapter;
pub mod attention;
pub mod backend;
pub mod cache;
pub mod cold;
pub mod config;
pub mod eliminate;
pub mod error;
pub mod ffi;
pub mod memory;
#[cfg(feature = "model")]
pub mod model;
pub mod monitor;
pub mod policy;
pub mod prefix;
pub mod protect;
pub mod quant;
#[cfg(feature = "candle")]
pub mod tensor;

pub use attention::{Attention, HeadStats, PageSelection};
pub use backend::{
    Device, DeviceBuffers, DeviceLocation, DeviceRows, InputDtype, PageBytes, PageResults, Scratch,
};
pub use cache::{
    CacheCounters, KvCache, Move, PageEntry, PageMeta, PageRef, PageTable, Pins, Restored, Rows,
    SeqId, Tier, Truncation,
};
pub use config::{
    Bits, CacheConfig, CacheConfigBuilder, CpuKernel, HotDtype, LayerBits, Rotation, SpillConfig,
    TierBudgets,
};
pub use error::{Error, Result};
pub use memory::MemoryReport;
#[cfg(feature = "model")]
pub use model::ProtectedSession;
pub use protect::{
    protect, protect_with, AttentionCache, AttentionShape, Engine, KvTierAttention, PageChoice,
};
pub use quant::WarmFormat;
