"""Layer selection: the repeated blocks, default targets, head detection, include/exclude."""
import pytest
import torch
from torch import nn

from helpers import tiny_bert, tiny_llama, tiny_qwen2
from polyquant.nn import find_blocks, select_linears

LLAMA_NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
BERT_NAMES = [f"encoder.layer.{i}.{m}" for i in range(2) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def test_find_blocks(llama):
    name, blocks = find_blocks(llama)
    assert name == "model.layers" and len(blocks) == 2
    assert find_blocks(tiny_bert())[0] == "encoder.layer"
    with pytest.raises(ValueError, match="repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_default_targets_are_the_block_linears(llama):
    assert [n for n, _ in select_linears(llama)] == LLAMA_NAMES
    assert [n for n, _ in select_linears(tiny_qwen2())] == LLAMA_NAMES
    assert [n for n, _ in select_linears(tiny_bert())] == BERT_NAMES  # pooler.dense stays float
    assert all(isinstance(m, nn.Linear) for _, m in select_linears(llama))


def test_lm_head_only_on_request(llama):
    names = [n for n, _ in select_linears(llama, quantize_lm_head=True)]
    assert names == LLAMA_NAMES + ["lm_head"]
    assert [n for n, _ in select_linears(llama, include=["lm_head"])] == []
    assert [n for n, _ in select_linears(llama, include=["lm_head"], quantize_lm_head=True)] == ["lm_head"]


def test_include_exclude_regexes(llama):
    mlp = [n for n, _ in select_linears(llama, include=[r"mlp\."])]
    assert mlp == [n for n in LLAMA_NAMES if ".mlp." in n]
    no_down = [n for n, _ in select_linears(llama, exclude=["down_proj"])]
    assert no_down == [n for n in LLAMA_NAMES if "down_proj" not in n]
    both = [n for n, _ in select_linears(llama, include=[r"layers\.1\."], exclude=[r"_proj$"])]
    assert both == []
    first = [n for n, _ in select_linears(llama, include=[r"layers\.0\.self_attn\.[qk]_proj"])]
    assert first == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.output = nn.Linear(8, 8)  # a block-internal Linear that happens to be called "output"


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.small = nn.ModuleList([nn.Linear(8, 8)])
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.output = nn.Linear(8, 10)  # the output head, by its conventional name


def test_blocks_and_heads_on_a_plain_module():
    toy = _Toy()
    assert find_blocks(toy)[0] == "blocks"  # the ModuleList with the most parameters
    names = [n for n, _ in select_linears(toy)]
    assert names == [f"blocks.{i}.{m}" for i in range(3) for m in ("proj", "output")]
    assert [n for n, _ in select_linears(toy, quantize_lm_head=True)][-1] == "output"
    assert "output" not in [n for n, _ in select_linears(toy, include=["output"])]
