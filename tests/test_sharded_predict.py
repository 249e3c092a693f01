"""Multi-host evaluation: two jax.distributed CPU processes each decode half of a split,
and the gathered predictions equal a single-process run's."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from discl_jax import config as config_lib
from discl_jax import parallel
from discl_jax.data import datasets
from discl_jax.train import loop

SPLIT_SIZE = 30     # digits-LT test split below; padded to 32 by the eval batch of 8

_CHILD = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{{sys.argv[1]}}", num_processes=2,
                               process_id=int(sys.argv[2]))
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_sharded_predict import make_config, predict_counting_decodes
    out, decoded = predict_counting_decodes(make_config())
    np.savez(sys.argv[3], decoded=decoded, **out)
    """)


def make_config():
  """Returns a tiny ResNet on 16 px digits-LT with an eval batch of 8."""
  c = config_lib.base_config()
  c.data.test_per_class = SPLIT_SIZE // 10
  c.data.image_size = 16
  c.train.model = "tiny"
  c.train.batch_size = 8
  c.eval.batch_size = 8
  return c


def predict_counting_decodes(config):
  """Returns (Trainer.predict of the initial state on the test split, images this process decoded)."""
  test = _CountingImages(datasets.load(config.data)["test"])
  assert len(test) == SPLIT_SIZE
  trainer = loop.Trainer(config, np.ones(10, np.int64), parallel.make_mesh())
  return trainer.predict(trainer.initial_state(), test), test.decoded


class _CountingImages:
  """`split` (LabeledImages) counting its `image` calls in `decoded`."""

  def __init__(self, split):
    self.split, self.labels, self.decoded = split, split.labels, 0

  def __len__(self):
    return len(self.split)

  def image(self, index):
    self.decoded += 1
    return self.split.image(index)


def test_two_processes_decode_half_each_and_gather_the_single_process_predictions(tmp_path):
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(tests=os.path.dirname(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = []
  for p in range(2):
    log = open(tmp_path / f"log{p}.txt", "wb")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, str(script), str(port), str(p),
                                   str(tmp_path / f"out{p}.npz")],
                                  env=env, stdout=log, stderr=subprocess.STDOUT))
  for p, proc in enumerate(procs):
    try:
      proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
    assert proc.returncode == 0, (tmp_path / f"log{p}.txt").read_text()[-3000:]

  single, decoded = predict_counting_decodes(make_config())
  assert decoded == 32                                 # the padded split, on one process
  for p in range(2):
    out = dict(np.load(tmp_path / f"out{p}.npz"))
    assert int(out.pop("decoded")) == 16               # its half, not the whole split
    assert set(out) == set(single)
    np.testing.assert_array_equal(out["label"], single["label"])
    np.testing.assert_array_equal(out["pred"], single["pred"])
    np.testing.assert_allclose(out["prob_true"], single["prob_true"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["loss"], single["loss"], rtol=1e-5, atol=1e-6)
