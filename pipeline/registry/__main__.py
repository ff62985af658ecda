"""The registry's command line: list, show and lineage of entries, rebuild of the index, and export (with a model
card) or push to the Hugging Face Hub.

    python -m pipeline.registry list [--stage S] [--json]
    python -m pipeline.registry show REF [--json]
    python -m pipeline.registry lineage REF
    python -m pipeline.registry rebuild
    python -m pipeline.registry export REF DIR [--license L]       a Hugging Face folder with a model card
    python -m pipeline.registry push REF --repo-id ORG/NAME         the same, uploaded to the Hub

REF is `stage` or `stage:latest` (newest complete), `stage:best` (best on the stage's key metric),
an entry id, a checkpoint path, or a hub id. Only complete entries resolve.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from pipeline.card import export, push
from pipeline.errors import PipelineError
from pipeline.registry import KEY_METRICS, STAGES, Entry, Registry


def _summary(e: Entry) -> str:
    key = KEY_METRICS.get(e.stage, ("", True))[0]
    metric = f"{key}={e.metrics[key]:.4g}" if key in e.metrics else ""
    parents = ",".join(e.parents) or "-"
    return f"{e.id:40} {e.status:9} {metric:22} parents={parents}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.registry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="registry root (default: $PIPELINE_HOME or runs/)")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list entries")
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="one entry in full")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("lineage", help="an entry and its ancestors")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    sub.add_parser("rebuild", help="recreate the index from the checkpoint manifests")
    p = sub.add_parser("export", help="a self-contained Hugging Face folder with a model card from the registry")
    p.add_argument("ref")
    p.add_argument("dir", help="a new (or empty) directory")
    p.add_argument("--license", default="other", help="the card's license (a Hub license id; default: other)")
    p = sub.add_parser("push", help="export to the Hugging Face Hub (network and a token needed)")
    p.add_argument("ref")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created if missing)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--license", default="other", help="the card's license (a Hub license id; default: other)")
    args = ap.parse_args(argv)
    reg = Registry(args.root)
    try:
        if args.command == "list":
            entries = reg.entries(args.stage)
            if args.json:
                print(json.dumps([asdict(e) for e in entries], indent=2))
            else:
                print("\n".join(_summary(e) for e in entries) or f"no entries in {reg.root}")
        elif args.command == "show":
            e = reg.resolve_any(args.ref)
            print(json.dumps(asdict(e), indent=2) if args.json else
                  "\n".join(f"{k:22} {json.dumps(v) if isinstance(v, (dict, list)) else v}"
                            for k, v in asdict(e).items() if k != "config"))
        elif args.command == "lineage":
            chain = reg.lineage(args.ref)
            if args.json:
                print(json.dumps([{"depth": d, **asdict(e)} for d, e in chain], indent=2))
            else:
                for depth, e in chain:
                    print("  " * depth + ("└─ " if depth else "") + _summary(e))
        elif args.command == "rebuild":
            print(f"rebuilt the index of {reg.root} from {reg.rebuild()} manifests")
        elif args.command == "export":
            print(f"exported {args.ref} with its model card to {export(reg, args.ref, args.dir, args.license)}")
        elif args.command == "push":
            print(f"pushed {args.ref} to {push(reg, args.ref, args.repo_id, args.private, args.license)}")
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
