"""The wheel carries what an installed kvarn needs: every module, the calibration specs of
``calibrate/`` and the recipes of ``recipes/``, and an install of it finds them without the
repository (``kvarn.paths.shipped_dir``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked(folder: str) -> list[Path]:
    """Files of ``folder`` that a clone has (git's list where there is one, else the folder)."""
    try:
        out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / f for f in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        files = []
    return files or sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (whl,) = out.glob("kvarn-*.whl")
    return whl


def test_wheel_holds_the_modules_and_the_shipped_data(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for folder in ("calibrate", "recipes"):
            files = _tracked(folder)
            assert files, f"{folder}/ is empty in the checkout"
            for f in files:
                inside = f"kvarn/_data/{f.relative_to(ROOT)}"
                assert inside in names, f"{inside} is missing from {wheel.name}"
                assert z.read(inside) == f.read_bytes(), f"{inside} differs from {f.relative_to(ROOT)}"
        for f in _tracked("kvarn"):
            if f.suffix == ".py":
                assert str(f.relative_to(ROOT)) in names, f"{f.relative_to(ROOT)} is missing from {wheel.name}"
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(entry_points).decode()
        assert "kvarn = kvarn.cli:main" in text and "vllm.general_plugins" in text


def test_installed_wheel_finds_its_data_outside_the_repository(wheel, tmp_path):
    """Installed (no repository on the path): the default calibration spec and the embedded model's
    recipe are found inside the install, and ``kvarn inspect`` reads the shipped recipe."""
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    script = f"""
import json, sys
sys.path.insert(0, {str(site)!r})
import kvarn
from kvarn import api
from kvarn.data import available_calib_specs, load_calib_spec
from kvarn.paths import shipped_dir
from kvarn.recipe import Recipe
recipe = api.find_recipe(None)
print(json.dumps({{"kvarn": kvarn.__file__, "calibrate": str(shipped_dir("calibrate")),
    "recipes": str(shipped_dir("recipes")), "specs": available_calib_specs(),
    "default_spec": load_calib_spec(api.DEFAULT_CALIB).num_samples, "recipe": str(recipe),
    "recipe_layers": Recipe.load(recipe).num_layers}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("kvarn", "calibrate", "recipes", "recipe"):
        assert got[key].startswith(str(site)), f"{key} comes from {got[key]}, not the install in {site}"
    assert "wiki-first-half" in got["specs"] and got["default_spec"] == 6 and got["recipe_layers"] == 30

    cli = f"import sys; sys.path.insert(0, {str(site)!r}); from kvarn.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", cli, "inspect", got["recipe"], "--json"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["fingerprint"]["num_layers"] == 30
