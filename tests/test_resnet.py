"""ResNet classifiers: shapes, sizes, batch norm state, registry errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from discl_jax.models import resnet


def _param_count(name, num_classes, size):
  model = resnet.get_model(name, num_classes)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3)), train=False),
                       variables)
  return sum(x.size for x in jax.tree.leaves(variables["params"])), variables, out


@pytest.mark.parametrize("name,num_classes,size,expected", [
    ("resnet32", 100, 32, 0.47e6),    # CIFAR ResNet-32: 0.46M + the 100-way head
    ("resnet10", 1000, 64, 5.42e6),   # ResNet-10 with a 1000-way head
    ("resnet50", 1000, 64, 25.56e6),  # torchvision resnet50: 25.56M
])
def test_sizes_and_output_shapes(name, num_classes, size, expected):
  count, variables, out = _param_count(name, num_classes, size)
  assert count == pytest.approx(expected, rel=0.02)
  assert out.shape == (2, num_classes) and out.dtype == jnp.float32
  assert jax.tree.leaves(variables["batch_stats"])


def test_resnet32_uses_padding_shortcuts_and_three_stages():
  _, variables, _ = _param_count("resnet32", 10, 32)
  names = set(variables["params"])
  assert not any("shortcut" in str(k) for k in jax.tree_util.tree_flatten_with_path(
      variables["params"])[0])
  assert sum(name.startswith("BasicBlock") for name in names) == 15
  kernel = variables["params"]["BasicBlock_14"]["Conv_1"]["kernel"]
  assert kernel.shape == (3, 3, 64, 64)


def test_tiny_train_mode_updates_batch_stats_and_eval_does_not():
  model = resnet.get_model("tiny", 5)
  x = jax.random.normal(jax.random.key(1), (4, 12, 12, 3))
  variables = model.init(jax.random.key(0, impl="rbg"), x, train=False)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 5)
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  eval_logits = model.apply(variables, x, train=False)
  assert eval_logits.shape == (4, 5) and np.all(np.isfinite(eval_logits))


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match="unknown model 'resnet18'.*resnet10, resnet32, resnet50, resnet8, tiny"):
    resnet.get_model("resnet18", 10)
