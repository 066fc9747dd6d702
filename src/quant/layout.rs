//! Byte layout of one warm page.
//!
//! A warm page is `num_kv_heads` equal head blocks. Each head block is, in order (offsets 16-byte
//! aligned so SIMD and GPU loads never straddle):
//!
//! | part       | type | count                         | meaning                                   |
//! |------------|------|-------------------------------|-------------------------------------------|
//! | `k_min`    | f16  | head_dim                      | per-channel minimum over the page's tokens|
//! | `k_step`   | f16  | head_dim                      | per-channel step                          |
//! | `v_min`    | f16  | page_size * groups            | per-token, per-group minimum              |
//! | `v_step`   | f16  | page_size * groups            | per-token, per-group step                 |
//! | `k_codes`  | u8   | page_size * head_dim*k_bits/8 | token-major packed key codes              |
//! | `v_codes`  | u8   | page_size * head_dim*v_bits/8 | token-major packed value codes            |
//! | `out_idx`  | u16  | outliers                      | key outlier channels, ascending           |
//! | `out_val`  | f16  | page_size * outliers          | their exact keys, token-major             |
//!
//! The last two parts exist only when the config keeps key outlier channels (`key_outliers > 0`):
//! the page's widest-range channels are stored as f16 beside the codes, and their min, step and
//! codes are zero, so the code path contributes nothing for them (KVQuant's dense-and-sparse split,
//! per page). `k_min` and `k_min + max_code * k_step` are the page's exact per-channel key bounds
//! for the other channels: the Quest-style page bound used by elimination costs nothing extra.

use crate::config::{Bits, CacheConfig};

const ALIGN: usize = 16;

/// The code widths of one warm page. Pages of one layer may differ: a policy can demote a warm
/// page to fewer bits (`KvCache::demote`), so the format travels with the page entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WarmFormat {
    pub k_bits: Bits,
    pub v_bits: Bits,
}

impl WarmFormat {
    /// The config's default format.
    pub fn of(cfg: &CacheConfig) -> Self {
        WarmFormat {
            k_bits: cfg.k_bits,
            v_bits: cfg.v_bits,
        }
    }
    /// Both widths equal to `bits`.
    pub const fn uniform(bits: Bits) -> Self {
        WarmFormat {
            k_bits: bits,
            v_bits: bits,
        }
    }
    /// True when no width of `self` is wider than the same width of `other`.
    pub fn no_wider_than(&self, other: WarmFormat) -> bool {
        self.k_bits.bits() <= other.k_bits.bits() && self.v_bits.bits() <= other.v_bits.bits()
    }
}

fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Offsets (bytes) of each part inside one head block, and the block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmLayout {
    pub page_size: usize,
    pub head_dim: usize,
    pub k_bits: Bits,
    pub v_bits: Bits,
    pub value_group: usize,
    pub k_min: usize,
    pub k_step: usize,
    pub v_min: usize,
    pub v_step: usize,
    pub k_codes: usize,
    pub v_codes: usize,
    /// Key outlier channels per head block (0: none).
    pub outliers: usize,
    pub out_idx: usize,
    pub out_val: usize,
    /// Bytes of one head block (aligned).
    pub head_bytes: usize,
    /// Value ranges fitted to the least squared error (`quant::values`), not the group's min/max:
    /// the same bytes, a different choice of min and step, and an error bound of one step instead
    /// of half a step.
    pub value_fit: bool,
}

impl WarmLayout {
    /// Layout for the given geometry.
    pub fn new(
        page_size: usize,
        head_dim: usize,
        k_bits: Bits,
        v_bits: Bits,
        value_group: usize,
    ) -> Self {
        let groups = head_dim / value_group;
        let k_min = 0;
        let k_step = align(k_min + 2 * head_dim);
        let v_min = align(k_step + 2 * head_dim);
        let v_step = align(v_min + 2 * page_size * groups);
        let k_codes = align(v_step + 2 * page_size * groups);
        let v_codes = align(k_codes + page_size * head_dim * k_bits.bits() / 8);
        let head_bytes = align(v_codes + page_size * head_dim * v_bits.bits() / 8);
        WarmLayout {
            value_fit: false,
            outliers: 0,
            out_idx: head_bytes,
            out_val: head_bytes,
            page_size,
            head_dim,
            k_bits,
            v_bits,
            value_group,
            k_min,
            k_step,
            v_min,
            v_step,
            k_codes,
            v_codes,
            head_bytes,
        }
    }

    /// This layout with `n` key outlier channels per head block appended.
    pub fn with_outliers(mut self, n: usize) -> Self {
        let end = self.v_codes + self.page_size * self.v_row_bytes();
        self.outliers = n;
        self.out_idx = align(end);
        self.out_val = align(self.out_idx + 2 * n);
        self.head_bytes = align(self.out_val + 2 * self.page_size * n);
        if n == 0 {
            self.head_bytes = align(end);
            self.out_idx = self.head_bytes;
            self.out_val = self.head_bytes;
        }
        self
    }

    /// This layout with value ranges fitted to the least squared error (`true`) or min/max.
    pub fn with_value_fit(mut self, fit: bool) -> Self {
        self.value_fit = fit;
        self
    }

    /// Layout for a config (its default warm format).
    pub fn of(cfg: &CacheConfig) -> Self {
        Self::of_format(cfg, WarmFormat::of(cfg))
    }

    /// Layout of a page of `cfg`'s geometry in warm format `fmt`.
    pub fn of_format(cfg: &CacheConfig, fmt: WarmFormat) -> Self {
        Self::new(
            cfg.page_size,
            cfg.head_dim,
            fmt.k_bits,
            fmt.v_bits,
            cfg.value_group,
        )
        .with_outliers(cfg.key_outliers)
        .with_value_fit(cfg.value_fit)
    }

    /// The code widths of this layout.
    pub fn format(&self) -> WarmFormat {
        WarmFormat {
            k_bits: self.k_bits,
            v_bits: self.v_bits,
        }
    }

    /// Value groups per token.
    pub fn groups(&self) -> usize {
        self.head_dim / self.value_group
    }
    /// Packed bytes of one token's key codes.
    pub fn k_row_bytes(&self) -> usize {
        self.head_dim * self.k_bits.bits() / 8
    }
    /// Packed bytes of one token's value codes.
    pub fn v_row_bytes(&self) -> usize {
        self.head_dim * self.v_bits.bits() / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_do_not_overlap_and_are_aligned() {
        for (kb, vb) in [
            (Bits::B8, Bits::B8),
            (Bits::B4, Bits::B2),
            (Bits::B2, Bits::B4),
        ] {
            let l = WarmLayout::new(32, 128, kb, vb, 32);
            let parts = [
                (l.k_min, 2 * 128),
                (l.k_step, 2 * 128),
                (l.v_min, 2 * 32 * 4),
                (l.v_step, 2 * 32 * 4),
                (l.k_codes, 32 * l.k_row_bytes()),
                (l.v_codes, 32 * l.v_row_bytes()),
            ];
            for w in parts.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0);
                assert_eq!(w[1].0 % ALIGN, 0);
            }
            assert!(parts[5].0 + parts[5].1 <= l.head_bytes);
        }
        let o = WarmLayout::new(32, 128, Bits::B2, Bits::B2, 32).with_outliers(4);
        assert!(o.out_idx >= o.v_codes + 32 * o.v_row_bytes() && o.out_idx.is_multiple_of(ALIGN));
        assert!(o.out_val >= o.out_idx + 8 && o.out_val.is_multiple_of(ALIGN));
        assert_eq!(o.head_bytes, o.out_val + 2 * 32 * 4);
        assert_eq!(
            o.with_outliers(0),
            WarmLayout::new(32, 128, Bits::B2, Bits::B2, 32)
        );
        // int4 K and V, d128, 32 tokens: 4096 code bytes + 512 value min/step bytes + 512 key min/step bytes.
        assert_eq!(
            WarmLayout::new(32, 128, Bits::B4, Bits::B4, 32).head_bytes,
            512 + 512 + 4096
        );
    }
}
