"""Where in a store_bench --quick run its slowest store fetches fall: the 25 slowest of the
int8 store's 2,000 k=8 fetches by position, and p50/p99 per block of 250 (scratch). Run from
the repository root: python benchmarks/results/stop40/fetch_tail.py"""
import sys

import numpy as np

sys.path.insert(0, "benchmarks")
import store_bench  # noqa: E402

seen = []
orig = store_bench.percentile


def spy(xs, q):
    if q == 99 and len(xs) == 2000 and not seen:
        seen.append(list(xs))
    return orig(xs, q)


store_bench.percentile = spy
sys.argv = ["store_bench", "--quick", "--formats", "int8", "--metadata", "compiled",
            "--background-verify", "--out", "/tmp/tail.json"]
store_bench.main()
lat = np.array(seen[0])
order = np.argsort(lat)[::-1][:25]
print(f"p50 {np.percentile(lat, 50):.2f} p99 {np.percentile(lat, 99):.2f}")
print("slowest 25 (index: ms):", ", ".join(f"{i}:{lat[i]:.1f}" for i in sorted(order)))
for lo in range(0, 2000, 250):
    blk = lat[lo:lo + 250]
    print(lo, f"p50 {np.percentile(blk, 50):.2f} p99 {np.percentile(blk, 99):.2f}",
          f"max {blk.max():.1f}")
