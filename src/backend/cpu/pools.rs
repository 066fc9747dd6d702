//! Host page pools of one layer: slot vectors with free lists, one allocation per page so the bytes
//! reported are exactly the bytes held. Allocation failures become `Error::OutOfMemory`.

use crate::config::HotDtype;
use crate::error::{Error, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Exact page payload in the hot dtype, `[num_kv_heads][page_size][head_dim]`.
pub enum HotBuf {
    F32(Box<[f32]>),
    F16(Box<[f16]>),
    BF16(Box<[bf16]>),
}

fn try_boxed<T: Clone>(len: usize, fill: T, what: &'static str) -> Result<Box<[T]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
        what,
        bytes: len * std::mem::size_of::<T>(),
    })?;
    v.resize(len, fill);
    Ok(v.into_boxed_slice())
}

impl HotBuf {
    pub fn new(dtype: HotDtype, len: usize) -> Result<Self> {
        Ok(match dtype {
            HotDtype::F32 => HotBuf::F32(try_boxed(len, 0.0, "hot page")?),
            HotDtype::F16 => HotBuf::F16(try_boxed(len, f16::ZERO, "hot page")?),
            HotDtype::BF16 => HotBuf::BF16(try_boxed(len, bf16::ZERO, "hot page")?),
        })
    }

    pub fn bytes(&self) -> usize {
        match self {
            HotBuf::F32(b) => b.len() * 4,
            HotBuf::F16(b) => b.len() * 2,
            HotBuf::BF16(b) => b.len() * 2,
        }
    }

    /// Appends the elements' little-endian bytes to `out` (one resize, then fixed-size chunks: a
    /// copy on little-endian targets, where per-element `extend_from_slice` was not).
    pub fn append_le_bytes(&self, out: &mut Vec<u8>) {
        fn put<const N: usize, T: Copy>(out: &mut Vec<u8>, src: &[T], le: impl Fn(T) -> [u8; N]) {
            let start = out.len();
            out.resize(start + src.len() * N, 0);
            for (c, &x) in out[start..].chunks_exact_mut(N).zip(src) {
                c.copy_from_slice(&le(x));
            }
        }
        match self {
            HotBuf::F32(b) => put(out, b, f32::to_le_bytes),
            HotBuf::F16(b) => put(out, b, f16::to_le_bytes),
            HotBuf::BF16(b) => put(out, b, bf16::to_le_bytes),
        }
    }

    /// A buffer of `len` elements from little-endian bytes (`bytes.len() == len * size`).
    pub fn from_le_bytes(dtype: HotDtype, len: usize, bytes: &[u8]) -> Result<Self> {
        let mut b = Self::new(dtype, len)?;
        match &mut b {
            HotBuf::F32(d) => {
                for (x, c) in d.iter_mut().zip(bytes.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            HotBuf::F16(d) => {
                for (x, c) in d.iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = f16::from_le_bytes([c[0], c[1]]);
                }
            }
            HotBuf::BF16(d) => {
                for (x, c) in d.iter_mut().zip(bytes.chunks_exact(2)) {
                    *x = bf16::from_le_bytes([c[0], c[1]]);
                }
            }
        }
        Ok(b)
    }

    /// Stores `src` at element offset `at` (rounding to the hot dtype).
    pub fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            HotBuf::F32(b) => b[at..at + src.len()].copy_from_slice(src),
            HotBuf::F16(b) => {
                for (d, &s) in b[at..at + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(s);
                }
            }
            HotBuf::BF16(b) => {
                for (d, &s) in b[at..at + src.len()].iter_mut().zip(src) {
                    *d = bf16::from_f32(s);
                }
            }
        }
    }

    /// `len` elements from `at` as f32: borrowed for f32 pages, converted into `scratch` otherwise.
    pub fn read<'a>(&'a self, at: usize, len: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            HotBuf::F32(b) => &b[at..at + len],
            // `convert_to_f32_slice` picks F16C / SIMD at run time once per slice.
            HotBuf::F16(b) => {
                scratch.resize(len, 0.0);
                b[at..at + len].convert_to_f32_slice(scratch);
                scratch
            }
            HotBuf::BF16(b) => {
                scratch.resize(len, 0.0);
                b[at..at + len].convert_to_f32_slice(scratch);
                scratch
            }
        }
    }
}

/// One exact page: keys and values.
pub struct HotPage {
    pub k: HotBuf,
    pub v: HotBuf,
}

/// A pool of pages of type `T` addressed by stable `u32` slots.
pub struct Pool<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    live: usize,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }
}

impl<T> Pool<T> {
    pub fn insert(&mut self, page: T) -> Result<u32> {
        self.live += 1;
        if let Some(slot) = self.free.pop() {
            self.slots[slot as usize] = Some(page);
            return Ok(slot);
        }
        if self.slots.len() >= u32::MAX as usize {
            self.live -= 1;
            return Err(Error::OutOfMemory {
                what: "page slots",
                bytes: 0,
            });
        }
        self.slots.try_reserve(1).map_err(|_| Error::OutOfMemory {
            what: "page slot table",
            bytes: std::mem::size_of::<Option<T>>(),
        })?;
        self.slots.push(Some(page));
        Ok((self.slots.len() - 1) as u32)
    }

    pub fn remove(&mut self, slot: u32) -> Option<T> {
        let page = self.slots.get_mut(slot as usize)?.take();
        if page.is_some() {
            self.live -= 1;
            self.free.push(slot);
        }
        page
    }

    pub fn get(&self, slot: u32) -> Option<&T> {
        self.slots.get(slot as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Bookkeeping bytes: the slot vector and the free list.
    pub fn metadata_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<T>>() + self.free.capacity() * 4
    }
}

pub(crate) fn try_zeroed_bytes(len: usize) -> Result<Box<[u8]>> {
    try_boxed(len, 0u8, "warm page")
}
