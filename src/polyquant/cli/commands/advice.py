"""``polyquant matrix`` (hardware compatibility), ``diagrams`` and ``recommend`` (a setting for a budget)."""
from __future__ import annotations

from pathlib import Path

from polyquant.cli.base import UsageError, arg, command
from polyquant.cli.paths import check_model_arg
from polyquant.cli.render import err, out, print_json


@command("matrix", help="the hardware compatibility matrix", order=50,
         description="For each registered method and bit width: can polyquant quantize it, run it with the "
                     "reference kernel, and run it with a fast kernel on CPU / CUDA (with the minimum compute "
                     "capability) / ROCm / Apple MPS / Intel XPU. With --results, also what actually ran in "
                     "that sweep.",
         args=[arg("--format", "-f", choices=("markdown", "json", "html"), default="markdown",
                   help="output format (default markdown)"),
               arg("--results", metavar="RESULTS", help="a sweep's results.json (or its folder): add the probed matrix")])
def cmd_matrix(args) -> int:
    """The hardware compatibility matrix (``polyquant.report.matrix``): declared, and probed from a
    sweep's results.json when given."""
    from polyquant.report import matrix as mx
    from polyquant.report.advisor import load_results
    probed = mx.probed_matrix(load_results(args.results)) if args.results else None
    declared = mx.declared_matrix()
    if args.format == "json":
        print_json({"devices": {d.key: {"label": d.label, "needs": d.needs} for d in mx.DEVICE_CLASSES},
                    "declared": declared, "probed": probed})
    elif args.format == "html":
        out(mx.matrix_html(declared, probed))
    else:
        out("## Declared\n\n" + mx.matrix_markdown(declared))
        if probed is not None:
            out(f"\n## Probed ({args.results})\n\n" + mx.matrix_markdown(probed))
    return 0


@command("diagrams", help="technique map, pipeline and integration diagrams", order=51,
         description="The overview's diagrams, generated from the registries: technique-map, pipeline, "
                     "integration. Without -o: Mermaid on stdout (Markdown blocks, or raw Mermaid for one named "
                     "diagram). With -o DIR: NAME.mmd and NAME.svg (rendered offline).",
         args=[arg("names", nargs="*", metavar="NAME", help="diagrams to emit (default: all)"),
               arg("-o", "--output", metavar="DIR", help="write the files here"),
               arg("--format", "-f", choices=("mermaid", "svg"),
                   help="only this format (default: Mermaid on stdout; both with -o)")])
def cmd_diagrams(args) -> int:
    """The overview's diagrams (``polyquant.report.diagrams``): Mermaid on stdout, or files."""
    from polyquant.report.diagrams import DIAGRAM_NAMES, all_diagrams
    names = list(dict.fromkeys(args.names)) or list(DIAGRAM_NAMES)
    unknown = [n for n in names if n not in DIAGRAM_NAMES]
    if unknown:
        raise UsageError(f"unknown diagram {unknown[0]!r}; diagrams: {', '.join(DIAGRAM_NAMES)}")
    if args.output is None and args.format == "svg":
        raise UsageError("--format svg writes files: give -o DIR")
    diagrams = all_diagrams()
    if args.output is None:
        if len(names) == 1:
            out(diagrams[names[0]].mermaid.rstrip())
        else:
            out("\n".join(f"## {diagrams[n].title}\n\n```mermaid\n{diagrams[n].mermaid}```\n" for n in names).rstrip())
        return 0
    from polyquant.report.store import atomic_write_text
    folder = Path(args.output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    kinds = ["mermaid", "svg"] if args.format is None else [args.format]
    for n in names:
        for kind in kinds:
            path = folder / f"{n}.{'mmd' if kind == 'mermaid' else 'svg'}"
            atomic_write_text(path, diagrams[n].mermaid if kind == "mermaid" else diagrams[n].svg)
            out(f"wrote {path}")
    return 0


@command("recommend", help="pick a method and setting for a memory budget", order=52,
         description="Pick the method and setting whose weights fit --memory on --device with the least "
                     "perplexity increase: from a sweep's measured results when given (--results), else from the "
                     "registry's traits and a documented prior table. Prints the numbers used and every rejected "
                     "option with the reason; exits 1 when nothing qualifies.",
         args=[arg("model", metavar="MODEL", nargs="?", default="default",
                   help="'default', a local HF folder (counted from config.json) or a .gguf (default: default)"),
               arg("--device", "-d", choices=("cpu", "cuda", "rocm", "mps", "xpu"), default="cpu",
                   help="where the model will run (default cpu)"),
               arg("--memory", "-m", required=True, metavar="SIZE", help="memory budget for the weights: 4GB, 512MiB, or bytes"),
               arg("--max-ppl-increase", metavar="LIMIT", help="largest perplexity increase: 5%% or 0.05"),
               arg("--results", metavar="RESULTS", help="a sweep's results.json (or its folder)"),
               arg("--capability", metavar="X.Y", help="CUDA compute capability of the target GPU, e.g. 8.9"),
               arg("--allow-reference", action="store_true",
                   help="accept options only the (slow) reference kernel runs on the device"),
               arg("--json", action="store_true", help="print JSON")])
def cmd_recommend(args) -> int:
    """The advisor (``polyquant.report.advisor.recommend``); exit 1 when nothing qualifies."""
    from polyquant.report import advisor
    check_model_arg(args.model)
    try:
        memory = advisor.parse_size(args.memory, "--memory")
        limit = (advisor.parse_ppl_increase(args.max_ppl_increase, "--max-ppl-increase")
                 if args.max_ppl_increase is not None else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    results = advisor.load_results(args.results) if args.results else None
    rec = advisor.recommend(args.model, args.device, memory, limit, results, capability=args.capability,
                            allow_reference=args.allow_reference)
    if args.json:
        print_json(rec.to_dict())
    else:
        out(rec.explain())
    if not rec.ok:
        err(f"polyquant: no recommendation: {rec.reason}")
        return 1
    return 0
