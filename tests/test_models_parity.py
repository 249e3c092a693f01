"""Our Flax VAE and CLIP (discl_jax/models) against diffusers' / transformers' PyTorch modules.

Tiny random PyTorch models write their checkpoints (safetensors) and ours load
them through the same loader real checkpoints go through; float32 on both
sides; inputs chosen so the functions that differ (one- vs two-pass norm
variance, argmax vs first-EOS pooling) differ measurably. Where diffusers <
0.40 / transformers < 5 are installed, the "flax" numerics are checked bit for
bit against their Flax classes on the shipped digit models.
"""

import json

import jax
import numpy as np
import pytest

from discl_jax import digit_models
from discl_jax.models import clip as clip_models
from discl_jax.models import tiny
from discl_jax.models import vae as vae_lib
from discl_jax.models import weights
from discl_jax.train import flyp

torch = pytest.importorskip("torch", reason="PyTorch parity needs the torch extra")

ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """Tiny models: more PyTorch threads only spin."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
  """(PyTorch AutoencoderKL with random weights, its folder), two blocks, 32 groups."""
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                      norm_num_groups=32, layers_per_block=1).eval()
  with torch.no_grad():  # norms and biases off their init (1, 0), so every parameter matters
    for p in vae.parameters():
      p.add_(0.05 * torch.randn_like(p))
    # The encoder's first norms see a large common offset: E[x^2] - mean^2 (one pass) loses
    # digits that E[(x - mean)^2] keeps.
    vae.encoder.conv_in.bias.add_(300.0)
  folder = tmp_path_factory.mktemp("vae") / "vae"
  vae.save_pretrained(folder, safe_serialization=True)
  return vae, folder


def _vae_inputs():
  rng = np.random.default_rng(0)
  pixels = rng.uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
  latents = (rng.normal(0, 1, (2, 4, 8, 12)) * 3).astype(np.float32)
  return pixels, latents


def test_vae_encode_and_decode_match_pytorch(torch_vae):
  pt, folder = torch_vae
  ours, params = vae_lib.load(folder)
  assert ours.numerics == "pytorch"
  pixels, latents = _vae_inputs()
  with torch.no_grad():
    posterior = pt.encode(torch.from_numpy(pixels)).latent_dist
    decoded = pt.decode(torch.from_numpy(latents)).sample.numpy()
  got = ours.apply({"params": params}, pixels, method=ours.encode).latent_dist
  nchw = lambda x: np.asarray(x).transpose(0, 3, 1, 2)
  mean_diff = _max_diff(nchw(got.mean), posterior.mean.numpy())
  logvar_diff = _max_diff(nchw(got.logvar), posterior.logvar.numpy())
  decode_diff = _max_diff(ours.apply({"params": params}, latents, method=ours.decode).sample,
                          decoded)
  print(f"VAE max |ours - PyTorch|: mean {mean_diff:.2e}, logvar {logvar_diff:.2e}, "
        f"decode {decode_diff:.2e}")
  assert max(mean_diff, logvar_diff, decode_diff) <= ATOL
  one_pass = ours.clone(numerics="flax")
  one_pass_mean = one_pass.apply({"params": params}, pixels, method=one_pass.encode).latent_dist.mean
  assert _max_diff(nchw(one_pass_mean), posterior.mean.numpy()) > 10 * ATOL  # visible here


def test_vae_config_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match="cfg.json: unknown VAE config key 'warp'"):
    vae_lib.from_config({"warp": 1}, source="cfg.json")
  with pytest.raises(ValueError, match="down_block_types"):
    vae_lib.from_config({"down_block_types": ["AttnDownEncoderBlock2D"]})
  with pytest.raises(FileNotFoundError, match="missing VAE config"):
    vae_lib.load(tmp_path)


# ---------------------------------------------------------------- text encoders


def _text_config(eos_id, act, pad_id):
  return dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
              hidden_act=act, bos_token_id=62, eos_token_id=eos_id, pad_token_id=pad_id)


# EOS 5 is not the largest id: rows carry larger ids before and after their first EOS.
EOS = 5
IDS = np.array([[62, 40, 41, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                [62, 30, 5, 50, 60, 5, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
                [62, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 5]], np.int32)


@pytest.fixture(scope="module", params=[("CLIPTextModel", "quick_gelu"),
                                        ("CLIPTextModelWithProjection", "gelu")])
def torch_text(request, tmp_path_factory):
  """(PyTorch text encoder, its folder, projection?) of SD's (quick_gelu) or SDXL's (gelu) kind."""
  import transformers  # pylint: disable=g-import-not-at-top
  name, act = request.param
  torch.manual_seed(1)
  pt = getattr(transformers, name)(transformers.CLIPTextConfig(**_text_config(EOS, act, 0))).eval()
  folder = tmp_path_factory.mktemp("text") / name
  pt.save_pretrained(folder, safe_serialization=True)
  return pt, folder, name.endswith("Projection")


def test_text_encoder_hidden_states_and_pooled_match_pytorch(torch_text):
  pt, folder, projection = torch_text
  ours, params = clip_models.load_text_encoder(folder, projection=projection)
  with torch.no_grad():
    want = pt(input_ids=torch.from_numpy(IDS).long(), output_hidden_states=True)
  got = ours.apply({"params": params}, IDS)
  pooled_want = (want.text_embeds if projection else want.pooler_output).numpy()
  pooled_got = got.text_embeds if projection else got.pooler_output
  diffs = {"hidden_states[-2]": _max_diff(got.hidden_states[-2], want.hidden_states[-2].numpy()),
           "last_hidden_state": _max_diff(got.last_hidden_state, want.last_hidden_state.numpy()),
           "pooled": _max_diff(pooled_got, pooled_want)}
  print(f"{type(pt).__name__} max |ours - PyTorch|: {diffs}")
  assert len(got.hidden_states) == len(want.hidden_states)
  assert max(diffs.values()) <= ATOL


def test_pooling_is_at_the_first_eos_not_the_largest_id(torch_text):
  pt, folder, projection = torch_text
  ours, params = clip_models.load_text_encoder(folder, projection=projection)
  first_eos = np.argmax(IDS == EOS, axis=1)
  assert np.all(first_eos != np.argmax(IDS, axis=1))  # argmax(ids) would pool elsewhere
  got = ours.apply({"params": params}, IDS)
  rows = np.arange(len(IDS))
  np.testing.assert_array_equal(got.pooler_output, np.asarray(got.last_hidden_state)[rows, first_eos])
  with torch.no_grad():
    want = pt(input_ids=torch.from_numpy(IDS).long())
  pooled, want = ((got.text_embeds, want.text_embeds) if projection
                  else (got.pooler_output, want.pooler_output))
  assert _max_diff(pooled, want.numpy()) <= ATOL


def test_pooling_of_a_tiny_tokenizer_whose_eos_is_not_the_largest_id(tmp_path):
  """A tokenizer with tokens after its EOS id: padding with them keeps pooling at EOS."""
  tiny.write_tokenizer(tmp_path / "base", words=("photo",))
  vocab = json.loads((tmp_path / "base" / "vocab.json").read_text())
  specials = ["<|startoftext|>", "<|endoftext|>"]  # ids 0 and 1, the byte tokens after them
  order = specials + [t for t in vocab if t not in specials]
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(order)}))
  (tmp_path / "tok" / "merges.txt").write_text((tmp_path / "base" / "merges.txt").read_text())
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  tok = CLIPTokenizer(str(tmp_path / "tok" / "vocab.json"), str(tmp_path / "tok" / "merges.txt"),
                      pad_token="!")
  assert tok.eos_token_id == 1 < tok.convert_tokens_to_ids("!")
  ids = tok(["a photo", "photo photo photo"], padding="max_length", max_length=12,
            return_tensors="np").input_ids.astype(np.int32)
  config = clip_models.text_config(_text_config(tok.eos_token_id, "gelu", tok.pad_token_id)
                                   | {"vocab_size": len(order)})
  module = clip_models.CLIPTextModel(config)
  params = tiny.random_params(jax.eval_shape(module.init_weights, jax.random.key(0)), 0, "text")
  out = module.apply({"params": params}, ids)
  eos = np.argmax(ids == tok.eos_token_id, axis=1)
  np.testing.assert_array_equal(out.pooler_output, np.asarray(out.last_hidden_state)[[0, 1], eos])
  assert not np.allclose(out.pooler_output,
                         np.asarray(out.last_hidden_state)[[0, 1], np.argmax(ids, axis=1)])


# ---------------------------------------------------------------- CLIP (scoring, FLYP)


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
  """(our CLIPModel, params, PyTorch CLIPModel) of one tiny CLIP written as safetensors."""
  import transformers  # pylint: disable=g-import-not-at-top
  folder = tiny.build_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=3,
                           weights_format="safetensors")
  module, params = clip_models.load_clip_model(folder)
  return module, params, transformers.CLIPModel.from_pretrained(str(folder)).eval()


def _clip_inputs(module):
  rng = np.random.default_rng(4)
  size = module.config.vision_config.image_size
  pixels = rng.normal(0, 1, (6, size, size, 3)).astype(np.float32)
  eos = module.config.text_config.eos_token_id
  ids = rng.integers(0, eos - 1, (6, 12)).astype(np.int32)
  ids[:, 0], ids[np.arange(6), rng.integers(3, 12, 6)] = eos - 1, eos
  return pixels, ids, np.ones_like(ids)


def _unwrap(features):
  return getattr(features, "pooler_output", features)  # transformers 5 wraps get_*_features


def test_clip_image_and_text_embeddings_match_pytorch(clip_pair):
  module, params, pt = clip_pair
  pixels, ids, mask = _clip_inputs(module)
  with torch.no_grad():
    image_want = _unwrap(pt.get_image_features(
        pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))).numpy()
    text_want = _unwrap(pt.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                             attention_mask=torch.from_numpy(mask))).numpy()
  image = _max_diff(module.apply({"params": params}, pixels, method="get_image_features"),
                    image_want)
  text = _max_diff(module.apply({"params": params}, ids, mask, method="get_text_features"),
                   text_want)
  print(f"CLIP max |ours - PyTorch|: image embeddings {image:.2e}, text embeddings {text:.2e}")
  assert max(image, text) <= ATOL


def test_flyp_step_loss_and_gradients_match_pytorch(clip_pair):
  module, params, pt = clip_pair
  pixels, ids, mask = _clip_inputs(module)
  (loss, _), grads = jax.value_and_grad(
      lambda p: flyp.flyp_loss(module, p, pixels, ids, mask), has_aux=True)(params)
  pt.zero_grad()
  img = torch.nn.functional.normalize(_unwrap(pt.get_image_features(
      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))), dim=-1)
  txt = torch.nn.functional.normalize(_unwrap(pt.get_text_features(
      input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))), dim=-1)
  logits = pt.logit_scale.exp() * img @ txt.T
  target = torch.arange(len(ids))
  want = (torch.nn.functional.cross_entropy(logits, target)
          + torch.nn.functional.cross_entropy(logits.T, target)) / 2
  want.backward()
  pt_grads = {k: p.grad.numpy() for k, p in pt.named_parameters() if p.grad is not None}
  want_grads = weights.convert_state_dict(pt_grads, jax.eval_shape(lambda: params))
  loss_rel = abs(float(loss) - float(want)) / abs(float(want))
  flat_got = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
  scale = max(float(np.abs(g).max()) for g in flat_want.values())
  grad_rel = max(_max_diff(flat_got[k], flat_want[k]) for k in flat_want) / scale
  print(f"FLYP step vs PyTorch CLIP: loss rel {loss_rel:.2e}, gradients max rel {grad_rel:.2e}")
  assert loss_rel <= ATOL and grad_rel <= ATOL


# ---------------------------------------------------------------- the shipped "flax" numerics


def _flax_class(package, name):
  found = getattr(pytest.importorskip(package), name, None)
  if found is None:
    pytest.skip(f"{package} has no {name}: the flax numerics' reference needs "
                "diffusers < 0.40 / transformers < 5")
  return found


def test_digit_vae_keeps_the_flax_classes_functions_bit_for_bit():
  flax_vae = _flax_class("diffusers", "FlaxAutoencoderKL")
  folder = digit_models.ROOT / "sd" / "vae"
  ours, params = vae_lib.load(folder)
  assert ours.numerics == "flax"
  ref = flax_vae.from_config({k: v for k, v in json.loads((folder / "config.json").read_text())
                              .items() if k != "discl_numerics"})
  pixels = np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
  latents = np.random.default_rng(2).normal(size=(2, 4, 8, 8)).astype(np.float32)
  def outputs(module):
    encode = lambda p, x: module.apply({"params": p}, x, method=module.encode).latent_dist
    decode = lambda p, z: module.apply({"params": p}, z, method=module.decode).sample
    return jax.jit(lambda p: ((encode(p, pixels).mean, encode(p, pixels).logvar),
                              decode(p, latents)))(params)

  for a, b in zip(jax.tree.leaves(outputs(ours)), jax.tree.leaves(outputs(ref))):
    np.testing.assert_array_equal(a, b)


def test_digit_clip_keeps_the_flax_classes_functions_bit_for_bit():
  flax_clip = _flax_class("transformers", "FlaxCLIPModel")
  folder = digit_models.ROOT / "clip"
  ours, params = clip_models.load_clip_model(folder)
  assert ours.config.text_config.numerics == "flax"
  ref = flax_clip.from_pretrained(str(folder))
  ids = np.array([[564, 10, 20, 30, 565, 565, 565, 565], [564, 11, 565, 565, 565, 565, 565, 565]])
  mask = (np.cumsum(ids == 565, axis=1) <= 1).astype(np.int32)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(
      ours.apply({"params": params}, ids, mask, method="get_text_features"),
      ref.get_text_features(ids, mask, params=ref.params))
  np.testing.assert_array_equal(
      ours.apply({"params": params}, pixels, method="get_image_features"),
      ref.get_image_features(pixels.transpose(0, 3, 1, 2), params=ref.params))
