"""Download a supported model's Q4 GGUF file(s) and print the config lines that select it.

    python scripts/download_model.py llama-3.1-8b [--quant Q4_K_M] [--dir models] [--json]
    python scripts/download_model.py --list

The config lines (or --json) go to stdout; progress and messages go to stderr.
An interrupted download resumes when the same command is run again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere

from models import catalog  # noqa: E402
from models.download import DownloadError, download_quant, yaml_snippet  # noqa: E402


def _catalog_table() -> str:
    rows = [("name", "quant", "size", "repo", "files", "source gated")]
    for m in catalog.MODELS.values():
        for q in m.quants:
            approx = "~" if q.size_source == "estimate" else ""
            rows.append((m.name, q.quant, f"{approx}{q.total_bytes / 1e9:.2f} GB", q.repo,
                         str(len(q.files)), "yes" if m.source_gated else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="download_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(catalog.MODELS)}")
    p.add_argument("--quant", default="Q4_K_M", help="Q4_K_M (default) or Q4_0")
    p.add_argument("--dir", default="models", type=Path, help="where to put the file(s) (default: models)")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the GGUF repo")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of YAML")
    p.add_argument("--list", action="store_true", help="list the catalog and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        print(_catalog_table())
        return 0
    if not args.name:
        parser.error(f"give a model name ({', '.join(catalog.MODELS)}) or --list")
    try:
        entry = catalog.get(args.name)
        quant = entry.quant(args.quant)
        paths = download_quant(quant, args.dir, revision=args.revision)
    except (catalog.UnknownModelError, DownloadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    snippet = yaml_snippet(paths[0])
    if args.json:
        print(json.dumps({"model": entry.name, "quant": quant.quant, "repo": quant.repo,
                          "files": [str(p) for p in paths], "model_path": str(paths[0]),
                          "yaml": snippet}, indent=2))
    else:
        print(snippet, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
