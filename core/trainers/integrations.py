"""What a run reaches outside itself through transformers: the trackers of ``training.report_to`` (what they
read from the environment) and the hub (``push_to_hub``: the errors an upload that cannot happen raises)."""

from __future__ import annotations

from pathlib import Path


_WANDB_DIR_SET = False  # whether WANDB_DIR is ours (the run directory of the stage being built)


def tracker_environment(report_to, run_dir: Path) -> None:
    """What the trackers of ``report_to`` read from the environment, set for the run. Weights & Biases: its
    files go to the run directory (WANDB_DIR, unless set), and when WANDB_MODE is unset it runs offline where it
    could not sync, that is with HF_HUB_OFFLINE set or without WANDB_API_KEY (a line says so, and how to sync
    the offline run later); WANDB_MODE=online (after ``wandb login``) syncs as it goes."""
    import importlib.util
    import os

    global _WANDB_DIR_SET
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    wandb = "wandb" in names or ("all" in names and importlib.util.find_spec("wandb") is not None)
    if not wandb:
        return
    if _WANDB_DIR_SET or "WANDB_DIR" not in os.environ:
        os.environ["WANDB_DIR"] = str(run_dir)
        _WANDB_DIR_SET = True
    if os.environ.get("WANDB_MODE"):
        return
    from ..validate import hub_offline

    why = "HF_HUB_OFFLINE is set" if hub_offline() else "WANDB_API_KEY is not set" \
        if not os.environ.get("WANDB_API_KEY") else None
    if why is not None:
        os.environ["WANDB_MODE"] = "offline"
        print(f"posttrain: W&B runs offline ({why}): its run is written under {run_dir / 'wandb'}; upload it with "
              "`wandb sync DIR`, or set WANDB_MODE=online to sync as it goes", flush=True)


def hub_errors() -> tuple:
    """What the hub client raises when an upload cannot happen: its own errors (OSError: HTTP errors, offline
    mode, no token) and its HTTP library's (a refused connection, a timeout), whichever library it uses."""
    import sys

    from huggingface_hub import HfApi  # noqa: F401  (loads the HTTP library the hub client uses)

    errors = [OSError]
    for name in ("httpx", "httpx2", "requests"):
        error = getattr(sys.modules.get(name), "HTTPError", None)
        if isinstance(error, type) and issubclass(error, Exception):
            errors.append(error)
    return tuple(errors)


def short_error(error: BaseException) -> str:
    """An error as one short line: its type and the start of its message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"
