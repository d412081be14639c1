//! Event transport, userspace side: one reader over either a BPF ring buffer (kernel >= 5.8)
//! or a perf event array (one buffer and one `AsyncFd` per online CPU), so every probe decodes
//! its records with the same code whichever the kernel offers.
//!
//! The kernel side is two objects built from the same code (agent-ebpf's `transport_*.rs`): aya
//! creates every map of an object at load time, and a kernel without ring buffers cannot create
//! a `RINGBUF` map, so the perf object has none.

use std::{
    future::poll_fn,
    io,
    sync::{Arc, atomic::AtomicU64},
    task::Poll,
};

use aya::{
    Ebpf,
    maps::{Map, MapData, RingBuf},
};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    perfbuf::PerfBuf,
    probe::{ProbeError, take},
};

/// Pages of each per-CPU perf buffer (64 KiB with 4 KiB pages: some 200 process events or 600
/// TCP events per CPU between two reads).
const PERF_PAGES: usize = 16;

/// How kernel programs hand events to userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// BPF ring buffer (kernel >= 5.8): one buffer shared by every CPU.
    Ringbuf,
    /// Perf event array (kernel >= 4.4): one buffer per CPU.
    Perf,
}

impl Transport {
    /// The name as the CLI spells it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Ringbuf => "ringbuf",
            Self::Perf => "perf",
        }
    }

    /// `tanzhen_events_lost_total` reason of the kernel-side transport drop slot
    /// (`*_LOST_RINGBUF_FULL`): a failed ring buffer reserve, or a perf output that failed
    /// for another reason than a full buffer (those the reader counts as `perf_lost`).
    #[must_use]
    pub fn kernel_drop_reason(self) -> &'static str {
        match self {
            Self::Ringbuf => "ringbuf_full",
            Self::Perf => "perf_output_error",
        }
    }
}

/// `--transport`: a transport, or `auto` to pick by probing the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportChoice {
    /// The ring buffer where the kernel can create one, else the perf event array.
    Auto,
    /// BPF ring buffer (kernel >= 5.8).
    Ringbuf,
    /// Perf event array (any kernel tanzhen supports).
    Perf,
}

impl TransportChoice {
    /// Resolves the choice against the kernel's ring buffer support (`has_ringbuf`, the
    /// result of [`crate::kernel::has_ringbuf`]). `Err` is the one line to print when
    /// `ringbuf` is forced on a kernel without it.
    pub fn resolve(self, has_ringbuf: &Result<bool, String>) -> Result<Transport, String> {
        match (self, has_ringbuf) {
            (Self::Perf, _) | (Self::Auto, Ok(false)) => Ok(Transport::Perf),
            (Self::Auto | Self::Ringbuf, Ok(true)) => Ok(Transport::Ringbuf),
            (Self::Ringbuf, Ok(false)) => Err(
                "--transport ringbuf: this kernel cannot create BPF ring buffers (they need \
                 Linux 5.8); use --transport auto or --transport perf"
                    .into(),
            ),
            (Self::Auto, Err(e)) => {
                log::warn!("probing BPF ring buffer support failed ({e}); using perf buffers");
                Ok(Transport::Perf)
            }
            (Self::Ringbuf, Err(e)) => {
                log::warn!("probing BPF ring buffer support failed ({e}); trying ringbuf anyway");
                Ok(Transport::Ringbuf)
            }
        }
    }
}

enum Inner {
    Ring(AsyncFd<RingBuf<MapData>>),
    /// The buffers, and the map that points the programs at them (kept with them).
    Perf(
        Vec<AsyncFd<PerfBuf>>,
        #[expect(dead_code, reason = "held, not read")] Map,
    ),
}

/// How often a ring buffer is read even without a wake-up: the programs wake the reader only
/// once a quarter of the ring is pending (see agent-ebpf's transport_ringbuf.rs), so this bounds
/// how late an event is seen when few arrive.
pub const RING_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads the records of one event map (`TCP_EVENTS`, `SCHED_EVENTS`) over either transport.
pub struct EventReader {
    inner: Inner,
    lost: Arc<AtomicU64>,
    /// The [`RING_POLL_INTERVAL`] timer.
    tick: tokio::time::Interval,
}

impl EventReader {
    /// Takes the map `name` out of `ebpf` and opens it for reading: the ring buffer, or a perf
    /// buffer on every online CPU.
    pub fn open(
        ebpf: &mut Ebpf,
        name: &'static str,
        transport: Transport,
    ) -> Result<Self, ProbeError> {
        let inner = match transport {
            Transport::Ringbuf => {
                let ring: RingBuf<MapData> = take(ebpf, name)?;
                // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns it.
                Inner::Ring(
                    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                        .map_err(io::Error::from)?,
                )
            }
            Transport::Perf => {
                let map = ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))?;
                let Map::PerfEventArray(data) = &map else {
                    return Err(ProbeError::MissingMap(name));
                };
                let map_fd = {
                    use std::os::fd::{AsFd as _, AsRawFd as _};
                    data.fd().as_fd().as_raw_fd()
                };
                let cpus = aya::util::online_cpus()
                    .map_err(|(path, e)| io::Error::new(e.kind(), format!("{path}: {e}")))?;
                let mut bufs = Vec::with_capacity(cpus.len());
                for cpu in cpus {
                    let buf = PerfBuf::open(map_fd, cpu, PERF_PAGES)?;
                    // SAFETY: the buffer owns its fd, open for as long as the AsyncFd owns it.
                    bufs.push(
                        unsafe { AsyncFd::register_with_interest(buf, Interest::READABLE) }
                            .map_err(io::Error::from)?,
                    );
                }
                Inner::Perf(bufs, map)
            }
        };
        let mut tick = tokio::time::interval(RING_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            inner,
            lost: Arc::default(),
            tick,
        })
    }

    /// Samples the kernel dropped because a perf buffer was full (PERF_RECORD_LOST), so far;
    /// always 0 for the ring buffer (its drops are counted by the programs).
    #[must_use]
    pub fn lost(&self) -> Arc<AtomicU64> {
        self.lost.clone()
    }

    /// Waits until a buffer has records (woken by the kernel, or on the
    /// [`RING_POLL_INTERVAL`] tick), then hands every available record to `f`.
    /// Cancel-safe: all the work happens inside one poll.
    pub async fn read(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> io::Result<()> {
        let Self { inner, lost, tick } = self;
        poll_fn(|cx| {
            let mut any = false;
            match inner {
                Inner::Ring(fd) => loop {
                    match fd.poll_read_ready_mut(cx) {
                        Poll::Ready(Ok(mut guard)) => {
                            drain_ring(guard.get_inner_mut(), f);
                            guard.clear_ready();
                            any = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => break,
                    }
                },
                Inner::Perf(fds, _) => {
                    for fd in fds.iter_mut() {
                        loop {
                            match fd.poll_read_ready_mut(cx) {
                                Poll::Ready(Ok(mut guard)) => {
                                    guard.get_inner_mut().drain(lost, f);
                                    guard.clear_ready();
                                    any = true;
                                }
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => break,
                            }
                        }
                    }
                }
            }
            // Records submitted without a wake-up; polling the tick until Pending also
            // registers the waker for the next one.
            while tick.poll_tick(cx).is_ready() {
                any |= drain_all(inner, lost, f) > 0;
            }
            if any {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Hands every record still buffered to `f` without waiting (the flush at detach).
    pub fn drain(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) {
        drain_all(&mut self.inner, &self.lost, f);
    }
}

/// Hands every available record of every buffer to `f`; returns how many there were.
fn drain_all(inner: &mut Inner, lost: &AtomicU64, f: &mut (dyn FnMut(&[u8]) + Send)) -> usize {
    match inner {
        Inner::Ring(fd) => drain_ring(fd.get_mut(), f),
        Inner::Perf(fds, _) => fds.iter_mut().map(|fd| fd.get_mut().drain(lost, f)).sum(),
    }
}

/// Hands every available record to `f`; returns how many there were.
fn drain_ring(ring: &mut RingBuf<MapData>, f: &mut (dyn FnMut(&[u8]) + Send)) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        f(&item);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_by_the_probe() {
        assert_eq!(
            TransportChoice::Auto.resolve(&Ok(true)),
            Ok(Transport::Ringbuf)
        );
        assert_eq!(
            TransportChoice::Auto.resolve(&Ok(false)),
            Ok(Transport::Perf)
        );
        assert_eq!(
            TransportChoice::Perf.resolve(&Ok(true)),
            Ok(Transport::Perf)
        );
        let e = TransportChoice::Ringbuf.resolve(&Ok(false)).unwrap_err();
        assert!(e.contains("--transport perf") && !e.contains('\n'), "{e}");
    }
}
