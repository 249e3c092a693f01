"""The spectrum store: generated images on disk plus append-only manifest shards.

Layout under `root` (= workdir/spectrum):

  {class}/{source}/lambda{L:.2f}_seed{S}.png   one image (L = 1 - strength)
  {class}/{source}/lambda{L:.2f}_seed{S}_retry{A}.png   regeneration attempt A
  manifest-{process:05d}.jsonl                  one row per image (its sha256, bytes), per process
  scores-{process:05d}.jsonl                    CLIP scores (of which sha256), per process
  generation.json                               the generation fingerprint (`provenance`)
  score.provenance.json                         the scoring config fingerprint (`provenance`)

Each process writes only its own shards and its own image files; readers merge
all shards. Images are written atomically before their manifest row, so after a
kill the only possible damage is a file without a row (re-added by
`reconcile`), a torn last manifest line (trimmed), or a leftover temp file of
our own atomic writes (removed). Nothing else under `root` is ever deleted:
files the store did not write are left where they are. An image whose size or
sha256 no longer matches its row (truncated, overwritten, replaced) loses its
row, so `generate` makes it again; rows of older stores without a checksum are
taken as they are. Only the shard names above are read: any other file beside
them (`scores-00000.old.jsonl`) is ignored with a warning.
"""

import hashlib
import io
import json
import pathlib
import re

import jax
import numpy as np
from absl import logging
from PIL import Image

from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.data import records

GENERATION = "generation.json"
SCORE_PROVENANCE = "score.provenance.json"
MANIFEST_GLOB = "manifest-*.jsonl"
SCORES_GLOB = "scores-*.jsonl"
_SHARD_NAME = re.compile(r"^(manifest|scores)-\d{5}\.jsonl$")  # exactly what the store writes
ROW_KEYS = ("job_id", "source_id", "label", "class_name", "strength",
            "image_guidance", "seed", "prompt", "path")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# The temp file of an atomic write (workdir.atomic_write_bytes: mkstemp's 8 random characters).
_IMAGE_NAME = re.compile(r"^lambda\d+\.\d\d_seed-?\d+\.png$")  # relative_path's file name
_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def job_id(source_id, strength, seed, attempt=0):
  """Returns the id of the job making `source_id` at `strength` with `seed` (and `attempt`)."""
  base = f"{source_id}|s{float(strength):.3f}|seed{int(seed)}"
  return f"{base}|retry{int(attempt)}" if attempt else base


def image_guidance(strength):
  """Returns lambda = 1 - strength, rounded to 6 decimals."""
  return round(1.0 - float(strength), 6)


def safe_component(name):
  """Returns `name` as one safe path component (unsafe characters become "_")."""
  safe = _UNSAFE.sub("_", str(name)).strip(".")
  return safe or "_"


def relative_path(class_name, source_id, guidance, seed, attempt=0):
  """Returns the image path of one job, relative to the store root (a str)."""
  retry = f"_retry{int(attempt)}" if attempt else ""
  return (f"{safe_component(class_name)}/{safe_component(source_id)}/"
          f"lambda{float(guidance):.2f}_seed{int(seed)}{retry}.png")


def make_row(*, source_id, label, class_name, strength, seed, prompt, attempt=0):
  """Returns the manifest row (dict) of one job, path included.

  A regeneration attempt (`attempt` > 0, `score.regenerate`) also records
  `attempt` and `original_job_id`, the job it regenerates.
  """
  guidance = image_guidance(strength)
  row = dict(
      job_id=job_id(source_id, strength, seed, attempt), source_id=str(source_id),
      label=int(label), class_name=str(class_name), strength=float(strength),
      image_guidance=guidance, seed=int(seed), prompt=str(prompt),
      path=relative_path(class_name, source_id, guidance, seed, attempt))
  if attempt:
    row.update(attempt=int(attempt), original_job_id=job_id(source_id, strength, seed))
  return row


def with_digest(row, data):
  """Returns manifest `row` with the sha256 and size of its image bytes `data`."""
  sha256, size = image_digest(data)
  return dict(row, sha256=sha256, bytes=size)


def attempt_of(row):
  """Returns the regeneration attempt of manifest `row` (0: the job's first image)."""
  return int(row.get("attempt", 0))


def original_job_id(row):
  """Returns the id of the job `row` is an attempt of (its own id for attempt 0)."""
  return row.get("original_job_id", row["job_id"])


def encode_png(image_uint8):
  """Returns PNG bytes of a uint8 H x W x 3 array."""
  image = np.asarray(image_uint8)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f"spectrum images must be uint8 H x W x 3, got {image.dtype} {image.shape}")
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def image_digest(data):
  """Returns (sha256 hex digest, size in bytes) of image file bytes `data`."""
  return hashlib.sha256(data).hexdigest(), len(data)


def mismatch(path, row):
  """Returns why the file at `path` differs from manifest `row` ("" when it matches or the
  row, from an older store, records no checksum); a missing file is a mismatch too."""
  if "sha256" not in row:
    return ""
  try:
    size = path.stat().st_size
  except FileNotFoundError:
    return "missing"
  if size != row["bytes"]:
    return f"{size} bytes, the manifest says {row['bytes']}"
  if image_digest(path.read_bytes())[0] != row["sha256"]:
    return "its sha256 differs from the manifest's"
  return ""


def read_verified(path, row):
  """Returns the bytes of the image of manifest `row` at `path`; BadImageError names the file
  and the remedy when they differ from the row's checksum (damaged or replaced)."""
  try:
    data = path.read_bytes()
  except FileNotFoundError as e:
    raise records.BadImageError(f"image file not found: {path}") from e
  except OSError as e:
    raise records.BadImageError(f"cannot read {path}: {e}") from e
  if "sha256" in row and image_digest(data) != (row["sha256"], row["bytes"]):
    raise records.BadImageError(
        f"{path} does not match its manifest row (damaged or replaced after generate wrote "
        "it): rerun the generate stage, which makes it again")
  return data


class SpectrumStore:
  """Generated images and their manifest under `root`, seen from one process."""

  def __init__(self, root, process_index=None, process_count=None):
    self.root = pathlib.Path(root)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.manifest_path = self.root / f"manifest-{self.process_index:05d}.jsonl"
    self.scores_path = self.root / f"scores-{self.process_index:05d}.jsonl"
    self._done = None
    self._warned = set()

  def reconcile(self, expected_rows=None):
    """Makes this process's manifest shard agree with the files; returns counts.

    Drops rows whose image is missing and duplicate rows, repairs a torn last
    line, re-adds image files without a row when `expected_rows` (rows from
    `make_row`) names their job and this process owns it, and removes the
    leftover temp files of this process's own atomic writes. Every other file
    is left alone (counted as left_unknown, or left_foreign when another
    process may own it): the store never deletes what it did not write.
    Returns a dict of counts.
    """
    self.root.mkdir(parents=True, exist_ok=True)
    counts = dict(kept=0, dropped_missing=0, dropped_duplicate=0, dropped_damaged=0,
                  readded=0, removed_temp=0, left_unknown=0, left_foreign=0)
    raw = self.manifest_path.read_text(encoding="utf-8") if self.manifest_path.exists() else ""
    own_rows = wd.read_jsonl(self.manifest_path)
    kept, seen, damaged = [], set(), {}
    for number, row in enumerate(own_rows, start=1):
      missing = [k for k in ROW_KEYS if k not in row]
      if missing:
        raise ValueError(f"{self.manifest_path}: row {number} lacks key(s) {missing}")
      reason = "" if row["job_id"] in seen else mismatch(self.root / row["path"], row)
      if row["job_id"] in seen:
        counts["dropped_duplicate"] += 1
      elif not (self.root / row["path"]).is_file():
        counts["dropped_missing"] += 1
      elif reason:
        counts["dropped_damaged"] += 1
        damaged[row["path"]] = reason
      else:
        seen.add(row["job_id"])
        kept.append(row)
    other_paths = {row["path"] for row in self._other_shard_rows()}
    expected = {row["path"]: row for row in (expected_rows or ())}
    recorded = {row["path"] for row in kept} | other_paths
    unknown = []
    for file in sorted(self.root.rglob("*")):
      if not file.is_file():
        continue
      rel = file.relative_to(self.root).as_posix()
      temp = _TEMP.match(file.name)
      if temp:
        target = file.parent / temp.group("target")
        if self._wrote_temp(target, expected):
          file.unlink()
          counts["removed_temp"] += 1
          continue
      elif rel in recorded or rel in damaged or file.parent == self.root:
        continue
      row = expected.get(rel)
      if not temp and row is not None and self._owns(row["job_id"]) and row["job_id"] not in seen:
        kept.append(with_digest(row, file.read_bytes()))
        seen.add(row["job_id"])
        counts["readded"] += 1
      elif self.process_count == 1:
        counts["left_unknown"] += 1
        unknown.append(rel)
      else:
        counts["left_foreign"] += 1
    counts["kept"] = len(kept)
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in kept)
    if text != raw:
      wd.atomic_write_text(self.manifest_path, text)
    self._done = None
    if damaged:
      first = next(iter(damaged))
      logging.warning("spectrum store %s: %d image(s) no longer match their manifest row and "
                      "will be generated again, e.g. %s (%s)", self.root, len(damaged), first,
                      damaged[first])
    if unknown:
      logging.warning("spectrum store %s: left %d file(s) that no job of this run wrote "
                      "(not deleted), e.g. %s", self.root, len(unknown), unknown[0])
    if any(counts[k] for k in counts if k != "kept"):
      logging.info("spectrum store %s reconciled: %s", self.root, counts)
    return counts

  def done_job_ids(self):
    """Returns the set of job ids with an image, over every process's shard."""
    if self._done is None:
      self._done = {row["job_id"] for row in self._all_manifest_rows()}
    return set(self._done)

  def add(self, row, image_uint8):
    """Writes the image atomically, then appends `row` to this process's shard."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
      raise ValueError(f"spectrum row for {row.get('job_id')!r} lacks key(s) {missing}")
    data = encode_png(image_uint8)
    wd.atomic_write_bytes(self.root / row["path"], data)
    wd.append_jsonl(self.manifest_path, [with_digest(row, data)])
    if self._done is not None:
      self._done.add(row["job_id"])

  def rows(self):
    """Returns every manifest row (all shards, one per job id) with scores merged.

    Each row gains clip_text, clip_source and score_error (None when unscored;
    the last score row of a job wins, and a score of other image bytes than the
    row's, an image made again since, counts as none).
    """
    scores = {}
    for shard in self._shards(SCORES_GLOB):
      for score in wd.read_jsonl(shard):
        scores[score["job_id"]] = score
    merged = []
    for row in self._all_manifest_rows():
      score = scores.get(row["job_id"], {})
      if score.get("sha256", row.get("sha256")) != row.get("sha256"):
        score = {}
      merged.append(dict(row, clip_text=score.get("clip_text"),
                         clip_source=score.get("clip_source"),
                         score_error=score.get("error")))
    return merged

  def repair_scores(self):
    """Drops a torn last line (a kill mid-append) of this process's score shard; returns None."""
    if not self.scores_path.exists():
      return
    data = self.scores_path.read_bytes()
    if data and not data.endswith(b"\n"):
      wd.atomic_write_bytes(self.scores_path, data[:data.rfind(b"\n") + 1])
      logging.info("spectrum store %s: dropped a torn last score line", self.root)

  def add_scores(self, score_rows):
    """Appends `score_rows` ({job_id, clip_text, clip_source, error}) to this process's shard."""
    score_rows = list(score_rows)
    for row in score_rows:
      if "job_id" not in row:
        raise ValueError(f"score row without job_id: {row!r}")
    if score_rows:
      wd.append_jsonl(self.scores_path, score_rows)

  def read_image(self, row):
    """Returns the image of manifest `row` as uint8 H x W x 3 after checking its bytes against
    the row's checksum; BadImageError names the file (damaged, replaced or undecodable)."""
    path = self.image_path(row)
    try:
      return records.read_rgb(io.BytesIO(read_verified(path, row)))
    except records.BadImageError as e:
      if str(path) in str(e):
        raise
      raise records.BadImageError(f"cannot decode image file {path}: {e.__cause__}") from e

  def damaged(self, rows):
    """Returns [(path, why)] of the rows whose image differs from its manifest checksum."""
    found = []
    for row in rows:
      reason = mismatch(self.image_path(row), row)
      if reason:
        found.append((self.image_path(row), reason))
    return found

  def image_path(self, row):
    """Returns the absolute pathlib.Path of the image of manifest `row`."""
    return self.root / row["path"]

  def owned(self, rows):
    """Returns the rows of `rows` whose job this process owns (all of them on one process)."""
    return [r for r in rows if self._owns(r["job_id"])]

  def _owns(self, job):
    return self.process_count == 1 or seeding.process_owns(
        job, self.process_index, self.process_count)

  def _wrote_temp(self, target, expected):
    """Returns True when `target` is a file this process writes atomically here."""
    if target in (self.manifest_path, self.scores_path) or (
        target == self.root / GENERATION and self.process_index == 0):
      return True
    row = expected.get(target.relative_to(self.root).as_posix())
    if row is not None:
      return self._owns(row["job_id"])
    return self.process_count == 1 and target.parent != self.root and bool(
        _IMAGE_NAME.match(target.name))

  def _shards(self, pattern):
    """Returns the shard files of `pattern` under root, sorted; warns once about every other
    file the pattern matches (not a name the store writes, so never read)."""
    shards = []
    for file in sorted(self.root.glob(pattern)):
      if _SHARD_NAME.match(file.name):
        shards.append(file)
      elif file not in self._warned:
        self._warned.add(file)
        logging.warning("spectrum store %s: ignoring %s, not a shard name the store writes "
                        "(manifest-NNNNN.jsonl, scores-NNNNN.jsonl)", self.root, file.name)
    return shards

  def _all_manifest_rows(self):
    rows, seen = [], set()
    for shard in self._shards(MANIFEST_GLOB):
      for row in wd.read_jsonl(shard):
        if row.get("job_id") not in seen:
          seen.add(row.get("job_id"))
          rows.append(row)
    return rows

  def _other_shard_rows(self):
    return [row for shard in self._shards(MANIFEST_GLOB)
            if shard != self.manifest_path for row in wd.read_jsonl(shard)]


def to_labeled_images(rows, class_names, root):
  """Returns the rows' images as path-backed LabeledImages (ids are job ids)."""
  root = pathlib.Path(root)
  rows = list(rows)
  return records.LabeledImages(
      ids=np.asarray([row["job_id"] for row in rows], dtype=object),
      labels=np.asarray([row["label"] for row in rows], dtype=np.int32),
      class_names=tuple(class_names),
      paths=np.asarray([str(root / row["path"]) for row in rows], dtype=object))
