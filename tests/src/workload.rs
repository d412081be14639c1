//! Workloads shared by the end-to-end tests and the VM scenario (`tanzhen-vm-scenario`):
//! TCP listeners and connectors in threads with distinctive names, forked syscall workers, and
//! threads whose context switches are bracketed by the kernel's own per-thread counters.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Barrier, mpsc},
    thread,
};

use crate::Metrics;

/// Listens on `bind` in a thread named `name` and accepts `n` connections.
/// Returns the listening address and the thread's handle.
pub fn spawn_listener(
    name: &str,
    bind: SocketAddr,
    n: usize,
) -> (SocketAddr, thread::JoinHandle<usize>) {
    let (tx, rx) = mpsc::channel();
    let h = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // listen() runs here, so the kernel sees this thread's comm at CLOSE -> LISTEN.
            let l = TcpListener::bind(bind).expect("bind listener");
            tx.send(l.local_addr().unwrap()).unwrap();
            let mut accepted = 0;
            for _ in 0..n {
                let (_s, _) = l.accept().expect("accept");
                accepted += 1;
            }
            accepted
        })
        .unwrap();
    (rx.recv().unwrap(), h)
}

/// In a thread named `name`: `ok` connects to `to`, then `refused` connects to `closed`.
pub fn spawn_connector(
    name: &str,
    to: SocketAddr,
    ok: usize,
    closed: Option<SocketAddr>,
    refused: usize,
) -> (usize, usize) {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut established = 0;
            for _ in 0..ok {
                let mut s = TcpStream::connect(to).expect("connect to listener");
                let _ = s.write_all(b"x");
                established += 1;
            }
            let mut failed = 0;
            if let Some(closed) = closed {
                for _ in 0..refused {
                    let e =
                        TcpStream::connect(closed).expect_err("connect to a closed port must fail");
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                    failed += 1;
                }
            }
            (established, failed)
        })
        .unwrap()
        .join()
        .unwrap()
}

/// What a worker does when told to go.
#[derive(Clone, Copy, Debug, Default)]
pub struct Workload {
    /// `syscall(SYS_getppid)` calls (libc cannot cache or skip them).
    pub getppid: u32,
    /// `openat` calls on a path that does not exist (ENOENT).
    pub open_missing: u32,
    /// `openat` calls on an existing file (each followed by a `close`).
    pub open_existing: u32,
    /// One TCP connect to this loopback port.
    pub connect_port: Option<u16>,
    /// `nanosleep` calls of 100 µs each: every one blocks, so the thread is switched out
    /// inside the syscall.
    pub sleeps: u32,
    /// `sched_setaffinity` calls alternating between CPUs 0 and 1: every one moves the thread
    /// to the other CPU inside the syscall, so it returns on another CPU than it entered.
    pub migrations: u32,
    /// Pin the worker to this CPU before its workload.
    pub pin_cpu: Option<usize>,
    /// A `sched_yield` after every this many `getppid` calls (0: none): workers sharing a CPU
    /// then take turns.
    pub yield_every: u32,
}

/// A forked child named `name`, waiting for [`Worker::go`].
pub struct Worker {
    pid: libc::pid_t,
    cmd: libc::c_int,
    done: libc::c_int,
}

impl Worker {
    pub fn spawn(name: &str, w: Workload) -> Self {
        let cname = CString::new(name).unwrap();
        let dir = std::env::temp_dir();
        let existing = dir.join(format!("tanzhen-sc-{}-{name}", std::process::id()));
        std::fs::write(&existing, b"x").unwrap();
        let existing = CString::new(existing.to_str().unwrap()).unwrap();
        let missing = CString::new(
            dir.join(format!("tanzhen-sc-missing-{}", std::process::id()))
                .to_str()
                .unwrap(),
        )
        .unwrap();
        let (mut cmd, mut done) = ([0; 2], [0; 2]);
        let cpu_sets: [libc::cpu_set_t; 2] = std::array::from_fn(cpu_set);
        let pin_set = w.pin_cpu.map(cpu_set);
        // SAFETY: plain syscalls; after fork the child only makes async-signal-safe calls on
        // memory prepared before the fork, then `_exit`s.
        unsafe {
            // CLOEXEC keeps the agent (spawned later) from inheriting them; other workers do
            // inherit them (no exec), hence the explicit quit command instead of EOF.
            assert_eq!(libc::pipe2(cmd.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::pipe2(done.as_mut_ptr(), libc::O_CLOEXEC), 0);
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                libc::prctl(libc::PR_SET_NAME, cname.as_ptr());
                let mut b = 0u8;
                if libc::read(cmd[0], (&raw mut b).cast(), 1) != 1 || b != b'g' {
                    libc::_exit(3);
                }
                if let Some(set) = &pin_set
                    && libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) != 0
                {
                    libc::_exit(8);
                }
                for i in 1..=w.getppid {
                    libc::syscall(libc::SYS_getppid);
                    if w.yield_every != 0 && i % w.yield_every == 0 {
                        libc::sched_yield();
                    }
                }
                for _ in 0..w.open_missing {
                    let fd = libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        missing.as_ptr(),
                        libc::O_RDONLY | libc::O_CLOEXEC,
                    );
                    if fd >= 0 {
                        libc::_exit(4);
                    }
                }
                for _ in 0..w.open_existing {
                    let fd = libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        existing.as_ptr(),
                        libc::O_RDONLY | libc::O_CLOEXEC,
                    );
                    if fd < 0 {
                        libc::_exit(5);
                    }
                    libc::close(fd as libc::c_int);
                }
                let nap = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000,
                };
                for _ in 0..w.sleeps {
                    libc::syscall(
                        libc::SYS_nanosleep,
                        &raw const nap,
                        std::ptr::null_mut::<libc::timespec>(),
                    );
                }
                for i in 0..w.migrations {
                    let set = &cpu_sets[(i % 2) as usize];
                    if libc::syscall(
                        libc::SYS_sched_setaffinity,
                        0,
                        size_of::<libc::cpu_set_t>(),
                        std::ptr::from_ref(set),
                    ) != 0
                    {
                        libc::_exit(7);
                    }
                }
                if let Some(port) = w.connect_port {
                    let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: port.to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    #[expect(clippy::cast_possible_truncation, reason = "16 bytes")]
                    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                    if libc::connect(s, (&raw const addr).cast(), len) != 0 {
                        libc::_exit(6);
                    }
                    libc::close(s);
                }
                libc::write(done[1], (&raw const b).cast(), 1);
                libc::read(cmd[0], (&raw mut b).cast(), 1);
                libc::_exit(0);
            }
            libc::close(cmd[0]);
            libc::close(done[1]);
            Self {
                pid,
                cmd: cmd[1],
                done: done[0],
            }
        }
    }

    pub fn pid(&self) -> String {
        self.pid.to_string()
    }

    /// Runs the workload and waits until the worker has finished it.
    pub fn go(&self) {
        self.start();
        self.wait();
    }

    /// Starts the workload (see [`Worker::wait`]).
    pub fn start(&self) {
        let b = b'g';
        // SAFETY: our own pipe fd.
        unsafe {
            assert_eq!(libc::write(self.cmd, (&raw const b).cast(), 1), 1);
        }
    }

    /// Waits until the worker has finished the workload [`Worker::start`] began.
    pub fn wait(&self) {
        let mut r = 0u8;
        // SAFETY: our own pipe fd.
        unsafe {
            assert_eq!(
                libc::read(self.done, (&raw mut r).cast(), 1),
                1,
                "worker {} died during its workload (exit code 4/5/6 = unexpected open/connect result, 7/8 = sched_setaffinity failed)",
                self.pid
            );
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: our own fds and child. `q` ends the worker wherever it waits.
        unsafe {
            let q = b'q';
            libc::write(self.cmd, (&raw const q).cast(), 1);
            libc::close(self.cmd);
            libc::close(self.done);
            let mut status = 0;
            libc::waitpid(self.pid, &raw mut status, 0);
        }
    }
}

/// Sets the calling thread's comm (prctl PR_SET_NAME).
pub fn set_comm(name: &str) {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) };
    assert_eq!(rc, 0, "prctl(PR_SET_NAME)");
}

/// The CPU set holding only `cpu`.
fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) {
    let set = cpu_set(cpu);
    // SAFETY: a valid, correctly sized CPU set.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    assert_eq!(rc, 0, "sched_setaffinity to CPU {cpu}");
}

pub fn require_cpus(n: usize) {
    let have = thread::available_parallelism().map_or(1, usize::from);
    assert!(
        have >= n,
        "this test pins threads to {n} CPUs; the machine has {have}"
    );
}

/// The kernel's (voluntary, involuntary) switch counts of the calling thread.
pub fn my_switches() -> (u64, u64) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /proc/self/task/{tid}/status"))
    };
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// Runs `work` in a thread (pinned to `cpu` if given) that carries `name` only while the kernel's counters
/// are being bracketed; returns the kernel's (voluntary, involuntary) deltas for that window.
pub fn bracketed(
    name: String,
    cpu: Option<usize>,
    start: Arc<Barrier>,
    work: impl FnOnce() + Send + 'static,
) -> thread::JoinHandle<(u64, u64)> {
    thread::spawn(move || {
        if let Some(cpu) = cpu {
            pin(cpu);
        }
        set_comm(&name);
        let before = my_switches();
        start.wait();
        work();
        let after = my_switches();
        set_comm("tz-done");
        (after.0 - before.0, after.1 - before.1)
    })
}

/// Two threads named `name` ping-pong a byte `round_trips` times through two pipes (pinned to
/// `cpus` when given); returns the kernel's (voluntary, involuntary) switch counts of the two
/// threads over exactly the window they carried `name`.
#[must_use]
pub fn pipe_ping_pong(name: &str, cpus: [Option<usize>; 2], round_trips: usize) -> (u64, u64) {
    let (mut a_rx, mut b_tx) = std::io::pipe().unwrap();
    let (mut b_rx, mut a_tx) = std::io::pipe().unwrap();
    let start = Arc::new(Barrier::new(2));
    let a = bracketed(name.to_owned(), cpus[0], start.clone(), move || {
        let mut buf = [0u8; 1];
        for _ in 0..round_trips {
            a_tx.write_all(b"p").unwrap();
            a_rx.read_exact(&mut buf).unwrap();
        }
    });
    let b = bracketed(name.to_owned(), cpus[1], start, move || {
        let mut buf = [0u8; 1];
        for _ in 0..round_trips {
            b_rx.read_exact(&mut buf).unwrap();
            b_tx.write_all(b"q").unwrap();
        }
    });
    let (va, ia) = a.join().unwrap();
    let (vb, ib) = b.join().unwrap();
    (va + vb, ia + ib)
}

/// Asserts `got` is within 1% of `want` (at least 2 switches, for tiny counts).
pub fn assert_close(got: f64, want: u64, what: &str, scrape: &Metrics) {
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let want = want as f64;
    let tol = (want * 0.01).max(2.0);
    assert!(
        (got - want).abs() <= tol,
        "{what}: agent {got}, kernel {want} (tolerance {tol})\n{}",
        scrape.0
    );
}
