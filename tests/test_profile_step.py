"""experiments/profile_step.py: self times of nested trace events, UNet parts, a real trace."""

import collections
import json
import os
import pathlib
import subprocess
import sys
import types

import experiment_scripts

ROOT = pathlib.Path(__file__).resolve().parent.parent
Event = collections.namedtuple("Event", ["name", "start_ns", "duration_ns"])


def test_nested_events_count_once():
  profile_step = experiment_scripts.load("profile_step")
  events = [Event("while.1", 0, 100), Event("fusion.2", 10, 30), Event("fusion.3", 50, 40),
            Event("fusion.4", 200, 5)]
  assert sorted(profile_step.self_times(events)) == [
      ("fusion.2", 30), ("fusion.3", 40), ("fusion.4", 5), ("while.1", 30)]


def test_parts_and_op_names():
  profile_step = experiment_scripts.load("profile_step")
  part = profile_step.part_of
  assert part("jit(step)/UNet/up_blocks_1/attentions_1/transformer_blocks_0/attn1/while/"
              "body/closed_call/reduce_max") == "self-attention"
  assert part("jit(step)/UNet/down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/"
              "dot_general") == "feed-forward"
  assert part("jit(step)/UNet/conv_norm_out/reduce_sum") == "norms"
  assert part("jit(step)/UNet/down_blocks_0/resnets_0/conv1/conv_general_dilated") == (
      "convolutions")
  assert part("jit(step)/UNet/time_embedding/linear_1/dot_general") == "other"
  hlo = ('  %ynn_fusion.8 = f32[1,256,256]{2,1,0} fusion(%a), kind=kCustom, '
         'metadata={op_name="jit(step)/UNet/attn1/reduce_max" stack_frame_id=1}\n'
         '  ROOT %tuple.1 = (f32[2]) tuple(%b)\n')
  assert profile_step.op_names(hlo) == {"ynn_fusion.8": "jit(step)/UNet/attn1/reduce_max"}


def test_ops_count_on_whichever_thread_ran_them():
  """On a busy machine XLA:CPU runs much of a step on the client or caller thread, not its workers."""
  profile_step = experiment_scripts.load("profile_step")
  line = lambda name, events: types.SimpleNamespace(name=name, events=events)
  profile = types.SimpleNamespace(planes=[types.SimpleNamespace(lines=[
      line("tf_XLAEigen/1", [Event("fusion.1", 0, 2_000_000)]),
      line("tf_XLAPjRtCpuClient/2", [Event("fusion.2", 0, 6_000_000)]),
      line("python", [Event("convolution.3", 0, 4_000_000), Event("jit_step", 0, 9_000_000)])])])
  names = {"fusion.1": "jit(step)/UNet/attn1/dot_general",
           "fusion.2": "jit(step)/UNet/attn2/dot_general",
           "convolution.3": "jit(step)/UNet/conv_in/conv_general_dilated"}
  assert profile_step.thread_ms_by_part(profile, names, repeats=2) == {
      "cross-attention": 3.0, "convolutions": 2.0, "self-attention": 1.0}


def test_profiles_a_real_step(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, str(ROOT / "experiments" / "profile_step.py"), "--slots=1",
                  "--repeats=1", f"--out={tmp_path}"], check=True, env=env, timeout=600)
  result = json.loads((tmp_path / "profile_step_tiny.json").read_text())
  parts = result["thread_ms_by_part"]
  assert result["slots"] == 1 and {"self-attention", "cross-attention", "convolutions"} <= set(parts)
  assert all(ms > 0 for ms in parts.values())
