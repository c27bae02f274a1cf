"""tl-dist push: publish a run on the Hugging Face Hub (weights, config.json, model card, pictures).

    tl-dist push RUN --repo USER/NAME [--private] [--message TEXT]

Writes the run's publishable folder (``tl-dist export RUN --format hf``: RUN/hf) and uploads it
through huggingface_hub (the [hub] extra), creating the repository if it is not there. The token is
huggingface_hub's own (``huggingface-cli login``, or $HF_TOKEN). Exit 0 uploaded, 2 bad usage or
run, 1 the upload failed (the message says why; the folder stays for another try).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from tl_dist.errors import UserError, first_line, one_line, printable


def hub_api():
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("push: needs huggingface_hub: pip install -e '.[hub]' (or pip install huggingface_hub)") \
            from None
    return HfApi()


def main(argv: Sequence[str] | None = None, prog: str = "tl-dist push") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Publish a run on the Hugging Face Hub: its best weights, "
                                "config.json, a model card and its pictures.")
    p.add_argument("run", metavar="RUN", help="run directory (its best.safetensors)")
    p.add_argument("--repo", required=True, help="the Hub repository, USER/NAME (created if it is not there)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", default=None, help="the commit message (default: the run and its result)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        from tl_dist.files import checkpoint, hub_folder

        if args.repo.count("/") != 1 or not all(args.repo.split("/")):
            raise UserError(f"push: --repo {args.repo}: give USER/NAME (or ORGANISATION/NAME)")
        api = hub_api()  # (before any work: a missing extra is said first)
        ckpt = checkpoint.locate(args.run)
        folder = ckpt.parent / "hf"
        hub_folder.write(ckpt, folder)
        meta = checkpoint.read_metadata(ckpt)
        message = args.message or (f"tl_dist: {meta['arch']} ({meta['mode']}), val acc {meta['val_acc']:.4f} at "
                                   f"epoch {meta['epoch']}")
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    try:
        api.create_repo(args.repo, private=args.private, exist_ok=True)
        done = api.upload_folder(repo_id=args.repo, folder_path=str(folder), commit_message=message,
                                 ignore_patterns=[hub_folder.MARKER])
    except Exception as e:  # noqa: BLE001 - the Hub client's errors (network, auth, quota) vary by version
        print(f"error: push: uploading {printable(str(folder))} to {args.repo} failed: {one_line(first_line(e))[:300]} "
              f"(log in with huggingface-cli login or set HF_TOKEN; the folder stays for another try)",
              file=sys.stderr)
        return 1
    print(f"pushed {printable(str(folder))} to https://huggingface.co/{args.repo}"
          + (f" ({getattr(done, 'commit_url', done)})" if done else ""))
    return 0
