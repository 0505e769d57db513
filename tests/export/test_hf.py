"""Export to / import from the Hugging Face format, checked by `transformers` itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.export.hf import export_hf
from scratchllm.export.import_hf import main as import_main
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT
from scratchllm.model.io import load_model, save_model
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import render_for_completion, render_text

transformers = pytest.importorskip("transformers")
TEXT = "Hello, world! 床前明月光，疑是地上霜。😀 def f(x): return x"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[GPT, Tokenizer, Path]:
    root = tmp_path_factory.mktemp("export")
    tok = Tokenizer.train([TEXT * 20 + " user assistant system"], 256 + 60 + 4, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=tok.vocab_size)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([tok.encode(TEXT)])
    for _ in range(5):  # a few steps so the weights are not the symmetric init
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, tok, export_hf(model, tok, root / "hf")


def test_transformers_logits_equal_ours(exported) -> None:
    model, tok, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)


def test_tokenizer_ids_and_chat_template_equal(exported) -> None:
    _, tok, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in [TEXT, "mixed English 和中文 🎉", "  spaces\n\nand lines"]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 你好"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == render_text(messages, add_generation_prompt=True)
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == render_for_completion(tok, messages)


def test_greedy_generation_identical(exported) -> None:
    model, tok, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tok.encode("Hello")
    ours, _ = generate_batch(model, [prompt], 12, SamplingParams(temperature=0))
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_id, min_new_tokens=12)
    assert theirs[0, len(prompt):].tolist() == ours[0]


def test_import_round_trip(exported, tmp_path: Path) -> None:
    model, tok, out = exported
    assert import_main([str(out), "--out", str(tmp_path / "ours")]) == 0
    imported, imported_tok, _ = load_model(tmp_path / "ours")
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        assert torch.allclose(imported(ids), model(ids), atol=1e-6)
    assert imported_tok.encode(TEXT) == tok.encode(TEXT)
    save_model(tmp_path / "again", imported, imported_tok, {})
