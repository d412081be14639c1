//! Event transport of the ring buffer object (`tanzhen-ebpf`, kernel >= 5.8): events are
//! reserved in a BPF ring buffer, filled in place and submitted.
//!
//! `transport_perf.rs` has the same API over a perf event array; each
//! object's `main` picks one with `#[path]`, so the probes' code is shared.

use core::marker::PhantomData;

use aya_ebpf::{
    EbpfContext,
    maps::{RingBuf, ring_buf::RingBufEntry},
};

/// An event channel carrying `T`s (a `#[map]` static).
#[repr(transparent)]
pub struct Events<T> {
    ring: RingBuf,
    _t: PhantomData<T>,
}

// SAFETY: a map definition; the kernel synchronises access.
unsafe impl<T> Sync for Events<T> {}

impl<T: 'static> Events<T> {
    /// A channel of `byte_size` bytes (a power-of-two multiple of the page size).
    #[must_use]
    pub const fn new(byte_size: u32) -> Self {
        Self {
            ring: RingBuf::with_byte_size(byte_size, 0),
            _t: PhantomData,
        }
    }

    /// Room for one event, to fill through [`Reserved::as_mut_ptr`] and then
    /// [`Reserved::submit`]; `None` when the buffer is full.
    #[inline(always)]
    pub fn reserve(&self) -> Option<Reserved<T>> {
        self.ring.reserve::<T>(0).map(Reserved)
    }
}

/// A reserved event.
pub struct Reserved<T: 'static>(RingBufEntry<T>);

impl<T: 'static> Reserved<T> {
    /// Where to write the event.
    #[inline(always)]
    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.0.as_mut_ptr()
    }

    /// Writes the whole event.
    #[inline(always)]
    pub fn write(&mut self, v: T) {
        self.0.write(v);
    }

    /// Hands the event to userspace. Never fails once reserved.
    #[inline(always)]
    pub fn submit<C: EbpfContext>(self, _ctx: &C) -> Result<(), i64> {
        self.0.submit(0);
        Ok(())
    }
}
