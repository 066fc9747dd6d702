//! Library and ABI version.
//!
//! Owns: `kvtier_version` and `kvtier_abi_version`. Both numbers come from Cargo.toml through
//! build.rs (`CARGO_PKG_VERSION`, and `KVTIER_ABI_VERSION` which build.rs derives from it), the same
//! source the header's `KVTIER_VERSION_*` / `KVTIER_ABI_VERSION` macros are generated from. Must
//! never: hold a hand-written version number.

use std::ffi::{c_char, CStr};

/// `CARGO_PKG_VERSION` as a C string.
const VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("the package version contains a NUL byte"),
    };

/// Parses a decimal `u32` at compile time.
const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    assert!(!b.is_empty(), "empty number");
    let mut i = 0;
    let mut n: u32 = 0;
    while i < b.len() {
        assert!(b[i].is_ascii_digit(), "not a decimal number");
        n = n * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    n
}

/// The ABI version build.rs derived from the package version.
pub(crate) const ABI_VERSION: u32 = parse_u32(env!("KVTIER_ABI_VERSION"));

/// The library version, `"MAJOR.MINOR.PATCH"` (as `KVTIER_VERSION_STRING` in the header this
/// library was built with). The string is static: never free it.
#[no_mangle]
pub extern "C" fn kvtier_version() -> *const c_char {
    ffi_panic_boundary_or! { VERSION.as_ptr(), "kvtier_version", { Ok(VERSION.as_ptr()) } }
}

/// The ABI version of the library. A program compiled against the header should check
/// `kvtier_abi_version() == KVTIER_ABI_VERSION` before any other call: different values mean the
/// structs or signatures may differ.
#[no_mangle]
pub extern "C" fn kvtier_abi_version() -> u32 {
    ffi_panic_boundary_or! { ABI_VERSION, "kvtier_abi_version", { Ok(ABI_VERSION) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_cargo() {
        // SAFETY: kvtier_version returns a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(kvtier_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
        let major = parse_u32(env!("CARGO_PKG_VERSION_MAJOR"));
        let minor = parse_u32(env!("CARGO_PKG_VERSION_MINOR"));
        let patch = parse_u32(env!("CARGO_PKG_VERSION_PATCH"));
        let want = if major != 0 {
            major << 16
        } else if minor != 0 {
            minor << 8
        } else {
            patch
        };
        assert_eq!(kvtier_abi_version(), want);
    }
}
