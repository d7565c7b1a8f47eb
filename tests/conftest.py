import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(int(os.environ.get("OMP_NUM_THREADS", 2)), os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches and trained tokenizers go to a per-session temporary folder, never ~/.cache."""
    monkeypatch.setenv("MYOPIA_CACHE", str(tmp_path_factory.getbasetemp() / "myopia-cache"))


@pytest.fixture(params=["grouped", "flash"])
def cpu_backward(request, monkeypatch):
    """Both CPU backwards of the fused attention op: the grouped products over the recomputed
    probabilities (short windows) and PyTorch's private flash backward with the separate split (longer
    windows). A test module runs every test with each through ``pytestmark = pytest.mark.usefixtures``."""
    from myopia.attention import fused

    monkeypatch.setattr(fused, "CPU_GROUPED_BACKWARD_MAX_T", 1 << 30 if request.param == "grouped" else 0)
    return request.param


WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "and", "then", "it", "was", "very", "quite", "big", "small"]


def write_word_corpus(folder, n_docs: int, words_per_doc: int):
    """A folder of random-word text documents (a small local corpus for end-to-end runs)."""
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_docs):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=words_per_doc)) + ".")
    return folder


def start_slow_cli(tmp_path, args, task="myopia.tasks.synthetic:SyntheticTask", **popen):
    """Start ``myopia ARGS`` in a subprocess whose training data is 50 ms slower per batch (so a signal
    sent after a few logged steps lands mid-run); returns the Popen."""
    import subprocess
    import textwrap

    module, cls = task.split(":")
    script = tmp_path / "slow_cli.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from {module} import {cls} as task
        original = task.train_batch
        def slow(self, *a, **k):
            time.sleep(0.05)
            return original(self, *a, **k)
        task.train_batch = slow
        from myopia.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, **popen)
