"""workbench: hook a model's activations into a store, analyse them (PCA, SAEs, CKA/SVCCA/...),
and explore the results in the browser.

    import workbench
    model = workbench.load_model("smollm2-135m")
    store = workbench.collect(model, hooks=["blocks.6.hook_resid_post"], corpus="builtin",
                              out="ws/stores/smol", max_tokens=50_000)
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("workbench.models", "load_model"),
    "collect": ("workbench.collector", "collect"),
    "ActivationStore": ("workbench.store", "ActivationStore"),
    "Workspace": ("workbench.workspace", "Workspace"),
    "run_step": ("workbench.steps", "run_step"),
    "WorkbenchError": ("workbench.errors", "WorkbenchError"),
    "StoreCorrupted": ("workbench.errors", "StoreCorrupted"),
    "steer": ("workbench.interventions", "steer"),
    "attribute": ("workbench.interventions", "attribute"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):   # lazy: `workbench --help` must not import torch and transformers
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
