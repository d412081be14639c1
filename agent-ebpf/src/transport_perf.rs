//! Event transport of the perf object (`tanzhen-ebpf-perf`, kernels without a BPF ring buffer,
//! e.g. 4.19): events are built in a per-CPU scratch slot ([`EVENT_SCRATCH`], shared by every
//! program: tracepoint and kprobe programs do not nest on a CPU) and copied into the current
//! CPU's perf buffer with `bpf_perf_event_output` (helper 25, kernel 4.4).
//!
//! Same API as `transport_ringbuf.rs`.

use core::marker::PhantomData;

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_CURRENT_CPU,
    helpers::generated::bpf_perf_event_output,
    macros::map,
    maps::{PerCpuArray, PerfEventArray},
};

/// `-ENOSPC`: the perf buffer was full (kernels >= 5.4 return it; older ones return 0).
const ENOSPC: i64 = -28;

/// Room for the largest event any program sends (`ProcEvent`, 304 bytes).
#[repr(C)]
pub struct Scratch([u64; 40]);

#[map]
static EVENT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// An event channel carrying `T`s (a `#[map]` static).
#[repr(transparent)]
pub struct Events<T, const BYTES: u32> {
    perf: PerfEventArray<T>,
    _t: PhantomData<T>,
}

// SAFETY: a map definition; the kernel synchronises access.
unsafe impl<T, const BYTES: u32> Sync for Events<T, BYTES> {}

impl<T: 'static, const BYTES: u32> Events<T, BYTES> {
    /// A channel; `BYTES` is the ring buffer object's size (perf buffers are sized per
    /// CPU by userspace).
    #[must_use]
    pub const fn new() -> Self {
        const {
            assert!(core::mem::size_of::<T>() <= core::mem::size_of::<Scratch>());
        }
        Self {
            perf: PerfEventArray::new(0),
            _t: PhantomData,
        }
    }

    /// This CPU's scratch slot for one event; `None` only if the map lookup fails.
    #[inline(always)]
    pub fn reserve(&self) -> Option<Reserved<'_, T, BYTES>> {
        let p = EVENT_SCRATCH.get_ptr_mut(0)?;
        Some(Reserved {
            events: self,
            ptr: p.cast::<T>(),
        })
    }
}

/// A reserved event (in the scratch slot).
pub struct Reserved<'a, T, const BYTES: u32> {
    events: &'a Events<T, BYTES>,
    ptr: *mut T,
}

impl<T: 'static, const BYTES: u32> Reserved<'_, T, BYTES> {
    /// Where to write the event.
    #[inline(always)]
    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.ptr
    }

    /// Writes the whole event.
    #[inline(always)]
    pub fn write(&mut self, v: T) {
        unsafe { self.ptr.write(v) };
    }

    /// Copies the event into this CPU's perf buffer. A full buffer is not an error here (the
    /// reader sees PERF_RECORD_LOST); other failures are.
    #[inline(always)]
    pub fn submit<C: EbpfContext>(self, ctx: &C) -> Result<(), i64> {
        let rc = unsafe {
            bpf_perf_event_output(
                ctx.as_ptr(),
                (&raw const self.events.perf).cast_mut().cast(),
                BPF_F_CURRENT_CPU as u64,
                self.ptr.cast(),
                core::mem::size_of::<T>() as u64,
            )
        };
        if rc == 0 || rc == ENOSPC {
            Ok(())
        } else {
            Err(rc)
        }
    }
}
