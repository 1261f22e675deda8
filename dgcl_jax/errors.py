"""The failures a run reports in one line, and how a machine that cannot store a file is recognised.

Standard library only: dgcl_jax/cli.py (imported before jax) reads the same table.
"""

from __future__ import annotations

import errno


class NonFiniteLossError(RuntimeError):
  """A step produced a non-finite loss or parameters; the last good checkpoint is kept."""


class RunEnvironmentError(RuntimeError):
  """The machine cannot do what the run needs (an unusable workdir, a full disk); one line."""


class WorkdirLockedError(RunEnvironmentError):
  """Another live training process holds the run directory."""


# OSError numbers and TensorStore/orbax texts of a machine that cannot store a file.
ENV_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.EIO: "I/O error", errno.ENOTDIR: "not a directory",
              errno.ENOENT: "no such file or directory"}
ENV_TEXTS = (("No space left on device", "no space left on the device"),
             ("Disk quota exceeded", "disk quota exceeded"), ("RESOURCE_EXHAUSTED", "disk full or quota exceeded"),
             ("Read-only file system", "read-only file system"), ("PERMISSION_DENIED", "permission denied"),
             ("Permission denied", "permission denied"))


def os_reason(e: OSError) -> str:
  """'Permission denied: /path' from an OSError."""
  return f"{e.strerror or type(e).__name__}" + (f": {e.filename}" if e.filename else "")


def _chain(e: BaseException | None) -> list[BaseException]:
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    chain.append(e)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return chain


def environment_cause(e: BaseException) -> str | None:
  """A short description if `e` (or an exception in its chain) says the disk is full, a quota is
  exceeded or the directory cannot be written; None otherwise."""
  chain = _chain(e)
  for x in chain:
    if isinstance(x, OSError) and x.errno in ENV_ERRNOS:
      return f"{ENV_ERRNOS[x.errno]} ({os_reason(x)})"
  for x in chain:
    lines = str(x).strip().splitlines()
    for marker, label in ENV_TEXTS:
      found = [line for line in lines if marker in line]
      if found:
        # TensorStore's line names the file first and the system's reason last: keep the reason.
        detail = found[0].split('": ')[-1].strip()
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        return f"{label} ({detail})"
  return None
