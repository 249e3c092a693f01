"""Stage `train`: curriculum training from the workdir's data and spectrum.

Reads the accepted spectrum rows, writes workdir/ckpt, metrics.jsonl, tb/ and
train_result.json. Rerunning resumes from the latest checkpoint; a finished
run returns at once.
"""

from absl import logging

from discl_jax.train import loop


def run(config, workdir):
  """Trains and evaluates; returns the final metrics dict.

  Raises SystemExit when the run was preempted (a checkpoint was saved; rerun
  the stage to resume), so later stages do not run on a partial model.
  """
  result = loop.train_and_evaluate(config, workdir)
  if result.get("preempted"):
    raise SystemExit(
        f"train: preempted in epoch {result['epoch']} after batch "
        f"{result['batches_done']}; checkpoint saved in {workdir}, rerun to resume")
  logging.info("train: best epoch %s, test/all %s", result.get("best_epoch"),
               result.get("test/all"))
  return result
