//! Event transport of the ring buffer object (`tanzhen-ebpf`, kernel >= 5.8): events are
//! reserved in a BPF ring buffer, filled in place and submitted.
//!
//! Submits do not wake the reader (`BPF_RB_NO_WAKEUP`) until a quarter of the ring is pending
//! (`BPF_RB_FORCE_WAKEUP`); the agent also reads every ring on a short timer. The ring's size
//! is a type parameter (the agent never resizes these maps), so a submit asks the kernel only
//! for the pending bytes: one `bpf_ringbuf_query` per event, not two. A wake-up per
//! event (the default) costs the producing thread an irq_work and the reader a context switch
//! per event: on a loopback connect loop that was ~1.8 µs per program run (bpf_stats), about
//! 11 µs per connect.
//!
//! `transport_perf.rs` has the same API over a perf event array; each
//! object's `main` picks one with `#[path]`, so the probes' code is shared.

use core::marker::PhantomData;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    maps::{RingBuf, ring_buf::RingBufEntry},
};

/// An event channel carrying `T`s in `BYTES` bytes (a `#[map]` static).
#[repr(transparent)]
pub struct Events<T, const BYTES: u32> {
    ring: RingBuf,
    _t: PhantomData<T>,
}

// SAFETY: a map definition; the kernel synchronises access.
unsafe impl<T, const BYTES: u32> Sync for Events<T, BYTES> {}

impl<T: 'static, const BYTES: u32> Events<T, BYTES> {
    /// A channel of `BYTES` bytes (a power-of-two multiple of the page size).
    #[must_use]
    pub const fn new() -> Self {
        Self {
            ring: RingBuf::with_byte_size(BYTES, 0),
            _t: PhantomData,
        }
    }

    /// Room for one event, to fill through [`Reserved::as_mut_ptr`] and then
    /// [`Reserved::submit`]; `None` when the buffer is full.
    #[inline(always)]
    pub fn reserve(&self) -> Option<Reserved<'_, T, BYTES>> {
        self.ring
            .reserve::<T>(0)
            .map(|entry| Reserved(entry, &self.ring))
    }
}

/// A reserved event.
pub struct Reserved<'a, T: 'static, const BYTES: u32>(RingBufEntry<T>, &'a RingBuf);

impl<T: 'static, const BYTES: u32> Reserved<'_, T, BYTES> {
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
        // Pending bytes include this reserved record.
        let pending = self.1.query(u64::from(BPF_RB_AVAIL_DATA));
        let flags = if pending.saturating_mul(4) >= u64::from(BYTES) {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        self.0.submit(u64::from(flags));
        Ok(())
    }
}
