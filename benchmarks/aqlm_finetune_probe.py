"""AQLM block fine-tuning probe (issue 14): quantize only the first N blocks of the default model with AQLM,
once per config, and print perplexity on 8 windows of pydoc and enwiki plus each block's output error before / after.
Usage: python benchmarks/aqlm_finetune_probe.py N '[{}, {"finetune_epochs": 5, "finetune_lr": 1e-3}]' [n_samples]"""
import copy, json, logging, sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import _common as C
import polyquant
from polyquant.calibration import Calibration
from polyquant.methods import aqlm as A
logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(1)
nb = int(sys.argv[1]); cfgs = json.loads(sys.argv[2]); ns = int(sys.argv[3]) if len(sys.argv) > 3 else 32
base, tok = polyquant.load_model("default")
calib = C.calibration_windows(tok, "pydoc", ns, 512, 0)
inc = [rf"model\.layers\.({'|'.join(str(i) for i in range(nb))})\."]
errs = []
orig = A.fit_block
def fb(*a, **k):
    r = orig(*a, **k); errs.append((round(r.loss_before, 5), round(r.loss_after, 5), r.epochs, round(r.seconds, 1))); return r
A.fit_block = fb
for kw in cfgs:
    errs.clear()
    t = time.perf_counter()
    q = polyquant.quantize(copy.deepcopy(base), A.AQLMConfig(include=inc, **kw), calibration=Calibration(calib, autocast=None), inplace=True, show_progress=False)
    s = time.perf_counter() - t
    ppl = C.ppl_by_text(q, tok, ["pydoc", "enwiki"], 8)
    print(json.dumps({"nb": nb, "cfg": kw, "s": round(s, 1), "ppl": ppl, "blocks": errs}), flush=True)
