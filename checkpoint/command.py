"""``rlfleet checkpoints list|pull``: the committed checkpoints under a URI, and one of them
downloaded and verified into a local directory (:func:`pull_checkpoint`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlfleet.checkpoint.commit import MANIFEST, parse_manifest
from rlfleet.checkpoint.load import (
    check_listing,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)
from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.common.config import CheckpointConfig
from rlfleet.common.storage import UnsafePathError


def pull_checkpoint(
    uri: str, dest_dir: str | os.PathLike[str], *, config: CheckpointConfig | None = None
) -> Path:
    """Download a checkpoint (``.../step-N``, or the latest under a root) into ``dest_dir`` and
    verify it; ``dest_dir/policy`` then loads with ``AutoModelForCausalLM.from_pretrained``.
    The store's listing is checked against the manifest first: a checkpoint with a file too many
    or missing, or with a name that leads outside ``dest_dir`` (``../x``), is refused before
    anything is written."""
    storage = resolve_checkpoint(uri, config=config)
    destination = Path(dest_dir)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} is not empty; pull into a new directory")
    check_listing(storage, parse_manifest(storage.read_bytes(MANIFEST), storage.uri), destination)
    try:
        storage.download_dir("", destination)
    except UnsafePathError as error:  # the listing changed since it was checked
        raise CheckpointError(str(error)) from None
    verify_checkpoint(destination)
    return destination.resolve()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    endpoint = argparse.ArgumentParser(add_help=False)
    endpoint.add_argument(
        "--endpoint",
        help="S3 endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", parents=[endpoint], help="list the committed checkpoints under URI"
    )
    listing.add_argument("uri", metavar="URI")
    pull = actions.add_parser("pull", parents=[endpoint], help="download and verify a checkpoint")
    pull.add_argument("uri", metavar="URI[/step-N]", help="a checkpoint, or a root (its latest)")
    pull.add_argument("dest", metavar="DIR")


def run(args: argparse.Namespace) -> int:
    config = CheckpointConfig(uri=args.uri, s3_endpoint_override=args.endpoint)
    try:
        if args.action == "list":
            infos = list_checkpoints(args.uri, config=config)
            for info in infos:
                if info.problem:
                    print(f"{info.step}\tUNUSABLE\t{info.problem}")
                else:
                    print(f"{info.step}\t{info.num_bytes}\t{info.created}\t{info.uri}")
            if not infos:
                print(f"no committed checkpoints under {args.uri}", file=sys.stderr)
        else:
            print(pull_checkpoint(args.uri, args.dest, config=config))
    except (OSError, CheckpointError) as error:
        print(f"rlfleet checkpoints {args.action}: {error}", file=sys.stderr)
        return 1
    return 0
