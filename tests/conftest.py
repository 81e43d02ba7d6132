"""Shared fixtures: a small embedded dataset and a briefly pre-trained tiny CLIP, built once per session."""
import subprocess
import sys
import tempfile
import time
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
        return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd,
                              capture_output=True, text=True, timeout=600, check=False)


def stop_after_first_epoch(script, out_dir, *argv):
    """Start a run and kill it (SIGKILL) once out_dir/last.pt exists: a run stopped after its first epoch,
    as a crash or a lost machine leaves it, for --resume to continue."""
    p = subprocess.Popen([sys.executable, str(ROOT / script), "--out-dir", str(out_dir), *map(str, argv)],
                         cwd=out_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (Path(out_dir) / "last.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.kill()
    p.wait()
    assert (Path(out_dir) / "last.pt").exists() and not (Path(out_dir) / "results.json").exists()
