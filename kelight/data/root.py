"""Where kelight finds shared data (read at run time, never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_root() -> Path | None:
    """The shared data folder: ``$KELIGHT_DATA``, else the first existing of ``../shared/data``
    and ``../../shared/data`` relative to the working directory, else ``None``.

    Raises:
        FileNotFoundError: ``$KELIGHT_DATA`` is set but is not a directory.
    """
    env = os.environ.get("KELIGHT_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"$KELIGHT_DATA={env!r} is not a directory; unset it or fix the path")
        return root.resolve()
    for candidate in (Path("../shared/data"), Path("../../shared/data")):
        if (Path.cwd() / candidate).is_dir():
            return (Path.cwd() / candidate).resolve()
    return None
