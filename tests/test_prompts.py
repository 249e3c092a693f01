"""Prompt sources, the deterministic choice per image, and the `prompts` stage."""

import json
import pathlib

import ml_collections
import pytest

from discl_jax import config as config_lib
from discl_jax import provenance
from discl_jax import seeding
from discl_jax import workdir as wd
from discl_jax.diffusion import prompts
from discl_jax.stages import prompts_stage

ROOT = pathlib.Path(__file__).resolve().parent.parent
HARD = [dict(source_id=f"digits/{i:04d}", label=9, class_name="nine", reason="few_class",
             class_count=6) for i in range(6)] + [
    dict(source_id="digits/0100", label=8, class_name="great_white", reason="few_class",
         class_count=8)]


def _prompts_config(**overrides):
  c = config_lib.base_config().prompts
  c.update(overrides)
  return c


def test_templates_and_builtin_sets():
  c = _prompts_config(templates=("a photo of a {c}", "wild"))
  classes = prompts.class_prompts(c, ["nine", "great_white"])
  assert classes["great_white"][0] == "a photo of a great white"
  assert "a great white in the wild" in classes["great_white"]
  assert len(classes["nine"]) == 1 + len(prompts.BUILTIN_TEMPLATES["wild"])
  with pytest.raises(ValueError, match="'a photo'.*built-in sets"):
    prompts.class_prompts(_prompts_config(templates=("a photo",)), ["nine"])
  with pytest.raises(ValueError, match="prompts.source"):
    prompts.class_prompts(_prompts_config(source="llm"), ["nine"])


def test_choice_is_deterministic_and_spreads_over_candidates():
  candidates = [f"p{i}" for i in range(5)]
  picks = [prompts.choose_prompt(candidates, "nine", f"img{i}", seed=0) for i in range(50)]
  again = [prompts.choose_prompt(candidates, "nine", f"img{i}", seed=0) for i in range(50)]
  assert picks == again
  assert len(set(picks)) == 5
  other_seed = [prompts.choose_prompt(candidates, "nine", f"img{i}", seed=1) for i in range(50)]
  assert other_seed != picks


def test_description_file_with_format(tmp_path):
  path = tmp_path / "descriptions.json"
  path.write_text(json.dumps({
      "nine": ["a nine painted on a red barn door", "a nine on a football shirt"],
      "great_white": ["a shark under a fishing boat"], "unused": ["x"]}))
  c = _prompts_config(source="file", descriptions_file=str(path),
                      description_format="a 8k real photo: {d}")
  document = prompts.build_prompts(c, HARD, seed=0, seeds_per_level=2)
  assert document["classes"]["nine"] == [
      "a 8k real photo: a nine painted on a red barn door",
      "a 8k real photo: a nine on a football shirt"]
  assert set(document["classes"]) == {"nine", "great_white"}
  assert document["sources"]["digits/0100"] == ["a 8k real photo: a shark under a fishing boat"] * 2
  assert document["source_classes"]["digits/0100"] == "great_white"
  assert set(document["sources"]) == {r["source_id"] for r in HARD}


def test_description_file_errors_name_class_and_file(tmp_path):
  path = tmp_path / "descriptions.json"
  path.write_text(json.dumps({"nine": ["a nine on a wall"]}))
  c = _prompts_config(source="file", descriptions_file=str(path))
  with pytest.raises(ValueError) as e:
    prompts.build_prompts(c, HARD, seed=0, seeds_per_level=2)
  assert "great_white" in str(e.value) and str(path) in str(e.value)
  path.write_text(json.dumps({"nine": [], "great_white": ["x"]}))
  with pytest.raises(ValueError, match="'nine' must map to a non-empty list"):
    prompts.build_prompts(c, HARD, seed=0, seeds_per_level=2)
  path.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    prompts.build_prompts(c, HARD, seed=0, seeds_per_level=2)
  missing = _prompts_config(source="file", descriptions_file=str(tmp_path / "nope.json"))
  with pytest.raises(FileNotFoundError, match="nope.json"):
    prompts.build_prompts(missing, HARD, seed=0, seeds_per_level=2)
  with pytest.raises(ValueError, match="description_format"):
    prompts.build_prompts(_prompts_config(source="file", descriptions_file=str(path),
                                          description_format="no slot"), HARD, seed=0,
                            seeds_per_level=2)


def test_prompts_stage_writes_prompts_json(tmp_path):
  config = config_lib.base_config()
  config.prompts.templates = ("photo",)
  with pytest.raises(FileNotFoundError, match="hard"):
    prompts_stage.run(config, tmp_path)
  wd.append_jsonl(wd.path(tmp_path, wd.HARD), HARD)
  prompts_stage.run(config, tmp_path)
  document = json.loads(wd.path(tmp_path, wd.PROMPTS).read_text())
  assert set(document["sources"]) == {r["source_id"] for r in HARD}
  assert all(p in document["classes"]["nine"] for s, per_seed in document["sources"].items()
             if s != "digits/0100" for p in per_seed)
  assert all(len(per_seed) == config.diffusion.seeds_per_level
             for per_seed in document["sources"].values())
  first = wd.path(tmp_path, wd.PROMPTS).read_bytes()
  prompts_stage.run(ml_collections.ConfigDict(config), tmp_path)
  assert wd.path(tmp_path, wd.PROMPTS).read_bytes() == first


def test_per_seed_choice_gives_an_image_different_prompts_per_seed():
  candidates = [f"p{i}" for i in range(10)]
  for i in range(20):
    per_seed = [prompts.choose_prompt(candidates, "nine", f"img{i}", 0, k) for k in range(8)]
    assert len(set(per_seed)) == 8  # 8 seeds, 10 descriptions: all different
    assert per_seed == [prompts.choose_prompt(candidates, "nine", f"img{i}", 0, k)
                        for k in range(8)]
    per_image = {prompts.choose_prompt(candidates, "nine", f"img{i}", 0, k, choice="per_image")
                 for k in range(8)}
    assert per_image == {per_seed[0]}
    # A regeneration attempt takes a fresh candidate, in both rules.
    attempts = [prompts.choose_prompt(candidates, "nine", f"img{i}", 0, 3, attempt=a)
                for a in range(5)]
    assert len(set(attempts)) == 5 and attempts[0] == per_seed[3]
  with pytest.raises(ValueError, match="prompts.choice"):
    prompts.choose_prompt(candidates, "nine", "img0", 0, choice="per_class")


def test_prompts_document_per_seed_and_per_image():
  c = _prompts_config(templates=("scenes",))
  per_seed = prompts.build_prompts(c, HARD, seed=0, seeds_per_level=4)
  assert per_seed["choice"] == "per_seed"
  for row in HARD:
    assert len(set(per_seed["sources"][row["source_id"]])) == 4
  c.choice = "per_image"
  per_image = prompts.build_prompts(c, HARD, seed=0, seeds_per_level=4)
  for row in HARD:  # one prompt for every seed, the seed-0 pick of per_seed
    assert per_image["sources"][row["source_id"]] == [per_seed["sources"][row["source_id"]][0]] * 4


def test_demo_keeps_its_per_image_prompts_and_store():
  # The demo chooses per image, as before prompts.choice existed: its prompts and
  # its generation fingerprint (so its existing spectrum) are unchanged.
  demo = config_lib.load_file(ROOT / "configs" / "demo.py")
  assert demo.prompts.choice == "per_image"
  document = prompts.build_prompts(demo.prompts, HARD, seed=0, seeds_per_level=2)
  candidates = document["classes"]["nine"]
  for row in HARD[:6]:
    old = candidates[seeding.stable_hash("prompt", 0, "nine", row["source_id"]) % len(candidates)]
    assert document["sources"][row["source_id"]] == [old, old]
  assert "choice" not in provenance.generation_fingerprint(demo)["prompts"]
  demo.prompts.choice = "per_seed"
  assert provenance.generation_fingerprint(demo)["prompts"]["choice"] == "per_seed"


def test_a_store_made_under_another_prompt_choice_is_refused(tmp_path):
  from discl_jax.data import spectrum_store  # pylint: disable=g-import-not-at-top
  from discl_jax.diffusion import jobs  # pylint: disable=g-import-not-at-top
  config = config_lib.load_file(ROOT / "configs" / "demo.py")
  store = spectrum_store.SpectrumStore(tmp_path / "spectrum", 0, 1)
  jobs.check_provenance(config, tmp_path, store)
  config.prompts.choice = "per_seed"
  with pytest.raises(ValueError, match=r"prompts\.choice is 'per_seed' now but was '<unset>'"):
    jobs.check_provenance(config, tmp_path, store)
