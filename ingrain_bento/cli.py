"""``ingrain-bento pull/list/rm``: fill the BentoML model store ahead of time.

Same code path as the server (``ModelStore.pull``, and ``runner.export`` for ``--backend onnx``),
so a pulled model serves with no further download or export. Download progress bars are
huggingface_hub's own (tqdm).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ingrain_bento.backends.base import BACKENDS, Backend
from ingrain_bento.errors import IngrainError
from ingrain_bento.families import parse_ref
from ingrain_bento.model_list import read_model_list


def _parser() -> argparse.ArgumentParser:
    from ingrain_bento.families import families

    libraries = sorted(families())
    parser = argparse.ArgumentParser(prog="ingrain-bento", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="download a model into the BentoML model store")
    pull.add_argument("--library", choices=libraries)
    pull.add_argument("--name", help="architecture, Hub id, or hf-hub:org/repo")
    pull.add_argument("--from", dest="model_list", help="pull every model of a models/*.yaml list instead")
    pull.add_argument("--pretrained", default=None, help="pretrained tag (open_clip), true/false (timm)")
    pull.add_argument("--backend", choices=[name for name, spec in BACKENDS.items() if spec.exports], default=None,
                      help="also export it for that backend now (a list's own backend fields otherwise)")
    commands.add_parser("list", help="list the models in the store")
    rm = commands.add_parser("rm", help="remove a model from the store")
    rm.add_argument("--name", required=True)
    rm.add_argument("--pretrained", default=None)
    rm.add_argument("--library", default=None, choices=libraries)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from rich.console import Console
    from rich.table import Table

    from ingrain_bento.store import ModelStore

    args = _parser().parse_args(argv)
    console = Console()
    store = ModelStore()
    try:
        if args.command == "pull":
            if args.model_list:
                refs = read_model_list(args.model_list)
            elif args.library and args.name:
                refs = [(parse_ref(args.library, args.name, args.pretrained), None)]
            else:
                console.print("[red]pull needs --library and --name, or --from FILE[/red]")
                return 2
            for ref, backend in refs:
                entry = store.pull(ref)
                size_mb = entry.size_bytes / 1e6
                console.print(f"[green]Stored[/green] {ref.display_id} as {entry.tag} ({size_mb:.1f} MB)")
                export: Backend | None = args.backend or backend
                if export is not None and BACKENDS[export].exports:
                    _export(console, store, entry, export)
        elif args.command == "list":
            table = Table("id", "library", "pretrained", "store tag", "MB", "exports")
            for entry in store.entries():
                exports = ", ".join(sorted(e.backend for e in store.exports_of(entry.tag)
                                           if not e.metadata.get("report", {}).get("failure")))
                table.add_row(entry.ref.display_id if entry.ref else entry.name, entry.library,
                              str(entry.pretrained), entry.tag, f"{entry.size_bytes / 1e6:.1f}", exports)
            console.print(table)
        else:
            matches = [e for e in store.entries()
                       if (args.library in (None, e.library)) and e.name == args.name
                       and (args.pretrained is None or str(e.pretrained).lower() == args.pretrained.lower())]
            if len(matches) != 1:
                console.print(f"[red]{len(matches)} stored models match {args.name!r}[/red]: "
                              "give --pretrained/--library to pick one.")
                return 1
            store.delete_tag(matches[0].tag)
            console.print(f"[green]Removed[/green] {matches[0].tag}")
    except IngrainError as exc:
        console.print(f"[red]{exc.message}[/red]")
        return 1
    return 0


def _export(console: Any, store: Any, entry: Any, backend: Backend) -> None:
    """Export a stored model for ``backend`` now, as the server's first load with it would."""
    import asyncio

    from ingrain_bento.runner.export import ensure_export
    from ingrain_bento.settings import get_settings

    export = asyncio.run(ensure_export(store, entry, backend, get_settings().export_timeout_s))
    if export.folder is None:
        console.print(f"[yellow]No {backend} export[/yellow] (it will load with torch): {export.failure}")
    else:
        console.print(f"[green]Exported[/green] {entry.tag} for {backend}")


if __name__ == "__main__":
    sys.exit(main())
