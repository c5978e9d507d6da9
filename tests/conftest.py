import os
import sys
from pathlib import Path

# Offline and quiet, before any library reads its settings.
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    TOKENIZERS_PARALLELISM="false",
)

import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from support import save_tiny_lm, save_tiny_reward_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with a word-level tokenizer, saved with save_pretrained."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> Path:
    """A GPT-2 sequence classifier with one output, sharing the tiny tokenizer."""
    return save_tiny_reward_model(tmp_path_factory.mktemp("tiny-reward"))


@dataclass
class DemoKit:
    data_dir: Path
    instruct: Path
    reward: Path
    report: object  # components.demo.bootstrap.BootstrapReport
    wall_s: float


@pytest.fixture(scope="session")
def demo_data_dir() -> Path:
    """data/demo as data.dvc pins it: a fresh clone has no data/demo (DVC-tracked) and regenerates it, as `make demo` does."""
    from components.config import PROJECT_ROOT
    from flows.cli.data import ensure_demo_data

    data_dir = PROJECT_ROOT / "data" / "demo"
    ensure_demo_data(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def demo_kit(demo_data_dir) -> DemoKit:
    """The demo data (checked against data.dvc) and models, built like `make demo` builds them.

    A fresh clone trains the models once here; a checkout that already has them for this data
    and these settings reuses them (the bootstrap's own skip rule).
    """
    from components.config import PROJECT_ROOT, DataConfig
    from components.data.versioning import dataset_version
    from components.demo.bootstrap import BootstrapSettings, bootstrap

    data_dir = demo_data_dir
    dataset_version(DataConfig(source="data/demo/prompts.jsonl"), PROJECT_ROOT)  # as data.dvc pins it
    start = time.perf_counter()
    report = bootstrap(data_dir, PROJECT_ROOT / "artifacts" / "demo", BootstrapSettings(progress=False))
    return DemoKit(data_dir, report.instruct_dir, report.reward_dir, report, time.perf_counter() - start)


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(size_bytes, read_only=False)`: a directory on a tmpfs of that size (ENOSPC once full), or mounted
    read-only (EROFS): real file-system faults, which need the right to mount (CI runs as root)."""
    mounts = []

    def mount(size: int, read_only: bool = False) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        options = f"size={max(size, 4096)}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the storage-fault tests need root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, saying why, on a machine without it. Under pytest-xdist
    (`--dist loadgroup`, as `make test` runs) a module's tests stay in one worker, so its shared fixtures run once,
    and the team-stack tests (tests/infra, one stack for the package) all in one."""
    import torch

    for item in items:
        module = Path(str(item.fspath))
        group = "infra" if module.parent.name == "infra" else f"{module.parent.name}/{module.stem}"
        item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
