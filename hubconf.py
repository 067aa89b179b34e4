"""torch.hub entry points: one per visreg_hub registry model, named with underscores.

    model = torch.hub.load("visreg-hub/visreg_hub", "vit_mini_p7_fmnist")          # from GitHub
    model = torch.hub.load("/path/to/visreg_hub", "vit_mini_p7_fmnist", source="local")

Each entry is ``visreg_hub.from_pretrained(<registry name>, **kwargs)`` (``pretrained=False`` builds the
same architecture with random weights, taking the same arguments, on the torch backend unless
``backend=`` says otherwise). The list is derived from :mod:`visreg_hub.hub.registry`, so a
new registry entry is a new torch.hub entry. Weights that are not bundled are downloaded through the
Hugging Face cache; offline, that is a ``ModelNotFoundError`` saying so, never a raw traceback from deep
inside huggingface_hub.
"""

from __future__ import annotations

dependencies = ["torch", "timm", "huggingface_hub", "safetensors", "numpy", "PIL", "yaml"]


def _entry_point(registry_name: str, description: str):
    def load(pretrained: bool = True, **kwargs):
        from visreg_hub.hub.loading import build_architecture, from_pretrained

        if pretrained:
            return from_pretrained(registry_name, **kwargs)
        return build_architecture(registry_name, **kwargs)

    load.__name__ = load.__qualname__ = registry_name.replace("-", "_")
    load.__doc__ = (
        f"{description}.\n\n"
        f"Same as ``visreg_hub.from_pretrained({registry_name!r}, **kwargs)`` (revision, cache_dir, "
        "local_files_only, token, device, dtype); ``pretrained=False`` gives random weights."
    )
    return load


def _register() -> list[str]:
    from visreg_hub.hub.registry import list_models

    names = []
    for entry in list_models():
        function = _entry_point(entry.name, entry.description or entry.name)
        globals()[function.__name__] = function
        names.append(function.__name__)
    return names


__all__ = _register()
