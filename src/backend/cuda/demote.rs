//! Demotion on the device: hot pages quantised into warm pages, a whole batch in one launch.
//!
//! Owns: the `kvt_quantize` launch over a batch of (hot slot, warm slot, tokens) jobs, the warm
//! slots it allocates, and reading back the per-page failure words when a page may hold values
//! beyond f16. Must never: free a hot page whose demotion failed, keep the warm slot of a failed
//! page, read the failure words before the launch has run, or launch more jobs than a grid's y
//! dimension holds.

use super::device::drv;
use super::storage::{CudaStorage, SAFE_ABS};
use crate::error::{Error, Result};
use crate::quant::WarmFormat;
use cudarc::driver::{result as cu, LaunchConfig, PushKernelArg};

/// Jobs per launch: the grid's y dimension (65535) rounded down to a power of two.
const MAX_JOBS: usize = 32768;

impl CudaStorage {
    /// See [`crate::backend::BackendStorage::demote_many`].
    pub(super) fn demote_pages(
        &mut self,
        pages: &[(u32, usize)],
        format: WarmFormat,
        out: &mut Vec<Option<u32>>,
    ) -> Result<()> {
        out.clear();
        if format != self.layout.format() {
            return Err(Error::Unsupported("CUDA warm pages use the config's bits"));
        }
        let mut seen = std::collections::HashSet::with_capacity(pages.len());
        for &(slot, n) in pages {
            self.hot_slot_check(slot)?;
            if n == 0 || n > self.ps {
                return Err(Error::internal(format!("demote of {n} tokens")));
            }
            if !seen.insert(slot) {
                return Err(Error::internal(format!(
                    "hot slot {slot} twice in one demotion"
                )));
            }
        }
        if !self.warm_enabled {
            out.resize(pages.len(), None);
            return Ok(());
        }
        for chunk in pages.chunks(MAX_JOBS) {
            let done = self.demote_chunk(chunk)?;
            out.extend(done);
        }
        Ok(())
    }

    /// One launch for `pages` (at most [`MAX_JOBS`], validated).
    fn demote_chunk(&mut self, pages: &[(u32, usize)]) -> Result<Vec<Option<u32>>> {
        let st = self.stream().clone();
        let mut warm = Vec::with_capacity(pages.len());
        for _ in pages {
            match self.warm.alloc(&st) {
                Ok(s) => warm.push(s),
                Err(e) => {
                    for s in warm {
                        self.warm.release(s);
                    }
                    return Err(e.into());
                }
            }
        }
        let check = pages.iter().any(|&(s, _)| {
            self.hot_absmax
                .get(s as usize)
                .is_none_or(|&m| m > SAFE_ABS)
        });
        match self.launch_quantize(pages, &warm, check) {
            Ok(ok) => Ok(pages
                .iter()
                .zip(warm)
                .zip(ok)
                .map(|((&(hot, _), ws), ok)| {
                    if ok {
                        self.hot.release(hot);
                        Some(ws)
                    } else {
                        self.warm.release(ws);
                        None
                    }
                })
                .collect()),
            Err(e) => {
                for s in warm {
                    self.warm.release(s);
                }
                Err(e)
            }
        }
    }

    /// Uploads the jobs with zeroed failure words, launches, and (with `check`) reads the words
    /// back: whether each page's range fitted f16.
    fn launch_quantize(
        &mut self,
        pages: &[(u32, usize)],
        warm: &[u32],
        check: bool,
    ) -> Result<Vec<bool>> {
        let st = self.stream().clone();
        let n = pages.len();
        let mut words = Vec::with_capacity(4 * n);
        for (&(hot, tokens), &ws) in pages.iter().zip(warm) {
            words.extend([hot, ws, tokens as u32]);
        }
        words.resize(4 * n, 0);
        let buf = self.flag.ensure(&st, 4 * words.len(), false)?;
        st.context().bind_to_thread().map_err(drv)?;
        // SAFETY: `buf` holds at least `4 * words.len()` bytes (ensured above); the copy is
        // ordered on the stream before the launch, and pageable host memory is staged before the
        // call returns, so `words` may go out of scope.
        unsafe { cu::memcpy_htod_async(buf, &words, st.cu_stream()) }.map_err(drv)?;
        let (hot, warm_base) = (self.hot.base(), self.warm.base());
        let (jobs, fails) = (buf, buf + 12 * n as u64);
        let cfg = LaunchConfig {
            grid_dim: (self.kvh as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = st.launch_builder(&self.k.quantize);
        b.arg(&hot).arg(&warm_base).arg(&jobs).arg(&fails);
        // SAFETY: matches `kvt_quantize`; every job names a live hot slot, a live warm slot and
        // at most `page_size` tokens, and `fails` holds one word per job.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        if !check {
            return Ok(vec![true; n]);
        }
        let mut f = vec![0u32; n];
        // SAFETY: reads the failure words after the kernel on the same stream, then syncs.
        unsafe { cu::memcpy_dtoh_async(&mut f, fails, st.cu_stream()) }.map_err(drv)?;
        st.synchronize().map_err(drv)?;
        Ok(f.into_iter().map(|w| w == 0).collect())
    }
}
