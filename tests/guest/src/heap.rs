//! The heap: a bump allocator over the RAM above the image, for `alloc`
//! (Vec, Box) and for memory the devices read and write (virtqueues, request
//! headers, data buffers; see [`DmaBuf`]).
//!
//! The image and start.S's 4 KiB-page mappings end at 2 MiB (link.ld asserts
//! it); above that, start.S identity-maps the first 4 GiB with 2 MiB pages,
//! user-accessible, so the heap is the memory map's RAM entry that contains
//! 2 MiB, up to the MMIO hole. Nothing is ever freed: a job allocates what it
//! needs once and the VM ends with it. Guest-physical and virtual addresses
//! are the same, so a pointer is also what a device is told.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::bootinfo::StartInfo;

/// Where the heap starts: above the image and start.S's 4 KiB page tables.
const HEAP_START: u64 = 0x20_0000;
/// Where it ends at the latest: the MMIO hole (start.S maps RAM only below it).
const HEAP_END_MAX: u64 = crate::mmio::MMIO_HOLE_START;
/// Alignment of a [`DmaBuf`]: a page, so that no two buffers share a cache
/// line and no buffer of up to a page crosses a page.
const DMA_ALIGN: usize = 4096;

struct BumpHeap {
    next: AtomicU64,
    end: AtomicU64,
}

// SAFETY: `alloc` hands out disjoint ranges of RAM that no Rust object and no
// other code uses (above the image, below the MMIO hole, inside a RAM entry
// of the memory map: see `init`), each at most once since `next` only grows
// (compare-exchange). `dealloc` never reuses memory, which is allowed.
unsafe impl GlobalAlloc for BumpHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let end = self.end.load(Ordering::Relaxed);
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let Some(start) = next.checked_next_multiple_of(layout.align() as u64) else {
                return ptr::null_mut();
            };
            let Some(stop) = start.checked_add(layout.size() as u64) else {
                return ptr::null_mut();
            };
            if stop > end {
                return ptr::null_mut();
            }
            match self
                .next
                .compare_exchange(next, stop, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return ptr::with_exposed_provenance_mut(start as usize),
                Err(now) => next = now,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

/// Empty until [`init`]: every allocation fails (and `alloc` panics).
#[global_allocator]
static HEAP: BumpHeap = BumpHeap {
    next: AtomicU64::new(HEAP_START),
    end: AtomicU64::new(HEAP_START),
};

/// Gives the heap the RAM from 2 MiB to the end of its memory-map entry (or
/// the MMIO hole). Returns the heap's size in bytes (0 if the memory map has
/// no RAM there).
pub fn init(start_info: &StartInfo) -> u64 {
    let end = match start_info.ram_range_containing(HEAP_START) {
        Some((_, end)) => end.min(HEAP_END_MAX),
        None => HEAP_START,
    };
    HEAP.end.store(end, Ordering::Relaxed);
    end - HEAP_START
}

/// Bytes of heap still free.
pub fn free_bytes() -> u64 {
    HEAP.end
        .load(Ordering::Relaxed)
        .saturating_sub(HEAP.next.load(Ordering::Relaxed))
}

/// Zeroed, page-aligned memory that is shared with a device: the CPU and
/// the device both access it, so it is only ever read and written through
/// raw pointers (volatile where the device may be writing concurrently),
/// never through a reference that would let the compiler assume nobody else
/// changes it. It lives until the VM ends (the heap never frees).
#[derive(Debug)]
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl DmaBuf {
    /// `len` zeroed bytes, or `None` when the heap is exhausted.
    pub fn alloc(len: usize) -> Option<DmaBuf> {
        let layout = Layout::from_size_align(len.max(1), DMA_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        Some(DmaBuf { ptr, len })
    }

    /// Guest-physical address of the first byte (the identity map makes it
    /// the pointer's address).
    pub fn paddr(&self) -> u64 {
        self.ptr.as_ptr().expose_provenance() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Pointer to the byte at `offset`, which must leave room for a `T`.
    pub fn ptr_at<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset
                .checked_add(size_of::<T>())
                .is_some_and(|end| end <= self.len),
            "DMA access at {offset}+{} outside a {}-byte buffer",
            size_of::<T>(),
            self.len
        );
        // SAFETY: offset + size_of::<T>() <= len (checked above), so the
        // result stays inside the allocation.
        unsafe { self.ptr.as_ptr().add(offset).cast() }
    }

    /// The bytes as a slice, for the CPU's use of a buffer the device does
    /// not own right now.
    ///
    /// # Safety
    /// No request that the device may still process refers to any of these
    /// bytes for the lifetime of the slice.
    pub unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `len` bytes, initialized (zeroed), never
        // freed, and only this DmaBuf (borrowed mutably) hands out slices of
        // it; that the device leaves it alone is the caller's contract.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}
