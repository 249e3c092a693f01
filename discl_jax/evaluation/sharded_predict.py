"""Predictions over an evaluation split, each process decoding only its share.

The split is padded to a multiple of the global eval batch; process p of P
reads its 1/P of the padded records (grain shards them) as its slice of each
global batch. Outputs, labels, rows and masks are gathered from all processes
with one all-gather per batch, padding and skipped images dropped, and put
back in split order by row.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils

from discl_jax import parallel
from discl_jax import progress
from discl_jax.data import pipeline
from discl_jax.data import transforms


def predict_split(split, step, mesh, *, eval_batch, image_size, on_bad_image="error",
                  mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD, recipe="resnet"):
  """Returns host dict of `step`'s per-example outputs plus "label", in split order.

  `step(batch)` maps a global batch {"image", "label"} to a dict of per-example
  arrays sharded like the batch. Images that are padding or skipped (with
  `on_bad_image="skip"`) are left out. `recipe` names the eval transform.
  """
  pc, pi = jax.process_count(), jax.process_index()
  loader = pipeline.eval_loader(split, image_size=image_size, batch_size=eval_batch,
                                shard=(pi, pc), on_bad_image=on_bad_image, mean=mean, std=std,
                                recipe=recipe)
  outputs = []
  progress.compiling("the prediction step")
  for batch in progress.counted(loader, len(split), "predict", lambda b: int(np.sum(b["mask"]))):
    inputs = parallel.put_batch({k: batch[k] for k in ("image", "label")}, mesh)
    out = dict(step(inputs), label=inputs["label"],
               **parallel.put_batch({k: batch[k] for k in ("row", "mask")}, mesh))
    outputs.append(multihost_utils.process_allgather(out, tiled=True) if pc > 1
                   else jax.device_get(out))
  if not outputs:
    return {k: np.zeros([0]) for k in ("pred", "prob_true", "loss", "label")}
  merged = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
  keep = merged.pop("mask") > 0
  order = np.argsort(merged.pop("row")[keep], kind="stable")
  return {k: v[keep][order] for k, v in merged.items()}
