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

from __future__ import annotations

from visreg_hub._lazy import lazy_exports

_EXPORTS = {
    "Backend": "visreg_hub.inference.backends",
    "TorchBackend": "visreg_hub.inference.backends",
    "backend_for": "visreg_hub.inference.backends",
    "set_backend": "visreg_hub.inference.backends",
    "encode": "visreg_hub.inference.embedder",
    "extract_patch_features": "visreg_hub.inference.embedder",
    "patch_pca_rgb": "visreg_hub.inference.embedder",
    "DEFAULT_MAX_PIXELS": "visreg_hub.inference.images",
    "IMAGE_EXTENSIONS": "visreg_hub.inference.images",
    "ImageSource": "visreg_hub.inference.images",
    "decode_image": "visreg_hub.inference.images",
    "expand_inputs": "visreg_hub.inference.inputs",
    "list_image_files": "visreg_hub.inference.inputs",
    "BatchEmbeddings": "visreg_hub.inference.pipeline",
    "EmbeddingPipeline": "visreg_hub.inference.pipeline",
    "EncodeFailure": "visreg_hub.inference.pipeline",
    "EncodeResult": "visreg_hub.inference.pipeline",
    "Preprocessor": "visreg_hub.inference.preprocess",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
