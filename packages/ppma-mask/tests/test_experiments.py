"""The experiment commands run end to end on tiny settings and write what they promise."""

import json
import subprocess
import sys

import numpy as np
import pytest
from ppma_mask.experiments.__main__ import main
from ppma_mask.experiments.scaling import fit_slope

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_fit_slope_recovers_a_power_law():
    n = np.array([100, 400, 1600, 6400])
    slope, intercept = fit_slope(n, 3e-7 * n**1.5)
    assert slope == pytest.approx(1.5, abs=1e-12)
    assert np.exp(intercept) == pytest.approx(3e-7, rel=1e-9)


def test_scaling_command_writes_table_plot_and_fits(tmp_path):
    argv = ["scaling", "--out", str(tmp_path), "--sides", "2", "4", "6", "8"]
    argv += ["--max-dense-side", "6", "--repeats", "2", "--min-sample-s", "0.001"]
    argv += ["--fit-min-side", "4", "--channels", "3", "--path", "sum"]
    assert main(argv) == 0

    record = json.loads((tmp_path / "scaling.json").read_text())
    timed = {(row["side"], row["method"]) for row in record["rows"]}
    assert timed == {(s, m) for s in (2, 4, 6, 8) for m in ("factored", "scan")} | {
        (s, "dense") for s in (2, 4, 6)
    }
    for row in record["rows"]:
        assert len(row["samples_cpu_s"]) == len(row["samples_wall_s"]) == 2
        assert row["median_s"] == row["median_cpu_s"] > 0  # CPU time is the default clock
        assert row["median_wall_s"] > 0
    assert record["fits"]["dense"]["fit_sides"] == [4, 6]
    assert record["fits"]["scan"]["fit_sides"] == [4, 6, 8]
    # where dense was built, the other methods agree with it to float64 precision
    for check in record["agreement"]:
        assert check["reference"] == ("dense" if check["side"] <= 6 else "factored")
        assert all(v < 1e-12 for k, v in check.items() if k not in ("side", "reference"))

    table = (tmp_path / "scaling.md").read_text()
    assert "| 8×8 | 64 | – |" in table and "fitted slope" in table
    assert (tmp_path / "scaling.png").read_bytes().startswith(PNG_SIGNATURE)


def test_figures_command_writes_images(tmp_path):
    argv = ["figures", "--out", str(tmp_path), "--grid", "5x6", "--query", "2,3"]
    assert main(argv + ["--factor-grid", "2x3"]) == 0
    for name in ("query_masks.png", "factor_matrices.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((tmp_path / "figures.json").read_text())["query"] == [2, 3]


def test_figures_command_rejects_a_query_outside_the_grid(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["figures", "--out", str(tmp_path), "--grid", "4x4", "--query", "4,0"])
    assert exit_info.value.code == 2
    assert "--query" in capsys.readouterr().err


def test_importing_the_package_loads_neither_torch_nor_matplotlib():
    code = (
        "import sys, ppma_mask, ppma_mask.experiments.__main__; "
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert output.strip() == "[]"
