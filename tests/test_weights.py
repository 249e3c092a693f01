"""models/weights.py: the layouts a hub snapshot has (one format per folder, shards + index, fp16)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from discl_jax.models import tiny
from discl_jax.models import weights

SHAPES = {"down_blocks_0": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32),
                                     "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
                            "norm": {"scale": jax.ShapeDtypeStruct((4,), jnp.float32)}},
          "proj": {"kernel": jax.ShapeDtypeStruct((4, 6), jnp.float32)}}


@pytest.fixture(scope="module")
def state():
  """(params, the same as PyTorch-named float32 tensors)."""
  params = tiny.random_params(SHAPES, 0, "weights")
  return params, weights.to_pytorch_state_dict(params)


def _assert_params(got, want, atol=0.0):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def _write_shards(folder, state, stem, variant=""):
  """Writes `state` as two shards and the index diffusers / transformers write; returns the names."""
  names = sorted(state)
  dtype = np.float16 if variant else np.float32
  shards = {}
  for i, part in enumerate((names[:2], names[2:])):
    shard = f"{stem}{'.' + variant if variant else ''}-0000{i + 1}-of-00002.safetensors"
    save_file({k: state[k].astype(dtype) for k in part}, str(folder / shard))
    shards.update(dict.fromkeys(part, shard))
  index = (f"{stem}.safetensors.index.{variant}.json" if variant
           else f"{stem}.safetensors.index.json")
  (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": shards}))
  return index, sorted(set(shards.values()))


def test_sharded_safetensors_load_through_their_index(tmp_path, state):
  params, pt = state
  index, shards = _write_shards(tmp_path, pt, "diffusion_pytorch_model")
  assert weights.pytorch_files(tmp_path, "diffusers") == ("safetensors", [tmp_path / s for s in shards])
  _assert_params(weights.load_params(tmp_path, SHAPES, "diffusers"), params)
  (tmp_path / shards[1]).unlink()
  with pytest.raises(FileNotFoundError, match=f"{index}.*{shards[1]}"):
    weights.load_params(tmp_path, SHAPES, "diffusers")


def test_fp16_variant_sharded_or_single_and_full_precision_first(tmp_path, state):
  params, pt = state
  _write_shards(tmp_path, pt, "diffusion_pytorch_model", variant="fp16")
  _assert_params(weights.load_params(tmp_path, SHAPES, "diffusers"), params, atol=2e-3)
  single = tmp_path / "single"
  single.mkdir()
  save_file({k: v.astype(np.float16) for k, v in pt.items()}, str(single / "model.fp16.safetensors"))
  _assert_params(weights.load_params(single, SHAPES, "transformers"), params, atol=2e-3)
  save_file(pt, str(single / "model.safetensors"))  # full precision wins when both are there
  _assert_params(weights.load_params(single, SHAPES, "transformers"), params)


def test_msgpack_first_and_torch_bin_last(tmp_path, state):
  params, pt = state
  torch = pytest.importorskip("torch", reason=".bin pickles load through torch")
  torch.save({k: torch.from_numpy(v) for k, v in pt.items()}, tmp_path / "pytorch_model.bin")
  assert weights.pytorch_files(tmp_path, "transformers")[0] == "torch"
  _assert_params(weights.load_params(tmp_path, SHAPES, "transformers"), params)
  weights.save_msgpack(jax.tree.map(lambda x: x * 0, params), tmp_path / "flax_model.msgpack")
  assert all(np.all(x == 0) for x in jax.tree.leaves(
      weights.load_params(tmp_path, SHAPES, "transformers")))


def test_a_folder_without_weights_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=rf"no diffusion_flax_model.msgpack.*'{tmp_path}'"):
    weights.load_params(tmp_path, SHAPES, "diffusers")
