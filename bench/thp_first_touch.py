"""First touch of a 0.9 GB tensor with and without torch's transparent-huge-page allocator.

    python bench/thp_first_touch.py

``brainbag predict`` sets ``THP_MEM_ALLOC_ENABLE=1`` before torch loads (brainbag/cli/common.py).
This prints, for each setting and in a fresh process each (torch reads the variable at import), the
seconds to fill a freshly allocated 0.9 GB float32 tensor, three allocations in a row: the first
one of a process may include the kernel's compaction of memory into huge pages.
"""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = """
import time, torch
ts = []
for _ in range(3):
    t = torch.empty(int(0.9e9) // 4, dtype=torch.float32)
    t0 = time.perf_counter(); t.fill_(1.0); ts.append(time.perf_counter() - t0)
    del t
print(' '.join(f'{x:.3f}' for x in ts))
"""


def main() -> None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            print(f"transparent_hugepage: {f.read().strip()}")
    except OSError:
        print("transparent_hugepage: not available")
    for rounds in range(2):
        for value in ("0", "1"):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value}
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip()
            print(f"THP_MEM_ALLOC_ENABLE={value} (round {rounds + 1}): fill s, 3 allocations: "
                  f"{out}")


if __name__ == "__main__":
    main()
