"""ONNX metadata of exported encoders and ONNX Runtime sessions whose provider is checked after creation.

* :class:`OnnxMetadata`: what :func:`~visreg_hub.inference.onnx.export_onnx` stores in the model's
  ``metadata_props`` (model name and config, data config, pooling, inputs, outputs, precision, baked
  preprocessing), so that an ``.onnx`` file alone is enough to embed images.
* :func:`create_session`: providers in the order TensorRT > CUDA > CPU (those present in this
  onnxruntime build), and the provider actually used read back with ``session.get_providers()``: ONNX
  Runtime falls back to the CPU with at most a log line when, for example, the CUDA libraries fail to
  load. Here that fallback is a ``logging`` warning and is visible as ``SessionInfo.fell_back``.
  Without a thread count it respects the CPUs this process may run on (:func:`default_intra_op_threads`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from visreg_hub.errors import CheckpointError, ModelNotFoundError, UserInputError, require_extra
from visreg_hub.native_io import onnx_model_source

logger = logging.getLogger(__name__)


def onnx_extra() -> str:
    """The pip extra to suggest for ONNX: ``onnx`` (onnxruntime-gpu) with CUDA, else ``onnx-cpu``."""
    import torch

    return "onnx" if torch.cuda.is_available() else "onnx-cpu"


FORMAT_VERSION = 1
PREFIX = "visreg_hub."
TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PROVIDER_PRIORITY = (TENSORRT, CUDA, CPU)
PROVIDER_ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "gpu": CUDA, "cpu": CPU}
GPU_PROVIDERS = (TENSORRT, CUDA)


@dataclass(frozen=True)
class OnnxMetadata:
    """Everything an ``.onnx`` file written by ``export_onnx`` says about itself.

    Attributes:
        model_name: ``config.name`` of the exported encoder ("" when it had none).
        model_config: ``ModelConfig.to_dict()`` of the encoder.
        data_config: timm-style preprocessing (input_size, mean, std, crop_pct, interpolation, crop_mode).
        pooling: feature tap of the ``embedding`` output.
        embedding_dim: E, the width of ``embedding``.
        outputs: graph outputs, ``("embedding",)`` or ``("embedding", "patch_tokens")``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (inputs and outputs are float32 whatever it is).
        input_name: ``"pixel_values"`` (normalised float32 (B, C, H, W)) or ``"images"`` (uint8).
        input_layout: ``"NCHW"`` or ``"NHWC"``.
        image_size: (H, W) of the input: the model size, or the fixed uint8 size with preprocessing.
        dynamic_batch: the batch dimension is symbolic.
        dynamic_image_size: H and W are symbolic (multiples of the patch size).
        preprocessing: description of the baked preprocessing, "" when there is none.
        fusions: ONNX Runtime fusions applied at export (name -> count); empty when not optimised.
        opset: ONNX opset of the default domain.
        library_version: visreg_hub version that wrote the file.
        quantization: how an int8 graph was quantised (``"dynamic"``, ``"static, N calibration images"``).
        format_version: version of this metadata layout.
    """

    model_name: str
    model_config: dict[str, Any]
    data_config: dict[str, Any]
    pooling: str
    embedding_dim: int
    outputs: tuple[str, ...]
    precision: str
    input_name: str
    input_layout: str
    image_size: tuple[int, int]
    dynamic_batch: bool
    dynamic_image_size: bool
    preprocessing: str = ""
    fusions: dict[str, int] = field(default_factory=dict)
    opset: int = 18
    library_version: str = ""
    quantization: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def has_preprocessing(self) -> bool:
        """The graph takes uint8 images and resizes/normalises them itself."""
        return bool(self.preprocessing)

    def write_to(self, proto) -> None:
        """Replace ``proto``'s ``visreg_hub.*`` metadata with this record (other keys are kept)."""
        kept = [prop for prop in proto.metadata_props if not prop.key.startswith(PREFIX)]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        for key, value in self.to_props().items():
            proto.metadata_props.add(key=key, value=value)

    def to_props(self) -> dict[str, str]:
        """``metadata_props`` entries (string -> string; structured values as JSON)."""
        props = {}
        for key, value in asdict(self).items():
            props[PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "the model") -> OnnxMetadata:
        """Parse ``metadata_props``.

        Raises:
            CheckpointError: the entries are missing (not exported by visreg_hub) or malformed.
        """
        ours = {key[len(PREFIX) :]: value for key, value in props.items() if key.startswith(PREFIX)}
        if "format_version" not in ours:
            raise CheckpointError(
                f"{source} has no visreg_hub metadata (metadata_props {sorted(props)}); export it with "
                "visreg_hub.export_onnx or `visreg-hub export onnx`"
            )
        try:
            fields = {
                key: (value if key in _STRING_FIELDS else json.loads(value)) for key, value in ours.items()
            }
            if int(fields["format_version"]) > FORMAT_VERSION:
                raise CheckpointError(
                    f"{source} uses metadata format {fields['format_version']}, newer than this visreg_hub "
                    f"({FORMAT_VERSION}); upgrade visreg_hub"
                )
            fields["outputs"] = tuple(fields["outputs"])
            fields["image_size"] = tuple(fields["image_size"])
            data_config = fields["data_config"]
            for key in ("input_size", "mean", "std"):  # JSON lists back to the tuples of ModelConfig
                data_config[key] = tuple(data_config[key])
            known = set(cls.__dataclass_fields__)
            metadata = cls(**{key: value for key, value in fields.items() if key in known})
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{source} has malformed visreg_hub metadata: {exc!r}") from exc
        _check_sizes(metadata, source)
        return metadata


def _check_sizes(metadata: OnnxMetadata, source: str) -> None:
    """The sizes buffers are allocated from (the resize target, the preprocessing's input size, the output
    width) within a ViT's bounds, and the fields that choose a code path among their values.

    why: they come from the file; ``image_size`` 100000 x 100000 made every input a 30 GB resize, a
    ``data_config.input_size`` of 4096 x 4096 sized the preprocessing of a graph without baked
    preprocessing (GBs per batch), and an ``embedding_dim`` of 1e12 sizes the output buffer of a GPU run.
    """
    from visreg_hub.models.config import POOLINGS
    from visreg_hub.models.limits import FIELD_BOUNDS

    def sides(values, count: int) -> bool:
        return len(values) == count and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= side for v in values
        )

    side, width = FIELD_BOUNDS["img_size"], FIELD_BOUNDS["embed_dim"] * 4  # cls_last4 is 4 blocks wide
    sizes, input_size = metadata.image_size, tuple(metadata.data_config.get("input_size", ()))
    sane = (
        sides(sizes, 2)
        and sides(input_size, 3)
        and input_size[0] in (1, 3)
        and isinstance(metadata.embedding_dim, int)
        and 1 <= metadata.embedding_dim <= width
    )
    if not sane:
        raise CheckpointError(
            f"{source} has visreg_hub metadata out of range (image_size {sizes!r}, data_config.input_size "
            f"{input_size!r}: at most {side} per side, 1 or 3 channels; embedding_dim "
            f"{metadata.embedding_dim!r}, at most {width}); re-export the model"
        )
    if not metadata.has_preprocessing and tuple(input_size[1:]) != tuple(sizes):
        # the preprocessing of a plain graph is sized from data_config: it must make what the graph takes
        raise CheckpointError(
            f"{source} has visreg_hub metadata data_config.input_size {input_size!r} for a graph that takes "
            f"{tuple(sizes)!r} images (image_size); re-export the model"
        )
    choices = {"pooling": POOLINGS, "precision": ("fp32", "fp16", "int8"), "input_layout": ("NCHW", "NHWC")}
    for name, allowed in choices.items():
        if getattr(metadata, name) not in allowed:
            raise CheckpointError(
                f"{source} has visreg_hub metadata {name}={getattr(metadata, name)!r}, not one of "
                f"{tuple(allowed)}; re-export the model"
            )


_STRING_FIELDS = frozenset(
    {
        "model_name",
        "pooling",
        "precision",
        "input_name",
        "input_layout",
        "preprocessing",
        "library_version",
        "quantization",
    }
)


def check_model_file(path: str | Path) -> Path:
    """``path`` as a Path if it is an existing file, else a FileNotFoundError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = " (it is a folder; pass the .onnx file inside it)" if path.is_dir() else ""
        raise ModelNotFoundError(f"ONNX model not found: {str(path)!r}{hint}")
    return path


def read_onnx_metadata(path: str | Path) -> OnnxMetadata:
    """The :class:`OnnxMetadata` of an exported ``.onnx`` file (weights are not loaded).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not an ONNX model or has no visreg_hub metadata.
    """
    from visreg_hub.inference.onnx.proto_scan import WireFormatError, read_model_metadata

    path = check_model_file(path)
    try:  # not onnx.load: ``import onnx`` alone is 1.5 s of a start, and the weights need no parsing here
        props, has_nodes = read_model_metadata(path)
    except WireFormatError as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable ONNX model: {exc}") from None
    if not has_nodes:
        raise CheckpointError(f"{str(path)!r} is not an ONNX model (no graph nodes)")
    return OnnxMetadata.from_props(props, source=repr(str(path)))


def check_graph_signature(session: Any, meta: OnnxMetadata, source: str) -> None:
    """Refuse a file whose visreg_hub metadata does not describe its own graph (edited, or another graph's
    metadata copied in): the metadata drives preprocessing and reports ``embedding_dim``, so a mismatch
    would otherwise fail later inside ONNX Runtime, or report the wrong size.

    Args:
        session: the file's ``onnxruntime.InferenceSession``.
        meta: its metadata (:func:`read_onnx_metadata`).
        source: the file, for the message.

    Raises:
        CheckpointError: naming each disagreement and the fix.
    """
    from visreg_hub.inference.onnx.graph import EMBEDDING

    problems = []
    inputs = session.get_inputs()
    outputs = {value.name: value for value in session.get_outputs()}
    if [value.name for value in inputs] != [meta.input_name]:
        problems.append(
            f"the graph's inputs are {[v.name for v in inputs]}, the metadata names {meta.input_name!r}"
        )
    else:
        value = inputs[0]
        kind = "tensor(uint8)" if meta.has_preprocessing else "tensor(float)"
        channels = 3 if meta.has_preprocessing else int(meta.data_config["input_size"][0])
        axis = 3 if meta.input_layout == "NHWC" else 1
        if value.type != kind:
            problems.append(f"input {value.name!r} is {value.type}, the metadata implies {kind}")
        if len(value.shape) != 4:
            problems.append(f"input {value.name!r} has shape {value.shape}, not 4-D ({meta.input_layout})")
        elif isinstance(value.shape[axis], int) and value.shape[axis] != channels:
            problems.append(
                f"input {value.name!r} takes {value.shape[axis]} channel(s), the metadata says {channels}"
            )
    missing = [name for name in meta.outputs if name not in outputs]
    if missing:
        problems.append(f"outputs {missing} named by the metadata are not in the graph ({sorted(outputs)})")
    elif EMBEDDING in outputs:
        width = outputs[EMBEDDING].shape[-1] if outputs[EMBEDDING].shape else None
        if isinstance(width, int) and width != meta.embedding_dim:
            problems.append(
                f"the graph's embedding has {width} values, the metadata says {meta.embedding_dim}"
            )
    if problems:
        raise CheckpointError(
            f"{source}: its visreg_hub metadata does not describe its graph ({'; '.join(problems)}); "
            "re-export it with `visreg-hub export onnx` or visreg_hub.export_onnx"
        )


# ------------------------------------------------------------------------------------------ providers
def resolve_providers(providers: str | list[str] | tuple[str, ...] | None, available: list[str]) -> list[str]:
    """Provider names to request, best first; CPU is always last as the fallback.

    Args:
        providers: None for the best available (TensorRT > CUDA > CPU); otherwise a name or list of names,
            full (``"CUDAExecutionProvider"``) or short (``"tensorrt"``, ``"cuda"``, ``"cpu"``).
        available: ``onnxruntime.get_available_providers()``.

    Raises:
        ValueError: a name that is neither a known alias nor an ``...ExecutionProvider``.
    """
    if providers is None:
        return [name for name in PROVIDER_PRIORITY if name in available or name == CPU]
    resolved = provider_names(providers, available)
    if CPU not in resolved:
        resolved.append(CPU)
    return resolved


def provider_names(
    providers: str | list[str] | tuple[str, ...], available: list[str] | None = None
) -> list[str]:
    """Full provider names of ``providers`` (a name or names, short or full), in order, without repeats.

    Needs no onnxruntime, so ``from_pretrained`` checks the names before it loads or exports anything.

    Raises:
        ValueError: an empty list, or a name that is neither a known alias nor an ``...ExecutionProvider``.
    """
    names = [providers] if isinstance(providers, str) else list(providers)
    if not names:
        raise UserInputError("providers is empty; pass None for the best available, or e.g. ['cuda', 'cpu']")
    resolved = []
    for name in names:
        full = PROVIDER_ALIASES.get(str(name).lower(), name)
        if not str(full).endswith("ExecutionProvider"):
            here = "" if available is None else f" (available here: {available})"
            raise UserInputError(
                f"unknown ONNX Runtime provider {name!r}; use one of {sorted(PROVIDER_ALIASES)} or a full "
                f"name such as {CUDA!r}{here}"
            )
        if full not in resolved:
            resolved.append(full)
    return resolved


class SessionInfo(NamedTuple):
    """An ONNX Runtime session and what it actually runs on.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        requested: providers asked for, best first (after alias resolution).
        active: ``session.get_providers()[0]``, the provider that runs the graph.
        fell_back: ``active`` is not the first requested provider (e.g. CUDA asked, CPU running).
    """

    session: Any
    requested: list[str]
    active: str
    fell_back: bool


def default_intra_op_threads() -> int | None:
    """Intra-op threads for a session created without a count: the number of CPUs this process may run
    on when that is fewer than the machine has (``taskset``, ``docker --cpuset-cpus``, ``numactl``), else
    None (ONNX Runtime's default).

    Why: by default ONNX Runtime starts one thread per physical core of the *machine* and pins each to its
    core, ignoring the process's CPU mask; under ``taskset -c 0`` its second thread then runs on core 1,
    beside whatever the mask kept away from it (and under some cpusets ``pthread_setaffinity_np`` fails).
    A thread count given explicitly makes it start that many threads without pinning them.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows): ONNX Runtime's default
        return None
    return allowed if allowed < (os.cpu_count() or allowed) else None


def create_session(
    path: str | Path,
    *,
    providers: str | list[str] | None = None,
    device_id: int = 0,
    intra_op_num_threads: int | None = None,
    fp16: bool = False,
    allow_fallback: bool = True,
) -> SessionInfo:
    """Create an ONNX Runtime session and check which provider it really uses.

    Args:
        path: the ``.onnx`` file.
        providers: see :func:`resolve_providers`.
        device_id: GPU index for the CUDA and TensorRT providers.
        intra_op_num_threads: CPU threads of the session (None: :func:`default_intra_op_threads`).
        fp16: let TensorRT build fp16 engines (for fp16 exports).
        allow_fallback: when False, running on another provider than the first requested one raises
            instead of logging a warning.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ONNX Runtime cannot load the file (not ONNX, or an op it has no kernel for).
        RuntimeError: ``allow_fallback=False`` and the session fell back to another provider.
    """
    ort = require_extra("onnxruntime", onnx_extra())
    path = check_model_file(path)
    available = ort.get_available_providers()
    requested = resolve_providers(providers, available)
    missing = [name for name in requested if name not in available]
    if missing:
        logger.warning(
            "ONNX Runtime provider(s) %s requested but not in this onnxruntime build (available: %s); "
            "for GPUs install onnxruntime-gpu (pip install 'visreg_hub[onnx]') with matching CUDA/cuDNN",
            missing, available,
        )  # fmt: skip
    usable = [name for name in requested if name in available] or [CPU]
    options = []
    for name in usable:
        if name == CUDA:
            options.append({"device_id": str(device_id)})
        elif name == TENSORRT:
            options.append({"device_id": str(device_id), "trt_fp16_enable": str(fp16)})
        else:
            options.append({})
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = default_intra_op_threads() if intra_op_num_threads is None else intra_op_num_threads
    if threads is not None:
        session_options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(
            onnx_model_source(path), session_options, providers=usable, provider_options=options
        )
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"ONNX Runtime cannot load {str(path)!r} on {usable}: {text}") from exc
    active = session.get_providers()[0]
    fell_back = active != requested[0]
    if fell_back:
        message = (
            f"ONNX Runtime is running {path.name} on {active}, not on the requested {requested[0]} "
            f"(session providers: {session.get_providers()}); inference will be slower. Check that "
            "onnxruntime-gpu and its CUDA/cuDNN libraries match this machine"
        )
        if not allow_fallback:
            raise RuntimeError(message)
        logger.warning(message)
    return SessionInfo(session, requested, active, fell_back)
