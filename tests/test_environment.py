"""What users install is what CI tests: the installed library versions are the pinned ones.

`make demo` and `make test` both install through scripts/setup.sh with constraints.txt, so any drift
between the two (e.g. a test extra downgrading transformer-lens) shows up here as a failure.
"""

from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt line {line!r} is not NAME==VERSION"
            pins[name.strip().lower()] = version.strip()
    return pins


def test_constraints_cover_the_libraries_that_make_the_numbers():
    assert {"torch", "transformer-lens", "transformers", "numpy", "sae-lens"} <= set(_pins())


@pytest.mark.parametrize("name", ["torch", "transformer-lens", "transformers", "tokenizers", "numpy", "ruff",
                                  "safetensors", "gguf", "threadpoolctl", "plotly", "pandas", "streamlit",
                                  "scikit-learn", "sae-lens"])
def test_installed_version_is_the_pinned_one(name):
    pins = _pins()
    assert name in pins, f"{name} is not pinned in constraints.txt"
    installed = metadata.version(name).split("+")[0]      # 2.13.0+cpu / +cu128 are the same release
    assert installed == pins[name], (f"{name} {installed} is installed but constraints.txt pins {pins[name]}: "
                                     "rerun scripts/setup.sh (make test) so demo and tests use one version")


def test_transformer_lens_pin_agrees_with_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"transformer-lens>=3.9,<4"' in text
    major = int(_pins()["transformer-lens"].split(".")[0])
    assert major == 3
