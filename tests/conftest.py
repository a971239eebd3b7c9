"""Shared pytest setup. Tests never reach a model hub: HF offline mode is forced here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def tmp_workspace(tmp_path):
    from workbench.workspace import Workspace
    return Workspace(tmp_path / "ws")
