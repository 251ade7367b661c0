"""wandb defaults that never prompt: offline unless a key is configured."""
from __future__ import annotations

import os
from pathlib import Path


def wandb_offline_default() -> bool:
    """True unless WANDB_API_KEY is set or ``wandb login`` stored a key (~/.netrc); WANDB_MODE wins if set."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
