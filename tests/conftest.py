import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ooc_ray.io import write_parquet

# Local Ray for tests: no token auth, no dashboard, trials keep the working directory.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "pbc_blood_cells"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_pbc() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared beside the checkout)")
    return SHARED_DATA


def make_dataset(root: Path, per_class=(4, 4), k: int = 2, size: int = 32, groups=("",)) -> pd.DataFrame:
    """Tiny manifest (contract columns + fold) over generated PNGs; class i is a brightness level + noise."""
    rng = np.random.default_rng(0)
    rows = []
    for li, n in enumerate(per_class):
        label = ["good", "bad", "acceptable", "other"][li]
        for j in range(n):
            arr = np.clip(40 + 150 * li + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            path = root / "images" / label / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            rows.append({"id": f"{label}-{j:02d}", "path": str(path), "label": label, "label_index": li,
                         "group": groups[(j // k) % len(groups)], "sha256": "", "size": path.stat().st_size,
                         "width": size, "height": size, "mode": "RGB", "fold": j % k})
    return pd.DataFrame(rows)


def write_manifest(manifest: pd.DataFrame, paths) -> None:
    """A manifest with its `fold` column -> manifest.parquet + folds.parquet, as the data stage writes them."""
    write_parquet(manifest.drop(columns="fold"), paths.manifest)
    write_parquet(manifest[["id", "fold"]], paths.folds)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads spin-wait on cores
    other processes (Ray workers, other tests) hold: measured 0.7 images/s with 2 threads vs 15 with 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(root: Path, **sections):
    """Experiment config on the tiny diffusion base at 32 px with few steps; `sections` update per section."""
    from ooc_ray.config import from_dict

    raw = {
        "name": "t", "results_dir": str(root / "results"),
        "generator": {"base": "tiny", "resolution": 32, "epochs": 2, "repeats": 1, "batch_size": 4,
                      "rank": 4, "alpha": 4.0, "unet_lr": 1e-3, "text_encoder_lr": 1e-3},
        "sample": {"weights": [1.0, 0.0], "steps": 2, "resolution": 32, "batch_size": 4, "actors": 1},
        "classify": {"ratios": [0.0, 0.5]},  # + synthetic_only: pools of 1.0 x n_train
        "ray": {"num_cpus": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)
