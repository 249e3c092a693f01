"""FLYP: the contrastive loss against numpy, captions, train/eval steps on 1 and 8 devices."""

import csv
import functools
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from PIL import Image

import iwildcam_fixture
from discl_jax import parallel
from discl_jax.models import clip_classifier as cc
from discl_jax.models import tiny
from discl_jax.scoring import clip as clip_lib
from discl_jax.train import flyp

CLASSES = ("white-lipped peccary", "central american agouti", "spotted paca")
LABELS = np.array([0, 2, 0, 1, 1, 0, 2, 0])  # several images per class, as in FLYP batches
TEMPLATE_IDS = np.array([0, 1, 0, 1, 0, 0, 1, 1])


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_clip_loss(img, txt, scale):
  """The symmetric contrastive loss written out: mean of the two directions' CE on the diagonal."""
  img = np.asarray(img, np.float64)
  txt = np.asarray(txt, np.float64)
  logits = scale * img @ txt.T
  n = len(img)
  image_to_text = -np.mean([_np_log_softmax(logits)[i, i] for i in range(n)])
  text_to_image = -np.mean([_np_log_softmax(logits.T)[i, i] for i in range(n)])
  return (image_to_text + text_to_image) / 2


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  return tiny.build_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=1)


@pytest.fixture(scope="module")
def clip(clip_dir):
  return clip_lib.load_clip(str(clip_dir))


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = _unit(rng, (6, 8)), _unit(rng, (6, 8))
  txt[3] = txt[1]  # a repeated caption (same class, same template) is still a negative
  loss = jax.jit(flyp.contrastive_loss)
  for scale in (1.0, 14.3, 100.0):
    np.testing.assert_allclose(loss(img, txt, scale),
                               _np_clip_loss(img, txt, scale), rtol=1e-5)
  # perfectly aligned, well-separated pairs have near-zero loss; swapped pairs a large one
  eye = np.eye(4, dtype=np.float32)
  assert float(loss(eye, eye, 100.0)) < 1e-6
  assert float(loss(eye, eye[::-1], 100.0)) > 50.0


def test_flyp_loss_through_the_model_matches_numpy(clip):
  model, params = clip.model, clip.params
  table = cc.caption_table(clip.tokenizer, CLASSES, flyp.IWILDCAM_TEMPLATES)
  ids, mask = flyp.batch_captions(*table, LABELS, TEMPLATE_IDS)
  assert ids.shape == (len(LABELS), table[0].shape[-1])
  np.testing.assert_array_equal(ids[1], table[0][1, 2])
  pixels = np.random.default_rng(1).normal(size=(len(LABELS), 32, 32, 3)).astype(np.float32)

  def loss_and_features(p, x, i, m):
    loss, logits = flyp.flyp_loss(model, p, x, i, m)
    return loss, logits, cc.image_features(model, p, x), cc.text_features(model, p, i, m)

  # the features themselves are checked against transformers' API in test_clip_classifier
  loss, logits, img, txt = jax.jit(loss_and_features)(params, pixels, ids, mask)
  scale = np.exp(float(params["logit_scale"]))
  np.testing.assert_allclose(loss, _np_clip_loss(img, txt, scale), rtol=1e-5)
  np.testing.assert_allclose(logits, scale * np.asarray(img) @ np.asarray(txt).T,
                             rtol=1e-4, atol=1e-4)


def test_an_epoch_is_every_image_caption_pair_in_ceil_2n_over_batch_steps():
  picks = np.stack([np.zeros(13, np.int64), np.arange(13)], 1)
  pairs = flyp.pair_picks(picks, 2, 8, np.random.default_rng(0))
  assert pairs.shape == (32, 3) and len(pairs) // 8 == math.ceil(2 * 13 / 8)
  every = {(int(r), int(t)) for _, r, t in pairs[:26]}
  assert every == {(r, t) for r in range(13) for t in range(2)}  # each pair once ...
  assert len({tuple(p) for p in pairs[26:]}) == 6  # ... then 6 distinct fill pairs
  assert len(flyp.pair_picks(picks[:12], 2, 8, np.random.default_rng(0))) == 24  # no fill
  assert len(flyp.pair_picks(picks[:3], 2, 16, np.random.default_rng(0))) == 16  # 6 pairs < batch
  with pytest.raises(ValueError, match="num_templates"):
    flyp.pair_picks(picks, 0, 8, np.random.default_rng(0))


def test_iwildcam_fixture_reads_back_and_gives_captions(tmp_path):
  data = iwildcam_fixture.write_tiny_iwildcam(tmp_path / "iwildcam_v2.0")
  with open(data.metadata_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == iwildcam_fixture.METADATA_COLUMNS
  assert len(rows) == len(data.rows) == len(iwildcam_fixture.CLASSES) * 14
  assert {r["split"] for r in rows} == set(iwildcam_fixture.SPLITS)
  id_locations = {r["location_remapped"] for r in rows if r["split"] in ("train", "id_val", "id_test")}
  ood_locations = {r["location_remapped"] for r in rows if r["split"] in ("val", "test")}
  assert id_locations and ood_locations and not id_locations & ood_locations
  assert sum(r["split"] == "train" and r["y"] == "2" for r in rows) == 6
  for r in rows:
    image = Image.open(tmp_path / "iwildcam_v2.0" / "train" / r["filename"])
    assert image.size == (64, 36) and image.mode == "RGB"
  with open(data.categories_csv, newline="") as f:
    categories = list(csv.DictReader(f))
  assert [c["name"] for c in categories] == list(data.class_names)
  with open(data.labels_csv, newline="") as f:
    english = {int(r["y"]): r["english"] for r in csv.DictReader(f)}
  assert english[1] == "white-lipped peccary"
  # the same call writes the same bytes
  again = iwildcam_fixture.write_tiny_iwildcam(tmp_path / "again")
  assert again.rows == data.rows
  name = rows[5]["filename"]
  assert (tmp_path / "again" / "train" / name).read_bytes() == (
      tmp_path / "iwildcam_v2.0" / "train" / name).read_bytes()
  captions = [t.format(c=english[1]) for t in flyp.IWILDCAM_TEMPLATES]
  assert captions == ["a photo of white-lipped peccary.", "white-lipped peccary in the wild."]


def _sgd_run(clip, mesh, steps=4):
  """Returns (host batch, per-step metrics, final state) of FLYP steps with plain SGD.

  SGD is linear in the gradients, so a wrong gradient reduction across
  devices would show in the params (Adam would normalise it away).
  """
  table = cc.caption_table(clip.tokenizer, CLASSES, flyp.IWILDCAM_TEMPLATES)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.003)
  labels = np.tile(LABELS, 2).astype(np.int32)
  rng = np.random.default_rng(2)
  host = {"image": (rng.normal(size=(len(labels), 32, 32, 3)) * 0.5
                    + labels[:, None, None, None] - 1).astype(np.float32),
          "label": labels, "template": np.tile(TEMPLATE_IDS, 2).astype(np.int32)}
  state = parallel.put_replicated(flyp.create_state(clip.params, tx), mesh)
  step = flyp.make_train_step(clip.model, tx, mesh, *table)
  metrics = []
  for _ in range(steps):
    state, m = step(state, parallel.put_batch(host, mesh), 0.003)
    metrics.append({k: float(v) for k, v in m.items()})
  return host, metrics, state


@pytest.fixture(scope="module")
def one_device_run(clip):
  return _sgd_run(clip, parallel.make_mesh((1,)))


def test_train_step_lowers_the_loss_and_eval_step_matches_the_head(clip, one_device_run):
  model = clip.model
  host, metrics, state = one_device_run
  losses = [m["loss"] for m in metrics]
  assert int(state.step) == 4
  assert losses[-1] < losses[0], losses
  assert all(0.0 <= m["accuracy"] <= 1.0 for m in metrics)
  # the caller's params (the zero-shot weights WiSE-FT needs) survived the donating steps
  assert not any(x.is_deleted() for x in jax.tree.leaves(clip.params))

  mesh = parallel.make_mesh((1,))
  table = cc.caption_table(clip.tokenizer, CLASSES, flyp.IWILDCAM_TEMPLATES)
  head = flyp.make_head_fn(model, mesh, *table)(state.params)
  batch = {"image": host["image"], "label": host["label"]}
  out = flyp.make_eval_step(model, mesh)(state.params, head, parallel.put_batch(batch, mesh))
  probs = np.asarray(jax.jit(functools.partial(cc.class_probabilities, model))(
      state.params, host["image"], head))
  rows = np.arange(len(host["label"]))
  np.testing.assert_array_equal(out["pred"], probs.argmax(-1))
  np.testing.assert_allclose(out["prob_true"], probs[rows, host["label"]], rtol=1e-4)
  np.testing.assert_allclose(out["loss"], -np.log(probs[rows, host["label"]]),
                             rtol=1e-4, atol=1e-5)


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    import test_flyp
    from discl_jax import parallel
    from discl_jax.scoring import clip as clip_lib

    assert jax.device_count() == 8, jax.devices()
    _, metrics, state = test_flyp._sgd_run(clip_lib.load_clip(sys.argv[1]), parallel.make_mesh())
    np.savez(sys.argv[2], *jax.tree.leaves(state.params),
             losses=np.asarray([m["loss"] for m in metrics]))
""")


def test_train_step_on_8_devices_equals_1_device(one_device_run, clip_dir, tmp_path):
  _, metrics, state = one_device_run
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = tmp_path / "eight.npz"
  proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT, str(clip_dir), str(out)],
                        env=env, capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  eight = np.load(out)
  np.testing.assert_allclose(eight["losses"], [m["loss"] for m in metrics], rtol=1e-5)
  for i, one in enumerate(jax.tree.leaves(state.params)):
    np.testing.assert_allclose(eight[f"arr_{i}"], one, rtol=1e-4, atol=1e-6)
