"""Inference: robust image decoding, checkpoint-derived preprocessing, ``encode()`` and dense features.

    from visreg_hub.inference import encode, extract_patch_features, patch_pca_rgb

    emb = encode(model, ["a.jpg", "photos/"])                       # (N, E) float32, L2-normalised
    result = encode(model, paths, on_error="skip")                  # EncodeResult(embeddings, failures)
    grid = extract_patch_features(model, "a.jpg")[0]                # (h, w, D)
    picture = patch_pca_rgb(grid)                                   # (h, w, 3) uint8

Everything embeds through one loop, :class:`~visreg_hub.inference.pipeline.EmbeddingPipeline`, on a
backend chosen when the model is loaded (:mod:`visreg_hub.inference.backends`: torch, or ONNX Runtime
with ``from_pretrained(name, backend="onnx")``). ONNX export and the ONNX Runtime backend live in
:mod:`visreg_hub.inference.onnx` (imported on demand, it needs the ``onnx`` extra).
"""

from visreg_hub.inference.backends import Backend, TorchBackend, backend_for, set_backend
from visreg_hub.inference.embedder import encode, extract_patch_features, patch_pca_rgb
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageSource, decode_image
from visreg_hub.inference.inputs import expand_inputs, list_image_files
from visreg_hub.inference.pipeline import BatchEmbeddings, EmbeddingPipeline, EncodeFailure, EncodeResult
from visreg_hub.inference.preprocess import Preprocessor

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "Backend",
    "BatchEmbeddings",
    "EmbeddingPipeline",
    "EncodeFailure",
    "EncodeResult",
    "ImageSource",
    "Preprocessor",
    "TorchBackend",
    "backend_for",
    "decode_image",
    "encode",
    "expand_inputs",
    "extract_patch_features",
    "list_image_files",
    "patch_pca_rgb",
    "set_backend",
]
