"""The reference's base recipe pieces: step schedule with epoch warm-up, Nesterov SGD, mixup."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from discl_jax import config as config_lib
from discl_jax import parallel
from discl_jax.models import resnet
from discl_jax.train import losses
from discl_jax.train import optim
from discl_jax.train import state as state_lib
from discl_jax.train import steps as steps_lib


def _train(**overrides):
  train = config_lib.base_config().train
  train.update(overrides)
  return train


def test_step_schedule_with_epoch_warmup_is_the_reference_lambda():
  # docs/design.md §6: lr 0.1, x0.1 at epochs 60 and 80, 5 warm-up epochs, 100 epochs.
  train = _train(learning_rate=0.1, lr_schedule="step", lr_milestones=(60, 80), lr_decay=0.1,
                 warmup_epochs=5, epochs=100)
  steps_per_epoch = 10

  def rate(epoch, batch=0):
    return optim.learning_rate(train, epoch * steps_per_epoch + batch,
                               (epoch + batch / steps_per_epoch) / train.epochs)

  want = {0: 0.02, 1: 0.04, 4: 0.1, 5: 0.1, 59: 0.1, 60: 0.01, 79: 0.01, 80: 0.001, 99: 0.001}
  for epoch, value in want.items():
    assert rate(epoch) == pytest.approx(value), epoch
    assert rate(epoch, 9) == pytest.approx(value), epoch  # constant within an epoch


def test_cosine_with_epoch_warmup_and_unknown_schedule():
  train = _train(learning_rate=1.0, warmup_epochs=2, epochs=4)
  assert optim.learning_rate(train, 0, 0.0) == pytest.approx(0.5)
  assert optim.learning_rate(train, 0, 0.5) == pytest.approx(0.5)   # epoch 2: cosine only
  with pytest.raises(ValueError, match="unknown train.lr_schedule 'poly'.*cosine, step"):
    optim.learning_rate(_train(lr_schedule="poly"), 0, 0.0)


def test_nesterov_sgd_matches_pytorch_update():
  train = _train(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.0,
                 nesterov=True)
  tx = optim.make_optimizer(train)
  params = {"w": jnp.ones(2)}
  opt_state = tx.init(params)
  grads = [jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])]
  buf, want = np.zeros(2), np.ones(2)
  for g in grads:  # PyTorch: buf = mu buf + g; p -= lr (g + mu buf)
    buf = 0.9 * buf + np.asarray(g)
    want = want - 0.1 * (np.asarray(g) + 0.9 * buf)
    updates, opt_state = tx.update({"w": g}, opt_state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["w"], want, rtol=1e-6)


def test_mixup_mixes_images_and_labels_with_one_lambda_per_key():
  images = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
  labels = jnp.arange(8) % 3
  key = losses.mixup_key(seed=0, step=5)
  mixed, perm, lam = losses.mixup(key, images, 0.2)
  assert 0.0 < float(lam) < 1.0
  assert sorted(np.asarray(perm).tolist()) == list(range(8))
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[perm], rtol=1e-6)
  again = losses.mixup(losses.mixup_key(seed=0, step=5), images, 0.2)
  np.testing.assert_array_equal(again[0], mixed)                   # deterministic per (seed, step)
  lams = {float(losses.mixup(losses.mixup_key(0, s), images, 0.2)[2]) for s in range(4)}
  assert len(lams) == 4                                            # a fresh lambda per step
  logits = jax.random.normal(jax.random.key(1), (8, 3))
  got = losses.mixup_loss(losses.cross_entropy, logits, labels, perm, lam)
  want = (lam * losses.cross_entropy(logits, labels)
          + (1 - lam) * losses.cross_entropy(logits, labels[perm]))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_train_step_with_mixup_trains_on_the_mixed_batch():
  model = resnet.get_model("tiny", 3)
  tx = optim.make_optimizer(_train(learning_rate=0.0))
  mesh = parallel.make_mesh((-1,))
  state = state_lib.create(model, tx, jax.random.key(0, impl="rbg"), 8)
  batch = {"image": np.asarray(jax.random.normal(jax.random.key(2), (4, 8, 8, 3))),
           "label": np.array([0, 1, 2, 0], np.int32)}
  mixed, perm, lam = losses.mixup(losses.mixup_key(7, 0), jnp.asarray(batch["image"]), 0.2)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, mixed,
                       train=True, mutable=["batch_stats"])[0]
  want = losses.mixup_loss(losses.cross_entropy, logits, batch["label"], perm, lam).mean()
  step = steps_lib.make_train_step(model, tx, losses.cross_entropy, mesh, mixup_alpha=0.2, seed=7)
  _, metrics = step(state, parallel.put_batch(batch, mesh), 0.0)
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
