//! The thread-local text of the last failed call, and `kvtier_last_error` which copies it out.
//!
//! Owns: one `String` per thread, replaced by every failing entry point (errno style: a success
//! leaves it as it was). Must never: hand C a pointer into it (C gets a copy in its own buffer),
//! record a failure of `kvtier_last_error` itself (that would overwrite the message being asked
//! for), or panic when a thread's locals are already being torn down.

use super::boundary::{Out, OutParam};
use super::status::kvtier_status;
use std::cell::RefCell;
use std::ffi::c_char;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Replaces this thread's last error with `"{function}: {message}"` (NUL bytes become spaces, so
/// the text is always a valid C string).
pub(crate) fn set(function: &str, message: &str) {
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut e) = e.try_borrow_mut() {
            e.clear();
            let _ = write!(e, "{function}: {message}");
            if e.contains('\0') {
                *e = e.replace('\0', " ");
            }
        }
    });
}

/// This thread's last error (empty when no call has failed yet).
#[cfg(test)]
pub(crate) fn get() -> String {
    LAST_ERROR.with(|e| e.borrow().clone())
}

/// Copies the message of this thread's most recent failed kvtier call into `buf` as a
/// NUL-terminated string. The message names the function and the offending input; it stays until
/// the next failing call on this thread (successful calls do not clear it). Before any failure it
/// is the empty string.
///
/// At most `buf_len - 1` bytes of text are copied, cut at a UTF-8 character boundary, followed by
/// a NUL. `*len_out` (when `len_out` is not NULL) receives the length of the whole message in
/// bytes, without the NUL, so `kvtier_last_error(NULL, 0, &len)` asks for the size to allocate
/// (`len + 1`).
///
/// Returns `KVTIER_STATUS_OK` when the whole message fit, `KVTIER_STATUS_BUFFER_TOO_SMALL` when it
/// was cut (or `buf_len` is 0 and the message is not empty), `KVTIER_STATUS_NULL_PARAMETER` when
/// `buf` is NULL but `buf_len` is not 0, `KVTIER_STATUS_INVALID_ARGUMENT` when `len_out` is
/// misaligned. This function never changes the last error.
///
/// # Safety
///
/// `buf` must be valid for writes of `buf_len` bytes (or `buf_len` is 0); `len_out` must be NULL
/// or valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_last_error(
    buf: *mut c_char,
    buf_len: usize,
    len_out: *mut usize,
) -> kvtier_status {
    // Not ffi_panic_boundary!: that would record this function's own failures as the last error.
    let copy = move || -> kvtier_status {
        let out = match Out::new(buf, buf_len, buf_len, "buf") {
            Ok(out) => out,
            Err(e) => return e.status,
        };
        let len_param = if len_out.is_null() {
            None
        } else {
            match OutParam::new(len_out, "len_out") {
                Ok(p) => Some(p),
                Err(e) => return e.status,
            }
        };
        LAST_ERROR
            .try_with(|e| {
                let e = match e.try_borrow() {
                    Ok(e) => e,
                    Err(_) => return kvtier_status::Panic,
                };
                let msg = e.as_str();
                let mut n = msg.len().min(buf_len.saturating_sub(1));
                while !msg.is_char_boundary(n) {
                    n -= 1;
                }
                if buf_len > 0 {
                    let mut bytes: Vec<c_char> =
                        msg.as_bytes()[..n].iter().map(|&b| b as c_char).collect();
                    bytes.push(0);
                    // SAFETY: `out` was checked for `buf_len >= n + 1` elements; the caller
                    // guarantees `buf` is writable for `buf_len` bytes.
                    unsafe { out.write(&bytes) };
                }
                if let Some(p) = len_param {
                    // SAFETY: checked non-NULL and aligned; writable (caller).
                    unsafe { p.write(msg.len()) };
                }
                if n == msg.len() && buf_len > 0 || msg.is_empty() {
                    kvtier_status::Ok
                } else {
                    kvtier_status::BufferTooSmall
                }
            })
            .unwrap_or(kvtier_status::Panic)
    };
    catch_unwind(AssertUnwindSafe(copy)).unwrap_or(kvtier_status::Panic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(buf_len: usize) -> (kvtier_status, String, usize) {
        let mut buf = vec![0x55 as c_char; buf_len];
        let mut len = usize::MAX;
        // SAFETY: `buf` holds `buf_len` bytes, `len` is a live usize.
        let st = unsafe { kvtier_last_error(buf.as_mut_ptr(), buf_len, &mut len) };
        let text = if buf_len == 0 {
            String::new()
        } else {
            let end = buf.iter().position(|&c| c == 0).expect("NUL written");
            String::from_utf8(buf[..end].iter().map(|&c| c as u8).collect()).unwrap()
        };
        (st, text, len)
    }

    #[test]
    fn copies_truncates_at_char_boundaries_and_reports_length() {
        std::thread::spawn(|| {
            assert_eq!(read(8), (kvtier_status::Ok, String::new(), 0));
            assert_eq!(read(0), (kvtier_status::Ok, String::new(), 0));
            set("kvtier_f", "é ok"); // "kvtier_f: é ok" is 15 bytes ("é" is 2)
            assert_eq!(read(64), (kvtier_status::Ok, "kvtier_f: é ok".into(), 15));
            assert_eq!(read(16), (kvtier_status::Ok, "kvtier_f: é ok".into(), 15));
            assert_eq!(
                read(15),
                (kvtier_status::BufferTooSmall, "kvtier_f: é o".into(), 15)
            );
            // 12 bytes of room would split "é": the cut moves back to the boundary.
            assert_eq!(
                read(12),
                (kvtier_status::BufferTooSmall, "kvtier_f: ".into(), 15)
            );
            assert_eq!(read(0), (kvtier_status::BufferTooSmall, String::new(), 15));
            // SAFETY: NULL with a count of 0 and NULL len_out are allowed.
            let st = unsafe { kvtier_last_error(std::ptr::null_mut(), 0, std::ptr::null_mut()) };
            assert_eq!(st, kvtier_status::BufferTooSmall);
            // SAFETY: NULL with a non-zero count is refused before any write.
            let st = unsafe { kvtier_last_error(std::ptr::null_mut(), 4, std::ptr::null_mut()) };
            assert_eq!(st, kvtier_status::NullParameter);
            // ... and did not replace the message.
            assert_eq!(get(), "kvtier_f: é ok");
            set("kvtier_g", "a\0b");
            assert_eq!(get(), "kvtier_g: a b");
        })
        .join()
        .unwrap();
    }
}
