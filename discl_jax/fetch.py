"""`python -m discl_jax.fetch --config=CONFIG[:VARIANTS] [--config.KEY=VALUE ...]`: `discl --stage=fetch`.

Downloads the hub weights the config's stages load into the Hugging Face cache
(discl_jax/hub.py), so that a later run works with HF_HUB_OFFLINE=1.
"""

import sys

from discl_jax import main

if __name__ == "__main__":
  sys.argv[1:1] = [f"--stage={main.FETCH}"]
  main.run()
