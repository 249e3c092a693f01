"""`prompts.source="llm"`: the reference's request and parsing against a loopback chat stub."""

import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest

from discl_jax import config as config_lib
from discl_jax import config_checks
from discl_jax import pipeline
from discl_jax import provenance
from discl_jax import workdir as wd
from discl_jax.diffusion import llm_descriptions as llm
from discl_jax.stages import prompts_stage

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The reference's request (data_generation/ImageNet_LT/get_text_prompt.py), for class "goldfish".
REFERENCE_REQUEST = (
    "Please provide 10 language descriptions for random scenes that contain only the class "
    "'goldfish' from the ImageNet Longtaill dataset. Each description should be different and "
    "contain a minimum of 15 words. These descriptions will serve as a guide for Stable "
    "Diffusion in generating images. answer in format of: prompt1\nprompt2\n")


class ChatStub(http.server.ThreadingHTTPServer):
  """A loopback OpenAI-compatible chat endpoint: records each request, answers from a script.

  `script[class]` is a list of answers popped per request for that class: an int is an
  HTTP status (429 with Retry-After: 0), a str the message content; when it is empty the
  answer is 12 numbered descriptions with a blank line after the first.
  """

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _ChatHandler)
    self.requests, self.script = [], {}
    self.thread = threading.Thread(target=self.serve_forever, daemon=True)
    self.thread.start()

  @property
  def base_url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/v1"

  def asked(self):
    """Returns the class of each request so far, in order."""
    return [r["content"].split("the class '")[1].split("'")[0] for r in self.requests]


class _ChatHandler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    del args

  def do_POST(self):  # pylint: disable=invalid-name
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    content = body["messages"][0]["content"]
    self.server.requests.append({"path": self.path, "model": body["model"], "content": content,
                                 "auth": self.headers.get("Authorization")})
    name = content.split("the class '")[1].split("'")[0]
    queue = self.server.script.get(name, [])
    answer = queue.pop(0) if queue else "\n".join(
        [f"1. a {name} in scene 1", ""] + [f"{k}. a {name} in scene {k}" for k in range(2, 13)])
    if isinstance(answer, int):
      self.send_response(answer)
      self.send_header("Retry-After", "0")
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data.encode())


@pytest.fixture
def stub():
  server = ChatStub()
  yield server
  server.shutdown()
  server.server_close()


def test_request_is_the_reference_text_and_parsing_strips_numbering():
  assert llm.request_text("goldfish") == REFERENCE_REQUEST
  answer = "1. A goldfish in a bowl.\n\n2.  Two goldfish.\n 10. A pond\n1.5 litres of water"
  assert llm.parse_answer(answer) == ["A goldfish in a bowl.", "Two goldfish.", "A pond",
                                      "1.5 litres of water"]


def test_client_retries_429_and_5xx_and_asks_again_while_short(stub):
  stub.script["goldfish"] = [429, 503, "1. one\n2. two", "\n".join(f"{k}. d{k}" for k in range(10))]
  client = llm.ChatClient(stub.base_url, "m", api_key="sk-test", backoff_s=0.01)
  got = llm.class_descriptions(client, "goldfish", count=10)
  assert got == [f"d{k}" for k in range(10)]
  assert stub.asked() == ["goldfish"] * 4  # 429, 503, a short answer asked again, the answer
  assert {r["auth"] for r in stub.requests} == {"Bearer sk-test"}
  assert {r["path"] for r in stub.requests} == {"/v1/chat/completions"}
  assert llm.retry_wait({}, 0.5) == 0.5 and llm.retry_wait({"Retry-After": "3"}, 0.5) == 3.0


def test_errors_are_one_line_naming_class_and_endpoint(stub):
  client = llm.ChatClient(stub.base_url, "m", api_key="", backoff_s=0.0, max_retries=1)
  stub.script["koala"] = [401]
  with pytest.raises(llm.LLMError, match=r"class 'koala', endpoint http://127\.0\.0\.1:\d+/v1/"
                                         r"chat/completions: HTTP 401 .*OPENAI_API_KEY"):
    llm.class_descriptions(client, "koala")
  stub.script["koala"] = [500, 500]
  with pytest.raises(llm.LLMError, match="HTTP 500 .* after 1 retries"):
    llm.class_descriptions(client, "koala")
  stub.script["koala"] = ["1. only one"] * 2
  with pytest.raises(llm.LLMError, match=r"class 'koala', endpoint .*: 2 answers, none with "
                                         r"10 descriptions \(at most 1\)"):
    llm.class_descriptions(client, "koala", max_answers=2)
  gone = llm.ChatClient("http://127.0.0.1:9/v1", "m", api_key="")  # the discard port: refused
  with pytest.raises(llm.LLMError, match=r"class 'koala', endpoint http://127.0.0.1:9/v1/chat/"
                                         r"completions: unreachable") as e:
    llm.class_descriptions(gone, "koala")
  assert "\n" not in str(e.value)


def _discl_prompts(work, stub):
  return subprocess.run(
      [sys.executable, "-m", "discl_jax.main", "--config=configs/demo.py", f"--workdir={work}",
       "--stage=prompts", "--config.prompts.source=llm",
       f"--config.prompts.llm_base_url={stub.base_url}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "OPENAI_API_KEY": ""})


def test_discl_prompts_from_an_llm_resume_after_a_failure(tmp_path, stub):
  work = tmp_path / "work"
  config = config_lib.load_file(ROOT / "configs" / "demo.py")
  pipeline.run_stages(config, work, ("hard",))  # the Few classes: five, six, seven, eight, nine
  # First run: classes are asked in sorted order; "nine" is refused (401) after "five".
  stub.script["nine"] = [401]
  failed = _discl_prompts(work, stub)
  assert failed.returncode != 0
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith("discl: LLMError: class 'nine', endpoint http://127.0.0.1:")
  assert "HTTP 401" in last
  cache = json.loads((work / prompts_stage.LLM_DESCRIPTIONS).read_text())
  assert stub.asked() == ["eight", "five", "nine"]
  assert list(cache) == ["eight", "five"] and not (work / wd.PROMPTS).exists()
  assert {r["model"] for r in stub.requests} == {"gpt-3.5-turbo-0125"}
  assert {r["auth"] for r in stub.requests} == {None}  # no key: none sent
  assert stub.requests[0]["content"] == llm.request_text("eight")
  # The rerun asks only for the classes the cache lacks; a 429 on the way is retried.
  stub.script["nine"] = [429]
  done = _discl_prompts(work, stub)
  assert done.returncode == 0, done.stderr[-2000:]
  assert stub.asked()[3:] == ["nine", "nine", "seven", "six"]
  document = json.loads((work / wd.PROMPTS).read_text())
  for name in ("five", "six", "seven", "eight", "nine"):
    assert document["classes"][name] == [
        f"a 8k real photo: a {name} in scene {k}" for k in range(1, 11)]
  assert all(p.startswith("a 8k real photo: ") for per_seed in document["sources"].values()
             for p in per_seed)


def test_llm_keys_are_checked_before_any_stage():
  config = config_lib.base_config()
  config.prompts.update(source="llm", llm_base_url="127.0.0.1:8000/v1", llm_model="",
                        llm_descriptions=0)
  with pytest.raises(ValueError) as e:
    config_checks.validate(config)
  for part in ("prompts.llm_base_url='127.0.0.1:8000/v1' must be an http:// or https:// URL",
               "prompts.source='llm' needs prompts.llm_model",
               "prompts.llm_descriptions=0 must be an integer >= 1"):
    assert part in str(e.value)


def test_a_moved_endpoint_keeps_the_prompts_but_another_model_does_not(tmp_path):
  config = config_lib.base_config()
  config.prompts.source = "llm"
  before = provenance.fingerprint(config, "prompts", tmp_path)
  config.prompts.llm_base_url = "http://127.0.0.1:8001/v1"
  assert provenance.fingerprint(config, "prompts", tmp_path) == before
  config.prompts.llm_model = "llama-3-8b-instruct"
  assert provenance.fingerprint(config, "prompts", tmp_path)["prompts.llm_model"] == (
      "llama-3-8b-instruct")
