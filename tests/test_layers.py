"""The package layers (pyproject.toml's ``[tool.importlinter]`` contracts), run by ``make test``.

``make lint`` runs the same ``lint-imports``; running it here too means a change that breaks a
layer (pipeline importing stages, a caller reaching into ``storage.codecs``, a side network
importing ``transformers``, zarr imported outside storage) fails the README's test command.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the contracts the layering relies on; dropping one from pyproject.toml must be deliberate
REQUIRED = {
    "layers",
    "storage-api",
    "sidenets-cached-only",
    "sidenets-storage-api",
    "zarr-in-storage",
}


def test_the_layer_contracts_are_configured() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    ids = {c["id"] for c in config["contracts"]}
    assert ids >= REQUIRED, f"contracts missing from pyproject.toml: {sorted(REQUIRED - ids)}"


def test_every_import_contract_is_kept() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    assert exe.is_file(), (
        f"expected the lint-imports command at {exe}, found none; install the dev extras "
        "(`make setup`, or `.venv/bin/pip install -e '.[dev]'`)"
    )
    done = subprocess.run(
        [str(exe), "--no-logo", "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"lint-imports found broken contracts:\n{done.stdout}{done.stderr}"
