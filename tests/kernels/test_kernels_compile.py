"""The MoE kernels and the ``mma`` attention variant compile for sm_90 as launched (see ``compile_sm90.py``: the interpreter that
runs the other kernel tests does not type-check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(here / "compile_sm90.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    compiled = [line for line in done.stdout.splitlines() if line.startswith("compiled")]
    names = {line.split()[1] for line in compiled}
    assert names == {"_moe_align_kernel", "_moe_up_kernel", "_moe_down_kernel", "_moe_combine_kernel",
                     "_topk_kernel", "_router_logits_kernel", "_attend_mma_kernel", "_attend_kernel",
                     "_attend_merge_kernel"}, done.stdout
    assert any("_attend_mma_kernel" in line and "'META16': False" in line for line in compiled)
    assert any("_attend_mma_kernel" in line and "'MASK_BOOL': True" in line and "'SINKS': 4" in line
               for line in compiled)
    assert any("_attend_mma_kernel" in line and "'HAS_MASK': True" in line and "'MASK_BOOL': False" in line
               for line in compiled)
    # every kernel also as torch.compile / AOTInductor compile it (their copy of its source)
    assert {line.split()[2] for line in done.stdout.splitlines() if line.startswith("inductor copy")} == names
    assert any("_attend_mma_kernel" in line and "'TAIL_PROGRAMS': True" in line and "'SINKS': 4" in line
               for line in compiled)  # the tail's programs in stage 1's launch
    assert any("_attend_kernel" in line and "'STAGE': 2" in line for line in compiled)  # the mma path's tail
    # ... and with sink tokens, whose partial its last program computes
    assert any("_attend_kernel" in line and "'STAGE': 2" in line and "'SINKS': 4" in line for line in compiled)
    assert any("'SLOTS': True" in line for line in compiled) and any("'SLOTS': False" in line for line in compiled)
    assert any("'KEEP': 3" in line for line in compiled)
    assert any("'FOLD': True" in line for line in compiled) and any("'FOLD': False" in line for line in compiled)
    assert any("'SPLIT_UP': 8" in line for line in compiled) and any("'SPLIT_UP': 4" in line for line in compiled)
    assert any("'NORMALIZE': True" in line and "'SOFTMAX': True" in line for line in compiled)
