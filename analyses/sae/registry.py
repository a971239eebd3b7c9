"""The one list of SAE architectures. Each architecture module decorates its class with
:func:`register_arch`; every other list (``ARCHS``, the trainer's checks, the SAELens loader, the
``train-sae`` CLI choices, the sweep schema, the UI form) is read from here, so adding an architecture is
one file plus one registration (the SAELens ``sae_lens/registry.py`` pattern).

What a class declares (class attributes, see :class:`analyses.sae.base.SAE`):

* ``arch`` — the name users pass (``train_sae(arch=...)``, ``--arch``);
* ``saelens_arch`` — the SAELens ``architecture`` it is saved as;
* ``uses_k`` — it needs ``k`` (active latents per token);
* ``options`` — the :class:`SAEConfig` fields that matter for it (recorded in cfg.json metadata);
* ``sparse_codes`` — ``encode_sparse`` gives a fixed-k code (TopK).

``ARCHS`` is a live dict; ``arch_names()`` / ``ARCHS.keys()`` are what callers that need "the choices"
hold, so an architecture registered later (a plug-in, a test) shows up everywhere.
"""

from __future__ import annotations

from typing import Any

ARCHS: dict[str, Any] = {}


def register_arch(cls: Any) -> Any:
    """Class decorator: make ``cls`` available as ``cls.arch``. Re-registering the same name with another
    class is an error (two modules claiming one name is a bug); re-registering the same class is a no-op."""
    name = getattr(cls, "arch", None)
    if not isinstance(name, str) or not name or name == "base":
        raise ValueError(f"{cls.__name__} must set a class attribute arch = '<name>' before registering")
    old = ARCHS.get(name)
    if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"SAE architecture {name!r} is already registered by {old.__module__}."
                         f"{old.__qualname__}; choose another name")
    ARCHS[name] = cls
    return cls


def unregister_arch(name: str) -> None:
    """Remove an architecture (for tests that register a temporary one)."""
    ARCHS.pop(name, None)


def arch_names() -> list[str]:
    return list(ARCHS)


def get_arch(name: str) -> Any:
    """The class registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return ARCHS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown SAE architecture {name!r}; known: {', '.join(ARCHS)}") from None


def uses_k(name: str) -> bool:
    """Whether architecture ``name`` takes ``k`` (the TopK family)."""
    return bool(get_arch(name).uses_k)
