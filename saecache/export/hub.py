"""Uploading an export folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from saecache import __version__
from saecache.core.errors import SaecacheError, first_line
from saecache.export.folder import is_export


def push(out: str | Path, repo_id: str, token: str | None = None) -> str:
    """Create the model repo ``repo_id`` (if needed) and upload the export in ``out``.

    Returns the commit's URL. Any failure (no network, offline mode, no or bad token, no
    rights) is one line; the export folder is left as it is.
    """
    from huggingface_hub import HfApi

    out = Path(out)
    if not out.is_dir() or not is_export(out):
        raise SaecacheError(f"{out} is not a saecache export folder: run saecache export first")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model",
                                   commit_message=f"saecache {__version__} export")
    except Exception as err:  # noqa: BLE001 - the Hub client's errors (HTTP, transport, auth)
        # come from several libraries; all are environment failures the user acts on
        reason = first_line(err)
        raise SaecacheError(f"could not push {out} to the Hub as {repo_id}: {reason} (the "
                            f"export stays in {out}; retry with network and a token)") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
