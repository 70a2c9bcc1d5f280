import subprocess
import sys

import pandas as pd

from ooc_ray.cli import main


def test_cli_data_stage(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"results_dir: {tmp_path}\ndata:\n  demo:\n    per_class: [6, 6, 6]\n    size: 32\nfolds:\n  k: 3\n")
    assert main(["data", str(cfg)]) == 0
    out = tmp_path / "exp"
    assert len(pd.read_parquet(out / "manifest.parquet")) == 18
    assert (out / "config.yaml").exists()  # resolved config saved beside the outputs


def test_cli_config_error_names_key(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data:\n  sorce: x\n")
    assert main(["data", str(cfg)]) == 2
    assert "data.sorce" in capsys.readouterr().err


def test_cli_data_error_is_clean(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"results_dir: {tmp_path}\ndata:\n  source: {tmp_path / 'nowhere'}\n")
    assert main(["data", str(cfg)]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "ooc_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in ["data", "finetune", "sample", "classify", "report", "run", "search"]:
        assert stage in out.stdout
