"""The FLYP trainer: what the train loop runs when `train.model == "clip"`.

`ClipTrainer` has the interface of the loop's ResNet `Trainer`
(`initial_state`, `batch_inputs`, `train_step`, `predict`, `image_size`,
`mean`, `std`), so there is one loop and the config picks the trainer:

- the model is a CLIP (`train.clip_model`; "" uses `score.model`, or with
  `score.tiny` the tiny CLIP built once into workdir/models/clip), loaded and
  trained in float32;
- images get CLIP's own transforms (`transforms.recipe_for("clip")`: FLYP's
  RandomResizedCrop(scale 0.9-1, bicubic) for training, resize + center crop
  for evaluation) and CLIP's mean/std, at CLIP's input size;
- an epoch trains on every (image, caption template) pair of its picks
  (`flyp.pair_picks`, the last batch filled at random) and the step is
  FLYP's contrastive step;
- predictions use the zero-shot head rebuilt from the current text encoder,
  optionally of WiSE-FT weights (`train.wise_ft_alpha` < 1 mixes in the
  zero-shot weights at evaluation only).

Captions fill `train.clip_templates` with each class's caption name: the
common name of `labels.csv` (columns y, english) beside the iWildCam
metadata.csv when that file exists, else the dataset's class name.
"""

import jax
import numpy as np
from absl import logging

from discl_jax import parallel
from discl_jax import seeding
from discl_jax.data import class_names as class_names_lib
from discl_jax.data import transforms
from discl_jax.evaluation import sharded_predict
from discl_jax.models import clip_classifier
from discl_jax.scoring import clip as clip_lib
from discl_jax.train import flyp
from discl_jax.train import optim

MODEL = "clip"  # train.model: FLYP fine-tuning of a CLIP (this trainer)
LOSS = "flyp"   # train.loss of train.model=MODEL


def clip_model_path(config, workdir):
  """Returns the CLIP to fine-tune: train.clip_model, score.model, or the workdir's tiny CLIP."""
  if config.train.clip_model:
    return config.train.clip_model
  return clip_lib.configured_model(config, workdir)


class ClipTrainer:
  """CLIP, AdamW, the jitted FLYP step, the zero-shot head and eval step of one run."""

  def __init__(self, config, class_names, mesh, workdir, models=None):
    self.config = config
    self.mesh = mesh
    tc = config.train
    if tc.loss != LOSS:
      raise ValueError(f"train.model='clip' trains with train.loss='flyp', got {tc.loss!r}")
    _, self.eval_batch = parallel.batch_sizes(tc.batch_size, config.eval.batch_size, mesh)
    alpha = float(tc.wise_ft_alpha)
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"train.wise_ft_alpha must be in [0, 1], got {alpha}")
    self.wise_ft_alpha = alpha
    if models is None:
      models = clip_lib.load_clip(clip_model_path(config, workdir), "float32")
    self.models = models
    self.model = models.model
    self.image_size = int(self.model.config.vision_config.image_size)
    if config.data.image_size != self.image_size:
      logging.info("CLIP input size %d (data.image_size=%d is for other models)",
                   self.image_size, config.data.image_size)
    self.mean, self.std = transforms.CLIP_MEAN, transforms.CLIP_STD
    self.templates = tuple(tc.clip_templates)
    self.caption_names = class_names_lib.text_names(config.data, class_names, "FLYP captions")
    ids, mask = clip_classifier.caption_table(
        models.tokenizer, self.caption_names, self.templates)
    self.tx = optim.make_optimizer(tc)
    self.train_step = flyp.make_train_step(self.model, self.tx, mesh, ids, mask)
    self.head_fn = flyp.make_head_fn(self.model, mesh, ids, mask)
    self._eval_step = flyp.make_eval_step(self.model, mesh)
    self._zero_shot = None
    self._eval_cache = (None, None)

  def initial_state(self, load_init=True):
    """Returns the replicated initial TrainState: the loaded (zero-shot) CLIP weights.

    Loaded on resume as well (`load_init` is ignored): WiSE-FT needs them.
    """
    del load_init
    state = flyp.create_state(self.models.params, self.tx)
    state = parallel.put_replicated(state, self.mesh)
    if self.wise_ft_alpha < 1.0:
      self._zero_shot = jax.tree.map(np.asarray, jax.device_get(state.params))
    return state

  def train_picks(self, picks, epoch):
    """Returns the epoch's training records: (source, row, template) for every pair of `picks`."""
    rng = seeding.numpy_rng(self.config.seed, "flyp/fill", epoch)
    return flyp.pair_picks(picks, len(self.templates), self.config.train.batch_size, rng)

  def batch_inputs(self, batch, sources, epoch):
    """Returns the host arrays of one train batch: image, label and the caption template."""
    del sources, epoch
    return {"image": batch["image"], "label": batch["label"], "template": batch["template"]}

  def eval_params(self, state):
    """Returns (params, head [D, C]) used for predictions: WiSE-FT mixed when alpha < 1.

    Cached per train step, so evaluating several splits builds the head once.
    """
    step = int(state.step)
    if self._eval_cache[0] == step:
      return self._eval_cache[1]
    params = state.params
    if self.wise_ft_alpha < 1.0:
      if self._zero_shot is None:
        raise RuntimeError("WiSE-FT needs the zero-shot weights: call initial_state() first")
      params = parallel.put_replicated(
          clip_classifier.wise_ft(self._zero_shot, params, self.wise_ft_alpha), self.mesh)
    out = (params, self.head_fn(params))
    self._eval_cache = (step, out)
    return out

  def predict(self, state, split):
    """Returns host dict "pred", "prob_true", "loss", "label" [len(split)], in split order."""
    params, head = self.eval_params(state)
    return sharded_predict.predict_split(
        split, lambda batch: self._eval_step(params, head, batch), self.mesh,
        eval_batch=self.eval_batch, image_size=self.image_size,
        on_bad_image=self.config.data.on_bad_image, mean=self.mean, std=self.std,
        recipe="clip")
