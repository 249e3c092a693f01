"""Mesh sharding of input batches on 8 fake CPU devices (in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np

    from discl_jax import parallel
    from discl_jax.data import pipeline
    from discl_jax.data.records import LabeledImages

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    split = LabeledImages(ids=np.array([f"x/{i}" for i in range(40)]),
                          labels=np.arange(40) % 5, class_names=tuple("abcde"),
                          pixels=rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8))
    picks = np.stack([np.zeros(40, np.int64), np.arange(40)], 1)
    loader = pipeline.train_loader([split], picks, image_size=8, batch_size=16, seed=0,
                                   epoch=0, shard=(0, 1))
    host = dict(next(iter(loader)))
    mesh = parallel.make_mesh()
    batch = parallel.put_batch({"image": host["image"], "label": host["label"]}, mesh)
    result = {"shape": list(batch["image"].shape), "shards_ok": True, "devices": []}
    for shard in batch["image"].addressable_shards:
      index = shard.index[0]
      position = list(mesh.devices).index(shard.device)
      result["devices"].append([position, index.start, index.stop])
      ok = np.array_equal(np.asarray(shard.data), host["image"][index])
      ok &= shard.data.shape == (2, 8, 8, 3)
      result["shards_ok"] = bool(result["shards_ok"] and ok)
    data_spec = jax.sharding.PartitionSpec("data")
    result["spec_ok"] = batch["image"].sharding.spec == data_spec
    total = jax.jit(lambda b: jnp.sum(b["image"], axis=(1, 2, 3)) + b["label"])(batch)
    result["sum_close"] = bool(np.allclose(
        np.asarray(total), host["image"].sum(axis=(1, 2, 3)) + host["label"], rtol=1e-5, atol=1e-4))
    result["sum_sharded"] = total.sharding.spec == data_spec
    replicated = parallel.put_replicated({"w": np.ones(3)}, mesh)
    result["replicated"] = replicated["w"].sharding.is_fully_replicated
    result["batch_sizes"] = list(parallel.batch_sizes(16, 20, mesh))
    try:
      parallel.batch_sizes(12, 20, mesh)
      result["bad_batch"] = ""
    except ValueError as e:
      result["bad_batch"] = str(e)
    subset = parallel.make_mesh((4,), jax.devices()[::-1])
    result["subset"] = [d.id for d in subset.devices.flat] == [d.id for d in jax.devices()[::-1][:4]]
    result["auto"] = subset.axis_types == (jax.sharding.AxisType.Auto,) == mesh.axis_types
    result["mesh_errors"] = []
    for bad in ((9,), (0,), (2, 4)):
      try:
        parallel.make_mesh(bad)
        result["mesh_errors"].append("")
      except ValueError as e:
        result["mesh_errors"].append(str(e))
    print("RESULT" + json.dumps(result))
""")


def test_put_batch_shards_over_8_cpu_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  result = json.loads(line[len("RESULT"):])
  assert result["shape"] == [16, 8, 8, 3]
  assert result["shards_ok"]
  assert sorted(d[0] for d in result["devices"]) == list(range(8))
  # Mesh position i holds rows [2i, 2i + 2).
  assert all(start == 2 * i and stop == 2 * i + 2 for i, start, stop in result["devices"])
  assert result["spec_ok"]
  assert result["sum_close"] and result["sum_sharded"]
  assert result["replicated"]
  assert result["batch_sizes"] == [16, 24]   # eval padded to a multiple of the 8 devices
  assert result["bad_batch"].startswith("train.batch_size=12 must be divisible by the 8 devices")
  # make_mesh: the first devices of the list given, in its order; Auto axis; one-line errors.
  assert result["subset"] and result["auto"]
  assert result["mesh_errors"] == ["mesh.shape (9,) needs 9 devices, have 8",
                                   "mesh.shape (0,) needs 0 devices, have 8",
                                   "mesh.shape must have one entry (data axis), got (2, 4)"]
