"""Summarise a py-spy raw profile by pipeline thread and leaf function."""
import sys
from collections import Counter

keys = ("source_loop", "reader_loop", "engine_loop", "_assemble", "closer", "pack")
by_thread, by_leaf, total = Counter(), Counter(), 0
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1)
    n = int(n)
    if "Thread.run" not in stack and "_worker" not in stack:
        continue
    frames = stack.split(";")
    top = next((k for k in keys if k in stack), "other")
    total += n
    by_thread[top] += n
    leaf = ";".join(f.split(" (")[0].split(".")[-1] + "@" + f.rsplit(":", 1)[-1].rstrip(")") for f in frames[-3:])
    by_leaf[(top, leaf)] += n
print("samples in pipeline threads:", total)
for k, v in by_thread.most_common():
    print(f"{100 * v / total:5.1f}% {k}")
for k, v in by_leaf.most_common(30):
    print(f"{100 * v / total:5.1f}% {k}")
