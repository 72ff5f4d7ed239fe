"""Checks that need neither torch nor transformers, so that an impossible run stops in a second.

``check_available(name, field)``: a model named by a hub id that is not cached while
``HF_HUB_OFFLINE=1`` (or a path that does not exist) is a one-line ``ConfigError`` saying what to
download and how to point the config at a local copy. ``preflight(config_name)`` runs it from the
top of the ``train``/``evaluate`` entrypoints BEFORE their heavy imports (torch and transformers
take several seconds to import on a loaded CPU); it only acts when ``HF_HUB_OFFLINE`` is set, and
leaves every other problem to the normal path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trb_exp import CONF_DIR
from trb_exp.config import ConfigError


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "on", "yes", "true")


def hub_endpoint() -> tuple[str, int]:
    from urllib.parse import urlparse

    u = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint (``HF_ENDPOINT``), given up after ``timeout`` seconds."""
    import socket

    try:
        socket.create_connection(hub_endpoint(), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_available(name: str, field: str = "model") -> None:
    """Fail at once, with one line, when ``name`` cannot be loaded without the network: not
    ``embedded:*``, not a local directory, and (offline) not in the local Hugging Face cache."""
    if name.startswith("embedded:") or Path(name).is_dir():
        return
    if Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"{field}={name!r}: no such model directory; give a directory saved with "
                          "save_pretrained or a hub id such as Qwen/Qwen3-0.6B-Base")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id
        cached = None
    if not hub_offline():
        if not isinstance(cached, str) and not hub_reachable():  # else the hub client retries for a minute
            host = hub_endpoint()[0]
            raise ConfigError(f"{field}={name!r} is not in the local Hugging Face cache and the hub ({host}) cannot "
                              f"be reached from here: download it where the network is (`hf download {name} "
                              f"--local-dir DIR`) and point the config at the copy: {field}=DIR")
        return  # online: from_pretrained downloads it (its errors become one line in models.load_model)
    if not isinstance(cached, str):
        raise ConfigError(
            f"{field}={name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it "
            f"where the hub is reachable (`hf download {name}` fills the cache; `hf download {name} "
            f"--local-dir DIR` makes a copy) and unset HF_HUB_OFFLINE, or point the config at the copy: {field}=DIR"
        )


def preflight(config_name: str, roles: tuple[str, ...] = ("student", "teacher")) -> None:
    """Check the command line's keys (``keys.check_overrides``); compose its config (Hydra's compose API) and
    check its models; print the one-line error and exit 2 if a key is unknown or a model cannot be loaded
    offline. Does nothing when online, for Hydra's own flags
    (--help, --cfg, -m) and when the config does not compose (Hydra then reports that itself)."""
    args = sys.argv[1:]
    from trb_exp.keys import check_overrides

    try:
        check_overrides(args, config_name)  # a misspelt key, with or without +: one line, not Hydra's error
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not hub_offline():
        return
    if any(a.startswith("-") for a in args):
        return
    try:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=[a for a in args if not a.startswith(("hydra.", "hydra/"))])
        names = [(f"model.{r}", cfg.model.get(r)) for r in roles]
    except Exception:
        return
    for field, name in names:
        if name is None:
            continue
        try:
            check_available(str(name), field)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


def check_out_dir(out, flag: str = "--out") -> None:
    """An output directory a long job will fill: refused at once (a ``ConfigError``) when a file is there,
    when it is a directory that already holds files (they would be overwritten), or when it cannot be
    written (a trial directory is made and removed in its nearest existing ancestor)."""
    import tempfile

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: a file is there; give a directory (it is created if missing)")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{flag} {out}: the directory exists and holds files, which would be overwritten; "
                          "give a new directory (it is created) or an empty one")
    base = out.absolute()
    while not base.exists():
        base = base.parent
    try:
        Path(tempfile.mkdtemp(prefix=".trb_exp-write-test-", dir=base)).rmdir()
    except OSError as e:
        raise ConfigError(f"{flag} {out}: cannot write there ({base}: {e.strerror}); give a writable "
                          "directory") from None
