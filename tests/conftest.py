import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")
    parser.addoption("--rungpu", action="store_true", help="run tests marked gpu (CUDA and real weights)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow"))
        if "gpu" in item.keywords and not (config.getoption("--rungpu") and torch.cuda.is_available()):
            item.add_marker(pytest.mark.skip(reason="gpu: pass --rungpu on a CUDA machine"))


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("distill-cache")
    os.environ.update(DISTILL_CACHE=str(cache), HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
                      TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from teachers import tiny

    return tiny.build("tiny-sdxl", tmp_path_factory.mktemp("teachers") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from teachers import tiny

    return tiny.build("tiny-sd3", tmp_path_factory.mktemp("teachers") / "tiny-sd3")


@pytest.fixture(scope="session")
def cli():
    return run_cli


def run_cli(*args, cwd=None, check=True, timeout=600):
    """Run the installed `distill` entry point in a real subprocess."""
    proc = subprocess.run([sys.executable, "-m", "distill", *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and proc.returncode != 0:
        raise AssertionError(f"distill {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
