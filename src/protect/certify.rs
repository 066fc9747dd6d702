//! Certified attention in [`KvTierAttention`]: before a decode step attends, the warm pages whose
//! score error bound exceeds the certifier's tolerance are restored exactly from the archive;
//! after the step they go back to the format they had (re-quantising the exact bytes gives the
//! same codes).
//!
//! Owns: the per-step promote / demote pair and its counters ([`CertStats`]). Must never: keep a
//! page exact past its step (that is healing's job) or certify a page without an archive copy.

use super::KvTierAttention;
use crate::cache::{Move, PageRef};
use crate::error::Result;
use crate::monitor::Certifier;
use crate::quant::WarmFormat;
use std::time::Instant;

/// What certified attention did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CertStats {
    /// Decode calls (one per layer per step) checked.
    pub calls: u64,
    /// Warm pages checked, and read exactly because their bound exceeded the tolerance.
    pub pages_checked: u64,
    pub pages_exact: u64,
    /// Time spent choosing, restoring and re-quantising, nanoseconds.
    pub nanos: u64,
}

impl KvTierAttention {
    /// Reads, for every decode step, the warm pages whose score error bound exceeds
    /// `certifier.tol` exactly (see [`crate::monitor::Certifier`]).
    pub fn with_certified(mut self, certifier: Certifier) -> Self {
        self.certify = Some(certifier);
        self
    }

    /// Certified attention's counters.
    pub fn certified_stats(&self) -> CertStats {
        self.cert
    }

    /// Restores the uncertain pages of `layer` for this step; returns them with their formats.
    pub(super) fn certify_before(
        &mut self,
        layer: usize,
        q: &[f32],
    ) -> Result<Vec<(usize, WarmFormat)>> {
        let Some(c) = self.certify else {
            return Ok(Vec::new());
        };
        let t0 = Instant::now();
        let mut pages = Vec::new();
        c.uncertain_pages(&self.cache, layer, self.seq, q, &mut pages)?;
        let view = self.cache.policy_view(self.seq, layer)?;
        self.cert.calls += 1;
        self.cert.pages_checked += view
            .pages
            .iter()
            .filter(|p| p.tier == crate::Tier::Warm)
            .count() as u64;
        let restore: Vec<(usize, WarmFormat)> = pages
            .into_iter()
            .filter(|&p| view.pages[p].archived)
            .map(|p| (p, view.pages[p].format))
            .collect();
        let moves: Vec<Move> = restore
            .iter()
            .map(|&(p, _)| Move::Promote(self.page_ref(layer, p)))
            .collect();
        self.cache.apply(&moves)?;
        self.cert.pages_exact += restore.len() as u64;
        self.cert.nanos += t0.elapsed().as_nanos() as u64;
        Ok(restore)
    }

    /// Puts the pages restored for this step back into their formats.
    pub(super) fn certify_after(
        &mut self,
        layer: usize,
        restored: Vec<(usize, WarmFormat)>,
    ) -> Result<()> {
        if restored.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let moves: Vec<Move> = restored
            .iter()
            .map(|&(p, f)| Move::Demote(self.page_ref(layer, p), f))
            .collect();
        self.cache.apply(&moves)?;
        self.cert.nanos += t0.elapsed().as_nanos() as u64;
        Ok(())
    }

    fn page_ref(&self, layer: usize, page: usize) -> PageRef {
        PageRef {
            seq: self.seq,
            layer,
            page,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AttentionCache, CacheConfig, HotDtype};

    #[test]
    fn uncertain_pages_are_read_exactly_for_the_step_and_put_back() {
        let build = |window: usize| {
            CacheConfig::builder(1, 4, 2, 32)
                .hot_dtype(HotDtype::F32)
                .hot_window(window)
                .k_bits(crate::Bits::B2)
                .v_bits(crate::Bits::B8)
                .build()
                .unwrap()
        };
        let n = 300;
        let kv: Vec<f32> = (0..n * 64)
            .map(|i| ((i as f32) * 0.917).sin() * 2.0)
            .collect();
        let q: Vec<f32> = (0..128).map(|i| ((i as f32) * 0.31).cos()).collect();
        let t: Vec<f32> = (0..64).map(|i| (i as f32 * 0.05).sin()).collect();
        // Reference: every page hot and exact.
        let mut exact = KvTierAttention::new(build(100_000)).unwrap();
        exact.append(0, &kv, &kv).unwrap();
        let want = exact.decode(0, &q, &t, &t).unwrap();
        let mut plain = KvTierAttention::new(build(64)).unwrap();
        plain.append(0, &kv, &kv).unwrap();
        let lossy = plain.decode(0, &q, &t, &t).unwrap();
        let mut a = KvTierAttention::new(build(64))
            .unwrap()
            .with_certified(Certifier::new(1e-6).unwrap());
        a.append(0, &kv, &kv).unwrap();
        let before = a.kv_cache().read_tokens(a.seq(), 0).unwrap();
        let got = a.decode(0, &q, &t, &t).unwrap();
        let st = a.certified_stats();
        assert_eq!(st.calls, 1);
        assert!(
            st.pages_exact > 0 && st.pages_exact == st.pages_checked,
            "{st:?}"
        );
        let err = |x: &[f32]| {
            x.iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        // The restored pages are exact (keys and values): only summation order differs.
        assert!(
            err(&got) <= 1e-5 && err(&lossy) > 1e-3,
            "{} vs {}",
            err(&got),
            err(&lossy)
        );
        // After the step the pages are warm again, with the same codes.
        let after = a.kv_cache().read_tokens(a.seq(), 0).unwrap();
        assert_eq!(before.0[..n * 64], after.0[..n * 64]);
        assert_eq!(before.1[..n * 64], after.1[..n * 64]);
    }
}
