"""The Triton kernels compile for real GPUs (A100: sm_80, H100: sm_90) and fit their SMs.

The interpreter tests (``test_kernels_triton.py``) check what the kernels compute; they cannot
check that a kernel compiles for a GPU, since the interpreter runs the Python source on numpy
(no ``tl.dot`` shape rules, no layouts, no register allocation). Here every configuration the
host wrappers launch is compiled by Triton's own just-in-time path for the named architecture
(:mod:`sparsecode.core.kernels.aot`; ``ptxas`` ships with triton, no GPU needed) and checked
against the hardware's limits. Each compile takes seconds, hence ``slow``.
"""

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from sparsecode.core.kernels import aot  # noqa: E402

pytestmark = pytest.mark.slow

CASES = [
    (90, torch.bfloat16, (16, 64, 128, 256)),  # the benchmark: H100, bf16, k = 64
    (90, torch.float16, (64,)),
    (90, torch.float32, (64,)),
    (80, torch.bfloat16, (64,)),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"sm{c[0]}-{str(c[1])[6:]}")
def report(request):
    arch, dtype, ks = request.param
    try:
        aot._tool("cuobjdump")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return arch, dtype, ks, aot.resource_report(arch, dtype, d=4096, ks=ks)


def test_every_kernel_compiles_and_fits_the_sm(report):
    arch, dtype, ks, launches = report
    names = [c.name for c in launches]
    assert names == (["_topk_candidates_kernel"] * len(ks) + ["_threshold_kernel"] * 2
                     + ["_bag_sum_kernel", "_pair_dot_kernel"])
    assert [c.meta["KP"] for c in launches[:len(ks)]] == list(ks)
    assert [c.meta["WRITE"] for c in launches[len(ks):len(ks) + 2]] == [False, True]
    for c in launches:
        assert c.shared_bytes <= aot.SHARED_LIMIT[arch], c
        assert 0 < c.registers <= aot.MAX_REGISTERS, c
    if arch == 90 and dtype != torch.float32:  # the configuration the benchmark runs
        assert [c.spill_bytes for c in launches] == [0] * len(launches)


def test_encoder_matmul_is_a_pipelined_tensor_core_loop(report):
    """On sm_90 the 16-bit encoder matmul must run on wgmma with operands staged by
    asynchronous copies (a software-pipelined loop); on sm_80 the copies still pipeline."""
    arch, dtype, ks, launches = report
    fused = [c for c in launches if c.name in ("_topk_candidates_kernel", "_threshold_kernel")]
    for c in fused:
        assert c.async_copies, c
        if arch >= 90 and dtype != torch.float32 and c.meta["BM"] >= 64:
            assert c.wgmma, c
    # float32 inputs take the exact (IEEE) product: no tensor cores, by design
    if dtype == torch.float32:
        assert not any(c.wgmma for c in fused)


def test_products_and_sums_keep_their_precision(report):
    """Read off the generated PTX. bf16 / fp16 inputs: every tensor-core product accumulates in
    f32, and no add / multiply / fma runs in 16 bits (the 16-bit values are only converted to
    f32 on load and back on the final store). float32 inputs: no TF32 and no 16-bit rounding
    anywhere (the exact product the torch reference computes)."""
    arch, dtype, ks, launches = report
    if dtype == torch.float32:
        for c in launches:
            assert "tf32" not in c.ptx and not re.findall(r"\bcvt\.\S*(?:bf16|f16)", c.ptx), c
        return
    half = "bf16" if dtype == torch.bfloat16 else "f16"
    for c in launches:
        assert not re.findall(r"\b(?:fma|add|mul|sub)(?:\.rn)?(?:\.ftz)?\.(?:bf16|f16)", c.ptx), c
        products = re.findall(r"\b(?:wgmma\.mma_async|mma)\.sync\.aligned\.\S+", c.ptx)
        assert all(f".f32.{half}.{half}" in p for p in products), (c, set(products))
        if c.name in ("_topk_candidates_kernel", "_threshold_kernel"):
            assert products, c
        if c.name in ("_bag_sum_kernel", "_pair_dot_kernel"):
            assert f"cvt.f32.{half}" in c.ptx and "fma.rn.f32" in c.ptx, c


def test_compile_only_leaves_triton_as_it_found_it():
    from triton.runtime.jit import JITFunction

    before_driver, before_run = aot._active_driver(), JITFunction.run
    with pytest.raises(KeyError), aot.compile_only(90):
        assert aot._active_driver() is not before_driver
        raise KeyError("raised inside the block")
    assert aot._active_driver() is before_driver and JITFunction.run is before_run
