"""Seconds to load the labels of a large generated TFDS dataset: first (scan) and cached.

Builds a generated ArrayRecord TFDS dataset (tests/tfds_fixture.py, tiny
images, no TensorFlow) of `--records` train records in a temporary data_dir,
then times `tfds_source.load` (data.name=tfds) twice: the first load scans
every record's label and writes the label index (discl_jax/data/label_index.py),
the second reads it.

  python experiments/bench_label_index.py                  # 100k records
  python experiments/bench_label_index.py --records=2000   # smoke size
Wall and process CPU seconds of each load (CPU time is the figure to trust
on a shared machine). The generated records are tiny (8x8 PNGs): on ImageNet
(~110 kB a record) the first scan also reads ~140 GB, the cached load does not.
Prints the figures and writes experiments/results/bench_label_index.json.
"""

import json
import os
import pathlib
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags

from discl_jax import config as config_lib
from discl_jax.data import datasets

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import tfds_fixture  # pylint: disable=g-import-not-at-top,wrong-import-position

_RECORDS = flags.DEFINE_integer("records", 100_000, "train records (test gets a quarter)")
_OUT = flags.DEFINE_string(
    "out", str(pathlib.Path(__file__).parent / "results" / "bench_label_index.json"),
    "where the JSON results go")


def _timed_load(data_dir):
  c = config_lib.base_config().data
  c.name, c.tfds_name, c.data_dir, c.val_per_class = "tfds", tfds_fixture.NAME, data_dir, 0
  start, cpu = time.perf_counter(), time.process_time()
  splits = datasets.load(c)
  return time.perf_counter() - start, time.process_time() - cpu, splits


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
    start = time.perf_counter()
    tfds_fixture.build(tmp, num_records=_RECORDS.value)
    build_s = time.perf_counter() - start
    first_s, first_cpu_s, first = _timed_load(tmp)
    cached_s, cached_cpu_s, cached = _timed_load(tmp)
    assert (first["train"].labels == cached["train"].labels).all()
    records = len(first["train"]) + len(first["test"])
  result = {"records": records, "build_s": round(build_s, 2),
            "first_load_s": round(first_s, 3), "cached_load_s": round(cached_s, 3),
            "first_load_cpu_s": round(first_cpu_s, 3), "cached_load_cpu_s": round(cached_cpu_s, 3),
            "speedup": round(first_s / cached_s, 1), "load_average": os.getloadavg(),
            "machine": platform.platform(), "cpus": os.cpu_count()}
  print(f"{records} records (train + test): first load {first_s:.2f} s "
        f"({first_cpu_s:.2f} s CPU; label scan), cached load {cached_s:.3f} s "
        f"({cached_cpu_s:.3f} s CPU; {first_s / cached_s:.0f}x); "
        f"load average {os.getloadavg()[0]:.1f}")
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
