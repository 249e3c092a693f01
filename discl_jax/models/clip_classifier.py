"""A CLIP (our Flax `models.clip.CLIPModel`) as an image classifier, for FLYP fine-tuning.

The classifier has no separate head: its class weights are the zero-shot head,
the renormalised mean of the normalised text embeddings of each class's
captions, rebuilt from the current text encoder whenever it is needed
(evaluation, the adaptive curriculum's true-class probabilities). Logits are
`exp(logit_scale) * <image embedding, class weight>`, as in CLIP and FLYP.

Everything here is a pure function of `(model, params, arrays)`: `model` is
the linen CLIPModel (structure only), `params` its plain pytree (keys
"text_model", "vision_model", "text_projection", "visual_projection",
"logit_scale", as transformers' FlaxCLIPModel named them), so the functions jit,
differentiate and shard like any other. A loaded checkpoint comes from
`discl_jax.scoring.clip.load_clip` (`.model`, `.params`, `.tokenizer`).
Images are NHWC floats standardised with CLIP's statistics
(`discl_jax.scoring.preprocess.CLIP_MEAN` / `CLIP_STD`: pass them as the
data loaders' mean/std).
"""

import jax
import jax.numpy as jnp
import numpy as np

from discl_jax.scoring import clip as clip_lib


def l2_normalize(x, axis=-1, eps=1e-12):
  """Returns `x` divided by its L2 norm along `axis` (computed in float32)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def image_features(model, params, pixels):
  """Returns the L2-normalised image embeddings [B, D] (float32) of NHWC `pixels`."""
  embeds = model.apply({"params": params}, jnp.asarray(pixels, model.dtype),
                       method="get_image_features")
  return l2_normalize(embeds)


def text_features(model, params, input_ids, attention_mask):
  """Returns the L2-normalised text embeddings [..., D] (float32) of token ids [..., L]."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  length = input_ids.shape[-1]
  embeds = clip_lib.embed_texts(model, params, input_ids.reshape(-1, length),
                                attention_mask.reshape(-1, length))
  return embeds.reshape(*input_ids.shape[:-1], -1)


def logit_scale(params):
  """Returns the multiplier exp(logit_scale) of the cosine similarities (float32 scalar)."""
  return jnp.exp(params["logit_scale"].astype(jnp.float32))


def tokenize(tokenizer, texts, max_length=None):
  """Returns (input_ids, attention_mask), int32 [N, L]: `texts` padded to `max_length`.

  `max_length` defaults to the tokenizer's model_max_length (77 for CLIP);
  longer texts are truncated.
  """
  out = tokenizer(list(texts), padding="max_length", truncation=True,
                  max_length=max_length or tokenizer.model_max_length, return_tensors="np")
  return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def caption_table(tokenizer, class_names, templates, max_length=None):
  """Returns (input_ids, attention_mask), int32 [T, C, L]: template t filled with class c.

  Each template is a format string with a `{c}` field, e.g. "a photo of {c}.".
  The table serves both the zero-shot head (all of it) and FLYP batches
  (entry [template, label] per image).
  """
  if not templates:
    raise ValueError("caption templates are empty")
  for template in templates:
    if "{c}" not in template:
      raise ValueError(f"caption template {template!r} has no {{c}} field")
  texts = [template.format(c=name) for template in templates for name in class_names]
  ids, mask = tokenize(tokenizer, texts, max_length)
  shape = (len(templates), len(class_names), ids.shape[-1])
  return ids.reshape(shape), mask.reshape(shape)


def zero_shot_head(model, params, input_ids, attention_mask):
  """Returns the zero-shot class weights [D, C] from captions [T, C, L] (T templates).

  Per class: the mean over templates of the normalised text embeddings,
  renormalised.
  """
  per_template = text_features(model, params, input_ids, attention_mask)  # [T, C, D]
  return l2_normalize(per_template.mean(axis=0)).T


def class_logits(model, params, pixels, head):
  """Returns the logits [B, C]: exp(logit_scale) * image embeddings @ `head` [D, C]."""
  return logit_scale(params) * image_features(model, params, pixels) @ head


def class_probabilities(model, params, pixels, head):
  """Returns the softmax class probabilities [B, C] of `pixels` under `head` [D, C]."""
  return jax.nn.softmax(class_logits(model, params, pixels, head), axis=-1)


def true_class_probabilities(probs, labels):
  """Returns probs[i, labels[i]] [B] from class probabilities [B, C]."""
  return jnp.take_along_axis(probs, jnp.asarray(labels)[:, None], axis=-1)[:, 0]


def wise_ft(zero_shot_params, finetuned_params, alpha):
  """Returns WiSE-FT params (1 - alpha) * zero_shot + alpha * finetuned, leaf by leaf.

  alpha = 0 gives the zero-shot weights, alpha = 1 the fine-tuned ones.
  Interpolation runs in float32 and each leaf keeps the fine-tuned dtype.
  The zero-shot head of the interpolated model is `zero_shot_head` of the
  result (the text encoder is interpolated too). Raises ValueError when
  alpha is outside [0, 1] or the two trees differ in structure or shapes.
  """
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
  zs_leaves, zs_def = jax.tree.flatten_with_path(zero_shot_params)
  ft_leaves, ft_def = jax.tree.flatten_with_path(finetuned_params)
  if zs_def != ft_def:
    raise ValueError("WiSE-FT: zero-shot and fine-tuned params have different structures: "
                     f"{_tree_difference(zs_leaves, ft_leaves)}")
  for (path, zs), (_, ft) in zip(zs_leaves, ft_leaves):
    if jnp.shape(zs) != jnp.shape(ft):
      raise ValueError(f"WiSE-FT: param {jax.tree_util.keystr(path)} has shape "
                       f"{jnp.shape(zs)} (zero-shot) vs {jnp.shape(ft)} (fine-tuned)")

  def mix(zs, ft):
    ft = jnp.asarray(ft)
    out = (1.0 - alpha) * jnp.asarray(zs, jnp.float32) + alpha * ft.astype(jnp.float32)
    return out.astype(ft.dtype)

  return jax.tree.map(mix, zero_shot_params, finetuned_params)


def _tree_difference(a_leaves, b_leaves):
  a = {jax.tree_util.keystr(p) for p, _ in a_leaves}
  b = {jax.tree_util.keystr(p) for p, _ in b_leaves}
  only_a, only_b = sorted(a - b)[:5], sorted(b - a)[:5]
  return f"only in zero-shot: {only_a}; only in fine-tuned: {only_b}"
