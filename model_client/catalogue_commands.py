"""``mm pull``, ``mm rm``, ``mm cp``, ``mm show``, ``mm reload``: the catalogue from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from model_client.client import ModelClient

BAR = 30


def add_arguments(sub: Any) -> None:
    pull = sub.add_parser("pull", help="fetch a model: hf.co/ORG/REPO:QUANT, hf://ORG/REPO/FILE or an https URL")
    pull.add_argument("ref")
    pull.add_argument("--name", help="its catalogue name (default: an hf.co reference as given, else the file's name)")
    pull.add_argument("--check", action="store_true", help="only say where it would go; download nothing")
    pull.add_argument("--allow-no-fit", action="store_true", help="download even if no device could hold it now")
    sub.add_parser("rm", help="remove a pulled model (and its files) or an alias").add_argument("model")
    cp = sub.add_parser("cp", help="give a model a second name (an alias: loaded once)")
    cp.add_argument("source")
    cp.add_argument("destination")
    sub.add_parser("show", help="a model's entry, source and GGUF header fields").add_argument("model")
    sub.add_parser("reload", help="take the catalogue fragments as they are on disk (as SIGHUP does)")


COMMANDS = ("pull", "rm", "cp", "show", "reload")


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.1f} MB"


def describe_fit(fit: dict[str, Any]) -> str:
    if not fit["fits"]:
        return f"fits nowhere now: {fit['reason']}"
    where = f"would load on {fit['device']} as {fit['variant'] or 'its files'}, {_mb(fit['needs_bytes'])}"
    if fit["evicts"]:
        return f"{where}, evicting {', '.join(fit['evicts'])}"
    return where + (", once busy models are done" if fit["action"] == "wait" else ", nothing evicted")


def pull(client: ModelClient, args: argparse.Namespace) -> int:
    started, shown = time.monotonic(), False
    for item in client.pull(args.ref, name=args.name, check=args.check, allow_no_fit=args.allow_no_fit):
        status = item.get("status")
        if item["final"]:
            if shown:
                print(file=sys.stderr)
            if item.get("check"):
                print(f"{item['model']}: {item['kind']}, {_mb(item['total'])} to download; {describe_fit(item['fit'])}")
                if item.get("header_bytes"):
                    share = item["header_bytes"] / item["file_bytes"] * 100
                    print(f"(read {_mb(item['header_bytes'])} of its header, {share:.2f}% of the file)")
            else:
                print(f"{item['model']}: pulled, {_mb(item['total'])}; in the catalogue as {item['model']!r}")
            return 0
        if status == "fit":
            print(f"{args.ref}: {describe_fit(item)}", file=sys.stderr)
        elif status in ("downloading", "verified") and item.get("total"):
            done, total = item["completed"], item["total"]
            filled = int(BAR * done / total) if total else BAR
            rate = done / max(1e-3, time.monotonic() - started)
            line = f"\r[{'#' * filled}{'.' * (BAR - filled)}] {done / total:5.1%} {_mb(done)} / {_mb(total)} "
            print(line + f"{rate / 1e6:6.1f} MB/s", end="", file=sys.stderr, flush=True)
            shown = True
    return 1


def run(client: ModelClient, args: argparse.Namespace) -> int:
    if args.command == "pull":
        return pull(client, args)
    if args.command == "rm":
        result = client.remove(args.model)
        alias = f" (a name of {result['alias_of']})" if result.get("alias_of") else ""
        print(f"removed {result['removed']}{alias}, {_mb(result['freed_bytes'])} freed")
    elif args.command == "cp":
        result = client.copy(args.source, args.destination)
        print(f"{result['model']} -> {result['alias_of']}")
    elif args.command == "show":
        print(json.dumps(client.show(args.model), indent=1))
    elif args.command == "reload":
        result = client.reload()
        for key in ("added", "removed", "changed", "deferred"):
            if result[key]:
                print(f"{key}: {', '.join(result[key])}")
        for file, problem in result["problems"].items():
            print(f"{file}: {problem}", file=sys.stderr)
        if not any(result[k] for k in ("added", "removed", "changed", "deferred")):
            print("no change")
    return 0
