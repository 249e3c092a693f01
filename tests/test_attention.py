"""The UNet's attention implementations (attention.py): parity, auto's choice, errors, plumbing."""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax.diffusion import attention
from discl_jax.diffusion import sampler
from discl_jax.diffusion import spectrum_run
from discl_jax.models import tiny
from discl_jax.models import unet as unet_lib

HEADS, HEAD_DIM, BATCH = 2, 8, 2
# 8 query rows per chunk on [BATCH * HEADS, chunk, Lk] scores: 37 queries are 4 chunks of 8 + 5.
SMALL_CHUNK_BYTES = 4 * BATCH * HEADS * 77 * 8


def _reference(q, k, v, heads, mask=None):
  """float64 numpy softmax(q k^T / sqrt(d)) v on [B, L, heads * d] (keys where `mask` is False left out)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
  qh, kh, vh = split(q), split(k), split(v)
  scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(qh.shape[-1])
  if mask is not None:
    scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  out = (probs / probs.sum(-1, keepdims=True)) @ vh
  return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def _inputs(lq, lk, dtype, heads=HEADS, head_dim=HEAD_DIM):
  rng = np.random.default_rng(0)
  shape = lambda n: (BATCH, n, heads * head_dim)
  # Spread-out scores, so a wrong normalisation or scale shows.
  return tuple(jnp.asarray(rng.normal(0, 2, shape(n)), dtype) for n in (lq, lk, lk))


IMPLEMENTATIONS_ON_CPU = {
    "xla": attention.xla,
    "chunked": attention.chunked,
    "chunked, 8-query chunks": functools.partial(attention.chunked,
                                                 max_score_bytes=SMALL_CHUNK_BYTES),
    "auto": functools.partial(attention.attention, implementation="auto"),
}


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS_ON_CPU))
@pytest.mark.parametrize("lq,lk,dtype,atol", [
    (37, 37, jnp.float32, 2e-5),      # self-attention, 37 queries: the chunk does not divide Lq
    (37, 77, jnp.float32, 2e-5),      # cross-attention to 77 text tokens
    (37, 77, jnp.bfloat16, 6e-2),     # bfloat16 projections (probabilities and output rounded)
])
def test_matches_float64_reference(name, lq, lk, dtype, atol):
  q, k, v = _inputs(lq, lk, dtype)
  got = jax.jit(functools.partial(IMPLEMENTATIONS_ON_CPU[name], heads=HEADS))(q, k, v)
  assert got.shape == q.shape and got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), _reference(q, k, v, HEADS),
                             atol=atol, rtol=0)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS_ON_CPU))
def test_masked_attention_matches_float64_reference(name):
  """The CLIP text encoder's masks: causal, and padding keys of the second row left out."""
  q, k, v = _inputs(37, 37, jnp.float32)
  mask = np.tril(np.ones((BATCH, 37, 37), bool))
  mask[1, :, 30:] = False
  got = jax.jit(functools.partial(IMPLEMENTATIONS_ON_CPU[name], heads=HEADS))(q, k, v, mask=mask)
  np.testing.assert_allclose(np.asarray(got, np.float64), _reference(q, k, v, HEADS, mask),
                             atol=2e-5, rtol=0)


def test_query_chunk_bounds_the_score_block():
  rows, lq, lk = BATCH * HEADS, 37, 77
  assert attention.query_chunk(rows, lq, lk, SMALL_CHUNK_BYTES) == 8
  assert attention.query_chunk(rows, lq, lk, 2**40) == lq  # everything fits: one chunk
  for budget in (4 * rows * lk * n for n in (8, 9, 16, 20, 36)):
    size = attention.query_chunk(rows, lq, lk, budget)
    assert 4 * rows * size * lk <= budget and 8 <= size <= lq
  # The fewest chunks that fit, of equal length: 1024 queries in 24-query room -> 42 x 24 + 16.
  assert attention.query_chunk(1, 1024, 1, 4 * 24) == 24
  assert attention.query_chunk(1, 256, 1, 4 * 200) == 128  # 2 x 128, not 200 + 56


def test_cudnn_runs_on_gpu_against_the_reference():
  if jax.default_backend() != "gpu":
    pytest.skip("cudnn attention needs a GPU")
  q, k, v = _inputs(37, 77, jnp.bfloat16, heads=4, head_dim=16)
  got = jax.jit(functools.partial(attention.cudnn, heads=4))(q, k, v)
  np.testing.assert_allclose(np.asarray(got, np.float64), _reference(q, k, v, 4), atol=6e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_cudnn_off_gpu_is_a_clear_error(dtype):
  if jax.default_backend() == "gpu":
    pytest.skip("the backend is a GPU")
  q = jnp.zeros((1, 4, 16), dtype)
  with pytest.raises(ValueError, match=r"diffusion.attention='cudnn' cannot run here: it needs "
                     rf"a GPU, the backend is '{jax.default_backend()}'; use 'auto', 'xla' or"):
    jax.jit(functools.partial(attention.attention, heads=2, implementation="cudnn"))(q, q, q)


@pytest.mark.parametrize("backend,dtype,head_dim,reason", [
    ("cpu", "bfloat16", 64, "needs a GPU"),
    ("tpu", "bfloat16", 64, "needs a GPU"),
    ("gpu", "float32", 64, "float16 or bfloat16 inputs, got float32"),
    ("gpu", "bfloat16", 20, "multiple of 8 and <= 256, got 20"),
    ("gpu", "float16", 320, "multiple of 8 and <= 256, got 320"),
])
def test_cudnn_problem_names_the_reason(backend, dtype, head_dim, reason):
  assert reason in attention.cudnn_problem(backend, dtype, head_dim)
  assert attention.cudnn_problem("gpu", "bfloat16", 64) is None


@pytest.mark.parametrize("backend,dtype,lq,lk,heads,head_dim,want", [
    # The shipped digit generator (8x8 and 4x4 latents, 4 heads): today's computation on CPU.
    ("cpu", "float32", 64, 64, 4, 8, "xla"),
    ("cpu", "float32", 64, 77, 4, 8, "xla"),
    ("cpu", "float32", 16, 16, 4, 16, "xla"),
    # CPU: chunked where one (batch, head) pair's Lq x Lk reaches 2^23 (bench_attention.py).
    ("cpu", "float32", 256, 256, 8, 4, "xla"),         # the tiny geometry's 16x16 level
    ("cpu", "float32", 1024, 1024, 4, 16, "xla"),      # the small geometry's 32x32 level
    ("cpu", "float32", 2048, 2048, 64, 16, "xla"),
    ("cpu", "float32", 4096, 4096, 8, 40, "chunked"),  # SD 1.5 512x512's 64x64 level
    ("cpu", "bfloat16", 4096, 4096, 1, 40, "chunked"),
    ("cpu", "float32", 4096, 77, 8, 40, "xla"),
    # GPU in half precision with head dims every cuDNN GPU takes: cudnn at any length.
    ("gpu", "bfloat16", 4096, 4096, 8, 40, "cudnn"),
    ("gpu", "float16", 64, 77, 8, 128, "cudnn"),
    ("gpu", "bfloat16", 256, 256, 8, 160, "xla"),      # SD 1.5's 160-dim heads: not on pre-Hopper
    ("gpu", "bfloat16", 4096, 4096, 2, 20, "chunked"), # head dim not a multiple of 8
    # GPU float32 / TPU: chunked only where one example's scores reach 2^23 (32 MiB).
    ("gpu", "float32", 4096, 4096, 8, 40, "chunked"),  # SD 1.5 512x512's 64x64 level
    ("gpu", "float32", 1024, 1024, 8, 80, "chunked"),  # ... and its 32x32 level
    ("gpu", "float32", 768, 768, 12, 64, "xla"),       # the refiner's 24x32 level at 384x512
    ("gpu", "float32", 4096, 77, 8, 40, "xla"),
    ("tpu", "bfloat16", 4096, 4096, 8, 40, "chunked"),
    ("tpu", "bfloat16", 1024, 77, 10, 64, "xla"),
])
def test_auto_choice(backend, dtype, lq, lk, heads, head_dim, want):
  assert attention.choose(backend, jnp.dtype(dtype), lq, lk, heads, head_dim) == want


def test_unknown_implementation_is_named():
  q = jnp.zeros((1, 4, 16))
  with pytest.raises(ValueError, match=r"diffusion.attention must be one of .*got 'flash'"):
    attention.attention(q, q, q, 2, "flash")


def test_bad_config_value_suggests_the_near_miss():
  config = config_lib.base_config()
  assert config.diffusion.attention == "auto"
  config.diffusion.attention = "chunkd"
  with pytest.raises(ValueError, match=r"diffusion.attention='chunkd' is not one of "
                     r".*did you mean 'chunked'"):
    config_checks.validate(config)


def test_tiny_unet_chunked_matches_xla(monkeypatch):
  """A tiny SD UNet at 6x10 latents (60 and 15 tokens) in 8-query chunks: xla's output."""
  monkeypatch.setitem(attention.CHUNK_SCORE_BYTES, "cpu", 4)  # every chunk MIN_CHUNK queries
  config = tiny.sd_configs(100, 0, 1)[0]
  unet = unet_lib.from_config(config)
  params = tiny.random_params(jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)), 0, "u")
  rng = np.random.default_rng(0)
  sample = rng.normal(0, 1, (2, 4, 6, 10)).astype(np.float32)
  context = rng.normal(0, 1, (2, 77, config["cross_attention_dim"])).astype(np.float32)
  timesteps = np.asarray([981, 1], np.int32)

  def run(implementation):
    module = unet.clone(attention=implementation)
    return np.asarray(jax.jit(lambda p: module.apply({"params": p}, sample, timesteps, context
                                                     ).sample)(params))

  want, got = run("xla"), run("chunked")
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
  assert "attention" not in unet.config  # a run-time choice, not a config.json entry


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return tiny.build_sd(tmp_path_factory.mktemp("attention") / "sd", seed=0)


def test_sampler_and_config_choose_the_unet_attention(tiny_checkpoint):
  config = config_lib.base_config()
  config.diffusion.attention = "chunked"
  s = spectrum_run.make_sampler(config, str(tiny_checkpoint))
  assert s.models.unet.attention == s.models.vae.attention == "chunked"
  assert s.models.text_encoder.attention == "chunked"  # every network: diffusion.attention
  assert inspect.signature(sampler.SpectrumSampler).parameters["attention"].default == "auto"
  xla = dataclasses.replace(s.models, unet=s.models.unet.clone(attention="xla"))
  # Each implementation compiles its own step.
  assert sampler._signature(xla, s.schedule, s.mesh) != sampler._signature(  # pylint: disable=protected-access
      s.models, s.schedule, s.mesh)
  with pytest.raises(ValueError, match=r"diffusion.attention must be one of .*got 'flash'"):
    sampler.SpectrumSampler(s.models, attention="flash")
