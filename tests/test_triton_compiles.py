"""Every Triton kernel compiles for Hopper (sm_90) without a GPU.

The interpreter that runs the Triton tests here executes the kernels' Python, not the
compiler: an op the compiler rejects, a type it cannot infer or a layout it cannot build
would first show on a lent GPU, whose minutes are few. Triton compiles ahead of time for a
named target with the ptxas it ships, so this checks (in a child process, since the test
session has TRITON_INTERPRET set) that each kernel reaches a cubin with every config it
runs with (autotuned and fixed), specialized and with the options of a launch, that none of
them spills registers, that no loss-head kernel contains a fused multiply-add (their
bits would then depend on the config, see EXACT) and that the row barrier polls its counter
with an acquire load inside its loop.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
# the fused module first: it must import on its own (imports point one way: fused -> two_pass)
from jacfast.kernels.triton_jacobian_matching import fused as jf, two_pass as jm
from jacfast.kernels import triton_jacobian_matching, triton_topk_seeds as tk
assert triton_jacobian_matching.forward_backward is jf.forward_backward

TARGET = GPUTarget("cuda", 90, 32)
PTR = lambda dt: "*" + dt
results = []
# a basic block that reads with acquire semantics and branches back to its own label: a poll
# the compiler kept inside its loop (a load hoisted out of it would spin on a stale value)
POLL_LOOP = re.compile(r"(\$L__BB\d+_\d+):.*\n(?:(?!\$L__BB).*\n)*?.*ld\.global\.gpu\.acquire.*\n"
                       r"(?:(?!\$L__BB).*\n)*?.*bra(?:\.uni)?\s+\1;")

# What a launch specializes on: Python ints below 2^31 arrive as i32 (the bit patterns of eps
# and scale as i64), and torch's allocations, D and CHUNK (every D of the sweep) as multiples
# of 16, which lets the compiler vectorize and changes register use.
ALIGNED = ("D", "CHUNK")

def compile_(fn, sig, consts, num_warps=4, options=jm.EXACT):
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if ty.startswith("*") or name in ALIGNED}
    sig = {**sig, **{name: "constexpr" for name in consts}}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                       options={"num_warps": num_warps, **options})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    stack = regs = None
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"]); f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        stack = sum(int(w.split(":")[1]) for w in out.split() if w.startswith("STACK:"))
        regs = max(int(w.split(":")[1]) for w in out.split() if w.startswith("REG:"))
    ptx = k.asm["ptx"]
    results.append({"kernel": fn.__name__, "consts": consts, "num_warps": num_warps, "stack": stack, "regs": regs,
                    "fma": ptx.count("fma.rn"), "poll_loop": bool(POLL_LOOP.search(ptx))})

rows = {"R": "i32", "D": "i32"}
def configs(tuned, fixed):  # every (constexprs, num_warps) the kernel runs with
    return [(c.kwargs, c.num_warps) for c in tuned] + [fixed]

for dt, rnd in (("fp32", 0), ("bf16", 2), ("fp16", 1), ("fp64", 0)):
    for cfg, warps in configs(jm.PARTIALS_CONFIGS, jm.FIXED["partials"]):
        for kind, write_grad in ((0, False), (1, True)):  # plain stage 1; squared writing its gradient
            compile_(jm._partials_kernel, {"s_ptr": PTR(dt), "t_ptr": PTR(dt), "ws_ptr": "*fp64", "gs_ptr": PTR(dt),
                     **rows, "CHUNK": "i32", "S": "i32", "RS": "i32", "scale_bits": "i64"},
                     {"KIND": kind, "HAS_T": True, "WRITE_GRAD": write_grad, "REDUCTION": 1, "RND": rnd,
                      "BLOCK": 2048, "LOG2_BLOCK": 11, **cfg}, warps)
    compile_(jm._finish_kernel, {"ws_ptr": "*fp64", "loss_ptr": PTR(dt), "coef_ptr": "*fp64", "R": "i32", "S": "i32",
             "RS": "i32", "rows_per_prog": "i32", "eps_bits": "i64", "scale_bits": "i64"},
             {"KIND": 0, "REDUCTION": 1, "RND": rnd, "FIN_RB": 2048, "LOG2_FIN_RB": 11, "SB": 1, "LOG2_SB": 0},
             num_warps=16)
    for cfg, warps in configs(jm.BACKWARD_CONFIGS, jm.FIXED["backward"]):
        compile_(jm._backward_kernel, {"s_ptr": PTR(dt), "t_ptr": PTR(dt), "coef_ptr": "*fp64", "g_ptr": PTR(dt),
                 "g_stride": "i32", "gs_ptr": PTR(dt), "gt_ptr": PTR(dt), **rows, "scale_bits": "i64"},
                 {"REDUCTION": 0, "HAS_T": True, "NEED_S": True, "NEED_T": True, "RND": rnd, "G_ONE": False,
                  "BD": 1024, **cfg}, warps)
    for kind in (0, 1, 2):
        tuned = jf.fused_configs(jf.FUSED_CONFIGS, {}, RND=rnd)
        for cfg, warps in configs(tuned, jm.FIXED["fused"]) if kind == 0 else [jm.FIXED["fused"]]:
            compile_(jf._fused_kernel, {"s_ptr": PTR(dt), "t_ptr": PTR(dt), "ws_ptr": "*fp64", "gs_ptr": PTR(dt),
                     **rows, "eps_bits": "i64", "scale_bits": "i64"},
                     {"KIND": kind, "HAS_T": kind != 2, "REDUCTION": 1, "RND": rnd, "BLOCK": 2048, "LOG2_BLOCK": 11,
                      "NB": 2, **cfg}, warps)
    compile_(jf._barrier_kernel, {"s_ptr": PTR(dt), "t_ptr": PTR(dt), "ws_ptr": "*fp64", "gs_ptr": PTR(dt),
             "sync_ptr": "*i32", **rows, "S": "i32", "RS": "i32", "eps_bits": "i64", "scale_bits": "i64",
             "max_polls": "i32"},
             {"HAS_T": True, "REDUCTION": 1, "RND": rnd, "BLOCK": 2048, "LOG2_BLOCK": 11, "SB": 64, "LOG2_SB": 6},
             num_warps=8)
    compile_(jf._pending_backward_kernel, {"s_ptr": PTR(dt), "t_ptr": PTR(dt), "coef_ptr": "*fp64", "gs_ptr": PTR(dt),
             "done_ptr": "*i32", "D": "i32", "CHUNK": "i32", "S": "i32", "RS": "i32", "scale_bits": "i64"},
             {"HAS_T": True, "REDUCTION": 1, "RND": rnd, "PB": 1024, "BD": 1024})
    compile_(jf._scale_unless_one_kernel, {"x_ptr": PTR(dt), "g_ptr": PTR(dt), "g_stride": "i32", **rows},
             {"RND": rnd, "BD": 1024, "RB": 4})
    compile_(tk._topk_seeds_kernel, {"x_ptr": PTR(dt), "idx_ptr": "*i64", "seeds_ptr": PTR(dt), "B": "i32",
             "C": "i32", "K": "i32"}, {"BLOCK_C": 4096}, num_warps=8, options={})
print(json.dumps(results))
"""


def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env={**env, "PYTHONPATH": ROOT,
                          "JACFAST_TRITON_AUTOTUNE": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in results}
    assert kernels == {"_partials_kernel", "_finish_kernel", "_backward_kernel", "_fused_kernel", "_barrier_kernel",
                       "_pending_backward_kernel", "_scale_unless_one_kernel", "_topk_seeds_kernel"}
    for r in results:  # no config of any kernel may spill registers to local memory
        assert r["stack"] in (0, None), r
        if r["kernel"] != "_topk_seeds_kernel":
            assert r["fma"] == 0, r
    assert all(r["poll_loop"] for r in results if r["kernel"] == "_barrier_kernel")
