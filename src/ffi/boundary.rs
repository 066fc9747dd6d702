//! The panic boundary and the pointer checks every entry point goes through.
//!
//! Owns: `ffi_panic_boundary!` / `ffi_panic_boundary_or!` (catch a panic, record the last error,
//! return a status or a neutral value), and the helpers that turn a C (pointer, count) pair into a
//! Rust slice or a checked output, refusing NULL, misaligned pointers and impossible sizes first.
//! Must never: build a slice or a reference before every check has passed, create a `&mut` to
//! caller memory (outputs are written with raw copies after all inputs were read, so inputs and
//! outputs may alias), or let a panic (even one from dropping a panic payload) escape.

use super::last_error;
use super::status::{kvtier_status, FfiError};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs an entry point's body: `ffi_panic_boundary!("kvtier_x_y", { ...; Ok(()) })`. The body
/// returns `Result<(), FfiError>`; the macro evaluates to a `kvtier_status`. An `Err` or a panic is
/// recorded as this thread's last error, prefixed with the function name.
macro_rules! ffi_panic_boundary {
    ($name:literal, $body:block) => {
        $crate::ffi::boundary::run(
            $name,
            move || -> ::core::result::Result<(), $crate::ffi::status::FfiError> { $body },
        )
    };
}

/// As `ffi_panic_boundary!` for functions that return a value instead of a status: the body
/// returns `Result<T, FfiError>` and a failure or panic yields `$default`.
macro_rules! ffi_panic_boundary_or {
    ($default:expr, $name:literal, $body:block) => {
        $crate::ffi::boundary::run_or(
            $default,
            $name,
            move || -> ::core::result::Result<_, $crate::ffi::status::FfiError> { $body },
        )
    };
}

/// See `ffi_panic_boundary!`.
pub(crate) fn run<F>(name: &'static str, body: F) -> kvtier_status
where
    F: FnOnce() -> Result<(), FfiError>,
{
    run_or(kvtier_status::Panic, name, move || {
        body().map(|()| kvtier_status::Ok).or_else(|e| {
            last_error::set(name, &e.message);
            Ok(e.status)
        })
    })
}

/// See `ffi_panic_boundary_or!`.
pub(crate) fn run_or<T, F>(default: T, name: &'static str, body: F) -> T
where
    F: FnOnce() -> Result<T, FfiError>,
{
    // AssertUnwindSafe: after a panic the only state a caller can observe again is a handle's,
    // and handles that mutate under a lock are poisoned by it (see `cache.rs`); configs are
    // replaced whole, so they are never seen half-changed.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            last_error::set(name, &e.message);
            default
        }
        Err(payload) => {
            last_error::set(name, &format!("panic: {}", panic_message(&*payload)));
            // A payload's destructor may itself panic; that must not unwind into C either.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            default
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Checks the pointer part of a (pointer, count) pair: NULL (when `len > 0`), alignment, size.
fn check_array<T>(ptr: *const T, len: usize, what: &str) -> Result<(), FfiError> {
    if len == 0 {
        return Ok(());
    }
    if ptr.is_null() {
        return Err(FfiError::null(what));
    }
    if !ptr.is_aligned() {
        return Err(FfiError::invalid(format!(
            "`{what}` is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|bytes| bytes > isize::MAX as usize)
    {
        return Err(FfiError::invalid(format!(
            "`{what}`: {len} elements cannot exist in memory"
        )));
    }
    Ok(())
}

/// Borrows the input array `ptr[0..len]`. `len == 0` accepts any pointer, NULL included.
///
/// # Safety
///
/// When `len > 0` and `ptr` is non-NULL and aligned, `ptr` must point to `len` initialised `T`s
/// that stay valid and are not written by anyone for `'a` (the rest of the call).
pub(crate) unsafe fn input<'a, T>(
    ptr: *const T,
    len: usize,
    what: &str,
) -> Result<&'a [T], FfiError> {
    check_array(ptr, len, what)?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: `ptr` is non-NULL and aligned, `len * size_of::<T>()` fits in `isize` (checked
    // above), and the caller guarantees `len` initialised, unaliased-by-writers elements for 'a.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A checked output array: non-NULL, aligned and at least `needed` elements long (or never
/// written, when `needed == 0`). Written once, after the call has succeeded.
#[derive(Debug)]
pub(crate) struct Out<T> {
    ptr: *mut T,
    len: usize,
}

impl<T: Copy> Out<T> {
    /// Checks the output array `ptr[0..len]` that the call will fill with `needed` elements.
    pub(crate) fn new(
        ptr: *mut T,
        len: usize,
        needed: usize,
        what: &str,
    ) -> Result<Self, FfiError> {
        if needed == 0 {
            return Ok(Out {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        check_array(ptr, len, what)?;
        if len < needed {
            return Err(FfiError::new(
                kvtier_status::BufferTooSmall,
                format!("`{what}` holds {len} elements; the call writes {needed}"),
            ));
        }
        Ok(Out { ptr, len })
    }

    /// An optional output: `len == 0` means "not wanted" (`None`, the pointer is ignored);
    /// otherwise as [`Out::new`].
    pub(crate) fn optional(
        ptr: *mut T,
        len: usize,
        needed: usize,
        what: &str,
    ) -> Result<Option<Self>, FfiError> {
        if len == 0 {
            return Ok(None);
        }
        Self::new(ptr, len, needed, what).map(Some)
    }

    /// Copies `src` to the start of the array.
    ///
    /// # Safety
    ///
    /// The pointer given to [`Out::new`] must be valid for writes of the `len` elements given
    /// there, and nothing may read or write that memory concurrently.
    pub(crate) unsafe fn write(&self, src: &[T]) {
        assert!(src.len() <= self.len, "output checked for fewer elements");
        if src.is_empty() {
            return;
        }
        // SAFETY: `self.ptr` is non-NULL and aligned (checked in `new`, since `len > 0` here),
        // valid for `self.len >= src.len()` writes (caller), and `src` is Rust-owned memory, so
        // the two ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, src.len()) }
    }
}

/// A checked scalar out-parameter (non-NULL, aligned).
#[derive(Debug)]
pub(crate) struct OutParam<T>(*mut T);

impl<T> OutParam<T> {
    pub(crate) fn new(ptr: *mut T, what: &str) -> Result<Self, FfiError> {
        check_array(ptr, 1, what)?;
        Ok(OutParam(ptr))
    }

    /// Stores `v` without reading or dropping the old contents (which may be uninitialised).
    ///
    /// # Safety
    ///
    /// The pointer given to [`OutParam::new`] must be valid for a write of one `T`.
    pub(crate) unsafe fn write(self, v: T) {
        // SAFETY: non-NULL and aligned (checked in `new`); valid for writes (caller).
        unsafe { std::ptr::write(self.0, v) }
    }
}

/// Borrows the handle behind `ptr`.
///
/// # Safety
///
/// A non-NULL, aligned `ptr` must come from the matching `_new` function and not have been freed.
pub(crate) unsafe fn handle<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, FfiError> {
    check_array(ptr, 1, what)?;
    // SAFETY: non-NULL and aligned (checked above); a live handle (caller). Handles are only ever
    // accessed through `&` (their state sits behind a lock), so shared borrows never alias a `&mut`.
    Ok(unsafe { &*ptr })
}

/// Reads an optional `#[repr(C)]` argument struct (NULL means `None`).
///
/// # Safety
///
/// A non-NULL, aligned `ptr` must point to an initialised `T`.
pub(crate) unsafe fn optional_struct<T: Copy>(
    ptr: *const T,
    what: &str,
) -> Result<Option<T>, FfiError> {
    if ptr.is_null() {
        return Ok(None);
    }
    check_array(ptr, 1, what)?;
    // SAFETY: non-NULL and aligned (checked above), initialised (caller); `T: Copy` is a plain
    // struct of pointers and integers, for which any bit pattern is valid.
    Ok(Some(unsafe { std::ptr::read(ptr) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_a_status_and_a_message() {
        let st = run("kvtier_test", || panic!("boom {}", 7));
        assert_eq!(st, kvtier_status::Panic);
        assert_eq!(last_error::get(), "kvtier_test: panic: boom 7");
        let v = run_or(42u32, "kvtier_test_or", || panic!("static"));
        assert_eq!(v, 42);
        assert_eq!(last_error::get(), "kvtier_test_or: panic: static");
    }

    #[test]
    fn errors_are_recorded_with_the_function_name() {
        let st = run("kvtier_x", || Err(FfiError::null("out")));
        assert_eq!(st, kvtier_status::NullParameter);
        assert_eq!(last_error::get(), "kvtier_x: `out` must not be NULL");
        // Success leaves the last error alone (errno style).
        assert_eq!(run("kvtier_y", || Ok(())), kvtier_status::Ok);
        assert_eq!(last_error::get(), "kvtier_x: `out` must not be NULL");
    }

    #[test]
    fn array_checks() {
        let data = [1.0f32, 2.0, 3.0];
        // SAFETY: every call passes either a count of 0, NULL, a misaligned pointer (all refused
        // before any read) or `data` with its true length.
        unsafe {
            assert_eq!(
                input::<f32>(std::ptr::null(), 0, "x").unwrap(),
                &[] as &[f32]
            );
            assert_eq!(
                input::<f32>(std::ptr::null(), 1, "x").unwrap_err().status,
                kvtier_status::NullParameter
            );
            let mis = (data.as_ptr() as *const u8).add(1) as *const f32;
            assert_eq!(
                input(mis, 1, "x").unwrap_err().status,
                kvtier_status::InvalidArgument
            );
            assert_eq!(input(data.as_ptr(), 3, "x").unwrap(), &data);
            assert_eq!(
                input(data.as_ptr(), usize::MAX / 2, "x")
                    .unwrap_err()
                    .status,
                kvtier_status::InvalidArgument
            );
        }
        let mut buf = [0f32; 2];
        assert_eq!(
            Out::new(buf.as_mut_ptr(), 2, 3, "o").unwrap_err().status,
            kvtier_status::BufferTooSmall
        );
        assert!(Out::<f32>::new(std::ptr::null_mut(), 0, 0, "o").is_ok());
        assert!(Out::<f32>::optional(std::ptr::null_mut(), 0, 5, "o")
            .unwrap()
            .is_none());
        let out = Out::new(buf.as_mut_ptr(), 2, 2, "o").unwrap();
        // SAFETY: `buf` holds 2 elements and is not otherwise borrowed.
        unsafe { out.write(&[5.0, 6.0]) };
        assert_eq!(buf, [5.0, 6.0]);
    }
}
