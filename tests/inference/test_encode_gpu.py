"""encode() on a CUDA device: pinned uint8 batches, normalisation on the GPU, autocast, model restored.

Marked ``gpu`` (excluded from the default run); skipped when no CUDA device is present.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_models import tiny_encoder
from visreg_hub.inference import encode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cuda_matches_cpu_and_restores_the_model(photo_paths, num_workers):
    model = tiny_encoder()
    expected = encode(model, photo_paths)
    on_gpu = encode(model, photo_paths, device="cuda", num_workers=num_workers, batch_size=3)
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32
    # TF32 or different kernels may differ slightly from the CPU
    torch.testing.assert_close(on_gpu, expected, atol=2e-3, rtol=0)
    assert next(model.parameters()).device.type == "cpu"  # moved for the call, moved back
    for dtype in ("bf16", "fp16"):
        low = encode(model, photo_paths, device="cuda", dtype=dtype, num_workers=num_workers)
        assert (low * expected).sum(dim=1).min() > 0.99
    model.cuda()
    cuda_tensor = torch.rand(2, 3, 40, 30, device="cuda")  # CUDA inputs are decoded on the CPU
    result = encode(model, [cuda_tensor], num_workers=num_workers)
    assert result.shape == (2, 32)
    assert next(model.parameters()).device.type == "cuda"
