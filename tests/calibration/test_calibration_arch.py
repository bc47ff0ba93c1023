"""The per-architecture table: true-sequential groups match the Linear names transformers really
uses, in forward order; unknown architectures fall back to one group per Linear; blocks with
per-layer arguments (Gemma 3's sliding / global layers) are captured per block."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import polyquant
from polyquant.calibration import block_groups, layout_for
from polyquant.calibration.driver import _capture, _run_block
from polyquant.methods import GPTQConfig
from polyquant.nn import QuantLinear, find_blocks
from helpers import tiny_bert, tiny_llama, tiny_qwen2


pytestmark = pytest.mark.usefixtures("one_thread")


def _small(cfg_cls, model_cls, **kw):
    torch.manual_seed(0)
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return model_cls(cfg_cls(**base)).eval()


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return _small(Gemma3TextConfig, Gemma3ForCausalLM, num_hidden_layers=3, head_dim=16, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def tiny_phi():
    from transformers import PhiConfig, PhiForCausalLM
    return _small(PhiConfig, PhiForCausalLM)


def tiny_phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return _small(Phi3Config, Phi3ForCausalLM)


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return _small(MistralConfig, MistralForCausalLM)


def _block_linears(model):
    _, blocks = find_blocks(model)
    return [n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)]


LLAMA = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


@pytest.mark.parametrize("make, layout, groups", [
    (tiny_llama, "llama", LLAMA),
    (tiny_qwen2, "llama", LLAMA),
    (tiny_mistral, "llama", LLAMA),
    (tiny_gemma3, "gemma2", LLAMA),
    (tiny_phi, "phi", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),
                       ("self_attn.dense",), ("mlp.fc2",)]),
    (tiny_phi3, "phi3", [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                         ("mlp.down_proj",)]),
    (tiny_bert, "bert", [("attention.self.query", "attention.self.key", "attention.self.value"),
                         ("attention.output.dense",), ("intermediate.dense",), ("output.dense",)]),
])
def test_groups_cover_the_real_module_names(make, layout, groups):
    model = make()
    names = _block_linears(model)
    assert layout_for(model, names) == layout
    got = block_groups(model, names)
    assert [g.names for g in got] == groups
    assert sorted(n for g in got for n in g.names) == sorted(names)  # nothing left out, nothing extra
    assert block_groups(model, names, true_sequential=False)[0].names == tuple(names)
    # feeds name modules that exist in the block
    _, blocks = find_blocks(model)
    assert all(g.feeds is None or blocks[0].get_submodule(g.feeds) is not None for g in got)


def test_partial_selection_and_unknown_names():
    model = tiny_llama()
    got = block_groups(model, ["self_attn.v_proj", "mlp.down_proj", "extra.proj"])
    assert [g.names for g in got] == [("self_attn.v_proj",), ("mlp.down_proj",), ("extra.proj",)]


class _Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.b = nn.Linear(d, d)
        self.a = nn.Linear(d, d)

    def forward(self, h, scale=None):
        return h + self.b(torch.relu(self.a(h))) * scale


class _Toy(nn.Module):
    """Not a transformers model: Linears named nothing the table knows; blocks take a kwarg."""

    def __init__(self, d=16, n=3):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.Linear(d, 50)

    def forward(self, input_ids, use_cache=False):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h, scale=0.5)
        return self.head(h)


def test_generic_fallback_one_group_per_linear_in_module_order():
    model = _Toy()
    assert layout_for(model, ["b", "a"]) is None
    assert [g.names for g in block_groups(model, ["b", "a"])] == [("b",), ("a",)]
    calib = [torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(k)) for k in range(4)]
    q = polyquant.quantize(model, GPTQConfig(bits=4, group_size=8), calibration=calib, show_progress=False)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 6
    with torch.no_grad():
        x = calib[0]
        assert (q(x) - model(x)).abs().max() < 0.5 * model(x).abs().max()


def test_gemma3_blocks_get_their_own_sliding_or_global_arguments():
    model = tiny_gemma3()
    calib = [torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    _, blocks = find_blocks(model)
    with torch.no_grad():
        inps, recs, _ = _capture(model, blocks, [{"input_ids": c} for c in calib], None)
        for j, c in enumerate(calib):
            hs = model(c, output_hidden_states=True).hidden_states
            h = inps[j]
            assert (h - hs[0]).abs().max() < 1e-5
            for i in range(2):
                h = _run_block(blocks[i], h, recs[j][i])
                assert (h - hs[i + 1]).abs().max() < 1e-5, i
            # the global layer really got a different mask from the sliding ones
            m0, m1 = recs[j][0][2]["attention_mask"], recs[j][1][2]["attention_mask"]
            assert m0 is not None  # sliding: an explicit band mask
            assert m1 is None or not torch.equal(m0, m1)  # global: plain causal (None under sdpa)
