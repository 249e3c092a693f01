"""Up-front checks of every config value and input path; the CLI's one-line errors and --help."""

import pathlib
import subprocess
import sys

import pytest

from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax import main as main_lib
from discl_jax import pipeline
from discl_jax import shipped_configs
from discl_jax import stages

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("key,typo,suggested", [
    ("data.name", "digit_lt", "digits_lt"),
    ("data.on_bad_image", "skipp", "skip"),
    ("data.verify_images", "decod", "decode"),
    ("hard.rule", "few_class", "few_classes"),
    ("prompts.source", "files", "file"),
    ("diffusion.dtype", "bf16", "bfloat16"),
    ("diffusion.scheduler", "ddmi", "ddim"),
    ("score.dtype", "float23", "float32"),
    ("train.model", "resnet23", "resnet32"),
    ("train.loss", "balanced_sofmax", "balanced_softmax"),
    ("train.optimizer", "adamm", "adam"),
    ("curriculum.schedule", "syn_to_rael", "syn_to_real"),
    ("curriculum.signal", "prob_gian", "prob_gain"),
    ("eval.select_metric", "macro_f", "macro_f1"),
    ("eval.select_split", "vall", "val"),
])
def test_every_enum_family_is_checked_with_a_suggestion(key, typo, suggested):
  config = config_lib.base_config()
  section, name = key.split(".")
  config[section][name] = typo
  with pytest.raises(ValueError, match=rf"{key}='{typo}' is not one of .*did you mean '{suggested}'"):
    config_checks.validate(config)


@pytest.mark.parametrize("key,value,words", [
    ("train.epochs", 0, "evaluates train.init_checkpoint as it is; set train.init_checkpoint"),
    ("train.epochs", -1, "an integer >= 0"),
    ("data.crop_scale", (0.0, 1.0), r"0.0 is not a number in \(0, 1\]"),
    ("data.crop_scale", (0.9, 0.5), r"must be \(low, high\) with low <= high"),
    ("data.color_jitter", 1.0, r"in \[0, 1\)"),
    ("prompts.llm_descriptions", 0, "an integer >= 1"),
    ("train.batch_size", 0, "an integer >= 1"),
    ("eval.batch_size", -8, "an integer >= 1"),
    ("diffusion.seeds_per_level", 0, "an integer >= 1"),
    ("score.threshold", 1.5, r"in \[-1, 1\]"),
    ("diffusion.strengths", (0.5, 1.5), r"1.5 is not a number in \(0, 1\]"),
    ("diffusion.strengths", (0.0,), r"0.0 is not a number in \(0, 1\]"),
    ("curriculum.levels", (1.0,), r"in \[0, 1\)"),
    ("curriculum.nontail_fraction", 0.0, r"in \(0, 1\]"),
    ("data.max_skip_fraction", 1.5, r"in \[0, 1\]"),
    ("train.learning_rate", 0.0, "a number > 0"),
])
def test_ranges_are_checked(key, value, words):
  config = config_lib.base_config()
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=rf"{key}=.*{words}"):
    config_checks.validate(config)


def test_rules_across_keys_and_every_error_at_once():
  config = config_lib.base_config()
  config.train.model = "clip"
  config.eval.select_split = "test"
  config.eval.splits = ("val", "test")
  config.score.text_template = "a photo"
  config.train.epochs = 0
  with pytest.raises(ValueError) as info:
    config_checks.validate(config)
  message = str(info.value)
  for part in ("train.loss='flyp'", "never on a test split", "must contain '{c}'",
               "train.epochs=0"):
    assert part in message


def test_enums_come_from_the_owning_modules():
  from discl_jax.curriculum import state  # pylint: disable=g-import-not-at-top
  from discl_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  table = config_checks.enums()
  assert table["curriculum.schedule"] is state.SCHEDULES
  assert table["diffusion.scheduler"] is schedules.KINDS
  schema = config_lib.base_config()
  for key in list(table) + list(config_checks.RANGES):
    assert config_checks.get(schema, key) is not config_checks._MISSING, key


def test_values_are_checked_before_the_first_stage(tmp_path):
  config = config_lib.base_config()
  config.train.epochs = -1          # used by the 5th stage only
  with pytest.raises(ValueError, match="train.epochs=-1 must be an integer >= 0"):
    pipeline.run_stages(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()


def test_missing_inputs_are_named_before_any_stage(tmp_path):
  config = config_lib.base_config()
  config.data.name = "imagenet_lt"
  config.data.root = str(tmp_path / "no_images")
  config.data.train_list = str(tmp_path / "train.txt")
  config.data.class_names_file = str(tmp_path / "names.txt")
  config.prompts.source = "file"
  config.prompts.descriptions_file = str(tmp_path / "descriptions.json")
  config.diffusion.model = str(tmp_path / "sd")
  config.train.init_checkpoint = str(tmp_path / "base_ckpt")
  with pytest.raises(FileNotFoundError) as info:
    pipeline.run_stages(config, tmp_path / "work")
  message = str(info.value)
  for part in ("data.root", "no_images", "data.train_list", "data.test_list is not set",
               "data.class_names_file", "prompts.descriptions_file", "diffusion.model",
               "train.init_checkpoint"):
    assert part in message, part
  assert not (tmp_path / "work").exists()
  # Only the inputs of the stages asked for: eval reads the data but no model.
  with pytest.raises(FileNotFoundError) as info:
    pipeline.run_stages(config, tmp_path / "work", ("eval",))
  assert "data.root" in str(info.value) and "diffusion.model" not in str(info.value)
  # A hub id is not a local path.
  config.diffusion.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  assert "diffusion.model" not in [k for k, _, _ in config_checks.inputs(config, ("generate",))]


def test_tfds_data_dir_is_checked_unless_it_is_to_be_prepared(tmp_path):
  config = config_lib.base_config()
  config.data.name = "cifar100_lt"
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="data.data_dir"):
    config_checks.check_inputs(config, ("hard",))
  config.data.prepare = True
  config_checks.check_inputs(config, ("hard",))


def _discl(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "discl_jax.main", *args],
                        capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_errors_are_one_line(tmp_path):
  cases = [
      ("--config=configs/nope.py", ("config file 'configs/nope.py' not found",)),
      ("--config=demo:nope", ("unknown config argument 'nope'",)),
      ("--config=configs/demo.py --config.train.epochs=-1 --config.curriculum.schedule=syn_to_rael",
       ("train.epochs=-1 must be an integer >= 0", "did you mean 'syn_to_real'")),
  ]
  for args, parts in cases:
    result = _discl(*args.split(), f"--workdir={tmp_path / 'w'}", "--stage=hard")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, args
    assert len(lines) == 1 and lines[0].startswith("discl: "), (args, result.stderr)
    assert all(part in lines[0] for part in parts), (args, lines[0])
  verbose = _discl("--config=configs/demo.py", "--config.train.epochs=-1", "--verbosity=1",
                   f"--workdir={tmp_path / 'w'}", "--stage=hard")
  assert "Traceback" in verbose.stderr and "train.epochs=-1" in verbose.stderr


def test_cli_turns_any_exception_into_one_line(monkeypatch, tmp_path, capsys):
  def broken(config, workdir, names):
    raise OSError(28, "No space left on device", str(tmp_path / "x.jsonl"))
  monkeypatch.setattr(pipeline, "run_stages", broken)
  monkeypatch.setattr(main_lib.parallel, "initialize", lambda config: None)
  monkeypatch.setattr(main_lib, "_CONFIG", type("Flag", (), {"value": config_lib.base_config()}))
  monkeypatch.setattr(main_lib, "_WORKDIR", type("Flag", (), {"value": str(tmp_path)}))
  monkeypatch.setattr(main_lib, "_STAGE", type("Flag", (), {"value": "all"}))
  with pytest.raises(SystemExit) as info:
    main_lib.main(["discl"])
  assert str(info.value) == (f"discl: OSError: [Errno 28] No space left on device: "
                             f"'{tmp_path / 'x.jsonl'}'")


def test_help_lists_stages_outputs_configs_variants_and_examples():
  result = _discl("--help", cwd=pathlib.Path("/"))
  assert result.returncode == 0
  text = result.stdout
  for name in stages.ORDER:
    assert f"  {name} " in text and main_lib.STAGE_OUTPUTS[name] in text
  for name in shipped_configs.names():
    _, variants = shipped_configs.describe(name)
    assert f"configs/{name}.py; variants: {', '.join(variants)}" in text
  assert "runlocal, base" in text                       # demo's variants
  assert "discl --config=configs/demo.py --workdir=workdir/demo" in text
  assert "--workdir" in text and "--stage" in text     # the flags themselves


def test_shipped_config_names_resolve_to_the_package_files():
  assert set(shipped_configs.names()) >= {"demo", "cifar100_lt", "imagenet_lt", "inat2018",
                                          "iwildcam"}
  spec = shipped_configs.resolve("demo:runlocal")
  assert spec.endswith("configs/demo.py:runlocal")
  assert shipped_configs.resolve("configs/demo.py") == "configs/demo.py" or not (
      pathlib.Path("configs/demo.py").is_file())
  with pytest.raises(ValueError, match="shipped config"):
    shipped_configs.resolve("demoo")
  config = config_lib.load_file(spec.split(":")[0], "runlocal")
  assert config.train.epochs == 2
