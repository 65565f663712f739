"""Pushing train.py's finished adapter folder to the Hugging Face Hub: once, after the folder is complete.

Trainer's own --push_to_hub uploads at every checkpoint and in the middle of a run; here the folder is uploaded as
train.py leaves it (adapter, processor, model card, curves, run_config.json), in one commit. The login is checked
before training starts, so a missing token is one line at once, not after the run.
"""

import logging
import os

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from run_io import UserError, first_line

logger = logging.getLogger(__name__)


def _first_line(e: Exception) -> str:
    text = first_line(e)[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_hub_options(args) -> None:
    """The Hub flags train.py can honour; one UserError line for one it would ignore."""
    strategy = getattr(args.hub_strategy, "value", args.hub_strategy)
    if args.push_to_hub and strategy in ("checkpoint", "all_checkpoints"):
        raise UserError(
            f"--hub_strategy {strategy} pushes Trainer's checkpoints; train.py pushes the finished adapter folder "
            "once: leave --hub_strategy out"
        )


def hub_repo_id(args) -> str:
    """The repo --push_to_hub uploads to, as owner/name: --hub_model_id, under the token's user when it names no
    owner (the --output_dir folder's name when not given, as Trainer does). Asks the Hub who the token belongs to,
    so a missing or wrong login fails before training."""
    api = HfApi(token=args.hub_token)
    try:
        user = api.whoami()["name"]
    except Exception as e:  # offline, no token, a revoked token: huggingface_hub and httpx raise their own types
        raise UserError(
            f"--push_to_hub: the Hub does not accept this login ({_first_line(e)}); log in with `hf auth login` or "
            "pass --hub_token, or leave --push_to_hub out"
        ) from e
    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    repo_id = name if "/" in name else f"{user}/{name}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"--hub_model_id {repo_id!r} is not a Hub repo id ({_first_line(e)})") from e
    return repo_id


def push_folder(folder: str, files: list, args) -> str:
    """Upload `files` (names in `folder`) to the repo args.hub_model_id in one commit; returns the commit's URL.

    The repo is made where missing (--hub_private_repo), the commit goes to --hub_revision (default main).
    A failure is one UserError line: the local folder stays as it is.
    """
    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id
    try:
        api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=list(files),
            revision=args.hub_revision,
            commit_message=f"Upload adapter trained by train.py ({len(files)} files)",
        )
    except Exception as e:  # network, permissions, quota: huggingface_hub and httpx raise their own types
        raise UserError(
            f"the adapter is saved in {folder}/, but pushing it to the Hub repo {repo_id} failed ({_first_line(e)}); "
            f"upload it later with `hf upload {repo_id} {folder} --exclude 'checkpoint-*' --exclude 'runs/*' "
            "--exclude '.*'`"
        ) from e
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("pushed %d files of %s to %s", len(files), folder, url)
    return url
