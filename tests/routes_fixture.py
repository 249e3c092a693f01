"""Stand-ins for the paper routes' inputs, in their real formats, small enough for a 2-core CPU.

- `write_oltr`: ImageNet-LT as OLTR ships it: `path label` split lists beside an
  image tree, the readable class names (one per line) and the LLM descriptions JSON.
- `write_ldmlr_resnet10`: LDMLR's checkpoint layout, written with torch:
  `{"state_dict": {"model": {"module." + torchvision name: tensor}}}`.
- `write_tiny_pipeline`: a tiny SD 1.x- or SDXL-refiner-shaped diffusers folder as a hub
  snapshot holds it (model_index.json, PyTorch safetensors per sub-folder, tokenizer files).
- `write_tiny_clip`: a tiny transformers CLIP folder (config, model.safetensors, tokenizer).
- `write_tfds`: a TFDS dataset prepared in ArrayRecord under a data_dir, written by
  the real builder class (cifar100, i_naturalist2018) with tiny examples instead of
  the download, so the real builder reads it as if `tfds build` had made it.
"""

import io
import json
import pathlib

import numpy as np
from PIL import Image

from discl_jax.diffusion import models
from discl_jax.models import tiny

IMAGENET_NAMES = ("tench", "goldfish", "great white shark")
WNIDS = ("n01440764", "n01443537", "n01484850")


def _image(label, size, rng):
  """Returns a uint8 HxWx3 image: a class colour plus noise."""
  height, width = size
  base = np.array([[200, 60, 40], [40, 180, 60], [50, 70, 210], [190, 190, 60]])[label % 4]
  return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def write_oltr(root, train_per_class=(24, 3, 2), size=(32, 32), seed=0):
  """Writes ImageNet-LT's inputs under `root`; returns {input key: path}.

  The first class is Medium (>= 20 images), the others Few. Keys: data.root, data.train_list / val_list / test_list (OLTR's `path label`
  lines, paths relative to data.root as in ImageNet_LT_*.txt), data.class_names_file,
  prompts.descriptions_file.
  """
  root = pathlib.Path(root)
  images, rng = root / "imagenet", np.random.default_rng(seed)
  paths = {"data.root": images}
  for split, counts in (("train", train_per_class), ("val", (2,) * len(train_per_class)),
                        ("test", (2,) * len(train_per_class))):
    lines = []
    for label, n in enumerate(counts):
      for k in range(n):
        rel = f"{'train' if split == 'train' else 'val'}/{WNIDS[label]}/{WNIDS[label]}_{split}{k}.JPEG"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(label, size, rng)).save(images / rel, format="JPEG", quality=95)
        lines.append(f"{rel} {label}")
    paths[f"data.{split}_list"] = root / f"ImageNet_LT_{split}.txt"
    paths[f"data.{split}_list"].write_text("\n".join(lines) + "\n")
  paths["data.class_names_file"] = root / "imagenet_lt_classnames.txt"
  paths["data.class_names_file"].write_text("\n".join(IMAGENET_NAMES) + "\n")
  paths["prompts.descriptions_file"] = root / "imagenet_lt_descriptions.json"
  paths["prompts.descriptions_file"].write_text(json.dumps(
      {name: [f"a {name} in clear water", f"a {name} seen from the side"]
       for name in IMAGENET_NAMES}))
  return {k: str(v) for k, v in paths.items()}


def write_ldmlr_resnet10(path, num_classes, seed=0):
  """Writes a random ResNet-10 in LDMLR's checkpoint layout with torch.save; returns the path."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  state = {}

  def conv(name, out, inp, k):
    state[f"{name}.weight"] = torch.randn(out, inp, k, k, generator=gen) / (inp * k * k) ** 0.5

  def bn(name, n):
    state.update({f"{name}.weight": 0.5 + torch.rand(n, generator=gen),
                  f"{name}.bias": 0.1 * torch.randn(n, generator=gen),
                  f"{name}.running_mean": 0.1 * torch.randn(n, generator=gen),
                  f"{name}.running_var": 0.5 + torch.rand(n, generator=gen),
                  f"{name}.num_batches_tracked": torch.tensor(1000)})

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  inplanes = 64
  for stage, width in enumerate((64, 128, 256, 512), start=1):
    block = f"layer{stage}.0"
    conv(f"{block}.conv1", width, inplanes, 3)
    bn(f"{block}.bn1", width)
    conv(f"{block}.conv2", width, width, 3)
    bn(f"{block}.bn2", width)
    if width != inplanes:
      conv(f"{block}.downsample.0", width, inplanes, 1)
      bn(f"{block}.downsample.1", width)
    inplanes = width
  state["fc.weight"] = torch.randn(num_classes, 512, generator=gen) / 512 ** 0.5
  state["fc.bias"] = torch.zeros(num_classes)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save({"state_dict": {"model": {f"module.{k}": v for k, v in state.items()},
                             "optimizer": {}}, "train_info": {"epoch": 100}}, path)
  return path


def write_tiny_pipeline(root, family):
  """Writes a tiny random `family` ("sd" or "sdxl_refiner") pipeline as a hub snapshot; returns root.

  Written by diffusers' and transformers' PyTorch classes (safetensors), as the hub holds them.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  if family == "sd":
    tok = tiny.write_tokenizer(root / "tokenizer")
    unet_cfg, vae_cfg, text_cfg = tiny.sd_configs(
        len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id)
    text = {"text_encoder": (CLIPTextModel, text_cfg)}
    scheduler = models.SD_SCHEDULER_CONFIG
  else:
    tok = tiny.write_tokenizer(root / "tokenizer_2", pad_token="!")
    unet_cfg, vae_cfg, text_cfgs = tiny.sdxl_configs(
        family, len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id)
    vae_cfg = dict(vae_cfg, force_upcast=True)
    text = {"text_encoder_2": (CLIPTextModelWithProjection, text_cfgs["text_encoder_2"])}
    scheduler = models.SDXL_SCHEDULER_CONFIG
  torch.manual_seed(0)
  modules = {"unet": UNet2DConditionModel(**unet_cfg), "vae": AutoencoderKL(**vae_cfg)}
  modules.update({name: cls(CLIPTextConfig(**cfg)) for name, (cls, cfg) in text.items()})
  for name, module in modules.items():
    module.save_pretrained(root / name, safe_serialization=True)
  models.write_pipeline_files(root, scheduler, family)
  return root


def write_tiny_clip(root):
  """Writes a tiny random CLIP folder (transformers layout, model.safetensors); returns it."""
  return tiny.build_clip(root, seed=0, weights_format="safetensors")


def _png(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def write_tfds(name, data_dir, splits, size, seed=0):
  """Prepares TFDS dataset `name` in `data_dir` from tiny examples; returns the data_dir.

  `splits` maps a split name to its images per label ({"train": (6, 3, 1), ...});
  each example gets every feature the real builder declares.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  real = type(tfds.builder(name))
  rng = np.random.default_rng(seed)

  def examples(split, counts):
    for label, n in enumerate(counts):
      for k in range(n):
        key = f"{split}_{label}_{k}"
        example = {"id": key, "image": _png(_image(label, size, rng)), "label": label}
        example.update({extra: 0 for extra in ("coarse_label", "supercategory")
                        if extra in real_features})
        yield key, example

  class TinyStandIn(real, skip_registration=True):  # pylint: disable=missing-class-docstring
    name = real.name

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: examples(split, counts) for split, counts in splits.items()}

  builder = TinyStandIn(data_dir=str(data_dir), file_format="array_record")
  real_features = builder.info.features
  if name == "cifar100":  # the real builder reads the names from the download
    builder.info.features["label"].names = CIFAR100_NAMES
    builder.info.features["coarse_label"].names = [f"superclass{i}" for i in range(20)]
  builder.download_and_prepare(file_format="array_record")
  return str(data_dir)


CIFAR100_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate "
    "poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone "
    "television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm").split()
