//! No allocation is sized by an untrusted field: a torn log whose header claims a 4 GiB
//! metadata block is refused by salvage without allocating it.

// A global allocator that records sizes must implement an unsafe trait: test-only, and it
// only forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use lifeboat_hrl::{Error, Header, ReadOptions, Reader};

/// Records the largest single allocation.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

#[test]
fn salvage_does_not_allocate_what_the_header_claims() {
    let mut raw = [0u8; 4096];
    raw[..8].copy_from_slice(b"msctlog\0");
    let mut h = Header::decode(&raw);
    h.log_format_version = lifeboat_hrl::VERSION_2;
    h.metadata_size = 0xFFFF_FFE0; // valid in form: 32 + 32 k
    h.eol_location = 0;
    let mut file = h.encode().to_vec();
    file.resize(16 << 10, 0);
    LARGEST.store(0, Ordering::Relaxed);
    let r = Reader::with_options(file, ReadOptions::strict().salvage(true));
    assert!(matches!(r, Err(Error::NothingToSalvage)), "{:?}", r.err());
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 64 << 20, "an allocation of {largest} bytes");
}
