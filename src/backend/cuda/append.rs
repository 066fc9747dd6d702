//! Appends whose keys and values are already in device memory (`write_hot_device`): one launch
//! for a whole batch of rows, on the caller's stream.
//!
//! Owns: checking the caller's [`CudaRows`], uploading the row map (slot and token of every row)
//! from page-locked memory, the `kvt_append_rows` launch (conversion to the hot dtype, the
//! rotation, the element checks), reading its check words back and, when an element is bad,
//! zeroing the rows again before the error is returned. Must never: leave a written row behind on
//! an error (tokens past a page's length are zero: exported pages and demotions rely on it), read
//! a caller's element on the host, or return before the caller's stream has run the launch (the
//! buffers are the caller's again after the call).

use super::device::drv;
use super::storage::CudaStorage;
use super::CudaRows;
use crate::backend::{DeviceRotation, DeviceRows, HotRow, InputDtype};
use crate::config::HotDtype;
use crate::error::{Error, Result};
use cudarc::driver::{result as cu, sys, LaunchConfig, PushKernelArg};

/// Check words after the row map: 4 smallest bad indices, the largest |x|, padding.
const CHECK_WORDS: usize = 8;

impl CudaStorage {
    pub(super) fn write_rows(
        &mut self,
        rows: &[HotRow],
        src: &DeviceRows,
        rotation: Option<DeviceRotation>,
    ) -> Result<()> {
        let DeviceRows::Cuda(r) = *src;
        let CudaRows {
            keys,
            values,
            dtype,
            stream,
        } = r;
        if rows.is_empty() {
            return Ok(());
        }
        let es = dtype.size() as u64;
        if keys == 0 || values == 0 || !keys.is_multiple_of(es) || !values.is_multiple_of(es) {
            return Err(Error::shape(
                "device rows",
                format!("non-null keys and values aligned to {es} bytes"),
                format!("keys {keys:#x}, values {values:#x}"),
            ));
        }
        for row in rows {
            self.hot_slot_check(row.slot)?;
            if row.pos as usize >= self.ps {
                return Err(Error::internal(format!(
                    "device row at token {} of a {}-token page",
                    row.pos, self.ps
                )));
            }
        }
        let (signs, norm, rot) = match rotation {
            Some(r) if r.signs.len() != self.d => {
                return Err(Error::internal(format!(
                    "rotation signs: {} for head_dim {}",
                    r.signs.len(),
                    self.d
                )))
            }
            Some(r) => (r.signs, r.norm, 1u32 | u32::from(r.values) << 1),
            None => (&[][..], 1.0, 0),
        };
        let n = rows.len();
        let map_bytes = n
            .checked_mul(8)
            .filter(|&b| n <= u32::MAX as usize && b <= isize::MAX as usize / 2)
            .ok_or_else(|| Error::shape("device rows", "a row count that fits memory", n))?;
        let total = map_bytes + 4 * (CHECK_WORDS + self.d);
        let st = self.stream().clone();
        let dev = self.rows_dev.ensure(&st, total, false)?;
        let host = self.rows_host.ensure(st.context(), total)?;
        // The map, the initial check words (no bad index, |x| 0) and the signs, little-endian.
        for (i, row) in rows.iter().enumerate() {
            host[8 * i..8 * i + 4].copy_from_slice(&row.slot.to_le_bytes());
            host[8 * i + 4..8 * i + 8].copy_from_slice(&row.pos.to_le_bytes());
        }
        let mut words = [u32::MAX; CHECK_WORDS];
        words[4..].fill(0);
        for (j, w) in words.iter().enumerate() {
            host[map_bytes + 4 * j..map_bytes + 4 * j + 4].copy_from_slice(&w.to_le_bytes());
        }
        let sg = map_bytes + 4 * CHECK_WORDS;
        for (j, s) in signs.iter().enumerate() {
            host[sg + 4 * j..sg + 4 * j + 4].copy_from_slice(&s.to_le_bytes());
        }
        let user = stream as sys::CUstream;
        // Order the caller's stream after our pending work (fresh slots' memsets, the buffer).
        if self.rows_ev.is_none() {
            self.rows_ev = Some(st.context().new_event(None).map_err(drv)?);
        }
        let ev = self
            .rows_ev
            .as_ref()
            .ok_or_else(|| Error::internal("the append event was just created"))?;
        ev.record(&st).map_err(drv)?;
        let host = &self.rows_host.slice_mut()[..total];
        // SAFETY: `user` is the caller's live stream of this context (or the legacy default
        // stream), `ev` a live event of it; `dev` holds `total` bytes (ensured above) and `host`
        // is page-locked memory of `total` bytes that no other copy uses until the synchronise
        // below.
        unsafe {
            cu::stream::wait_event(
                user,
                ev.cu_event(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(drv)?;
            cu::memcpy_htod_async(dev, host, user).map_err(drv)?;
        }
        let hot_max = match self.hot_dtype {
            HotDtype::F32 => f32::MAX,
            HotDtype::F16 => half::f16::MAX.to_f32(),
            HotDtype::BF16 => half::bf16::MAX.to_f32(),
        };
        let in_dtype: u32 = match dtype {
            InputDtype::F32 => 0,
            InputDtype::F16 => 1,
            InputDtype::BF16 => 2,
        };
        let (map, check) = (dev, dev + map_bytes as u64);
        let signs_ptr = if rot != 0 { dev + sg as u64 } else { 0 };
        let launch = |this: &Self, mode: u32| -> Result<()> {
            // SAFETY: a borrowed wrapper of the caller's live stream; dropping it destroys nothing.
            let s = unsafe { st.context().wrap_borrowed_stream(user) };
            let cfg = LaunchConfig {
                grid_dim: (n as u32, this.kvh as u32, 2),
                block_dim: (this.d as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let hot = this.hot.base();
            let mut b = s.launch_builder(&this.k.append_rows);
            b.arg(&keys)
                .arg(&values)
                .arg(&in_dtype)
                .arg(&map)
                .arg(&hot)
                .arg(&signs_ptr)
                .arg(&rot)
                .arg(&norm)
                .arg(&hot_max)
                .arg(&mode)
                .arg(&check);
            // SAFETY: argument types and order match `kvt_append_rows`; every mapped slot is live
            // and every position below the page size (checked above), so each store lands in its
            // slot; `keys` / `values` hold `n * kvh * d` elements of `dtype` readable on `user`
            // (the caller's contract), read only in mode 0.
            unsafe { b.launch(cfg) }.map_err(drv)?;
            Ok(())
        };
        launch(self, 0)?;
        let mut got = [0u32; CHECK_WORDS];
        // SAFETY: reads the check words after the launch on the same stream, then waits for it.
        unsafe {
            cu::memcpy_dtoh_async(&mut got, check, user).map_err(drv)?;
            cu::stream::synchronize(user).map_err(drv)?;
        }
        let bad = (0..4).find(|&i| got[i] != u32::MAX);
        if let Some(i) = bad {
            launch(self, 1)?;
            // SAFETY: waits for the zeroing launch on the caller's stream.
            unsafe { cu::stream::synchronize(user) }.map_err(drv)?;
            let index = got[i] as usize;
            let (what, max) = (
                ["keys", "values", "rotated keys", "rotated values"][i],
                hot_max,
            );
            let dtype_name = match self.hot_dtype {
                HotDtype::F32 => "f32",
                HotDtype::F16 => "f16",
                HotDtype::BF16 => "bf16",
            };
            let x = if i < 2 {
                self.read_element(if i == 0 { keys } else { values }, dtype, index)?
            } else {
                f32::INFINITY
            };
            return Err(if i < 2 && !x.is_finite() {
                Error::NonFinite { what, index }
            } else {
                Error::OutOfRange {
                    what,
                    index,
                    value: x,
                    dtype: dtype_name,
                    max,
                }
            });
        }
        let am = f32::from_bits(got[4]);
        for row in rows {
            let a = &mut self.hot_absmax[row.slot as usize];
            *a = a.max(am);
        }
        Ok(())
    }

    /// One element of a caller's device array, for an error message.
    fn read_element(&self, base: u64, dtype: InputDtype, index: usize) -> Result<f32> {
        let at = base + (index * dtype.size()) as u64;
        let mut b = [0u8; 4];
        let n = dtype.size();
        self.stream().context().bind_to_thread().map_err(drv)?;
        // SAFETY: `at` is element `index` of the caller's array, which holds more elements (the
        // kernel read it); a synchronous copy of `n` bytes into a stack buffer.
        unsafe { cu::memcpy_dtoh_sync(&mut b[..n], at) }.map_err(drv)?;
        Ok(match dtype {
            InputDtype::F32 => f32::from_le_bytes(b),
            InputDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            InputDtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        })
    }
}
