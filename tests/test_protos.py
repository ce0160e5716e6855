"""The committed stubs must be what ``python scripts/gen_protos.py`` generates now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_check_detects_a_stale_stub(tmp_path: Path) -> None:
    """Edit a copy of the tree's proto and the check must fail on the old stubs."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    shutil.copytree(ROOT / "services" / "proto", copy / "services" / "proto",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    proto = copy / "proto" / "tensor.proto"
    proto.write_text(
        proto.read_text().replace("float offset = 7;", "float offset = 7;\n  int32 x = 8;")
    )
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=copy,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "tensor_pb2" in result.stderr
