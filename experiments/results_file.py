"""Where every experiment leaves its numbers: out_dir/results.json."""
from __future__ import annotations

import json
import pathlib


def write_results(out_dir: str, results: dict) -> pathlib.Path:
    """Writes results.json into out_dir (made if missing) and returns out_dir as a Path."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return out


def publish(out_dir: str, results: dict, report: str) -> None:
    """write_results, then the report and where the numbers went, on stdout."""
    out = write_results(out_dir, results)
    print(report)
    print(f"wrote {out / 'results.json'}")
