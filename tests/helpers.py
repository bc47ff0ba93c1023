"""Tiny models built from configs (random, seeded weights) for fast tests, and shared asserts."""
from __future__ import annotations

import torch


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum().clamp_min(1e-30)))


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 256, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM
    _seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 256):
    """Another decoder family (q/k/v with bias)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    _seed(seed)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 256):
    """A BERT-style encoder."""
    from transformers import BertConfig, BertModel
    _seed(seed)
    cfg = BertConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, vocab_size=vocab, max_position_embeddings=128)
    return BertModel(cfg).eval()


def tiny_tokenizer_dir(path) -> str:
    """A small word-level tokenizer saved to ``path`` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(250)}
    vocab.update({"[UNK]": 250, "<s>": 251, "</s>": 252})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return str(path)


def tiny_model_dir(tmp_path_factory, seed: int, name: str = "tiny"):
    """A tiny Llama (``tiny_llama(seed)``) with the word-level tokenizer, saved as safetensors in a fresh
    ``<name>/tiny-llama`` folder: the model directory the CLI and compare tests pass around."""
    d = tmp_path_factory.mktemp(name) / "tiny-llama"
    tiny_llama(seed=seed).save_pretrained(str(d), safe_serialization=True)
    tiny_tokenizer_dir(d)
    return d


def words(n: int, seed: int) -> str:
    """``n`` random words the tiny tokenizer knows (``w0`` .. ``w249``), reproducibly from ``seed``."""
    import random
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(250)}" for _ in range(n))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``polyquant <args>`` in-process: (exit code, stdout, stderr)."""
    from polyquant.cli import main
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def worst_step_error(dec, model, prompt: torch.Tensor, tokens: torch.Tensor) -> float:
    """Replay ``tokens`` one step at a time through a decoder (``reset()``, the prompt, then one token a
    call) and return the worst relative error of a step's logits against the model's own forward
    over the whole sequence (max abs difference / max abs logit, per step)."""
    dec.reset()
    seq = torch.cat([prompt, tokens])
    dec(prompt)
    with torch.no_grad():
        full = model(seq[None]).logits[0]
    worst = 0.0
    for i, tok in enumerate(tokens[:-1]):
        want = full[len(prompt) + i]
        worst = max(worst, float((dec(tok[None]) - want).abs().max() / want.abs().max()))
    return worst


def qweights(model) -> dict:
    """Every ``QuantLinear``'s ``QuantizedWeight``, by module name."""
    from polyquant.nn.quant_linear import QuantLinear
    return {n: m.quantized_weight for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def reload_same_logits(model, path, x: torch.Tensor, record: bool = True):
    """Save ``model`` to ``path`` and load it back; without ``record`` the ``polyquant.json`` is removed
    first (a foreign reader's view: everything comes from ``config.json``). Asserts identical logits on
    ``x`` and the same set of quantized layers; returns (loaded model, the source's qweights, the loaded's)."""
    from polyquant.formats import load, save
    out = save(model, path)
    if not record:
        (out / "polyquant.json").unlink()
    back, _ = load(out)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    source, loaded = qweights(model), qweights(back)
    assert sorted(source) == sorted(loaded)
    return back, source, loaded


def auto_int4_kernel() -> str:
    """The kernel ``auto`` picks on this CPU for a 1- to 4-bit integer layout both fast kernels take:
    ``cpu-lut4`` (compiled, float32) where it builds and the CPU has AVX-512, else ``cpu-int4``."""
    from polyquant.kernels.cext import library_error
    if library_error("lut4") is not None:
        return "cpu-int4"
    from polyquant.kernels.cpu_lut4 import simd_level
    return "cpu-lut4" if simd_level() == 1 else "cpu-int4"


AUTO_INT4 = auto_int4_kernel()
AUTO_INT4_ACTORDER = "cpu-lut4" if AUTO_INT4 == "cpu-lut4" else "cpu-int4-actorder"  # 4-bit act-order (g_idx)


def _have_lut4() -> bool:
    from polyquant.kernels.cext import library_error
    return library_error("lut4") is None


HAVE_LUT4 = _have_lut4()  # the compiled cpu-lut4 kernel builds here (a C compiler, POLYQUANT_NO_CEXT unset)


def int_qweight(out: int, inp: int, bits: int = 4, gs: int = 32, sym: bool = True, act_order: bool = False,
                seed: int = 0):
    """A seeded integer ``QuantizedWeight`` (GPTQ-style layouts): random codes, scales in
    [0.01, 0.06), zero points when ``sym`` is False, a shuffled act-order ``g_idx`` when asked;
    ``gs=-1``: per channel."""
    from polyquant.tensor.quantized_weight import QuantizedWeight
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out, inp), generator=g, dtype=torch.uint8)
    ng = 1 if gs == -1 else -(-inp // gs)
    block = (1, inp if gs == -1 else gs)
    scale = torch.rand(out, ng, generator=g) * 0.05 + 0.01
    zero = None if sym else torch.randint(0, 2 ** bits, (out, ng), generator=g).float()
    g_idx = None
    if act_order:
        g_idx = torch.empty(inp, dtype=torch.int32)
        g_idx[torch.randperm(inp, generator=g)] = (torch.arange(inp) // block[1]).int()
    return QuantizedWeight.from_codes(codes, f"{'int' if sym else 'uint'}{bits}", block, scale, zero, g_idx)


COMPILE_PRELUDE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from polyquant.kernels.triton_util import import_triton
cap = int(sys.argv[1])

def build(fn, sig, consts):
    import_triton(fn.__globals__)
    fn = JITFunction(fn)
    sig = dict(sig)
    sig.update({n: "i32" for n in fn.arg_names if n not in sig and n not in consts})
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 4, "num_stages": 3})
"""


def compile_ahead(script: str, cap: int, *args: str) -> None:
    """Run ``COMPILE_PRELUDE + script`` (which calls ``build`` and prints "ok"; ``sys.argv[2:]`` are
    ``args``) in a fresh process
    with TRITON_INTERPRET unset, so triton compiles for ``cuda`` capability ``cap`` (no GPU needed);
    skips where this triton has no GPUTarget, asserts the script succeeded."""
    import os
    import subprocess
    import sys

    import pytest
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no GPUTarget")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_PRELUDE + script, str(cap), *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
