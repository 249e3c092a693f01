"""The UNet's attention, softmax(q k^T / sqrt(d)) v, in interchangeable implementations.

Every implementation takes the [B, L, heads * d] query, key and value
projections and an optional boolean `mask` [B or 1, Lq, Lk] (True: attend; the
CLIP text encoder's causal and padding masks) and returns [B, Lq, heads * d]
in the value's dtype; the name is `diffusion.attention` (IMPLEMENTATIONS):

- `xla`: scores and softmax in float32 over whole score rows, then the weighted
  sum of values; on CPU in cache-sized blocks of (batch, head) pairs (the
  UNet's computation before this module; the shipped digit generator's outputs
  are this).
- `chunked`: the same result, memory-bounded: the queries in chunks whose
  float32 score block is at most `CHUNK_SCORE_BYTES`, each normalised after the
  product with the values (exp(s - max) v / sum(exp(s - max)), as flash
  attention does: the [chunk, d] output is divided instead of the [chunk, Lk]
  probabilities). Any backend.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused
  flash attention; GPU only, float16 / bfloat16, head dim a multiple of 8.
- `auto`: `choose(...)` per attention call, from the backend, dtype and shapes.
"""

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")
CACHE_SCORES = 2**16  # xla on CPU: float32 scores per (batch, head) block (256 KiB, inside a core's L2)
CUDNN_DTYPES = ("float16", "bfloat16")
CUDNN_MAX_HEAD_DIM = 256  # cuDNN flash attention's limit on Hopper and later (128 before)
CUDNN_AUTO_MAX_HEAD_DIM = 128  # `auto` picks cudnn only where every cuDNN GPU takes the head dim
# Per backend ("default": any other), the most bytes of one chunk's float32 score block
# [B * heads, chunk, Lk] (a chunk has room for at least MIN_CHUNK queries). CPU: scores and
# their exponentials (2 x 8 MiB) stay in a 32 MiB L3 (bench_attention.py could not separate
# 4, 8 and 16 MiB on a loaded 2-core EPYC); elsewhere a memory bound, not a measured optimum.
CHUNK_SCORE_BYTES = {"cpu": 8 * 2**20, "default": 512 * 2**20}
MIN_CHUNK = 8
# Per backend, `auto` picks `chunked` where the float32 scores xla holds at once reach this:
# on CPU one (batch, head) pair's Lq x Lk (xla's smallest block), elsewhere one example's
# heads x Lq x Lk. CPU (bench_attention.py, 2-core EPYC, 32 MiB L3): xla 2.4x faster at
# 1024^2 (the small geometry), chunked 1.6x faster at 4096^2 (SD 1.5 at 512x512), so the
# bound is a pair's scores filling the L3; the digit generator, tiny and small stay on xla.
# Elsewhere: a memory bound (32 MiB an example), not a measured optimum.
AUTO_CHUNKED_SCORES = {"cpu": 2**23, "default": 2**23}


def _per_backend(table, backend):
  return table.get(backend, table["default"])


def _split_heads(x, heads):
  """Returns [B, L, heads * d] as [B * heads, L, d]."""
  b, length, inner = x.shape
  d = inner // heads
  return x.reshape(b, length, heads, d).transpose(0, 2, 1, 3).reshape(b * heads, length, d)


def score_block(pairs, lq, lk, backend):
  """Returns how many (batch, head) pairs one `xla` block holds: on CPU as many as fit
  CACHE_SCORES (a divisor of `pairs`, at least 1), elsewhere all of them."""
  if backend != "cpu":
    return pairs
  fit = max(1, CACHE_SCORES // (lq * lk))
  return max(n for n in range(1, min(fit, pairs) + 1) if pairs % n == 0)


def _pair_mask(mask, batch, heads):
  """Returns boolean `mask` [B or 1, Lq, Lk] as [B * heads, Lq, Lk] (the pairs' order)."""
  mask = jnp.broadcast_to(mask[:, None], (batch, heads) + mask.shape[1:])
  return mask.reshape((batch * heads,) + mask.shape[2:])


def _masked(scores, mask):
  return scores if mask is None else jnp.where(mask, scores, jnp.finfo(scores.dtype).min)


def xla(query, key, value, heads, mask=None):
  """Returns softmax(q k^T / sqrt(d)) v, [B, Lq, heads * d], normalising whole score rows.

  Scores and softmax in float32 (as PyTorch's fused attention kernels compute
  them), the weighted sum of values in the inputs' dtype. On CPU the (batch,
  head) pairs run `score_block` at a time (a loop, not one [B * heads, Lq, Lk]
  score tensor) so one block's scores stay in cache: a 32-row, 8-head,
  256-token self-attention ran 3.9x faster, bit-identical to the unblocked one.
  """
  b, lq, inner = query.shape
  d = inner // heads
  pairs = b * heads
  block = score_block(pairs, lq, key.shape[1], jax.default_backend())

  def split(x):  # [B, L, H * d] -> [B * H / block, block, L, d]
    return _split_heads(x, heads).reshape(pairs // block, block, x.shape[1], d)

  def one_block(qkvm):
    q, k, v = qkvm[:3]
    scores = jnp.einsum("bid,bjd->bij", q, k, preferred_element_type=jnp.float32) * d**-0.5
    scores = _masked(scores, qkvm[3] if len(qkvm) > 3 else None)
    probs = jax.nn.softmax(scores, axis=2).astype(v.dtype)
    return jnp.einsum("bij,bjd->bid", probs, v)

  blocks = (split(query), split(key), split(value))
  if mask is not None:
    blocks += (_pair_mask(mask, b, heads).reshape(pairs // block, block, lq, key.shape[1]),)
  out = one_block(tuple(x[0] for x in blocks))[None] if block == pairs else jax.lax.map(one_block, blocks)
  return out.reshape(b, heads, lq, d).transpose(0, 2, 1, 3).reshape(b, lq, inner)


def query_chunk(rows, lq, lk, max_score_bytes):
  """Returns the query chunk length: [rows, chunk, lk] float32 scores within `max_score_bytes`.

  The fewest chunks that fit (with room for at least MIN_CHUNK queries each),
  of equal length where possible (at most a shorter last chunk).
  """
  fit = max(MIN_CHUNK, max_score_bytes // (4 * rows * lk))
  return min(lq, -(-lq // -(-lq // fit)))


def _deferred_block(qm, k, v, scale):
  """Returns softmax(q k^T scale) v for `qm` = (queries [R, c, d], mask [R, c, Lk] or None).

  Normalised after the product with v.
  """
  q, mask = qm
  scores = _masked(jnp.einsum("bid,bjd->bij", q, k, preferred_element_type=jnp.float32) * scale,
                   mask)
  weights = jnp.exp(scores - scores.max(axis=2, keepdims=True))
  out = jnp.einsum("bij,bjd->bid", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / weights.sum(axis=2, keepdims=True)).astype(v.dtype)


def chunked(query, key, value, heads, mask=None, max_score_bytes=None):
  """Returns softmax(q k^T / sqrt(d)) v, [B, Lq, heads * d], over query chunks (`query_chunk`).

  Full chunks run under `lax.map` (one chunk's scores live at a time), a
  shorter last chunk after them; each is normalised after its product with v.
  `max_score_bytes` defaults to the backend's CHUNK_SCORE_BYTES.
  """
  b, lq, inner = query.shape
  d = inner // heads
  q, k, v = (_split_heads(x, heads) for x in (query, key, value))
  m = None if mask is None else _pair_mask(mask, b, heads)
  if max_score_bytes is None:
    max_score_bytes = _per_backend(CHUNK_SCORE_BYTES, jax.default_backend())
  size = query_chunk(b * heads, lq, k.shape[1], max_score_bytes)
  block = functools.partial(_deferred_block, k=k, v=v, scale=d**-0.5)
  n = lq // size
  if size == lq:
    out = block((q, m))
  else:
    cut = lambda x: x[:, :n * size].reshape((b * heads, n, size) + x.shape[2:]).swapaxes(0, 1)
    full = (cut(q), None if m is None else cut(m))
    out = jax.lax.map(block, full).transpose(1, 0, 2, 3).reshape(b * heads, n * size, d)
    if lq % size:
      rest = (q[:, n * size:], None if m is None else m[:, n * size:])
      out = jnp.concatenate([out, block(rest)], axis=1)
  return out.reshape(b, heads, lq, d).transpose(0, 2, 1, 3).reshape(b, lq, inner)


def cudnn_problem(backend, dtype, head_dim):
  """Returns why cuDNN flash attention cannot run (backend, dtype or head dim), or None."""
  if backend != "gpu":
    return f"it needs a GPU, the backend is {backend!r}"
  if jnp.dtype(dtype).name not in CUDNN_DTYPES:
    return f"it needs float16 or bfloat16 inputs, got {jnp.dtype(dtype).name} (diffusion.dtype)"
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    return f"it needs a head dim that is a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM}, got {head_dim}"
  return None


def cudnn(query, key, value, heads, mask=None):
  """Returns softmax(q k^T / sqrt(d)) v, [B, Lq, heads * d], from cuDNN's fused flash attention.

  Raises ValueError naming `diffusion.attention` off a GPU, for float32 inputs
  or a head dim cuDNN does not take.
  """
  b, lq, inner = query.shape
  d = inner // heads
  problem = cudnn_problem(jax.default_backend(), query.dtype, d)
  if problem:
    raise ValueError(f"diffusion.attention='cudnn' cannot run here: {problem}; "
                     "use 'auto', 'xla' or 'chunked'")
  split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d)  # [B, L, H, d]
  out = jax.nn.dot_product_attention(split(query), split(key), split(value),
                                     mask=None if mask is None else mask[:, None],
                                     implementation="cudnn")
  return out.reshape(b, lq, inner)


def choose(backend, dtype, q_len, k_len, heads, head_dim):
  """Returns the implementation `auto` runs for one attention: "cudnn", "chunked" or "xla".

  cudnn on a GPU with half-precision inputs and a head dim every cuDNN GPU
  takes; chunked where xla's scores at once (CPU: Lq x Lk, else heads x Lq x
  Lk) reach AUTO_CHUNKED_SCORES of the backend; xla otherwise. It does not
  depend on the batch size, so a job's result does not depend on the number of
  slots.
  """
  if (jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim <= CUDNN_AUTO_MAX_HEAD_DIM
      and cudnn_problem(backend, dtype, head_dim) is None):
    return "cudnn"
  scores = q_len * k_len * (1 if backend == "cpu" else heads)
  return "chunked" if scores >= _per_backend(AUTO_CHUNKED_SCORES, backend) else "xla"


IMPLEMENTATION_FNS = {"xla": xla, "chunked": chunked, "cudnn": cudnn}


def attention(query, key, value, heads, implementation="xla", mask=None):
  """Returns softmax(q k^T / sqrt(d)) v, [B, Lq, heads * d], computed by `implementation`.

  `mask`: optional boolean [B or 1, Lq, Lk], False where a query must not see a key.
  """
  if implementation == "auto":
    implementation = choose(jax.default_backend(), query.dtype, query.shape[1], key.shape[1],
                            heads, query.shape[2] // heads)
    if mask is not None and implementation == "cudnn":
      implementation = "xla"  # masked (CLIP text, 77 tokens): small, and no GPU test of cuDNN masks yet
  if implementation not in IMPLEMENTATION_FNS:
    raise ValueError(f"diffusion.attention must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  return IMPLEMENTATION_FNS[implementation](query, key, value, heads, mask=mask)
