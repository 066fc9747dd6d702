//! Packing of quantisation codes into bytes.
//!
//! Standard order (the stored format, read by every backend): code `i` of a row sits in byte
//! `i / n` at bit offset `(i % n) * bits`, with `n = 8 / bits` codes per byte.
//!
//! 3-bit rows (8 codes in 3 bytes, exactly 3 bits per code) are two planes: the low two bits of
//! every code packed as a 2-bit row (`len / 4` bytes), then the high bits, code `i`'s in byte
//! `len / 4 + i / 8` at bit `i % 8`. Chosen over 10 codes in 32 bits (3.2 bits per code, 7% more
//! bytes) because no code straddles a byte, the low plane decodes with the 2-bit path as it is, and
//! the high plane is one shift and mask per code on every backend.
//!
//! Lane order (a CPU-kernel view, never stored): unpacking 8 bytes at once yields `n` vectors of 8
//! lanes, vector `k` holding bit field `k` of each byte. A row unpacked that way is a fixed
//! permutation of the standard order ([`lane_order`]); the CPU kernel permutes the query and the
//! output once instead of shuffling every row.

use crate::config::Bits;

/// Packs `codes` (each `<= bits.max_code()`) into `out` in standard order.
/// `out.len()` must be `codes.len() * bits / 8`.
pub fn pack_row(codes: &[u8], bits: Bits, out: &mut [u8]) {
    if bits == Bits::B3 {
        let (lo, hi) = out.split_at_mut(codes.len() / 4);
        let low: Vec<u8> = codes.iter().map(|c| c & 3).collect();
        pack_row(&low, Bits::B2, lo);
        for (byte, chunk) in hi.iter_mut().zip(codes.chunks_exact(8)) {
            *byte = chunk
                .iter()
                .enumerate()
                .fold(0u8, |v, (k, &c)| v | (((c >> 2) & 1) << k));
        }
        return;
    }
    let n = bits.per_byte();
    let b = bits.bits();
    debug_assert_eq!(out.len() * n, codes.len());
    for (byte, chunk) in out.iter_mut().zip(codes.chunks_exact(n)) {
        let mut v = 0u8;
        for (k, &c) in chunk.iter().enumerate() {
            v |= c << (k * b);
        }
        *byte = v;
    }
}

/// Unpacks a row in standard order into `out` (`out.len() == packed.len() * 8 / bits`).
pub fn unpack_row(packed: &[u8], bits: Bits, out: &mut [u8]) {
    if bits == Bits::B3 {
        let (lo, hi) = packed.split_at(out.len() / 4);
        unpack_row(lo, Bits::B2, out);
        for (chunk, &byte) in out.chunks_exact_mut(8).zip(hi) {
            for (k, c) in chunk.iter_mut().enumerate() {
                *c |= ((byte >> k) & 1) << 2;
            }
        }
        return;
    }
    let n = bits.per_byte();
    let b = bits.bits();
    let mask = bits.max_code() as u8;
    for (chunk, &byte) in out.chunks_exact_mut(n).zip(packed) {
        for (k, c) in chunk.iter_mut().enumerate() {
            *c = (byte >> (k * b)) & mask;
        }
    }
}

/// `lane_order(bits, len)[p]` is the standard index of the code found at position `p` when a row of
/// `len` codes (a multiple of `8 * 8 / bits`) is unpacked 8 bytes at a time in lane order. 3-bit
/// rows use the 2-bit order of their low plane.
pub fn lane_order(bits: Bits, len: usize) -> Vec<usize> {
    lane_order_chunk(bits, len, 8)
}

/// [`lane_order`] for unpacking `chunk` bytes at a time (`chunk` lanes per vector): position `p`
/// of block `c` (`chunk · 8 / bits` codes), vector `k`, lane `j` holds standard code
/// `(c · chunk + j) · n + k`. Empty when `len` is not a whole number of blocks.
pub fn lane_order_chunk(bits: Bits, len: usize, chunk: usize) -> Vec<usize> {
    let n = bits.per_byte();
    let block = chunk * n;
    if chunk == 0 || !len.is_multiple_of(block) {
        return Vec::new();
    }
    (0..len)
        .map(|p| {
            let (c, k, j) = (p / block, (p % block) / chunk, p % chunk);
            (c * chunk + j) * n + k
        })
        .collect()
}

/// Unpacks a row in lane order to f32 (`out.len() == packed.len() * 8 / bits`). Written so LLVM
/// vectorises it: fixed 8-wide inner loops, no data-dependent branches.
#[inline(always)]
pub fn unpack_row_lanes_f32(packed: &[u8], bits: Bits, out: &mut [f32]) {
    if bits == Bits::B3 {
        let (lo, hi) = packed.split_at(out.len() / 4);
        unpack_row_lanes_f32(lo, Bits::B2, out);
        add_high_plane_lanes(hi, out);
        return;
    }
    let n = bits.per_byte();
    let b = bits.bits();
    let mask = bits.max_code() as u8;
    for (bytes, block) in packed.chunks_exact(8).zip(out.chunks_exact_mut(8 * n)) {
        for k in 0..n {
            let lanes = &mut block[k * 8..k * 8 + 8];
            for j in 0..8 {
                lanes[j] = ((bytes[j] >> (k * b)) & mask) as f32;
            }
        }
    }
}

/// Adds `4 · high bit` to a 3-bit row's low plane unpacked in (2-bit) lane order. Lane `(k, j)` of
/// 32-code block `c` is standard code `32c + 4j + k`, whose high bit is bit `4j + k` of the block's
/// 32-bit little-endian high word.
#[inline(always)]
pub fn add_high_plane_lanes(hi: &[u8], out: &mut [f32]) {
    for (w, block) in hi.chunks_exact(4).zip(out.chunks_exact_mut(32)) {
        let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        for k in 0..4 {
            for j in 0..8 {
                block[k * 8 + j] += (((w >> (4 * j + k)) & 1) * 4) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lane_order() {
        for bits in [Bits::B8, Bits::B4, Bits::B3, Bits::B2] {
            let len = 128;
            let codes: Vec<u8> = (0..len)
                .map(|i| (i * 7 % (bits.max_code() as usize + 1)) as u8)
                .collect();
            let mut packed = vec![0u8; len * bits.bits() / 8];
            pack_row(&codes, bits, &mut packed);
            let mut back = vec![0u8; len];
            unpack_row(&packed, bits, &mut back);
            assert_eq!(back, codes);
            let mut lanes = vec![0f32; len];
            unpack_row_lanes_f32(&packed, bits, &mut lanes);
            let order = lane_order(bits, len);
            for p in 0..len {
                assert_eq!(lanes[p], codes[order[p]] as f32, "bits {bits:?} p {p}");
            }
        }
    }
}
