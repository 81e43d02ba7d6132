"""Shared fixtures: a small embedded dataset and a briefly pre-trained tiny CLIP, built once per session."""
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from embedded import ensure_embedded, pretrain_tiny

SMALL = {"pretrain": 600, "train": 240, "dev": 100, "test": 100}


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """Folder with a small embedded dataset and nc-tiny-pretrained.pt (150 steps) in it."""
    root = tmp_path_factory.mktemp("embedded")
    ensure_embedded(root, SMALL)
    pretrain_tiny(root, torch.device("cpu"), steps=150, batch_size=64, warmup=15)
    return root


def run_script(script, *argv):
    """Run a project script in a subprocess from an empty folder (so the default data/embedded is never the
    repository's); returns the CompletedProcess, output captured as text."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd, capture_output=True,
                              text=True, timeout=600, check=False)
