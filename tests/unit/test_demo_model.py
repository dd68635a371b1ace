"""The demo checkpoint is deterministic, cached, and a Llama that transformers
loads offline, whose greedy text is varied and not on a knife edge."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

import trillm.demo_model as demo
from trillm.demo_model import MANIFEST, build_demo_model, main

pytestmark = pytest.mark.unit

FILES = {"config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json", MANIFEST}


def digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.is_file()}


def test_two_builds_are_byte_identical(demo_model_dir, tmp_path):
    # Another process (other hash seed, fresh torch/tokenizers state), through the CLI.
    again = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "1234", "RAYON_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "trillm.demo_model", "--out", str(again)], check=True, env=env)
    assert set(digests(again)) == FILES
    assert digests(again) == digests(demo_model_dir)


def test_a_current_build_is_left_alone(demo_model_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in demo_model_dir.iterdir()}
    assert main(["--out", str(demo_model_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(demo_model_dir) and "up to date" in err
    assert {p.name: p.stat().st_mtime_ns for p in demo_model_dir.iterdir()} == before


@pytest.mark.parametrize("damage", ["recipe", "missing_file"])
def test_a_stale_build_is_redone(demo_model_dir, tmp_path, monkeypatch, damage):
    for name in FILES - {MANIFEST}:
        os.link(demo_model_dir / name, tmp_path / name)
    manifest = json.loads((demo_model_dir / MANIFEST).read_text())
    if damage == "recipe":
        manifest["recipe_sha256"] = "0" * 64
    else:
        (tmp_path / "tokenizer.json").unlink()
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))

    class Rebuilt(Exception):
        pass

    def refuse(sources):
        raise Rebuilt

    monkeypatch.setattr(demo, "_corpus", refuse)
    with pytest.raises(Rebuilt):
        build_demo_model(tmp_path)


def test_transformers_loads_it_offline(demo_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(demo_model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (640, 10, 10, 5)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (
        1728, 8192, 2048, False)
    assert sum(p.numel() for p in model.parameters()) == 55_964_800
    assert model.dtype == torch.float32 and model.generation_config.eos_token_id == 2

    texts = []
    for prompt in ("The quick brown fox", "你好，世界 😀"):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        generated = out.sequences[0, ids.shape[1]:].tolist()
        top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values
        assert len(set(generated)) >= 12, generated  # not one token over and over
        assert not set(generated) & set(range(len(demo.SPECIAL_TOKENS)))  # never stops by itself
        assert (top2[:, 0] - top2[:, 1]).median() > 0.3  # greedy is not a coin toss
        texts.append(tokenizer.decode(generated))
    assert texts[0] != texts[1]
