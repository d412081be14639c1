#!/bin/bash
# Average ns per program run (kernel bpf_stats) under perf bench sched pipe.
# Usage (root): tools/sched-bpf-stats.sh target/release/tanzhen
BIN=$1
sysctl -qw kernel.bpf_stats_enabled=1
show() { bpftool prog show | awk '/tracepoint|raw_tracepoint|tracing/{name=$4} /run_time_ns/{for(i=1;i<=NF;i++){if($i=="run_time_ns")t=$(i+1); if($i=="run_cnt")c=$(i+1)}; if(c>0) printf "  %-22s runs %9d  avg %6.0f ns\n", name, c, t/c}'; }
$BIN run --probes sched --listen 127.0.0.1:19605 2>/dev/null & A=$!
until curl -sf 127.0.0.1:19605/healthz >/dev/null; do sleep 0.1; done
perf bench sched pipe -l 200000 | grep usecs/op; echo "tanzhen:"; show; kill -TERM $A; wait $A
runqlat >/dev/null 2>&1 & R=$!; sleep 2
perf bench sched pipe -l 200000 | grep usecs/op; echo "runqlat:"; show; kill -INT $R; wait $R
sysctl -qw kernel.bpf_stats_enabled=0
