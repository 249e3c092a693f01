"""Contrastive training of a small CLIP (our Flax CLIPModel, models/clip.py) on labelled images + captions.

With few classes a batch holds many images of one class, so the usual
one-positive-per-row CLIP loss would push apart matching pairs. The loss here
treats every (image, caption) pair of the same label as a positive: each row's
target is uniform over its positives (symmetric, image->text and text->image).
"""

import functools

import jax
import jax.numpy as jnp

import digit_training
from discl_jax.scoring import clip

MAX_LOGIT_SCALE = 100.0


def multi_positive_loss(image_emb, text_emb, logit_scale, labels):
  """Returns (loss, accuracy) of L2-normalised embeddings [B, D] with integer `labels` [B].

  accuracy: share of images whose most similar caption in the batch has their label.
  """
  scale = jnp.minimum(jnp.exp(logit_scale), MAX_LOGIT_SCALE)
  logits = scale * image_emb @ text_emb.T
  same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
  targets = same / jnp.sum(same, axis=1, keepdims=True)
  image_loss = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1))
  text_loss = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1), axis=1))
  accuracy = jnp.mean(labels[jnp.argmax(logits, axis=1)] == labels)
  return 0.5 * (image_loss + text_loss), accuracy


def clip_loss(module, spec, params, images, input_ids, attention_mask, labels):
  """Returns (loss, {"accuracy"}) of uint8 images [B, H, W, 3] against caption tokens [B, L]."""
  image_emb = clip.embed_images(module, spec, params, images)
  text_emb = clip.embed_texts(module, params, input_ids, attention_mask)
  loss, accuracy = multi_positive_loss(image_emb, text_emb, params["logit_scale"], labels)
  return loss, {"accuracy": accuracy}


def make_clip_step(module, spec, optimizer):
  """Returns jitted step(state, images, input_ids, attention_mask, labels) -> (state, metrics).

  `module` is the linen CLIPModel (models/clip.py), `spec` its ClipPreprocess; the
  state is `digit_training.init_state`'s dict; donates it.
  """

  def step(state, images, input_ids, attention_mask, labels):
    loss_fn = functools.partial(clip_loss, module, spec, images=images, input_ids=input_ids,
                                attention_mask=attention_mask, labels=labels)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return digit_training.apply_gradients(optimizer, state, grads), dict(aux, loss=loss)

  return jax.jit(step, donate_argnums=(0,))
