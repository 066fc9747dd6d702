//! Cache configuration: model shape, page geometry, tier precision and budgets.
//!
//! Owns: `CacheConfig`, its builder, the named presets and `validate()`. Every other module reads a
//! validated config and may rely on its invariants (documented on each field). Must never: allocate
//! cache memory or know about a particular backend.

pub use crate::backend::cpu::CpuKernel;
use crate::error::{Error, Result};
pub use crate::quant::rotate::Rotation;

/// Bit width of warm-tier codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Bits {
    /// 8-bit codes, 1 per byte.
    B8 = 8,
    /// 4-bit codes, 2 per byte.
    B4 = 4,
    /// 3-bit codes, 8 in 3 bytes: a row is a 2-bit plane (the low bits, packed as `B2`) followed
    /// by a 1-bit plane (the high bits, 8 per byte). See [`crate::quant::pack`].
    B3 = 3,
    /// 2-bit codes, 4 per byte.
    B2 = 2,
}

impl Bits {
    /// Number of bits per code.
    pub const fn bits(self) -> usize {
        self as usize
    }
    /// The narrower of `self` and `other`.
    pub const fn min_bits(self, other: Bits) -> Bits {
        if (other as u8) < (self as u8) {
            other
        } else {
            self
        }
    }
    /// Largest code value (`2^bits - 1`).
    pub const fn max_code(self) -> u32 {
        (1u32 << self as u32) - 1
    }
    /// Codes packed into one byte of the (low) code plane: 1, 2 or 4; 3-bit codes keep their
    /// low two bits 4 per byte.
    pub const fn per_byte(self) -> usize {
        match self {
            Bits::B3 => 4,
            b => 8 / b as usize,
        }
    }
    /// Parses 8, 4, 3 or 2.
    pub fn from_bits(bits: u32) -> Result<Self> {
        match bits {
            8 => Ok(Bits::B8),
            4 => Ok(Bits::B4),
            3 => Ok(Bits::B3),
            2 => Ok(Bits::B2),
            other => Err(Error::config(
                "bits",
                format!("{other} is not one of 8, 4, 3, 2"),
            )),
        }
    }
}

/// Element type of hot (exact) pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HotDtype {
    F32,
    F16,
    BF16,
}

impl HotDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            HotDtype::F32 => 4,
            HotDtype::F16 | HotDtype::BF16 => 2,
        }
    }
}

/// Warm code widths of one layer, overriding the config's `k_bits` / `v_bits` there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerBits {
    pub layer: usize,
    pub k_bits: Bits,
    pub v_bits: Bits,
}

/// Spilling of host pages (the archive and the cold tier) to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpillConfig {
    /// Directory for the page files (created if missing; the cache writes nothing else there and
    /// removes its files when dropped).
    pub dir: std::path::PathBuf,
    /// RAM the archive and the cold tier may hold together; past it, the least recently used
    /// pages are written to disk.
    pub host_ram_bytes: usize,
    /// Bytes of page records the disk may hold (`None`: unlimited).
    pub disk_bytes: Option<usize>,
    /// Read spilled pages ahead on a background thread: the next layer's cold pages when a layer
    /// is attended, and whatever [`crate::KvCache::prefetch`] asks for. The read-ahead buffer
    /// holds at most `host_ram_bytes` more.
    pub prefetch: bool,
    /// Page files are closed to new records at this size ([`SpillConfig::new`]: 64 MiB). Freed
    /// records leave dead space; once the dead bytes exceed both one segment and the live bytes,
    /// the cache compacts the files (moves the live records out of segments at most half live
    /// and deletes those; see [`crate::KvCache::compact_spill`]).
    pub segment_bytes: usize,
}

impl SpillConfig {
    /// Spilling into `dir` past `host_ram_bytes` of host RAM: no disk limit, prefetch on,
    /// 64 MiB segments.
    pub fn new(dir: impl Into<std::path::PathBuf>, host_ram_bytes: usize) -> Self {
        SpillConfig {
            dir: dir.into(),
            host_ram_bytes,
            disk_bytes: None,
            prefetch: true,
            segment_bytes: crate::cold::disk::SEGMENT_BYTES as usize,
        }
    }
}

/// Byte budgets per tier. `None` means unlimited. Budgets count bytes actually allocated,
/// metadata included (see [`crate::MemoryReport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TierBudgets {
    pub hot_bytes: Option<usize>,
    pub warm_bytes: Option<usize>,
    pub cold_bytes: Option<usize>,
}

/// A validated cache configuration. Build one with [`CacheConfig::builder`] or a preset.
///
/// Invariants after `validate()`: `num_q_heads % num_kv_heads == 0`; `head_dim % 32 == 0`;
/// `page_size` is a multiple of 8 in 8..=256; `value_group` divides `head_dim` and is a multiple of 32 (so a
/// group never splits a SIMD unpack block);
/// `protected_layers` are all `< num_layers`; `num_layers` and `num_q_heads` are at most
/// [`CacheConfig::MAX_LAYERS`] and [`CacheConfig::MAX_HEADS`].
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Transformer layers.
    pub num_layers: usize,
    /// Query heads per layer.
    pub num_q_heads: usize,
    /// Key/value heads per layer (GQA: divides `num_q_heads`; MQA: 1).
    pub num_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Token positions per page (all kv heads of one layer of one sequence).
    pub page_size: usize,
    /// Element type of hot pages.
    pub hot_dtype: HotDtype,
    /// The first `sink_tokens` positions of every sequence stay hot forever (attention sinks).
    pub sink_tokens: usize,
    /// The most recent `hot_window` tokens stay hot. A page is demoted to warm only once every one
    /// of its tokens is older than the window, so between `hot_window` and
    /// `hot_window + page_size - 1` recent tokens are exact at any time.
    pub hot_window: usize,
    /// Key code width in the warm tier.
    pub k_bits: Bits,
    /// Value code width in the warm tier.
    pub v_bits: Bits,
    /// Channels per value quantisation group (per token).
    pub value_group: usize,
    /// Layers kept entirely hot (exact), e.g. the first and last.
    pub protected_layers: Vec<usize>,
    /// When false, nothing is ever demoted: a full-precision cache (the quality reference).
    pub warm_enabled: bool,
    /// Byte budgets per tier.
    pub budgets: TierBudgets,
    /// Longest sequence accepted, per layer.
    pub max_seq_len: usize,
    /// Softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Keep a lossless archive in host RAM: every page that leaves the hot tier keeps its exact
    /// bytes (hot dtype), so `promote` restores it bit for bit. On by default; costs host memory
    /// (reported as `archive_bytes`), never device memory.
    pub archive: bool,
    /// Decay of the accumulated attention mass per page at each `observe` step:
    /// `mass = decay * mass + step_mass`. 1.0 (default) is H2O's plain accumulation.
    pub mass_decay: f32,
    /// Orthogonal rotation of keys/queries (and optionally values) before they are stored
    /// ([`crate::quant::rotate`]); off by default.
    pub rotation: Rotation,
    /// Seed of the rotation's per-layer sign vectors.
    pub rotation_seed: u64,
    /// Per-layer warm widths (at most one entry per layer); layers not listed use `k_bits` /
    /// `v_bits`. E.g. the first and last layers at higher precision ([`CacheConfigBuilder::edge_layers`]).
    pub layer_bits: Vec<LayerBits>,
    /// Key outlier channels per warm page and kv head kept exact (f16) beside the codes: the
    /// page's widest-range channels (0, the default: none). At most `head_dim / 4`.
    pub key_outliers: usize,
    /// Fit each value group's min and step to the least squared error over a grid of clipped
    /// ranges instead of taking its min and max ([`crate::quant::values`]); off by default. Same
    /// bytes; at 2 bits about 0.6x the squared error of min/max on Gaussian data, for an error
    /// bound of one step instead of half a step and ~10-20x the quantisation work. CPU storage
    /// only (CUDA and Metal refuse it).
    pub value_fit: bool,
    /// Spill the archive and cold pages to disk past a RAM budget (`None`, the default: RAM only).
    pub spill: Option<SpillConfig>,
    /// Worker threads of the cache's own pool for attention and prefill (`None`, the default:
    /// rayon's global pool, one thread per core, shared by every cache of the process).
    pub threads: Option<usize>,
    /// The CPU kernel path (instruction set and score arithmetic) of CPU storage
    /// ([`CpuKernel`]; `Auto`, the default: `KVTIER_CPU_KERNEL` or the fastest this CPU runs).
    pub cpu_kernel: CpuKernel,
}

impl CacheConfig {
    /// Starts a builder with the model shape and balanced defaults.
    pub fn builder(
        num_layers: usize,
        num_q_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> CacheConfigBuilder {
        CacheConfigBuilder {
            cfg: CacheConfig {
                num_layers,
                num_q_heads,
                num_kv_heads,
                head_dim,
                page_size: 32,
                hot_dtype: HotDtype::F16,
                sink_tokens: 4,
                hot_window: 128,
                k_bits: Bits::B4,
                v_bits: Bits::B4,
                value_group: 32,
                protected_layers: Vec::new(),
                warm_enabled: true,
                budgets: TierBudgets::default(),
                max_seq_len: 1 << 20,
                softmax_scale: None,
                archive: true,
                mass_decay: 1.0,
                rotation: Rotation::None,
                rotation_seed: 0x6b76_7469_6572,
                layer_bits: Vec::new(),
                key_outliers: 0,
                value_fit: false,
                spill: None,
                threads: None,
                cpu_kernel: CpuKernel::Auto,
            },
        }
    }

    /// `quality`: int8 keys and values, f16 hot pages, 256-token hot window, first and last layer
    /// protected. 1.76x smaller than f16 (device bytes, metadata included, measured at 32K tokens of
    /// 32 q / 8 kv heads, d128 by tests/core_v2.rs; the int8 format allows at most 1.78x), with
    /// near-lossless attention.
    pub fn quality(
        layers: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let mut b = Self::builder(layers, q_heads, kv_heads, head_dim)
            .k_bits(Bits::B8)
            .v_bits(Bits::B8)
            .hot_window(256);
        if layers > 2 {
            b = b.protected_layers(vec![0, layers - 1]);
        }
        b.build()
    }

    /// `balanced` (the default): int4 keys and values (KIVI-4), group 32, f16 hot pages,
    /// 128-token hot window, 4 sink tokens. 3.15x smaller than f16 (measured as for `quality`; the
    /// format allows at most 3.20x).
    pub fn balanced(
        layers: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Self::builder(layers, q_heads, kv_heads, head_dim).build()
    }

    /// `compact`: int4 keys, int2 values (k4v2), group 32, 64-token hot window, keys and values
    /// rotated ([`Rotation::KeysValues`]: on SmolLM2 at 4K it cuts k4v2's PPL loss from 1.8% to
    /// 0.6%, docs/results.md). 3.94x smaller than f16 (measured as for `quality`; the format allows
    /// at most 4.00x); keys keep 4 bits because softmax is far more sensitive to them.
    pub fn compact(
        layers: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Self::builder(layers, q_heads, kv_heads, head_dim)
            .v_bits(Bits::B2)
            .hot_window(64)
            .rotation(Rotation::KeysValues)
            .build()
    }

    /// Q heads that share one kv head.
    pub fn group_size(&self) -> usize {
        self.num_q_heads / self.num_kv_heads
    }

    /// The softmax scale in effect.
    pub fn scale(&self) -> f32 {
        self.softmax_scale
            .unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }

    /// The warm format pages of `layer` are demoted to by default.
    pub fn warm_format(&self, layer: usize) -> crate::quant::WarmFormat {
        match self.layer_bits.iter().find(|b| b.layer == layer) {
            Some(b) => crate::quant::WarmFormat {
                k_bits: b.k_bits,
                v_bits: b.v_bits,
            },
            None => crate::quant::WarmFormat {
                k_bits: self.k_bits,
                v_bits: self.v_bits,
            },
        }
    }

    /// This config as seen by one layer's storage: `k_bits` / `v_bits` are that layer's widths.
    pub fn for_layer(&self, layer: usize) -> CacheConfig {
        let f = self.warm_format(layer);
        CacheConfig {
            k_bits: f.k_bits,
            v_bits: f.v_bits,
            ..self.clone()
        }
    }

    /// Whether `layer` is kept entirely exact.
    pub fn is_protected(&self, layer: usize) -> bool {
        !self.warm_enabled || self.protected_layers.contains(&layer)
    }

    /// Largest `num_layers` accepted: far above any model, low enough that a cache's per-layer
    /// state is never a huge allocation (a shape such as `1 << 40` layers is a caller's bug).
    pub const MAX_LAYERS: usize = 4096;
    /// Largest `num_q_heads` (and so `num_kv_heads`) accepted, for the same reason; with
    /// `head_dim <= 512` every size product the cache computes stays far from overflow.
    pub const MAX_HEADS: usize = 4096;

    /// Largest `threads` accepted.
    pub const MAX_THREADS: usize = 1024;

    /// Checks every invariant; the error names the first offending field.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &'static str, v: usize| {
            if v == 0 {
                Err(Error::config(field, "must be > 0"))
            } else {
                Ok(())
            }
        };
        positive("num_layers", self.num_layers)?;
        positive("num_q_heads", self.num_q_heads)?;
        positive("num_kv_heads", self.num_kv_heads)?;
        positive("head_dim", self.head_dim)?;
        if self.num_layers > Self::MAX_LAYERS {
            return Err(Error::config(
                "num_layers",
                format!("{} must be <= {}", self.num_layers, Self::MAX_LAYERS),
            ));
        }
        if self.num_q_heads > Self::MAX_HEADS {
            return Err(Error::config(
                "num_q_heads",
                format!("{} must be <= {}", self.num_q_heads, Self::MAX_HEADS),
            ));
        }
        if !self.num_q_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::config(
                "num_kv_heads",
                format!(
                    "{} does not divide num_q_heads {}",
                    self.num_kv_heads, self.num_q_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(32) || self.head_dim > 512 {
            return Err(Error::config(
                "head_dim",
                format!("{} must be a multiple of 32 and <= 512", self.head_dim),
            ));
        }
        if !self.page_size.is_multiple_of(8) || !(8..=256).contains(&self.page_size) {
            return Err(Error::config(
                "page_size",
                format!("{} must be a multiple of 8 in 8..=256", self.page_size),
            ));
        }
        if self.value_group == 0
            || !self.value_group.is_multiple_of(32)
            || !self.head_dim.is_multiple_of(self.value_group)
        {
            return Err(Error::config(
                "value_group",
                format!(
                    "{} must be a multiple of 32 that divides head_dim {}",
                    self.value_group, self.head_dim
                ),
            ));
        }
        if let Some(&l) = self
            .protected_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return Err(Error::config(
                "protected_layers",
                format!("layer {l} >= num_layers {}", self.num_layers),
            ));
        }
        if let Some(t) = self.threads {
            if t == 0 || t > Self::MAX_THREADS {
                return Err(Error::config(
                    "threads",
                    format!("{t} must be in 1..={}", Self::MAX_THREADS),
                ));
            }
        }
        if self.key_outliers > self.head_dim / 4 {
            return Err(Error::config(
                "key_outliers",
                format!(
                    "{} must be <= head_dim / 4 = {}",
                    self.key_outliers,
                    self.head_dim / 4
                ),
            ));
        }
        for (i, b) in self.layer_bits.iter().enumerate() {
            if b.layer >= self.num_layers {
                return Err(Error::config(
                    "layer_bits",
                    format!("layer {} >= num_layers {}", b.layer, self.num_layers),
                ));
            }
            if self.layer_bits[..i].iter().any(|o| o.layer == b.layer) {
                return Err(Error::config(
                    "layer_bits",
                    format!("layer {} is listed twice", b.layer),
                ));
            }
        }
        if self.max_seq_len == 0 || self.max_seq_len > (u32::MAX as usize) {
            return Err(Error::config("max_seq_len", "must be in 1..=u32::MAX"));
        }
        if !(self.mass_decay > 0.0 && self.mass_decay <= 1.0) {
            return Err(Error::config(
                "mass_decay",
                format!("{} must be in (0, 1]", self.mass_decay),
            ));
        }
        if let Some(s) = self.softmax_scale {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::config(
                    "softmax_scale",
                    format!("{s} must be finite and > 0"),
                ));
            }
        }
        Ok(())
    }
}

/// Builder for [`CacheConfig`]; `build()` validates.
#[derive(Debug, Clone)]
pub struct CacheConfigBuilder {
    cfg: CacheConfig,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, v: $ty) -> Self {
            self.cfg.$name = v;
            self
        }
    };
}

impl CacheConfigBuilder {
    setter!(/// Tokens per page.
        page_size: usize);
    setter!(/// Hot page element type.
        hot_dtype: HotDtype);
    setter!(/// Attention-sink tokens kept hot.
        sink_tokens: usize);
    setter!(/// Recent tokens kept hot.
        hot_window: usize);
    setter!(/// Warm key bits.
        k_bits: Bits);
    setter!(/// Warm value bits.
        v_bits: Bits);
    setter!(/// Value quantisation group size.
        value_group: usize);
    setter!(/// Layers kept exact.
        protected_layers: Vec<usize>);
    setter!(/// Per-tier byte budgets.
        budgets: TierBudgets);
    setter!(/// Longest sequence accepted.
        max_seq_len: usize);
    setter!(/// Softmax scale (default `1/sqrt(head_dim)`).
        softmax_scale: Option<f32>);
    setter!(/// Lossless host archive of pages that leave the hot tier (default on).
        archive: bool);
    setter!(/// Per-step decay of accumulated page attention mass, in (0, 1] (default 1).
        mass_decay: f32);
    setter!(/// Rotation of keys/queries (and values) before storage (default none).
        rotation: Rotation);
    setter!(/// Seed of the rotation's sign vectors.
        rotation_seed: u64);
    setter!(/// Key outlier channels kept exact per warm page and kv head (default 0).
        key_outliers: usize);
    setter!(/// Fit value ranges to the least squared error (default off: min/max).
        value_fit: bool);
    setter!(/// Spill host pages to disk past a RAM budget (default none).
        spill: Option<SpillConfig>);
    setter!(/// Threads of the cache's own pool (default: rayon's global pool).
        threads: Option<usize>);
    setter!(/// CPU kernel path (default `Auto`).
        cpu_kernel: CpuKernel);

    /// Warm widths of one layer (replacing an earlier entry for it).
    pub fn layer_bits(mut self, layer: usize, k_bits: Bits, v_bits: Bits) -> Self {
        self.cfg.layer_bits.retain(|b| b.layer != layer);
        self.cfg.layer_bits.push(LayerBits {
            layer,
            k_bits,
            v_bits,
        });
        self
    }

    /// The first `n` and last `n` layers at `k_bits` / `v_bits` (the layers most sensitive to
    /// quantisation in most models), the others at the config's widths.
    pub fn edge_layers(mut self, n: usize, k_bits: Bits, v_bits: Bits) -> Self {
        let layers = self.cfg.num_layers;
        for l in (0..n.min(layers)).chain(layers.saturating_sub(n)..layers) {
            self = self.layer_bits(l, k_bits, v_bits);
        }
        self
    }

    /// Keeps every page hot and exact (no warm tier): the full-precision reference.
    pub fn full_precision(mut self) -> Self {
        self.cfg.warm_enabled = false;
        self
    }

    /// Validates and returns the config.
    pub fn build(self) -> Result<CacheConfig> {
        self.cfg.validate()?;
        Ok(self.cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for f in [
            CacheConfig::quality,
            CacheConfig::balanced,
            CacheConfig::compact,
        ] {
            f(32, 32, 8, 128).unwrap();
            f(30, 9, 3, 64).unwrap();
        }
    }

    #[test]
    fn invalid_fields_are_named() {
        let field = |r: Result<CacheConfig>| match r {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
        assert_eq!(
            field(CacheConfig::builder(0, 8, 8, 64).build()),
            "num_layers"
        );
        assert_eq!(
            field(CacheConfig::builder(2, 9, 2, 64).build()),
            "num_kv_heads"
        );
        assert_eq!(
            field(CacheConfig::builder(1 << 40, 8, 8, 64).build()),
            "num_layers"
        );
        assert_eq!(
            field(CacheConfig::builder(2, 1 << 33, 1, 64).build()),
            "num_q_heads"
        );
        assert_eq!(field(CacheConfig::builder(2, 8, 8, 60).build()), "head_dim");
        assert_eq!(
            field(CacheConfig::builder(2, 8, 8, 64).page_size(12).build()),
            "page_size"
        );
        assert_eq!(
            field(CacheConfig::builder(2, 8, 8, 64).value_group(48).build()),
            "value_group"
        );
        assert_eq!(
            field(
                CacheConfig::builder(2, 8, 8, 64)
                    .protected_layers(vec![2])
                    .build()
            ),
            "protected_layers"
        );
        assert_eq!(
            field(
                CacheConfig::builder(2, 8, 8, 64)
                    .softmax_scale(Some(f32::NAN))
                    .build()
            ),
            "softmax_scale"
        );
        assert_eq!(
            field(
                CacheConfig::builder(2, 8, 8, 64)
                    .layer_bits(2, Bits::B8, Bits::B8)
                    .build()
            ),
            "layer_bits"
        );
        let mut dup = CacheConfig::builder(2, 8, 8, 64).build().unwrap();
        dup.layer_bits = vec![
            LayerBits {
                layer: 1,
                k_bits: Bits::B8,
                v_bits: Bits::B8,
            };
            2
        ];
        assert_eq!(field(dup.validate().map(|_| dup.clone())), "layer_bits");
        let e = CacheConfig::builder(6, 8, 8, 64)
            .k_bits(Bits::B2)
            .v_bits(Bits::B2)
            .edge_layers(1, Bits::B4, Bits::B4)
            .build()
            .unwrap();
        assert_eq!(e.warm_format(0).k_bits, Bits::B4);
        assert_eq!(e.warm_format(5).v_bits, Bits::B4);
        assert_eq!(e.warm_format(3).k_bits, Bits::B2);
        assert_eq!(e.for_layer(5).k_bits, Bits::B4);
        assert!(Bits::from_bits(5).is_err());
        assert_eq!(Bits::from_bits(3).unwrap().max_code(), 7);
    }
}
