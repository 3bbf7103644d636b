"""Install this checkout into a target folder without building anything.

    python benchmarks/gpu/install_tree.py TARGET

pyproject.toml maps the package ``mc_retrofit`` onto folders (``retrofit/``,
``kernels/``, ...), so PYTHONPATH=REPO cannot import it, and a pip build needs a
setuptools new enough for the project's metadata, which a bare GPU machine may lack.
This copies each mapped folder to where an installed package would sit
(``[tool.setuptools] package-dir``) and writes a minimal ``.dist-info`` so
``importlib.metadata.version("mc-retrofit")`` answers. Pure copies: the code run is the
code in the working tree at the time of the call. Standard library only.
"""
from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def install(target: Path) -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, tool = meta["project"], meta["tool"]["setuptools"]
    mapping = tool.get("package-dir", {})
    target.mkdir(parents=True, exist_ok=True)
    done = []
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in sorted(mapping, key=lambda p: p.count(".")):  # parents first, then the folders mapped inside them
        dest = target.joinpath(*pkg.split("."))
        if dest.exists() and pkg.count(".") == 0:
            shutil.rmtree(dest)
        shutil.copytree(REPO / mapping[pkg], dest, ignore=ignore, dirs_exist_ok=True)
        done.append(f"{pkg} <- {mapping[pkg]}/")
    for pkg in tool.get("packages", []):  # every declared package must now import from the target
        if not (target.joinpath(*pkg.split(".")) / "__init__.py").exists():
            raise SystemExit(f"install_tree: {pkg} has no __init__.py under {target}")
    name, version = project["name"], project["version"]
    dist = target / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "INSTALLER").write_text("benchmarks/gpu/install_tree.py\n")
    scripts = project.get("scripts", {})
    if scripts:
        (dist / "entry_points.txt").write_text("[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items()))
    (dist / "RECORD").write_text("")
    return done


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for line in install(Path(sys.argv[1])):
        print(line)
