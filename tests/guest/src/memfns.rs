//! The memory functions LLVM emits calls to (`memcpy`, `memmove`, `memset`,
//! `memcmp`, `bcmp`): there is no libc, and the precompiled `core` of the
//! linux-gnu target does not provide them. String instructions in inline asm,
//! so LLVM cannot turn an implementation back into a call to itself.

use core::arch::asm;

/// # Safety
/// `dest` and `src` valid for `n` bytes, not overlapping (C `memcpy`).
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for n bytes; the
    // direction flag is clear (ABI), so rep movsb copies forward.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
            options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `dest` and `src` valid for `n` bytes; they may overlap (C `memmove`).
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest before src, or no overlap: a forward copy reads every byte
        // before it is overwritten.
        // SAFETY: both ranges valid for n bytes (caller), forward copy as above.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
                options(nostack, preserves_flags));
        }
    } else if n > 0 {
        // dest inside (src, src + n): copy backward from the last byte, with
        // the direction flag set for the copy only.
        // SAFETY: both ranges valid for n bytes (caller), so their last bytes
        // at offset n - 1 are too; DF is cleared again before returning.
        unsafe {
            asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _, options(nostack));
        }
    }
    dest
}

/// # Safety
/// `dest` valid for `n` bytes (C `memset`).
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees dest is valid for n bytes; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") value as u8,
            options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `a` and `b` valid for `n` bytes (C `memcmp`).
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let (x, y): (u32, u32);
    // SAFETY: the caller guarantees both ranges are valid for n > 0 bytes.
    // repe cmpsb stops after the first differing byte (or after n bytes), so
    // the bytes at rsi - 1 and rdi - 1 are the last ones compared, in range.
    unsafe {
        asm!("repe cmpsb", "movzx {x:e}, byte ptr [rsi - 1]", "movzx {y:e}, byte ptr [rdi - 1]",
            x = out(reg) x, y = out(reg) y,
            inout("rcx") n => _, inout("rsi") a => _, inout("rdi") b => _,
            options(nostack, readonly));
    }
    x as i32 - y as i32
}

/// # Safety
/// `a` and `b` valid for `n` bytes (like `memcmp`, but only zero or non-zero).
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp, passed on from our caller.
    unsafe { memcmp(a, b, n) }
}
