"""llama.cpp's own binaries, run from Python: ``llama-perplexity`` (its perplexity protocol, its
kernels), ``llama-quantize`` (its own quantizer) and ``llama-bench`` (its decode speed). What
``polyquant eval OUT.gguf --runtime llama.cpp`` and ``benchmarks/bench_export.py llamacpp`` run.

llama-cpp-python is source-only on PyPI (a 19-minute build on 2 cores), so polyquant calls the
binaries instead; building just these three targets of llama.cpp (the copy vendored in
llama-cpp-python's sdist works) takes a fraction of that:

    tar xzf llama_cpp_python-0.3.16.tar.gz && cd llama_cpp_python-0.3.16/vendor/llama.cpp
    cmake -B /tmp/lcp/build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DCMAKE_BUILD_TYPE=Release \
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build /tmp/lcp/build --target llama-perplexity llama-quantize llama-bench -j1

then point ``$LLAMA_CPP_BIN`` (or ``bin_dir=``) at ``/tmp/lcp/build/bin`` (or put them on PATH).

llama-perplexity's protocol (``tools/perplexity/perplexity.cpp``): the file's tokens cut into
``--chunks`` non-overlapping windows of ``-c`` tokens (a BOS put first only when the vocabulary
adds one; SmolLM2's does not), each scored on its second half only: the logits at positions
``c/2 .. c-2`` predict tokens ``c/2+1 .. c-1``. That is not polyquant's protocol (every token of
the window after the first), so its perplexity is lower; :func:`second_half_ppl` is llama.cpp's
protocol in PyTorch, so polyquant can score the same tokens the same way.

On CPUs with AMX, llama.cpp's AMX buffer type crashed in ``ggml_backend_amx_mul_mat`` on these VMs
(llama-cpp-python: ``use_extra_bufts=False``); :func:`perplexity` then passes ``--no-repack``
(common's flag that sets ``no_extra_bufts``). :func:`has_amx` says whether it applies here.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

__all__ = ["LlamaCppError", "find_bin", "has_amx", "perplexity", "quantize", "bench", "second_half_ppl",
           "gguf_tensor_types"]


class LlamaCppError(RuntimeError):
    """A llama.cpp binary is missing, failed, or printed no result (the message says which)."""


def find_bin(name: str, bin_dir: str | os.PathLike | None = None) -> Path:
    """The path of llama.cpp's ``name`` binary: in ``bin_dir``, ``$LLAMA_CPP_BIN`` or on PATH."""
    for d in (bin_dir, os.environ.get("LLAMA_CPP_BIN")):
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    found = shutil.which(name)
    if found:
        return Path(found)
    raise LlamaCppError(f"llama.cpp's {name} was not found in {bin_dir or '$LLAMA_CPP_BIN'} or on PATH (set "
                        "LLAMA_CPP_BIN to the folder of the binaries; polyquant.eval.llamacpp shows the build)")


def has_amx() -> bool:
    try:
        return "amx" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout)[-3000:]
        raise LlamaCppError(f"{' '.join(map(str, cmd))} exited with {p.returncode}:\n{tail}")
    return p


def perplexity(bin_dir, model: Path, text_file: Path, ctx: int = 512, chunks: int = 8, threads: int = 1,
               timeout: float = 3600) -> dict:
    """``llama-perplexity`` on ``model``: ``{"ppl", "ppl_err", "chunks", "ctx", "seconds", "log_tail"}``."""
    exe = find_bin("llama-perplexity", bin_dir)
    cmd = [str(exe), "-m", str(model), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
           "--chunks", str(chunks), "-t", str(threads), "-tb", str(threads)]
    if has_amx():
        cmd.append("--no-repack")
    t0 = time.perf_counter()
    p = _run(cmd, timeout)
    log = p.stderr + p.stdout
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if not m:
        raise LlamaCppError(f"no 'Final estimate' in llama-perplexity's output for {model}:\n{log[-2000:]}")
    n = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", log)
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)),
            "chunks": int(n.group(1)) if n else None, "ctx": int(n.group(2)) if n else None,
            "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(cmd),
            "cpu_backend": re.findall(r"system_info: (.*)", log)[-1:] or None}


def quantize(bin_dir, src: Path, dst: Path, qtype: str = "Q4_0", threads: int = 1,
             extra: list[str] | None = None, timeout: float = 3600) -> dict:
    """``llama-quantize [extra] src dst qtype threads``; returns the command and its seconds."""
    exe = find_bin("llama-quantize", bin_dir)
    cmd = [str(exe), *(extra or []), str(src), str(dst), qtype, str(threads)]
    t0 = time.perf_counter()
    _run(cmd, timeout)
    return {"command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1)}


def bench(bin_dir, model: Path, n_gen: int = 64, n_prompt: int = 0, threads: int = 1, reps: int = 1,
          timeout: float = 3600, mmap: bool = True) -> dict:
    """``llama-bench`` (JSON output) for one model: ``{"tok_s", "tok_s_sd", "n_gen", "n_prompt", ...}``
    of its text-generation (or prompt) test. ``mmap=False`` (``-mmp 0``) reads the weights into fresh memory:
    with mmap the speed follows where the file's page-cache pages happen to sit (a freshly written or copied
    file decodes up to ~5% faster than an old one with the same bytes), so comparisons of files use False."""
    exe = find_bin("llama-bench", bin_dir)
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(reps), "-o", "json", "-mmp", "1" if mmap else "0"]
    p = _run(cmd, timeout)
    try:
        rows = json.loads(p.stdout[p.stdout.index("["):])
    except ValueError as e:
        raise LlamaCppError(f"llama-bench printed no JSON rows for {model}: {e}\n{p.stdout[-1000:]}") from None
    r = rows[-1]
    return {"tok_s": float(r["avg_ts"]), "tok_s_sd": float(r.get("stddev_ts") or 0.0), "n_gen": r.get("n_gen"),
            "n_prompt": r.get("n_prompt"), "cpu_info": r.get("cpu_info"), "backends": r.get("backends"),
            "type": r.get("model_type"), "model_size": r.get("model_size"), "build": r.get("build_commit"),
            "command": " ".join(cmd)}


def second_half_ppl(model: torch.nn.Module, windows: torch.Tensor) -> dict:
    """llama-perplexity's protocol in PyTorch: each window of ``c`` tokens scored on the tokens
    ``c/2+1 .. c-1`` only (predicted from the logits at ``c/2 .. c-2``)."""
    c = windows.shape[1]
    first = c // 2
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(windows.shape[0]):
            x = windows[i:i + 1]
            logits = model(input_ids=x, use_cache=False).logits[0, first:c - 1].double()
            lp = torch.log_softmax(logits, dim=-1)
            nll -= float(lp.gather(1, x[0, first + 1:c, None]).sum())
            count += c - 1 - first
    return {"ppl": math.exp(nll / count), "tokens_scored": count}


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """Tensor type -> count of a GGUF file (gguf's reader)."""
    import gguf
    out: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return out
