"""A cache of the labels of a TFDS split, kept once per dataset version.

Scanning the labels of ImageNet's 1.28M records takes minutes; every stage of
every run needs them. The first scan is saved as `<split>-<key>.npy` in
`<TFDS version dir>/discl_jax_label_index/` when that is writable, else in
`$XDG_CACHE_HOME/discl_jax/label_index/<name>/<config>/<version>/`
(`~/.cache` by default; always there for a remote data dir such as gs://). `<key>` hashes the dataset name, config, version,
split and the path, size and modification time of each of the split's data
files, so a rebuilt or changed dataset misses the cache (and its stale index
is removed). Files are written atomically (temporary file, then rename).
Deleting either folder clears the cache.
"""

import hashlib
import json
import logging
import os
import pathlib
import re
import tempfile

import numpy as np

INDEX_DIR = "discl_jax_label_index"


def user_cache_dir():
  """Returns the user cache folder of discl_jax ($XDG_CACHE_HOME or ~/.cache)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(root) / "discl_jax"


def split_identity(b, split):
  """Returns a JSON-able description of TFDS split `split` of builder `b` and its files.

  None when the data files cannot be listed or stat'ed (e.g. under
  tfds.testing.mock_data): such a split is not cached.
  """
  try:
    files = [[*_file_identity(os.fspath(fi.filename)), int(fi.skip), int(fi.take)]
             for fi in b.info.splits[split].file_instructions]
  except Exception as e:  # pylint: disable=broad-except  (tfds raises many kinds)
    logging.info("label index of %s/%s not cached: %s", b.name, split, e)
    return None
  config = b.builder_config.name if b.builder_config else ""
  return {"name": b.name, "config": config, "version": str(b.version),
          "split": split, "files": files}


def _is_remote(path):
  return "://" in path


def _file_identity(path):
  """Returns [path, size, modification time] of a local or remote (gs://...) file."""
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    st = epath.Path(path).stat()
    return [path, st.length, st.mtime]
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _dirs(b, identity):
  """Returns the cache folders to try: the TFDS version dir's (when local), the user cache's."""
  user = user_cache_dir().joinpath("label_index", identity["name"],
                                   identity["config"] or "default", identity["version"])
  data_dir = os.fspath(b.data_dir)
  return [user] if _is_remote(data_dir) else [pathlib.Path(data_dir) / INDEX_DIR, user]


def _file_name(identity):
  split = re.sub(r"[^A-Za-z0-9_.-]", "_", identity["split"])
  key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
  return f"{split}-{key}.npy", f"{split}-*.npy"


def _expected_len(identity):
  return sum(take for _, _, _, _, take in identity["files"])


def _read(path, n):
  try:
    labels = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    logging.warning("ignoring unreadable label index %s: %s", path, e)
    return None
  if labels.dtype != np.int64 or labels.shape != (n,):
    logging.warning("ignoring label index %s: %s %s, expected int64 [%d]", path,
                    labels.dtype, labels.shape, n)
    return None
  return labels


def _write(folder, name, stale_pattern, labels):
  """Writes `labels` atomically to `folder/name`; returns the path or None if unwritable."""
  try:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    with os.fdopen(fd, "wb") as f:
      np.save(f, labels, allow_pickle=False)
    os.replace(tmp, folder / name)
  except OSError as e:
    logging.info("label index not written to %s: %s", folder, e)
    return None
  for stale in folder.glob(stale_pattern):
    if stale.name != name:
      stale.unlink(missing_ok=True)
  return folder / name


def cached_labels(b, split, scan):
  """Returns int64 [N]: the labels of `split`, from the cache or `scan(b, split)` (then saved)."""
  identity = split_identity(b, split)
  if identity is None:
    return scan(b, split)
  name, stale_pattern = _file_name(identity)
  n = _expected_len(identity)
  dirs = _dirs(b, identity)
  for folder in dirs:
    if (folder / name).is_file():
      labels = _read(folder / name, n)
      if labels is not None:
        return labels
  labels = np.asarray(scan(b, split), np.int64)
  for folder in dirs:
    path = _write(folder, name, stale_pattern, labels)
    if path is not None:
      logging.info("label index of %s/%s saved to %s", b.name, split, path)
      break
  return labels
