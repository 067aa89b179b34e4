"""ONNX export of VISReg encoders and embedding with ONNX Runtime (needs the ``onnx`` extra).

    import visreg_hub
    from visreg_hub.inference.onnx import OnnxEmbedder

    report = visreg_hub.export_onnx(model, "model.onnx")          # validated against PyTorch
    embedder = OnnxEmbedder("model.onnx")                         # TensorRT > CUDA > CPU
    emb = embedder.encode(["cat.jpg", "dog.png"])                 # same contract as model.encode
    embedder.active_provider                                      # what runs: "CPUExecutionProvider", ...

    model = visreg_hub.from_pretrained(name, backend="onnx")      # encode() runs the exported graph

Modules, one job each: :mod:`.export` (``export_onnx``: graph, metadata, validation; the graph's inputs,
outputs and baked preprocessing are described there), :mod:`.graph` (torch -> ONNX and graph surgery:
fusions, fp16, baked preprocessing), :mod:`.runtime` (metadata, ONNX Runtime sessions and providers),
:mod:`.validate` (ONNX Runtime vs PyTorch), :mod:`.embedder` (an ``.onnx`` file -> embeddings) and
:mod:`.backend` (the pipeline backend behind ``from_pretrained(..., backend="onnx")``).
"""

from visreg_hub.inference.onnx.backend import OnnxBackend, encode_onnx
from visreg_hub.inference.onnx.embedder import OnnxEmbedder
from visreg_hub.inference.onnx.export import export_onnx
from visreg_hub.inference.onnx.runtime import OnnxMetadata, read_onnx_metadata
from visreg_hub.inference.onnx.validate import OnnxValidationError, ValidationReport, validate_onnx

__all__ = [
    "OnnxBackend",
    "OnnxEmbedder",
    "OnnxMetadata",
    "OnnxValidationError",
    "ValidationReport",
    "encode_onnx",
    "export_onnx",
    "read_onnx_metadata",
    "validate_onnx",
]
