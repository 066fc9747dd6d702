//! Build script: the C ABI's version numbers and, under the `generate-header` feature, the header.
//!
//! Owns: the one definition of `KVTIER_ABI_VERSION` (derived from the package version in Cargo.toml,
//! handed to the crate as the `KVTIER_ABI_VERSION` compile-time variable and written into the header),
//! the cbindgen run that turns `src/ffi` into `include/kvtier.h`, and (feature `metal-emu`) the C++
//! build of the Metal kernels' host emulator.
//! Must never: write into the source tree unless the `generate-header` feature is on, or hand-keep a
//! version number (every number here comes from Cargo's `CARGO_PKG_VERSION_*`).
//!
//! Regenerate the header: `cargo check --features generate-header`. Check it for drift without
//! touching the tree: `KVTIER_HEADER_OUT=/tmp/kvtier.h cargo check --features generate-header`, then
//! diff (`scripts/c-tests.sh` does both steps).

use std::env;

/// The package version, from Cargo.
struct Version {
    major: u32,
    minor: u32,
    patch: u32,
    #[cfg_attr(not(feature = "generate-header"), allow(dead_code))]
    text: String,
}

impl Version {
    fn from_env() -> Self {
        let num = |key: &str| -> u32 {
            let v = env::var(key).unwrap_or_else(|_| panic!("cargo sets {key}"));
            v.parse()
                .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
        };
        Version {
            major: num("CARGO_PKG_VERSION_MAJOR"),
            minor: num("CARGO_PKG_VERSION_MINOR"),
            patch: num("CARGO_PKG_VERSION_PATCH"),
            text: env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION"),
        }
    }

    /// The ABI version: the package version with every component after the leftmost non-zero one
    /// zeroed (Cargo's semver compatibility rule), packed as `major << 16 | minor << 8 | patch`.
    /// It changes exactly when a release may break the C ABI: 0.1.x → 0x000100, 0.2.x → 0x000200,
    /// 1.y.z → 0x010000.
    fn abi(&self) -> u32 {
        assert!(
            self.minor < 256 && self.patch < 256,
            "ABI packing needs minor and patch < 256"
        );
        if self.major != 0 {
            self.major << 16
        } else if self.minor != 0 {
            self.minor << 8
        } else {
            self.patch
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let version = Version::from_env();
    println!("cargo:rustc-env=KVTIER_ABI_VERSION={}", version.abi());
    #[cfg(feature = "generate-header")]
    header::generate(&version);
    #[cfg(feature = "metal-emu")]
    metal_emu();
}

/// The Metal emulator (feature `metal-emu`): the `.metal` kernels compiled as C++17 against
/// `emu/shim.h`, IEEE f32 without contraction (as the Metal library is compiled: fast math off).
#[cfg(feature = "metal-emu")]
fn metal_emu() {
    let dir = "src/backend/metal";
    for f in [
        "emu/runtime.cpp",
        "emu/shim.h",
        "kernels/common.metal",
        "kernels/append.metal",
        "kernels/quant.metal",
        "kernels/decode.metal",
    ] {
        println!("cargo:rerun-if-changed={dir}/{f}");
    }
    cc::Build::new()
        .cpp(true)
        .file(format!("{dir}/emu/runtime.cpp"))
        .std("c++17")
        .opt_level(2)
        .flag("-ffp-contract=off")
        .flag("-fno-fast-math")
        .flag_if_supported("-Wno-attributes")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(true)
        .compile("kvtier_metal_emu");
}

#[cfg(feature = "generate-header")]
mod header {
    use super::Version;
    use std::env;
    use std::path::PathBuf;

    /// The version macros, placed right after the header's `#include`s.
    fn version_macros(v: &Version) -> String {
        format!(
            "\n/* Package and ABI version, written by build.rs from Cargo.toml: do not edit. */\n\
             #define KVTIER_VERSION_MAJOR {major}\n\
             #define KVTIER_VERSION_MINOR {minor}\n\
             #define KVTIER_VERSION_PATCH {patch}\n\
             #define KVTIER_VERSION_STRING \"{text}\"\n\
             /* Changes exactly when a release may break the C ABI (Cargo's semver rule): compare it\n \
             * with kvtier_abi_version() at run time. */\n\
             #define KVTIER_ABI_VERSION 0x{abi:06x}u\n",
            major = v.major,
            minor = v.minor,
            patch = v.patch,
            text = v.text,
            abi = v.abi(),
        )
    }

    pub fn generate(v: &Version) {
        for path in ["src/ffi", "cbindgen.toml", "Cargo.toml"] {
            println!("cargo:rerun-if-changed={path}");
        }
        println!("cargo:rerun-if-env-changed=KVTIER_HEADER_OUT");
        let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
        let mut config = cbindgen::Config::from_file(root.join("cbindgen.toml"))
            .unwrap_or_else(|e| panic!("cbindgen.toml: {e}"));
        let extra = config.after_includes.take().unwrap_or_default();
        config.after_includes = Some(format!("{}\n{extra}", version_macros(v)));
        // Parse src/ffi only (no `cargo metadata`, no dependencies, no core module): the ABI is
        // exactly what src/ffi declares, and a public const added to the core never leaks in.
        let bindings = cbindgen::Builder::new()
            .with_config(config)
            .with_src(root.join("src/ffi/mod.rs"))
            .generate()
            .unwrap_or_else(|e| panic!("cbindgen failed: {e}"));
        let out = env::var_os("KVTIER_HEADER_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("include/kvtier.h"));
        // Writes only when the text changed, so an up-to-date header keeps its mtime.
        bindings.write_to_file(&out);
    }
}
