"""The Triton sort kernel against the torch.sort path.

On CPU the kernel runs in Triton's interpreter, which checks its logic: packed (value, index) keys, the
bf16/fp16 and float32 key layouts, padding to a power of two, the scatter back to unsorted order, the
row sums, and the shape term's value and gradient through the kernel. The interpreter must be chosen
before triton is first imported, so those checks run in one child process (this file run as a script
with ``TRITON_INTERPRET=1``). The ``gpu`` test checks the compiled kernel on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visreg_hub.losses import (
    _triton_sort,
    gaussian_quantiles,
    shape_loss,
    sliced_wasserstein_loss,
    sort_shape,
)

REPO = Path(__file__).resolve().parents[2]


def _torch_reference(projections):
    quantiles = gaussian_quantiles(projections.shape[-1])
    values, order = projections.float().sort(dim=-1, stable=True)  # ties by index, as the packed keys
    residual = torch.empty(projections.shape).scatter_(-1, order, values - quantiles)
    return residual, (values - quantiles).square().sum(-1)


def _interpreter_checks() -> dict[str, float]:
    """Max errors of the interpreted kernel vs torch.sort, in units of the tolerance (pass: <= 1)."""
    kernel = _triton_sort.build_kernel()
    report = {}
    for dtype, ulp in ((torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10), (torch.float32, 1e-7)):
        for n in (2, 5, 16):  # the interpreter runs ~10-100 ms per row: keep rows few and short
            generator = torch.Generator().manual_seed(n)
            projections = (2 * torch.randn(3, n, generator=generator)).to(dtype)
            projections[0, : min(n, 3)] = 0.0  # ties
            projections[1, -1] = -projections[1, 0].abs() - 1.0  # negatives of larger magnitude
            residual = torch.full(projections.shape, float("nan"), dtype=dtype)
            squares = _triton_sort.launch(projections, gaussian_quantiles(n), residual, kernel=kernel)
            expected_residual, expected_squares = _torch_reference(projections)
            key = f"{str(dtype).split('.')[-1]}/n{n}"
            # one rounding of the residual to `dtype` (the interpreter may truncate where CUDA rounds)
            allowed = ulp * expected_residual.abs().clamp_min(1.0)
            report[f"kernel/{key}/residual"] = float(
                ((residual.float() - expected_residual).abs() / allowed).max()
            )
            allowed = 1e-6 * (1.0 + expected_squares)
            report[f"kernel/{key}/squares"] = float(((squares - expected_squares).abs() / allowed).max())

    # the shape term through the kernel: route the CPU tensors to the interpreted kernel
    _triton_sort.usable = lambda projections: True
    _triton_sort.try_launch = lambda *args: _triton_sort.launch(*args, kernel=kernel)
    # "triton" on CPU tensors is refused by design; here the CPU tensors go to the interpreted kernel.
    sort_shape._resolve_backend = lambda sort_backend, device: sort_backend == "triton"
    for dtype, tolerance in ((torch.bfloat16, 2e-2), (torch.float32, 1e-6)):
        z = (torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.3).to(dtype)
        w = torch.nn.functional.normalize(
            torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), dim=0
        )
        for loss_of in (shape_loss, sliced_wasserstein_loss):
            z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
            fast, slow = loss_of(z1, w, sort_backend="triton"), loss_of(z2, w, sort_backend="torch")
            fast.backward()
            slow.backward()
            key = f"{loss_of.__name__}/{str(dtype).split('.')[-1]}"
            report[f"{key}/value"] = abs(fast.item() - slow.item()) / (1e-5 * abs(slow.item()))
            gap = (z1.grad.float() - z2.grad.float()).abs().max().item()
            report[f"{key}/grad"] = gap / (tolerance * z2.grad.float().abs().max().item())
    return report


@pytest.mark.skipif(_triton_sort.triton is None, reason="triton is not installed")
def test_interpreted_triton_kernel_matches_torch_sort():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(report) == 9 * 2 + 2 * 2 * 2
    failures = {key: value for key, value in report.items() if not value <= 1.0}
    assert not failures, failures


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernel_matches_torch_path_on_cuda(dtype):
    z = (torch.randn(4, 1000, 128, device="cuda") * 1.3 + 0.2).to(dtype)
    w = torch.nn.functional.normalize(torch.randn(128, 300, device="cuda"), dim=0)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    fast = shape_loss(z1, w, sort_backend="triton")
    slow = shape_loss(z2, w, sort_backend="torch")
    fast.backward()
    slow.backward()
    assert not _triton_sort._state["disabled"]
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    torch.testing.assert_close(z1.grad.float(), z2.grad.float(), rtol=2e-2, atol=1e-6)


if __name__ == "__main__":  # the interpreter child process of the test above
    torch.set_num_threads(1)
    print(json.dumps(_interpreter_checks()))
