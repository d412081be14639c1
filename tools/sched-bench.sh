#!/bin/bash
# perf bench sched pipe: baseline vs tanzhen --probes sched vs runqlat, alternating.
# Usage (root): tools/sched-bench.sh target/release/tanzhen [loops] [rounds]
BIN=$1; N=${2:-200000}; ROUNDS=${3:-3}
b() { perf bench sched pipe -l $N 2>/dev/null | awk '/usecs\/op/{print $1}'; }
for r in $(seq 1 $ROUNDS); do
  base=$(b)
  $BIN run --probes sched --listen 127.0.0.1:19601 --interval 5s 2>/dev/null & A=$!
  until curl -sf 127.0.0.1:19601/healthz >/dev/null; do sleep 0.1; done
  tz=$(b); kill -TERM $A; wait $A
  runqlat >/dev/null 2>&1 & R=$!; sleep 2
  rq=$(b); kill -INT $R; wait $R
  echo "round $r: baseline $base  tanzhen $tz  runqlat $rq  (usecs/op)"
done
