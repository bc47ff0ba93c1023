"""``polyquant methods | formats | kernels``: the registries as tables, Markdown (README) or JSON."""
from __future__ import annotations

from polyquant.cli.base import arg, command
from polyquant.cli.render import err, markdown_table, out, print_json, text_table

_JSON = arg("--json", action="store_true", help="print JSON")
_MD = arg("--markdown", action="store_true", help="print a Markdown table (README)")


def plugin_failures(group: str, text: bool) -> None:
    """The plug-ins of ``group`` that failed to load, by entry-point name with the error: under the
    table in text mode (stdout), on stderr for ``--json`` / ``--markdown`` (their stdout stays clean)."""
    from polyquant.plugins import plugin_errors
    errors = plugin_errors().get(group, {})
    if not errors:
        return
    lines = [f"  {name}: {msg}" for name, msg in sorted(errors.items())]
    head = f"plug-ins that failed to load ({group}; the built-ins are unaffected):"
    if text:
        out("")
        out("\n".join([head, *lines]))
    else:
        err("\n".join([head, *lines]))


def method_rows(markdown: bool = False) -> tuple[list[str], list[list[str]]]:
    from polyquant.methods import list_methods
    headers = ["name", "family", "bits", "calibration", "formats (default first)", "activations", "description"]
    rows = []
    for s in list_methods():
        name = f"`{s.name}`" if markdown else s.name
        rows.append([name, s.family, ",".join(str(b) for b in s.bits), "yes" if s.needs_calibration else "no",
                     ", ".join(s.formats), s.activations, s.description])
    return headers, rows


def format_rows(markdown: bool = False) -> tuple[list[str], list[list[str]]]:
    import polyquant.formats as formats
    headers = ["name", "quant_method", "readers", "description"]
    rows = [[f"`{f.name}`" if markdown else f.name, f.quant_method, ", ".join(f.readers), f.description]
            for f in formats.list_formats()]
    return headers, rows


def _listing(args, group: str, records, rows) -> int:
    """One registry listing: ``records()`` as JSON (``--json``), ``rows(markdown)`` as a Markdown
    (``--markdown``, where the command has it) or text table; then the plug-ins that failed."""
    markdown = getattr(args, "markdown", False)
    if args.json:
        print_json(records())
    elif markdown:
        out(markdown_table(*rows(True)))
    else:
        out(text_table(*rows(False)))
    plugin_failures(group, text=not (args.json or markdown))
    return 0


def kernel_rows(markdown: bool = False) -> tuple[list[str], list[list[str]]]:
    from polyquant.kernels import list_kernels
    return (["name", "devices", "layouts", "fast", "priority"],
            [[k.name, ",".join(k.devices), k.layouts, "yes" if k.fast else "no", k.priority] for k in list_kernels()])


@command("methods", help="list the quantization methods", args=[_JSON, _MD], order=1)
def cmd_methods(args) -> int:
    from polyquant.methods import list_methods
    from polyquant.methods.options import option_defaults
    return _listing(args, "polyquant.methods", lambda: [
        {"name": s.name, "family": s.family, "bits": list(s.bits), "needs_calibration": s.needs_calibration,
         "formats": list(s.formats), "default_format": s.default_format, "activations": s.activations,
         "description": s.description, "reference": s.reference,
         "options": option_defaults(s.config_cls)} for s in list_methods()], method_rows)


@command("formats", help="list the checkpoint formats", args=[_JSON, _MD], order=2)
def cmd_formats(args) -> int:
    import polyquant.formats as formats
    return _listing(args, "polyquant.formats", lambda: [
        {"name": f.name, "quant_method": f.quant_method, "readers": list(f.readers), "writers": list(f.writers),
         "description": f.description} for f in formats.list_formats()], format_rows)


@command("kernels", help="list the matmul kernels", args=[_JSON], order=3)
def cmd_kernels(args) -> int:
    from polyquant.kernels import list_kernels
    return _listing(args, "polyquant.kernels", lambda: [
        {"name": k.name, "devices": list(k.devices), "layouts": k.layouts, "fast": k.fast, "priority": k.priority}
        for k in list_kernels()], kernel_rows)
