#!/usr/bin/env python3
"""Cross-check tanzhen's run-queue histogram against libbpf-tools runqlat over one 10 s window."""
# Usage (root, libbpf-tools installed): tools/sched-runqlat-xcheck.py target/release/tanzhen
# Runs perf bench sched pipe as load, runqlat for one 10 s window, and scrapes tanzhen
# (--interval 100ms) when runqlat starts tracing and when it prints; compares sample counts,
# median buckets and the CDF at the (nearly aligned) bucket edges.
import re, subprocess, sys, time, urllib.request, collections
BIN = sys.argv[1]; PORT = 19600
def scrape():
    t = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics").read().decode()
    cum = collections.Counter(); count = 0
    for l in t.splitlines():
        m = re.match(r'tanzhen_sched_runqueue_latency_seconds_bucket\{le="([^"]+)".*\} (\S+)', l)
        if m: cum[m.group(1)] += float(m.group(2))
        m = re.match(r'tanzhen_sched_runqueue_latency_seconds_count\{.*\} (\S+)', l)
        if m: count += float(m.group(1))
    return cum, count
agent = subprocess.Popen([BIN, "run", "--probes", "sched", "--interval", "100ms", "--listen", f"127.0.0.1:{PORT}"], stderr=subprocess.DEVNULL)
for _ in range(100):
    try: urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz"); break
    except Exception: time.sleep(0.1)
work = subprocess.Popen(["perf", "bench", "sched", "pipe", "-l", "2000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1)
rq = subprocess.Popen(["stdbuf", "-oL", "runqlat", "10", "1"], stdout=subprocess.PIPE, text=True)
lines = []
before = None
for line in rq.stdout:
    lines.append(line)
    if "Tracing" in line and before is None:
        before = scrape()
    if "usecs" in line:
        time.sleep(0.15)  # one drain interval and a half
        after = scrape()
rq.wait(); work.kill(); agent.terminate(); agent.wait()
theirs = []
for l in lines:
    m = re.match(r'\s*(\d+) -> (\d+)\s*: (\d+)', l)
    if m: theirs.append((int(m.group(1)), int(m.group(2)) + 1, int(m.group(3))))  # [lo, hi) usecs
tn = sum(c for _, _, c in theirs)
les = sorted((float(k) if k != "+Inf" else float("inf"), k) for k in after[0])
ours = []; prev = 0.0; lo = 0.0
for v, k in les:
    c = after[0][k] - before[0].get(k, 0)
    ours.append((lo * 1e6, v * 1e6, c - prev)); prev = c; lo = v
on = after[1] - before[1]
def median(h, n):
    acc = 0
    for lo, hi, c in h:
        acc += c
        if acc >= n / 2: return lo, hi
print("".join(lines))
print(f"samples: tanzhen {on:.0f}  runqlat {tn}  diff {100*(on-tn)/tn:+.2f}%")
print(f"median bucket (usecs): tanzhen {median(ours, on)}  runqlat {median(theirs, tn)}")
def cdf_ours(x_us):
    return sum(c for lo, hi, c in ours if hi <= x_us * 1.0000001) / on
def cdf_theirs(x_us):
    return sum(c for lo, hi, c in theirs if hi <= x_us) / tn
print("fraction of samples below (tanzhen at 1.024*2^k us | runqlat at 2^k us):")
for k in range(0, 7):
    print(f"  2^{k}: tanzhen {cdf_ours(1.024 * 2**k):.3f}  runqlat {cdf_theirs(2**k):.3f}")
