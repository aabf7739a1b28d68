"""Sharing a run on the Hugging Face Hub: the access check before training, and the upload.

`check_access(repo_id)`: with `train.push_to_hub`, before anything is read or written -- offline
mode, no token, an endpoint that does not answer, a refused or read-only token each make one
`HubError` naming the fix. `push_run(run_dir, repo_id)`: creates the repository (`private` for a new
one), the branch `revision` when given, and uploads in one commit what `upload_paths` selects (the
model or adapter, tokenizer, chat template, model card, report, config.yaml, run files, merged/),
never checkpoints/ unless asked. `sftlab push RUN_DIR` (`add_push_parser`) is the same upload by hand.

The token comes from huggingface_hub (HF_TOKEN, or `hf auth login`'s file); it is handed to its API
and never printed or written. HF_ENDPOINT is read at call time (a mirror, or a local test server).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console

from sftlab.config.schema import TrainConfig
from sftlab.errors import SftlabError
from sftlab.paths import not_found_message

SKIPPED_DIRS = ("checkpoints", "tensorboard", "wandb", "trackio")  # top-level: not part of the shared model
SKIPPED_FILES = ("FINISHED",)


class HubError(SftlabError, RuntimeError):
    """The Hub cannot be used (offline, no token, refused, no finished run); the message says what to do.
    (Not a RunError: importing rundir loads torch, and `sftlab push` needs none of it.)"""


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def _offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_access(repo_id: str, what: str = "train.push_to_hub") -> str:
    """The user name the token belongs to; a HubError when the Hub cannot take the upload."""
    from huggingface_hub import get_token

    later = (
        "; or set train.push_to_hub=false and upload the finished run later with `sftlab push RUN_DIR`"
        if what == "train.push_to_hub"
        else ""
    )
    if _offline():
        raise HubError(f"{what}: HF_HUB_OFFLINE is set, so {repo_id} cannot be uploaded; unset it{later}")
    token = get_token()
    if not token:
        raise HubError(
            f"{what}: no Hugging Face token to upload {repo_id} with: set HF_TOKEN or run "
            f"`hf auth login` (a token with write access){later}"
        )
    try:
        who = _api().whoami(token=token)
    except Exception as e:
        raise HubError(f"{what}: {_why(e)}{later}") from None
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(
            f"{what}: the token of {who.get('name')} is read-only; {repo_id} needs a token with write "
            f"access (HF_TOKEN or `hf auth login`){later}"
        )
    return str(who.get("name", "?"))


def _why(e: Exception) -> str:
    """What went wrong talking to the Hub, in a line (huggingface_hub's messages never hold the token)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return f"{endpoint()} refused the token (401: invalid or expired); set a valid HF_TOKEN or `hf auth login`"
    if status is not None:
        return f"{endpoint()} answered {status}: {str(e).splitlines()[0][:300]}"
    return f"cannot reach {endpoint()} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"


def upload_paths(run_dir: Path, checkpoints: bool = False) -> list[str]:
    """The run's files to upload, relative POSIX paths: all but hidden files, the marker, trackers' logs
    and (unless `checkpoints`) checkpoints/."""
    skipped = set(SKIPPED_DIRS) - ({"checkpoints"} if checkpoints else set())
    out = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts[0] in skipped or (len(rel.parts) == 1 and rel.name in SKIPPED_FILES):
            continue
        out.append(rel.as_posix())
    return out


def retry_command(run_dir: Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    return shlex.join(
        ["sftlab", "push", str(run_dir), "--repo-id", repo_id]
        + (["--private"] if private else [])
        + (["--revision", revision] if revision else [])
    )


def push_run(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    checkpoints: bool = False,
) -> str:
    """Create `repo_id` (exists: kept as it is) and upload the run in one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, get_token

    from sftlab.trainer.card import CARD, card_text

    run_dir = Path(run_dir)
    api, token = _api(), get_token()
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    ops = []
    for rel in upload_paths(run_dir, checkpoints):
        if rel in (CARD, f"merged/{CARD}"):  # the card names the repository it is in
            content: Any = card_text(run_dir, repo_id, merged=rel != CARD).encode()
        else:
            content = str(run_dir / rel)
        ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    steps = (_finished(run_dir) or {}).get("steps", "?")
    info = api.create_commit(
        repo_id,
        ops,
        commit_message=f"sftlab run {run_dir.name}: {steps} optimizer steps",
        revision=revision,
        token=token,
    )
    return str(info.commit_url)


def _finished(run_dir: Path) -> dict | None:
    from sftlab.trainer.rundir import read_finished

    return read_finished(run_dir)


def push_after_training(train: TrainConfig, out: Path, result: Any, console: Console) -> None:
    """train.push_to_hub at the end of a run (main process, after the model, card, report and marker are
    written). A failure is reported with the retry command and kept in `result.push_error` (`result`: the
    run's TrainResult, untyped here: trainer/run.py loads torch, and `sftlab push` needs none of it)."""
    console.print(
        f"[bold]push[/bold]: uploading {out} to {train.hub_model_id} on {endpoint()}", highlight=False
    )
    try:
        url = push_run(out, train.hub_model_id, train.hub_private, train.hub_revision)
    except Exception as e:
        retry = retry_command(out, train.hub_model_id, train.hub_private, train.hub_revision)
        result.push_error = f"{train.hub_model_id}: {_why(e)}"
        console.print(
            f"[bold red]push failed[/bold red]: {result.push_error}. The run in {out} is "
            f"complete; retry the upload with: {retry}",
            highlight=False,
        )
        return
    result.hub_url = url
    console.print(f"[bold green]pushed[/bold green] to {url}", highlight=False)


def cmd_push(ns) -> int:
    """`sftlab push RUN_DIR`: the finished run's model, card and report to the Hub."""
    run_dir = Path(ns.run_dir)
    if not run_dir.is_dir():  # before the imports below (torch: seconds)
        raise HubError(not_found_message("run directory", ns.run_dir))
    from sftlab.trainer.card import CARD, write_model_cards
    from sftlab.trainer.rundir import saved_config

    if _finished(run_dir) is None:
        raise HubError(
            f"{run_dir} holds no finished run (no FINISHED marker: its model was not saved); push a "
            "run directory once its training has finished"
        )
    hub = (saved_config(run_dir) or {}).get("train") or {}
    repo_id = ns.repo_id or hub.get("hub_model_id")
    if not repo_id:
        raise HubError(
            f"sftlab push: which repository? Pass --repo-id <user-or-org>/<name> ({run_dir}'s "
            "config.yaml sets no train.hub_model_id)"
        )
    private = ns.private or bool(hub.get("hub_private"))
    check_access(repo_id, "sftlab push")
    if not (run_dir / CARD).is_file():  # a run from before cards were written
        write_model_cards(run_dir, repo_id)
    print(f"pushing {run_dir} to {repo_id} on {endpoint()}" + (" (private)" if private else ""))
    try:
        url = push_run(
            run_dir, repo_id, private, ns.revision or hub.get("hub_revision"), ns.include_checkpoints
        )
    except Exception as e:
        raise HubError(f"sftlab push {repo_id}: {_why(e)}") from None
    print(f"pushed to {url}")
    return 0


def add_push_parser(sub) -> None:
    p = sub.add_parser(
        "push", help="upload a finished run (model or adapter, tokenizer, card, report) to the Hub"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--repo-id", help="namespace/name (default: the run's train.hub_model_id)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (created when missing)")
    p.add_argument("--include-checkpoints", action="store_true", help="also upload checkpoints/ (large)")
    p.set_defaults(func=cmd_push)
