"""FLYP ("Finetune Like You Pretrain", Goyal et al. 2023): CLIP fine-tuned with its own loss.

Each training image is paired with a caption of its class, one of the class
templates filled with the class name (iWildCam, as the FLYP and DisCL
references: "a photo of {c}." and "{c} in the wild." with the common name),
and the whole CLIP (both towers and the logit scale) is trained with the
symmetric contrastive loss over the batch:

  logits = exp(logit_scale) * img @ txt.T              [B, B]
  loss   = (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2

Same-class pairs. A batch usually holds several images of one class, often
with the very same caption. Like the reference (`ClipLoss` called without
`ground_labels`), the target is still the diagonal only: the other images'
captions, even identical ones, count as negatives. This is FLYP's loss as
published; we do not mask or soft-label duplicates.

Captions. The references list every (image, template) pair as a row of the
training CSV, and an epoch is one shuffled pass over every row (docs/design.md §6:
with two templates, ceil(2N / batch) steps for N images). `pair_picks` does
the same with an epoch's (source, row) picks: every pick with every template,
as (source, row, template) records the loader shuffles. The reference's last
batch of an epoch is smaller (PyTorch `drop_last=False`); ours keeps one
shape, so the last batch is filled with pairs drawn at random from the epoch.

Multi-device: the step is jitted with the batch sharded over the mesh's
`data` axis; the [B, B] logits span the global batch (XLA gathers the
embeddings), the same as the reference's all-gathered loss on many GPUs.
Evaluation rebuilds the zero-shot head from the current text encoder (see
`discl_jax.models.clip_classifier`). FLYP puts weight decay on every
parameter and does not clamp the logit scale; neither do we.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from discl_jax import parallel
from discl_jax.models import clip_classifier
from discl_jax.train.state import TrainState

# The FLYP / DisCL reference templates for iWildCam, filled with the common name.
IWILDCAM_TEMPLATES = ("a photo of {c}.", "{c} in the wild.")


def contrastive_loss(image_embeds, text_embeds, scale):
  """Returns the symmetric CLIP loss (scalar) of paired embeddings [B, D], row i with row i.

  `scale` multiplies the similarities (exp of the model's logit_scale);
  embeddings are expected L2-normalised.
  """
  logits = scale * image_embeds @ text_embeds.T
  targets = jnp.arange(logits.shape[0])
  per_image = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  per_text = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  return (per_image.mean() + per_text.mean()) / 2


def flyp_loss(model, params, pixels, input_ids, attention_mask):
  """Returns (loss, logits [B, B]): the contrastive loss of images and their captions [B, L]."""
  img = clip_classifier.image_features(model, params, pixels)
  txt = clip_classifier.text_features(model, params, input_ids, attention_mask)
  scale = clip_classifier.logit_scale(params)
  return contrastive_loss(img, txt, scale), scale * img @ txt.T


def pair_picks(picks, num_templates, batch_size, rng):
  """Returns int64 [P, 3] (source, row, template): every pick with every template.

  P = ceil(K * num_templates / batch_size) * batch_size: the pairs, then as
  many pairs drawn from them at random (with `rng`, without replacement while
  they last) as fill the last batch.
  """
  if num_templates < 1:
    raise ValueError(f"num_templates must be >= 1, got {num_templates}")
  picks = np.asarray(picks, np.int64).reshape(-1, 2)
  pairs = np.concatenate([np.repeat(picks, num_templates, axis=0),
                          np.tile(np.arange(num_templates), len(picks))[:, None]], axis=1)
  fill = -len(pairs) % batch_size
  if not len(pairs) or not fill:
    return pairs
  extra = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-fill // len(pairs)))])
  return np.concatenate([pairs, pairs[extra[:fill]]])


def batch_captions(caption_ids, caption_mask, labels, templates):
  """Returns (input_ids, attention_mask) [B, L]: entry [template, label] of the [T, C, L] table."""
  return caption_ids[templates, labels], caption_mask[templates, labels]


def create_state(params, tx):
  """Returns a fresh TrainState (no batch statistics) holding a copy of CLIP `params`.

  The copy keeps the caller's arrays (e.g. the zero-shot weights kept for
  WiSE-FT) alive when the train step donates the state's buffers.
  """
  params = jax.tree.map(jnp.array, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params))


def make_train_step(model, tx, mesh, caption_ids, caption_mask):
  """Returns jitted `train_step(state, batch, lr) -> (state, metrics)`.

  `batch` holds "image" [B, S, S, 3] (CLIP-normalised), "label" [B] and
  "template" [B] (from `pair_picks`); the caption of each image is
  looked up in the [T, C, L] table (`clip_classifier.caption_table`).
  `metrics`: "loss" (FLYP loss) and "accuracy" (fraction of images whose
  most similar caption in the batch belongs to their class). The input
  state is donated; `tx` must be built by `optax.inject_hyperparams`.
  """
  caption_ids = jnp.asarray(caption_ids, jnp.int32)
  caption_mask = jnp.asarray(caption_mask, jnp.int32)

  def train_step(state, batch, lr):
    ids, mask = batch_captions(caption_ids, caption_mask, batch["label"], batch["template"])

    def loss_of(params):
      return flyp_loss(model, params, batch["image"], ids, mask)

    (loss, logits), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    opt_state = state.opt_state
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    best = jnp.argmax(logits, axis=-1)
    accuracy = jnp.mean(batch["label"][best] == batch["label"])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}

  replicated = parallel.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,))


def make_head_fn(model, mesh, caption_ids, caption_mask):
  """Returns jitted `head(params) -> [D, C]`: the zero-shot head of the current text encoder."""
  caption_ids = jnp.asarray(caption_ids, jnp.int32)
  caption_mask = jnp.asarray(caption_mask, jnp.int32)

  def head(params):
    return clip_classifier.zero_shot_head(model, params, caption_ids, caption_mask)

  replicated = parallel.replicated(mesh)
  return jax.jit(head, in_shardings=(replicated,), out_shardings=replicated)


def make_eval_step(model, mesh):
  """Returns jitted `eval_step(params, head, batch) -> dict` of per-example arrays [B].

  Keys as the classifier eval step: "pred" (argmax class), "prob_true"
  (probability of "label") and "loss" (cross-entropy), from the logits
  `exp(logit_scale) * image embeddings @ head`.
  """
  def eval_step(params, head, batch):
    logits = clip_classifier.class_logits(model, params, batch["image"], head)
    log_probs = jax.nn.log_softmax(logits)
    log_true = jnp.take_along_axis(log_probs, batch["label"][:, None], axis=-1)[:, 0]
    return {"pred": jnp.argmax(logits, -1).astype(jnp.int32),
            "prob_true": jnp.exp(log_true), "loss": -log_true}

  replicated = parallel.replicated(mesh)
  return jax.jit(eval_step,
                 in_shardings=(replicated, replicated, parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))
