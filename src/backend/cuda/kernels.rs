//! Kernel sources, their compile-time geometry, and NVRTC compilation.
//!
//! Owns: the `.cu` sources (embedded with `include_str!`: append, quantise, decode, query
//! conversion, page masses), [`KernelSpec`] (every constant a kernel
//! is specialised on, written as a block of `#define`s in front of the sources) and [`compile`]
//! (NVRTC, for the device's own architecture). Loading the result into a context and caching it per
//! device is `device.rs`'s job. Must never: touch device memory, or guess a layout offset — every
//! warm-page offset comes from [`WarmLayout`], the one definition shared with the CPU backend.

use super::CudaError;
use crate::config::{Bits, CacheConfig, HotDtype};
use crate::quant::WarmLayout;

const COMMON: &str = include_str!("kernels/common.cuh");
const APPEND: &str = include_str!("kernels/append.cu");
const QUANT: &str = include_str!("kernels/quant.cu");
const DECODE: &str = include_str!("kernels/decode.cu");
const CONVERT: &str = include_str!("kernels/convert.cu");
const MASS: &str = include_str!("kernels/mass.cu");
const DECODE_MMA: &str = include_str!("kernels/decode_mma.cuh");
const DECODE_HMMA: &str = include_str!("kernels/decode_hmma.cuh");

/// Most partials one (sequence, kv head, head subgroup) may be split into (`MAXSPLIT` in decode.cu).
pub(crate) const MAX_SPLIT: usize = 256;

/// Launch-shape knobs of the decode kernel. `warps == 0` (the default) picks per configuration
/// what the H200 measurements chose; [`super::CudaDevice::set_tuning`] overrides them for
/// storages created afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CudaTuning {
    /// Warps per CTA (1..=16). Each warp takes the work item's pages round-robin.
    pub warps: u32,
    /// Value channels per lane in the value phase (8 or 16; 16 is forced for 2-bit values).
    pub channels_per_lane: u32,
    /// CTAs per SM the register allocation must allow (`__launch_bounds__` second argument).
    pub min_blocks: u32,
    /// Keep warm pages (and bf16 hot pages of hot-only modules) on the CUDA-core (f32 FMA) path
    /// even where a tensor-core path applies (for A/B measurements; the default is the
    /// tensor-core path wherever it applies).
    pub cuda_cores: bool,
    /// cp.async stages per warp on the tensor-core path (2..=4; 0 picks 2). The CUDA-core path
    /// always double-buffers.
    pub stages: u32,
}

/// Everything a compiled module is specialised on. Two storages with equal specs share a module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct KernelSpec {
    pub d: usize,
    /// q heads handled by one CTA (a divisor of `gfull`).
    pub gs: usize,
    /// q heads per kv head.
    pub gfull: usize,
    pub qh: usize,
    pub kvh: usize,
    pub ps: usize,
    pub kb: usize,
    pub vb: usize,
    pub vg: usize,
    /// 0 = f32, 1 = f16, 2 = bf16.
    pub hot: u8,
    pub warm: bool,
    pub layout: [usize; 7],
    /// Key outlier channels per head block and their offsets (`[out_idx, out_val]`).
    pub nout: usize,
    pub out_layout: [usize; 2],
    pub nwarps: usize,
    pub cpl: usize,
    pub minb: usize,
    /// Warm pages on tensor cores (`decode_mma.cuh`).
    pub mma: bool,
    /// Hot bf16 pages of a hot-only module on tensor cores (`decode_hmma.cuh`).
    pub hmma: bool,
    /// Shared-memory row strides of staged key and value codes (padded against bank conflicts).
    pub kstride: usize,
    pub vstride: usize,
    /// Warm-page stages per warp (cp.async ring depth).
    pub nstage: usize,
}

fn align16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

impl KernelSpec {
    /// The spec for a validated config. Fails for shapes the kernels do not cover.
    pub fn new(
        cfg: &CacheConfig,
        tuning: CudaTuning,
        smem_limit: usize,
    ) -> Result<Self, CudaError> {
        let l = WarmLayout::of(cfg);
        let d = cfg.head_dim;
        let gfull = cfg.group_size();
        let vb = cfg.v_bits.bits();
        let l_k_row = d * cfg.k_bits.bits() / 8;
        let l_v_row = d * vb / 8;
        // The tensor-core path (decode_mma.cuh) covers the shapes its fragment mapping is written
        // for: at most 4 q heads per CTA (hi and lo halves of 4 heads fill the 8 MMA columns),
        // 16-token k-tiles, head_dim 64 or 128 (registers), 32-channel value groups.
        // 3-bit codes and key outlier channels run on the CUDA-core path only.
        let plain = cfg.k_bits != Bits::B3 && cfg.v_bits != Bits::B3 && cfg.key_outliers == 0;
        let mma = cfg.warm_enabled
            && plain
            && !tuning.cuda_cores
            && gfull <= 4
            && cfg.page_size.is_multiple_of(16)
            && cfg.page_size <= 64
            && (d == 64 || d == 128)
            && cfg.value_group == 32;
        // Hot bf16 pages on tensor cores (decode_hmma.cuh): hot-only modules (with a warm tier
        // the hot pages are the few of the hot window), the same head and page shapes.
        let hmma = !cfg.warm_enabled
            && cfg.hot_dtype == HotDtype::BF16
            && !tuning.cuda_cores
            && gfull <= 4
            && cfg.page_size.is_multiple_of(16)
            && (d == 64 || d == 128);
        let tuning = if tuning.warps == 0 && hmma {
            CudaTuning {
                warps: 8,
                channels_per_lane: 8,
                min_blocks: 1,
                cuda_cores: false,
                stages: 0,
            }
        } else if tuning.warps == 0 && mma {
            // Tensor-core path, measured on the H200 (32/8/128, B1 S128K and B8 S32K): 16 warps
            // per SM in one CTA with double buffering beat 8-warp CTAs (1 or 2 per SM, 2..4
            // stages) by 5-20%; it is issue-bound, so more warps hide more latency.
            CudaTuning {
                warps: 16,
                channels_per_lane: 8,
                min_blocks: 1,
                cuda_cores: false,
                stages: tuning.stages,
            }
        } else if tuning.warps == 0 {
            // Measured on the H200 (d128, G4, ps32): 8 warps with 8 value channels per lane and
            // 2 CTAs per SM beat 4 warps x 16 channels, except with 2-bit values (16 channels
            // forced), where 4 warps x 3 CTAs is better. Hot-only modules preload a block's
            // values and need the registers of 2 CTAs per SM to avoid spills.
            if !cfg.warm_enabled {
                CudaTuning {
                    warps: 4,
                    channels_per_lane: 16,
                    min_blocks: 2,
                    cuda_cores: tuning.cuda_cores,
                    stages: 0,
                }
            } else if vb == 2 || vb == 3 {
                CudaTuning {
                    warps: 4,
                    channels_per_lane: 16,
                    min_blocks: 3,
                    cuda_cores: tuning.cuda_cores,
                    stages: 0,
                }
            } else {
                CudaTuning {
                    warps: 8,
                    channels_per_lane: 8,
                    min_blocks: 2,
                    cuda_cores: tuning.cuda_cores,
                    stages: 0,
                }
            }
        } else {
            tuning
        };
        if !(1..=16).contains(&tuning.warps)
            || !(1..=8).contains(&tuning.min_blocks)
            || !(tuning.stages == 0 || (2..=4).contains(&tuning.stages))
        {
            return Err(CudaError::Driver(format!(
                "tuning out of range: {tuning:?} (warps 1..=16, min_blocks 1..=8, stages 0 or 2..=4)"
            )));
        }
        // Value channels per lane: at least 8, a whole 32-bit word of value codes, and a whole row
        // across a warp. Heads per CTA: the largest divisor of the group whose accumulators fit in
        // 64 registers per lane; the rest of the group goes to sibling CTAs.
        // 3-bit values: 16 channels, one word of the 2-bit plane and 16 bits of the high plane.
        let cpl_min = if vb == 3 {
            16.max(d / 32)
        } else {
            8.max(d / 32).max(32 / vb)
        };
        let gs = (1..=gfull.min(8))
            .rev()
            .find(|g| gfull.is_multiple_of(*g) && g * cpl_min <= 64)
            .unwrap_or(1);
        let cpl = if tuning.channels_per_lane >= 16 && gs * 16 <= 64 {
            16.max(cpl_min)
        } else {
            cpl_min
        };
        let hot = match cfg.hot_dtype {
            HotDtype::F32 => 0,
            HotDtype::F16 => 1,
            HotDtype::BF16 => 2,
        };
        let mut spec = KernelSpec {
            d,
            gs,
            gfull,
            qh: cfg.num_q_heads,
            kvh: cfg.num_kv_heads,
            ps: cfg.page_size,
            kb: cfg.k_bits.bits(),
            vb,
            vg: cfg.value_group,
            hot,
            warm: cfg.warm_enabled,
            layout: [
                l.k_min,
                l.k_step,
                l.v_min,
                l.v_step,
                l.k_codes,
                l.v_codes,
                l.head_bytes,
            ],
            nout: l.outliers,
            out_layout: [l.out_idx, l.out_val],
            nwarps: tuning.warps as usize,
            cpl,
            minb: tuning.min_blocks as usize,
            mma,
            hmma,
            kstride: k_stride(l_k_row, mma),
            vstride: v_stride(l_v_row, mma),
            nstage: match (mma, tuning.stages) {
                (false, _) => 2,
                (true, 0) => 2,
                (true, n) => n as usize,
            },
        };
        // Fewer stages (when not set explicitly), then fewer warps, until the shared memory fits.
        while spec.decode_smem() > smem_limit && spec.nstage > 2 && tuning.stages == 0 {
            spec.nstage -= 1;
        }
        while spec.decode_smem() > smem_limit && spec.nwarps > 1 {
            spec.nwarps /= 2;
        }
        if spec.decode_smem() > smem_limit {
            return Err(CudaError::Driver(format!(
                "decode kernel needs {} bytes of shared memory per block, the device allows {smem_limit}",
                spec.decode_smem()
            )));
        }
        Ok(spec)
    }

    /// Subgroups of `gs` heads per kv head.
    pub fn nsub(&self) -> usize {
        self.gfull / self.gs
    }

    /// Threads per decode CTA.
    pub fn decode_threads(&self) -> u32 {
        (self.nwarps * 32) as u32
    }

    /// Dynamic shared memory of the decode kernel; mirrors the `*_BYTES` macros of decode.cu.
    pub fn decode_smem(&self) -> usize {
        let gp = self.gs.div_ceil(4) * 4;
        let [_, _, _, _, k_codes, _, _] = self.layout;
        let stage = if self.warm {
            align16(k_codes + self.ps * self.kstride + self.ps * self.vstride) + self.out_bytes()
        } else {
            0
        };
        // Scaled queries [D][GP] floats; with MMA also the lane query table (QE_BYTES).
        // With HMMA the score A fragments ([D / 16][32] uint4, HQA_BYTES).
        let qsm = self.d * gp * 4
            + if self.mma {
                self.d / 8 * 256 + 256
            } else if self.hmma {
                self.d / 16 * 512
            } else {
                0
            };
        // Per warp: [park (statistics + output) | softmax weights | 2 stages]; the CUDA-core
        // path also keeps q * step there ([D][GP] floats, which the park area overlaps).
        let park = self.gs * 4 * 4 + self.gs * self.d * 4;
        let head = if self.mma { park } else { self.d * gp * 4 };
        let warp = head + 32 * gp * 4 + self.nstage * stage;
        // The combine's factors ([MAX_SPLIT][GS]) and, for a rotated output, [GS][D] after them.
        (qsm + self.nwarps * warp).max((MAX_SPLIT * self.gs + self.gs * self.d) * 4)
    }

    /// Bytes of a head block's outlier part (indices and values), staged after the value codes.
    pub fn out_bytes(&self) -> usize {
        let [_, _, _, _, _, _, head_bytes] = self.layout;
        if self.nout == 0 {
            0
        } else {
            head_bytes - self.out_layout[0]
        }
    }

    /// The `#define` block in front of the sources.
    pub fn defines(&self) -> String {
        let [k_min, k_step, v_min, v_step, k_codes, v_codes, head_bytes] = self.layout;
        let vals: [(&str, usize); 33] = [
            ("D", self.d),
            ("GS", self.gs),
            ("GFULL", self.gfull),
            ("NSUB", self.nsub()),
            ("QH", self.qh),
            ("KVH", self.kvh),
            ("PS", self.ps),
            ("KB", self.kb),
            ("VB", self.vb),
            ("VG", self.vg),
            ("HOT", self.hot as usize),
            ("WARM", self.warm as usize),
            ("K_MIN", k_min),
            ("K_STEP", k_step),
            ("V_MIN", v_min),
            ("V_STEP", v_step),
            ("K_CODES", k_codes),
            ("V_CODES", v_codes),
            ("HEAD_BYTES", head_bytes),
            ("NWARPS", self.nwarps),
            ("CPL", self.cpl),
            ("MINB", self.minb),
            ("MMA", self.mma as usize),
            ("HMMA", self.hmma as usize),
            ("KSTRIDE", self.kstride),
            ("VSTRIDE", self.vstride),
            ("NSTAGE", self.nstage),
            ("KVT_MAXSPLIT_HOST", MAX_SPLIT),
            ("NOUT", self.nout),
            ("OUT_IDX", self.out_layout[0]),
            ("OUT_VAL", self.out_layout[1]),
            ("RB", crate::quant::rotate::block_size(self.d)),
            ("KVT_SPEC_VERSION", 7),
        ];
        let mut s = String::from("// kvtier kernel specialisation\n");
        for (k, v) in vals {
            s.push_str(&format!("#define {k} {v}\n"));
        }
        s
    }

    /// Full NVRTC source of the module.
    pub fn source(&self) -> String {
        format!(
            "{}\n{COMMON}\n{APPEND}\n{QUANT}\n{DECODE_MMA}\n{DECODE_HMMA}\n{DECODE}\n{CONVERT}\n{MASS}\n",
            self.defines()
        )
    }
}

/// Shared-memory stride of a staged key-code row of `row` bytes. CUDA-core path: rows of an even
/// number of 16-byte chunks get one chunk of padding (its LDS.128 rows). Tensor-core path: each
/// quad of lanes reads 64 contiguous bytes of one row with 16-byte loads, so rows of 128 bytes or
/// more are padded to an odd multiple of 64 to put neighbouring rows in the other bank half.
fn k_stride(row: usize, mma: bool) -> usize {
    if mma {
        if row >= 128 {
            row + 64
        } else {
            row
        }
    } else if row.is_multiple_of(16) && (row / 16).is_multiple_of(2) {
        row + 16
    } else {
        row
    }
}

/// Shared-memory stride of a staged value-code row. Tensor-core path: lane quads read rows
/// 2j (j = 0..3) with 32-bit loads, so the stride is padded in 16-byte steps until rows 0, 2, 4
/// and 6 start in four different 32-byte bank ranges. CUDA-core path: unpadded.
fn v_stride(row: usize, mma: bool) -> usize {
    if !mma {
        return row;
    }
    let mut s = row;
    while !matches!((2 * s) % 128, 32 | 96) {
        s += 16;
    }
    s
}

/// Compiles `src` with NVRTC for `arch` (e.g. `sm_90`) and returns the PTX. A rejected program
/// becomes [`CudaError::Compile`] carrying NVRTC's log; a missing libnvrtc is reported the same way.
pub(crate) fn compile(
    src: &str,
    arch: &str,
    name: &'static str,
) -> Result<cudarc::nvrtc::Ptx, CudaError> {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
    // SAFETY: `is_culib_present` only tries to dlopen libnvrtc under its known names and drops the
    // handle; it has no other side effect. Without this check cudarc panics on first use.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Compile {
            kernel: name,
            log: "libnvrtc (the NVRTC runtime compiler) was not found on the loader path".into(),
        });
    }
    if src.as_bytes().contains(&0) {
        return Err(CudaError::Compile {
            kernel: name,
            log: "source contains a NUL byte".into(),
        });
    }
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            "-default-device".into(),
            "-diag-suppress=186".into(),
        ],
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts).map_err(|e| CudaError::Compile {
        kernel: name,
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bits;

    #[test]
    fn int3_and_outliers_take_the_cuda_core_path() {
        let cfg = CacheConfig::builder(1, 9, 3, 64)
            .k_bits(Bits::B3)
            .v_bits(Bits::B3)
            .key_outliers(4)
            .build()
            .unwrap();
        let s = KernelSpec::new(&cfg, CudaTuning::default(), 227 * 1024).unwrap();
        assert!(!s.mma && s.cpl == 16 && s.nout == 4);
        // 4 u16 indices (padded to 16) and 32 x 4 f16 values.
        assert_eq!(s.out_bytes(), 16 + 256);
        assert!(s.source().contains("#define NOUT 4"));
    }

    #[test]
    fn smem_and_defines_cover_presets() {
        for cfg in [
            CacheConfig::builder(1, 32, 8, 128)
                .hot_dtype(HotDtype::BF16)
                .build()
                .unwrap(),
            CacheConfig::builder(1, 9, 3, 64)
                .v_bits(Bits::B2)
                .build()
                .unwrap(),
            CacheConfig::builder(1, 8, 1, 512)
                .hot_dtype(HotDtype::F32)
                .build()
                .unwrap(),
        ] {
            let s = KernelSpec::new(&cfg, CudaTuning::default(), 227 * 1024).unwrap();
            assert_eq!(s.gfull % s.gs, 0);
            assert!(s.gs * s.cpl <= 64);
            assert!(s.cpl * s.vb >= 32);
            assert_eq!(s.out_bytes(), 0);
            assert!(s.decode_smem() >= (MAX_SPLIT * s.gs + s.gs * s.d) * 4);
            assert!(s.source().contains("#define HEAD_BYTES"));
        }
    }
}
