"""Write the OpenAPI document the app serves to ``openapi.json`` at the repository root.

    .venv/bin/python scripts/write_openapi.py          # rewrite openapi.json
    .venv/bin/python scripts/write_openapi.py --check  # exit 1 if it is out of date

tests/test_openapi.py fails when the file differs from what the running app serves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def render() -> str:
    from service.api.app import create_app
    from service.settings import Settings

    # Building the schema touches neither the database nor the data dir.
    app = create_app(Settings(data_dir=ROOT / "data", database_url="sqlite://"), run_worker=False)
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--output", default=str(ROOT / "openapi.json"))
    args = parser.parse_args()
    text = render()
    target = Path(args.output)
    if args.check:
        if not target.exists() or target.read_text() != text:
            print(f"{target} is out of date: run .venv/bin/python scripts/write_openapi.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
