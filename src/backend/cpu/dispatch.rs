//! Which instruction set the CPU kernels run on: chosen once per cache (at storage creation), by
//! the config, the `KVTIER_CPU_KERNEL` environment variable (read once per process), or run-time
//! detection.
//!
//! Owns: [`CpuKernel`] and its resolution. Must never: change a cache's numerics after creation
//! (the path is fixed per storage, so every step of a cache is computed the same way).
//!
//! The paths differ in arithmetic, not only in speed:
//! - `Portable` and `Avx2` compute scores in f32 from the codes (`q·min + (q∘step)·code`); they
//!   agree to f32 rounding and are the oracle other backends are tested against.
//! - `Avx512` computes warm key scores as exact integer dot products of the codes with the query
//!   quantised once per page and head: int8 (`vpdpbusd`) against 4- and 2-bit codes, int16
//!   (`vpdpwssd`) against 8-bit codes, the per-channel step folded in before quantising. The
//!   added error per score is at most `s/2 · Σ_c code_c` with `s = max_c |q_c·step_c| / 127`
//!   (`/ 32767` for 8-bit codes), below the key quantisation error itself (see docs/cpu.md and
//!   the bound test in tests/cpu_paths.rs). Values, hot pages and 3-bit codes stay exact f32 on
//!   16-lane registers.

use crate::error::{Error, Result};

/// The CPU kernel path of a cache (see the module docs for how they differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(u32)]
pub enum CpuKernel {
    /// `KVTIER_CPU_KERNEL` if set (`avx512`, `avx2` or `portable`), else the fastest path this CPU
    /// supports.
    #[default]
    Auto = 0,
    /// AVX-512 F/BW/DQ/VL with VNNI (integer key scores), plus AVX2, FMA and F16C.
    Avx512 = 1,
    /// AVX2, FMA and F16C (f32 scores on 8-lane registers).
    Avx2 = 2,
    /// Plain Rust, vectorised by the compiler for the build target.
    Portable = 3,
}

impl CpuKernel {
    /// Every path, fastest first.
    pub const ALL: [CpuKernel; 3] = [CpuKernel::Avx512, CpuKernel::Avx2, CpuKernel::Portable];

    /// The name `KVTIER_CPU_KERNEL` accepts.
    pub fn name(self) -> &'static str {
        match self {
            CpuKernel::Auto => "auto",
            CpuKernel::Avx512 => "avx512",
            CpuKernel::Avx2 => "avx2",
            CpuKernel::Portable => "portable",
        }
    }

    /// Parses a name as `KVTIER_CPU_KERNEL` gives it (case-insensitive).
    pub fn from_name(s: &str) -> Option<CpuKernel> {
        [CpuKernel::Auto]
            .into_iter()
            .chain(CpuKernel::ALL)
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the path (`Auto` always can).
    pub fn available(self) -> bool {
        match self {
            CpuKernel::Auto | CpuKernel::Portable => true,
            CpuKernel::Avx2 => has_avx2(),
            CpuKernel::Avx512 => has_avx2() && has_avx512_vnni(),
        }
    }

    /// The concrete path a cache with this setting runs: `Auto` becomes the environment's choice
    /// or the fastest available path (decided once per process, at the first cache: storages are
    /// also made for a moment per page conversion); a path this CPU lacks is an error.
    pub fn resolve(self) -> Result<CpuKernel> {
        static AUTO: std::sync::OnceLock<std::result::Result<CpuKernel, String>> =
            std::sync::OnceLock::new();
        let k = match self {
            CpuKernel::Auto => AUTO
                .get_or_init(Self::from_env)
                .clone()
                .map_err(|reason| Error::config("cpu_kernel", reason))?,
            k => k,
        };
        if !k.available() {
            return Err(Error::config(
                "cpu_kernel",
                format!("this CPU cannot run the {} path", k.name()),
            ));
        }
        Ok(k)
    }

    /// `Auto`'s choice: `KVTIER_CPU_KERNEL` if set, else the fastest available path.
    fn from_env() -> std::result::Result<CpuKernel, String> {
        match std::env::var("KVTIER_CPU_KERNEL") {
            Ok(v) if !v.trim().is_empty() => match CpuKernel::from_name(&v) {
                Some(CpuKernel::Auto) => Ok(Self::best()),
                Some(k) => Ok(k),
                None => Err(format!(
                    "KVTIER_CPU_KERNEL={v:?} is not one of auto, avx512, avx2, portable"
                )),
            },
            _ => Ok(Self::best()),
        }
    }

    fn best() -> CpuKernel {
        CpuKernel::ALL
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(CpuKernel::Portable)
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_portable_always_runs() {
        for k in [CpuKernel::Auto].into_iter().chain(CpuKernel::ALL) {
            assert_eq!(CpuKernel::from_name(k.name()), Some(k));
        }
        assert_eq!(CpuKernel::from_name(" AVX2 "), Some(CpuKernel::Avx2));
        assert_eq!(CpuKernel::from_name("sse"), None);
        assert_eq!(CpuKernel::Portable.resolve().unwrap(), CpuKernel::Portable);
        let auto = CpuKernel::Auto.resolve().unwrap();
        assert_ne!(auto, CpuKernel::Auto);
        assert!(auto.available());
    }
}
