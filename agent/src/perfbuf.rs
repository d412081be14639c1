//! Per-CPU perf buffers for a `PERF_EVENT_ARRAY` map, opened here rather than through aya: aya
//! 0.14 asks the kernel for a reader wake-up after every sample (`wakeup_events = 1`), and each
//! wake-up queues an irq_work (a self-IPI, a VM exit under virtualisation) inside the program
//! that wrote the sample. These buffers wake the reader once a quarter of the buffer is filled
//! (`watermark`); the reader also polls them on a timer (see `transport.rs`), so a quiet
//! buffer's events are not held back. Kernels before 5.8 (no ring buffer) send every event of
//! the TCP and scheduler probes this way.
//!
//! Record layout (`perf_event_open(2)`, `struct perf_event_mmap_page`): a metadata page whose
//! `data_head` (offset 1024) the kernel advances and whose `data_tail` (1032) the reader
//! advances, then `2^n` data pages of records, each an 8-byte `perf_event_header` (type, misc,
//! size) and a body; records are 8-byte aligned and may wrap around the end of the data area.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// `PERF_TYPE_SOFTWARE`.
const PERF_TYPE_SOFTWARE: u32 = 1;
/// `PERF_COUNT_SW_BPF_OUTPUT`.
const PERF_COUNT_SW_BPF_OUTPUT: u64 = 10;
/// `PERF_SAMPLE_RAW`.
const PERF_SAMPLE_RAW: u64 = 1 << 10;
/// `watermark` in the attribute flags: wake at `wakeup_watermark` bytes, not per event.
const ATTR_FLAG_WATERMARK: u64 = 1 << 14;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `PERF_RECORD_LOST`: `u64 id, u64 lost`.
const PERF_RECORD_LOST: u32 = 2;
/// `PERF_RECORD_SAMPLE`: with `PERF_SAMPLE_RAW` only, `u32 size` then the raw bytes.
const PERF_RECORD_SAMPLE: u32 = 9;
/// Offsets of `data_head` and `data_tail` in `struct perf_event_mmap_page` (fixed ABI).
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
/// `BPF_MAP_UPDATE_ELEM`.
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// `struct perf_event_attr`, as far as these buffers use it (the kernel accepts any size from
/// `PERF_ATTR_SIZE_VER0` up, with zeros beyond what it knows).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_watermark: u32,
    bp_type: u32,
    /// `bp_addr`, `bp_len`, `branch_sample_type`, `sample_regs_user`, `sample_stack_user` and
    /// the rest up to `PERF_ATTR_SIZE_VER5` (112 bytes, Linux 4.1): all zero.
    rest: [u64; 7],
}
const _: () = assert!(size_of::<PerfEventAttr>() == 112);

/// One CPU's perf buffer: the perf event fd and its mapping.
pub struct PerfBuf {
    fd: OwnedFd,
    base: NonNull<u8>,
    /// Bytes of the data area (a power of two).
    data_size: usize,
    page_size: usize,
    /// A record that wraps around the end of the data area, made contiguous.
    scratch: Vec<u8>,
}

// SAFETY: the mapping is owned by this value and only read/written through `&mut self`.
unsafe impl Send for PerfBuf {}

impl AsRawFd for PerfBuf {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl PerfBuf {
    /// Opens a `BPF_OUTPUT` perf event on `cpu` with `pages` data pages (a power of two) that
    /// wakes its reader at a quarter full, maps it, and stores its fd at index `cpu` of the perf
    /// event array `map_fd`.
    pub fn open(map_fd: RawFd, cpu: u32, pages: usize) -> io::Result<Self> {
        if !pages.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("perf buffer pages must be a power of two, not {pages}"),
            ));
        }
        let page_size = crate::kernel::page_size() as usize;
        let data_size = page_size * pages;
        let attr = PerfEventAttr {
            type_: PERF_TYPE_SOFTWARE,
            size: size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_BPF_OUTPUT,
            sample_period: 1,
            sample_type: PERF_SAMPLE_RAW,
            flags: ATTR_FLAG_WATERMARK,
            wakeup_watermark: u32::try_from(data_size / 4).unwrap_or(u32::MAX),
            ..PerfEventAttr::default()
        };
        // SAFETY: perf_event_open reads `attr` (valid for its `size`); pid -1 with a cpu is
        // every process on that CPU; no group.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &raw const attr,
                -1 as libc::pid_t,
                cpu as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("perf_event_open (BPF output) on CPU {cpu}: {e}"),
            ));
        }
        // SAFETY: a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let len = page_size + data_size;
        // SAFETY: a shared mapping of the perf event's metadata page and data area.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("mapping the perf buffer of CPU {cpu}: {e}"),
            ));
        }
        let buf = Self {
            fd,
            base: NonNull::new(base.cast()).expect("mmap returned a non-null address"),
            data_size,
            page_size,
            scratch: Vec::new(),
        };
        map_set(map_fd, cpu, buf.fd.as_raw_fd())?;
        Ok(buf)
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: `data_head` is an 8-byte aligned u64 inside the mapped metadata page.
        unsafe { &*self.base.as_ptr().add(DATA_HEAD).cast::<AtomicU64>() }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as `head`.
        unsafe { &*self.base.as_ptr().add(DATA_TAIL).cast::<AtomicU64>() }
    }

    /// Hands every sample's raw bytes to `f` (with the kernel's padding to 8 bytes at the end)
    /// and adds the samples the kernel reported lost to `lost`; returns the number of samples.
    pub fn drain(&mut self, lost: &AtomicU64, f: &mut (dyn FnMut(&[u8]) + Send)) -> usize {
        // Acquire pairs with the kernel's store of data_head after writing the records.
        let head = self.head().load(Ordering::Acquire);
        let tail = self.tail().load(Ordering::Relaxed);
        // SAFETY: the data area is mapped for the life of `self`; the kernel writes only
        // beyond `head` until it sees our new tail, and `walk` reads only below `head`.
        let data = unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(self.page_size).cast_const(),
                self.data_size,
            )
        };
        let (tail, n) = walk(data, tail, head, &mut self.scratch, lost, f);
        // Release: the kernel may reuse the space once it sees the new tail.
        self.tail().store(tail, Ordering::Release);
        n
    }
}

/// Walks the records of the data area `data` (a power of two long) from position `tail` to
/// `head`: samples' raw bytes go to `f`, lost counts to `lost`. Returns the new tail and the
/// number of samples. A malformed header (never seen from a kernel) is logged and counted as
/// one lost sample, and everything up to `head` skipped rather than looped on.
fn walk(
    data: &[u8],
    mut tail: u64,
    head: u64,
    scratch: &mut Vec<u8>,
    lost: &AtomicU64,
    f: &mut (dyn FnMut(&[u8]) + Send),
) -> (u64, usize) {
    let mask = data.len() - 1;
    let mut n = 0;
    while tail < head {
        // Headers are 8-byte aligned and the area a multiple of 8: never split.
        let off = (tail as usize) & mask;
        let h = &data[off..off + 8];
        let kind = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]);
        let size = usize::from(u16::from_ne_bytes([h[6], h[7]]));
        if size < 8 || size > data.len() || tail + size as u64 > head {
            log::error!(
                "perf buffer: malformed record header at {tail} (head {head}); skipping {} bytes",
                head - tail
            );
            lost.fetch_add(1, Ordering::Relaxed);
            return (head, n);
        }
        let body: &[u8] = if off + size <= data.len() {
            &data[off..off + size]
        } else {
            // The record wraps around the end of the area: make it contiguous.
            scratch.clear();
            scratch.extend_from_slice(&data[off..]);
            scratch.extend_from_slice(&data[..size - (data.len() - off)]);
            scratch
        };
        match kind {
            PERF_RECORD_SAMPLE if body.len() >= 12 => {
                let raw = u32::from_ne_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
                f(&body[12..(12 + raw).min(body.len())]);
                n += 1;
            }
            PERF_RECORD_LOST if body.len() >= 24 => {
                let count = u64::from_ne_bytes(body[16..24].try_into().expect("8 bytes"));
                lost.fetch_add(count, Ordering::Relaxed);
            }
            _ => {}
        }
        tail += size as u64;
    }
    (tail, n)
}

impl Drop for PerfBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.page_size + self.data_size);
        }
    }
}

/// `map[cpu] = fd` on a perf event array (`BPF_MAP_UPDATE_ELEM`).
fn map_set(map_fd: RawFd, cpu: u32, fd: RawFd) -> io::Result<()> {
    #[repr(C)]
    struct UpdateAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let value = fd as u32;
    let attr = UpdateAttr {
        map_fd: map_fd as u32,
        _pad: 0,
        key: (&raw const cpu) as u64,
        value: (&raw const value) as u64,
        flags: 0,
    };
    // SAFETY: the kernel reads `attr` and the key and value it points to, all alive here.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            &raw const attr,
            size_of::<UpdateAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("setting the perf buffer of CPU {cpu} in its map: {e}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `rec` at stream position `pos` of the ring `data`, wrapping like the kernel.
    fn put(data: &mut [u8], pos: u64, rec: &[u8]) {
        let len = data.len();
        for (i, b) in rec.iter().enumerate() {
            data[(pos as usize + i) % len] = *b;
        }
    }

    fn header(kind: u32, size: usize) -> Vec<u8> {
        let mut h = kind.to_ne_bytes().to_vec();
        h.extend_from_slice(&0u16.to_ne_bytes());
        h.extend_from_slice(&u16::try_from(size).unwrap().to_ne_bytes());
        h
    }

    /// A sample record carrying `payload` padded like the kernel's (raw size + 4 to 8 bytes).
    fn sample(payload: &[u8]) -> Vec<u8> {
        let raw = (payload.len() + 4).next_multiple_of(8) - 4;
        let mut r = header(PERF_RECORD_SAMPLE, 8 + 4 + raw);
        r.extend_from_slice(&u32::try_from(raw).unwrap().to_ne_bytes());
        r.extend_from_slice(payload);
        r.resize(8 + 4 + raw, 0);
        r
    }

    fn lost_record(count: u64) -> Vec<u8> {
        let mut r = header(PERF_RECORD_LOST, 24);
        r.extend_from_slice(&7u64.to_ne_bytes());
        r.extend_from_slice(&count.to_ne_bytes());
        r
    }

    fn run(data: &[u8], tail: u64, head: u64) -> (u64, Vec<Vec<u8>>, u64) {
        let lost = AtomicU64::new(0);
        let mut got = Vec::new();
        let mut scratch = Vec::new();
        let (t, n) = walk(data, tail, head, &mut scratch, &lost, &mut |b| {
            got.push(b.to_vec());
        });
        assert_eq!(n, got.len());
        (t, got, lost.into_inner())
    }

    #[test]
    fn samples_lost_records_and_wrap_around() {
        let mut data = vec![0u8; 128];
        // 88 bytes of records from 16 bytes before the end: the first sample wraps (its header
        // does not: headers are 8-byte aligned); positions keep growing past the size.
        let start = 128 * 3 + 112;
        let recs = [
            sample(b"abcdef"),
            sample(b"0123456789"),
            lost_record(5),
            sample(b"z"),
        ];
        let mut pos = start;
        for r in &recs {
            put(&mut data, pos, r);
            pos += r.len() as u64;
        }
        let (tail, got, lost) = run(&data, start, pos);
        assert_eq!(tail, pos);
        assert_eq!(lost, 5);
        assert_eq!(got.len(), 3);
        // Payloads come with the kernel's padding after them.
        assert!(
            got[0].starts_with(b"abcdef") && got[0].len() == 12,
            "{:?}",
            got[0]
        );
        assert!(
            got[1].starts_with(b"0123456789") && got[1].len() == 12,
            "{:?}",
            got[1]
        );
        assert!(
            got[2].starts_with(b"z") && got[2].len() == 4,
            "{:?}",
            got[2]
        );
    }

    #[test]
    fn nothing_new_reads_nothing() {
        let data = vec![0u8; 64];
        assert_eq!(run(&data, 128, 128), (128, Vec::new(), 0));
    }

    #[test]
    fn a_malformed_header_is_counted_and_skipped() {
        let mut data = vec![0u8; 64];
        put(&mut data, 0, &header(PERF_RECORD_SAMPLE, 4));
        let (tail, got, lost) = run(&data, 0, 32);
        assert_eq!((tail, got.len(), lost), (32, 0, 1));
        // A record claiming more than was written.
        put(&mut data, 0, &header(PERF_RECORD_SAMPLE, 48));
        let (tail, got, lost) = run(&data, 0, 32);
        assert_eq!((tail, got.len(), lost), (32, 0, 1));
    }
}
