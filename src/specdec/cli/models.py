"""`specdec models list|fetch`."""

from __future__ import annotations

import argparse


def cmd_list(args: argparse.Namespace) -> int:
    from specdec.models.hub import cache_dir, list_models

    rows = list_models()
    print(f"cache: {cache_dir()}")
    for row in rows:
        state = "converted" if row.get("converted") else ("fetched" if row.get("cached") else "not fetched")
        print(f"  {row['name']:<30} {row['size'] / 1e6:8.1f} MB  {state}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from specdec.models.hub import fetch

    for name in args.names:
        path = fetch(name, progress=not args.quiet)
        print(f"{name}: {path}")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    msub = p.add_subparsers(dest="models_command", metavar="{list,fetch}", required=True)
    msub.add_parser("list", help="known models and whether they are cached").set_defaults(func=cmd_list)
    fetch = msub.add_parser("fetch", help="download, assemble and verify a known model")
    fetch.add_argument("names", nargs="+")
    fetch.add_argument("--quiet", action="store_true")
    fetch.set_defaults(func=cmd_fetch)
