//! The kernels' parameter structs and threadgroup-memory sizes, mirrored field for field from
//! `kernels/common.metal` (only 32-bit fields, in groups of four, so C and MSL lay them out alike).
//!
//! Owns: [`AppendParams`], [`QuantParams`], [`DecodeItem`], [`DecodeParams`], [`CombineParams`],
//! and the byte counts of each kernel's threadgroup memory.
//! Must never: change a struct without the same change in `common.metal` (the layout tests below
//! pin the sizes).

use bytemuck::{Pod, Zeroable};

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub(crate) struct AppendParams {
    pub slot: u32,
    pub first: u32,
    pub n: u32,
    pub kvh: u32,
    pub ps: u32,
    pub d: u32,
    pub hot_dtype: u32,
    pub src_dtype: u32,
    pub hot_page_bytes: u32,
    pub pad: [u32; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub(crate) struct QuantParams {
    pub hot_slot: u32,
    pub warm_slot: u32,
    pub n: u32,
    pub ps: u32,
    pub d: u32,
    pub hot_dtype: u32,
    pub hot_page_bytes: u32,
    pub warm_page_bytes: u32,
    pub head_bytes: u32,
    pub k_bits: u32,
    pub v_bits: u32,
    pub value_group: u32,
    pub k_min: u32,
    pub k_step: u32,
    pub v_min: u32,
    pub v_step: u32,
    pub k_codes: u32,
    pub v_codes: u32,
    pub pad: [u32; 2],
}

/// One decode work item: one page of one kv head of one sequence (`tier` 0 hot, 1 warm; the
/// offsets are the page format's [`crate::quant::WarmLayout`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub(crate) struct DecodeItem {
    pub seq: u32,
    pub kv: u32,
    pub page: u32,
    pub tier: u32,
    pub slot: u32,
    pub n: u32,
    pub k_bits: u32,
    pub v_bits: u32,
    pub k_min: u32,
    pub k_step: u32,
    pub v_min: u32,
    pub v_step: u32,
    pub k_codes: u32,
    pub v_codes: u32,
    pub head_bytes: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub(crate) struct DecodeParams {
    pub n_items: u32,
    pub qh: u32,
    pub kvh: u32,
    pub d: u32,
    pub ps: u32,
    pub g: u32,
    pub hot_dtype: u32,
    pub q_dtype: u32,
    pub hot_page_bytes: u32,
    pub warm_page_bytes: u32,
    pub value_group: u32,
    pub pad0: u32,
    pub scale: f32,
    pub pad1: [f32; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub(crate) struct CombineParams {
    pub n_seqs: u32,
    pub qh: u32,
    pub kvh: u32,
    pub g: u32,
    pub d: u32,
    pub want_lse: u32,
    pub pad: [u32; 2],
}

fn align16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// `kvt_quantize`: kmin, kstep `[d]` u16 | vmin, vstep `[ps * ng]` u16 | klo, khi `[d]` f32 | u32.
pub(crate) fn quant_tg_bytes(d: usize, ps: usize, value_group: usize) -> usize {
    let ng = d / value_group;
    let fl = (4 * d + 4 * ps * ng).div_ceil(4) * 4;
    align16(fl + 8 * d + 4)
}

/// `kvt_decode`: q `[g * d]` | s `[g * ps]` | st `[g * 4]`, all f32.
pub(crate) fn decode_tg_bytes(g: usize, d: usize, ps: usize) -> usize {
    align16(4 * (g * d + g * ps + 4 * g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_msl_sizes() {
        assert_eq!(std::mem::size_of::<AppendParams>(), 48);
        assert_eq!(std::mem::size_of::<QuantParams>(), 80);
        assert_eq!(std::mem::size_of::<DecodeItem>(), 64);
        assert_eq!(std::mem::size_of::<DecodeParams>(), 64);
        assert_eq!(std::mem::size_of::<CombineParams>(), 32);
    }
}
