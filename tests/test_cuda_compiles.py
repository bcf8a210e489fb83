"""The CUDA kernels as built: no register spills in the kernels that hold data in registers.

The extension compiles here (nvcc, no GPU), so what ptxas made of each kernel can be read
from the built module before a lent GPU runs it: a spill puts a fused kernel's segment in
local memory and costs the pass over memory its fusion saves. The resource usage comes from
cuobjdump (CUDA's, or the copy the Triton wheel ships), for every architecture built.

backward_kernel is left out: in its fp16 variant for rows whose length is not a multiple of
8 (groups that cross rows), ptxas keeps 64 registers (4 blocks per SM) at the price of a
4-byte spill; forbidding it (``__launch_bounds__(256, 1)``) gives 90 registers, 2 blocks.
"""
import os
import re
import shutil
import subprocess

import pytest

import triton

CHECKED = ("rows_fused_kernel", "pending_backward_kernel", "rows_stage1_kernel", "finish_kernel", "topk")


def _cuobjdump():
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or ""]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _resource_usage(path: str, tool: str) -> list[tuple[str, str, int]]:
    """(architecture, demangled kernel name, stack bytes) of every kernel in ``path``."""
    dump = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    names = sorted(set(re.findall(r"Function (\S+):", dump)))
    demangled = dict(zip(names, subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                                               text=True, check=True).stdout.split("\n")))
    found, arch, name = [], None, None
    for line in dump.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function (\S+):", line):
            name = demangled[m.group(1)]
        elif m := re.search(r"STACK:(\d+)", line):
            found.append((arch, name, int(m.group(1))))
    return found


def test_register_kernels_do_not_spill():
    try:
        import jacfast._C_cuda as module
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built: {e}")
    tool = _cuobjdump()
    if tool is None or shutil.which("c++filt") is None:
        pytest.skip("needs cuobjdump and c++filt")
    usage = _resource_usage(module.__file__, tool)
    checked = [(arch, name, stack) for arch, name, stack in usage if any(k in name for k in CHECKED)]
    assert {name.split("<")[0].split("::")[-1] for _, name, _ in checked} >= {
        "rows_fused_kernel", "pending_backward_kernel", "rows_stage1_kernel", "finish_kernel"}, usage
    spilled = [(arch, name[:160], stack) for arch, name, stack in checked if stack != 0]
    assert not spilled, spilled
