"""Print the project's requirements from pyproject.toml, one per line, for `pip install -r`.

The Dockerfile installs dependencies in layers *before* copying the source, so that editing code
does not reinstall 5 GB of torch. Reading them from pyproject.toml keeps one list of pins (no
requirements.txt to drift). Standard library only: it runs before anything is installed.

    python requirements.py pyproject.toml --extra gpu --only torch torchvision
    python requirements.py pyproject.toml --extra gpu --exclude torch torchvision
"""

from __future__ import annotations

import argparse
import re
import tomllib


def distribution_name(requirement: str) -> str:
    """'uvicorn[standard]>=0.29' -> 'uvicorn' (normalised as pip does)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if name is None:
        raise SystemExit(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--extra", action="append", default=[], help="optional-dependency group")
    parser.add_argument("--only", nargs="*", default=None, help="keep only these distributions")
    parser.add_argument("--exclude", nargs="*", default=[], help="drop these distributions")
    args = parser.parse_args()

    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project["dependencies"])
    for extra in args.extra:
        try:
            requirements += project["optional-dependencies"][extra]
        except KeyError:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}") from None

    only = {distribution_name(n) for n in args.only} if args.only is not None else None
    exclude = {distribution_name(n) for n in args.exclude}
    for requirement in requirements:
        name = distribution_name(requirement)
        if (only is None or name in only) and name not in exclude:
            print(requirement)


if __name__ == "__main__":
    main()
