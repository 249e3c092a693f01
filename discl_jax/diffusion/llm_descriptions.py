"""Scene descriptions per class from an OpenAI-compatible chat endpoint (`prompts.source="llm"`).

The reference wrote its ImageNet-LT prompts with `gpt-3.5-turbo-0125`
(`data_generation/ImageNet_LT/get_text_prompt.py`, docs/design.md §6): one chat
request per class with `REQUEST`, the answer split on newlines, asked again
while it is too short, each line stripped of a leading "N. ". Here the first
`count` non-empty lines are kept, and a class is asked again (up to
`max_answers` answers) while it has fewer: with the default 10 this covers the
reference's rule (asked again while 8 lines or fewer) and never keeps a short
list. Blank lines between answers are dropped (the reference kept them as
empty descriptions).

Any endpoint that speaks `POST {base_url}/chat/completions` works: OpenAI's, or
a local vLLM / Ollama / llama.cpp server. The key comes from $OPENAI_API_KEY
(sent as a bearer token when set; a local server needs none). 429 and 5xx
answers are retried after their Retry-After, else with exponential backoff; a 401, an unreachable endpoint,
any other error status or an answer that never reaches the count raises
`LLMError`, one line naming the class and the endpoint.

Descriptions are cached per class in a JSON file {class: [descriptions]} (the
format of `prompts.descriptions_file`), rewritten atomically after each class,
so a killed run asks only for the classes it lacks.
"""

import json
import os
import pathlib
import re
import time
import urllib.error
import urllib.request

from discl_jax import workdir as wd

REQUEST = ("Please provide {count} language descriptions for random scenes that contain only "
           "the class '{name}' from the ImageNet Longtaill dataset. Each description should be "
           "different and contain a minimum of 15 words. These descriptions will serve as a "
           "guide for Stable Diffusion in generating images. answer in format of: "
           "prompt1\nprompt2\n")  # the reference's text, typo included
API_KEY_ENV = "OPENAI_API_KEY"
RETRY_STATUSES = (429, 500, 502, 503, 504)
_NUMBERING = re.compile(r"^\d+\.\s+")


class LLMError(RuntimeError):
  """A class's descriptions could not be had from the endpoint (one-line message)."""


def request_text(class_name, count=10):
  """Returns the reference's request for `count` descriptions of `class_name`."""
  return REQUEST.format(count=count, name=class_name)


def parse_answer(text):
  """Returns the descriptions in an answer: its lines, stripped, without a leading "N. ",
  empty lines dropped."""
  lines = (_NUMBERING.sub("", line.strip()) for line in str(text).split("\n"))
  return [line for line in lines if line]


class ChatClient:
  """POSTs one-message chat requests to `{base_url}/chat/completions`; returns the answer text.

  `backoff_s` is the first wait before retrying a 429 / 5xx answer (doubled
  per retry, at most `max_retries` retries).
  """

  def __init__(self, base_url, model, *, api_key=None, timeout_s=120.0, backoff_s=2.0,
               max_retries=6):
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model = model
    self.api_key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    self.timeout_s, self.backoff_s, self.max_retries = timeout_s, backoff_s, max_retries

  def ask(self, content, class_name):
    """Returns the text of the first choice's message for user message `content`.

    Raises LLMError naming `class_name` and the endpoint on a 401 or other
    error status, an unreachable endpoint, an answer without a message, or a
    429 / 5xx that lasts past the retries.
    """
    body = json.dumps({"model": self.model,
                       "messages": [{"role": "user", "content": content}]}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    where = f"class {class_name!r}, endpoint {self.url}"
    retries = 0
    while True:
      request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          answer = json.loads(response.read().decode("utf-8"))
        return answer["choices"][0]["message"]["content"]
      except urllib.error.HTTPError as e:
        if e.code in RETRY_STATUSES and retries < self.max_retries:
          time.sleep(retry_wait(e.headers, self.backoff_s * 2 ** retries))
          retries += 1
          continue
        after = f" after {retries} retries" if retries else ""
        raise LLMError(f"{where}: HTTP {e.code} {e.reason}{_status_hint(e.code)}{after}") from None
      except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise LLMError(f"{where}: unreachable ({reason}); check prompts.llm_base_url") from None
      except (ValueError, KeyError, IndexError, TypeError) as e:
        raise LLMError(f"{where}: the answer is not a chat completion ({type(e).__name__}: "
                       f"{e})") from None


def retry_wait(headers, backoff_s, longest_s=60.0):
  """Returns the seconds to wait before a retry: the answer's Retry-After (seconds), else
  `backoff_s`, at most `longest_s`."""
  try:
    wait = float((headers or {}).get("Retry-After", backoff_s))
  except (TypeError, ValueError):  # an HTTP date: not worth parsing, back off instead
    wait = backoff_s
  return min(max(wait, 0.0), longest_s)


def _status_hint(code):
  if code == 401:
    return f" (unauthorized: set ${API_KEY_ENV} to a valid key)"
  if code == 404:
    return " (is prompts.llm_base_url the API root, e.g. https://api.openai.com/v1, and " \
           "prompts.llm_model served there?)"
  return ""


def class_descriptions(client, class_name, count=10, max_answers=5):
  """Returns the first `count` descriptions of `class_name`, asking again while an answer
  has fewer; LLMError names the class and endpoint when `max_answers` answers all do."""
  content = request_text(class_name, count)
  best = 0
  for _ in range(max_answers):
    found = parse_answer(client.ask(content, class_name))
    if len(found) >= count:
      return found[:count]
    best = max(best, len(found))
  raise LLMError(f"class {class_name!r}, endpoint {client.url}: {max_answers} answers, none "
                 f"with {count} descriptions (at most {best}); lower prompts.llm_descriptions "
                 "or try another prompts.llm_model")


def read_cache(path):
  """Returns the cached {class: [descriptions]} at `path`, or {} when there is none.

  Raises ValueError naming the file when it is not such a JSON object.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); delete it to ask the LLM again") from e
  if not isinstance(data, dict) or not all(
      isinstance(v, list) and all(isinstance(d, str) for d in v) for v in data.values()):
    raise ValueError(f"{path} must hold a JSON object {{class: [descriptions]}}; delete it "
                     "to ask the LLM again")
  return data


def fetch_descriptions(client, class_names, cache_path, count=10, max_answers=5, display=str,
                       log=None):
  """Returns {class: [count descriptions]} for `class_names`, asking only for classes the
  cache at `cache_path` lacks (or holds fewer than `count` of), and caching each answer.

  The request names a class as `display(class)` reads it; `log(k, class)` follows each answer.
  """
  cache = read_cache(cache_path)
  for k, name in enumerate(dict.fromkeys(class_names)):
    if len(cache.get(name, ())) >= count:
      continue
    cache[name] = class_descriptions(client, display(name), count, max_answers)
    wd.atomic_write_json(cache_path, cache)
    if log is not None:
      log(k + 1, name)
  return {name: cache[name][:count] for name in class_names}
