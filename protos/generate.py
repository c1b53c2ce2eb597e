"""Generate the Python code and type stubs for every .proto file under protos/.

Run `python -m protos.generate` after editing a .proto file and commit the result;
`python -m protos.generate --check` exits non-zero when the committed code is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(root: Path = ROOT) -> list[Path]:
    """Every .proto file under root/protos, sorted for a deterministic run."""
    return sorted((root / "protos").rglob("*.proto"))


def generate(out_dir: Path, root: Path = ROOT) -> None:
    """Compile every .proto under root/protos into out_dir, mirroring the protos/ tree."""
    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(root)) for p in proto_files(root)),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")


def generated_files(base: Path) -> dict[str, Path]:
    """Generated files under base/protos, keyed by their path relative to base."""
    found = {}
    for path in (base / "protos").rglob("*"):
        if path.name.endswith(GENERATED_SUFFIXES):
            found[str(path.relative_to(base))] = path
    return found


def stale_files(root: Path = ROOT) -> list[str]:
    """Paths whose committed generated code under root differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), root)
        fresh = generated_files(Path(tmp))
        committed = generated_files(root)
        names = sorted(set(fresh) | set(committed))
        return [
            n
            for n in names
            if n not in fresh
            or n not in committed
            or not filecmp.cmp(fresh[n], committed[n], False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name} (run `python -m protos.generate`)", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for old in generated_files(ROOT).values():
            old.unlink()
        for name, path in generated_files(Path(tmp)).items():
            shutil.copyfile(path, ROOT / name)
            print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
