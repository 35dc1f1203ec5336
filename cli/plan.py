"""`vita-audio plan`: will it fit? Memory per stage, KV cache per token and stream, streams per LLM replica and a
placement on the GPUs given, from the models' configs alone (meta device: no weight is read, no GPU needed).

    vita-audio plan --size 7B --gpus 1 --gpu-memory 80GB
    vita-audio plan --models /models --gpus 8 --gpu-memory 80GB --context 8192 --write-config serve-8gpu.yaml

Without --models it plans the released 7B (`--size 7B`). `--write-config FILE` writes the placement as a Serve
config (serve/config.yaml's shape: `vita-audio serve --config FILE`, `serve run FILE`). A GPU set a stage cannot
fit is refused (exit 2) with the stage and the shortfall named.
"""
from __future__ import annotations

from pathlib import Path

from actors.errors import InputError

SIZES = ("tiny", "bench", "7B")
DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(p, name: str) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--models", type=Path, default=None,
                        help="folder with llm/, encoder/, decoder/: their configs are read, never the weights")
    source.add_argument("--size", default=None, help=f"a named size instead: {', '.join(SIZES)} (default 7B)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of one kind to place the stages on")
    p.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 80GB (GB = 2^30 bytes), 24GiB, 40960MB")
    p.add_argument("--context", type=int, default=4096, help="tokens per stream (prompt + output) the KV cache holds")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="serving dtype (the GPU path: bfloat16)")
    p.add_argument("--write-config", type=Path, default=None, help="write the placement as a Serve config YAML here")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON line")


def check_flags(args) -> None:
    """Every flag checked before anything is loaded (one InputError naming the flag)."""
    if args.gpus is None or args.gpus < 1:
        raise InputError(f"--gpus must be >= 1, got {args.gpus}")
    if args.context < 1:
        raise InputError(f"--context must be >= 1, got {args.context}")
    if args.size is not None and args.size not in SIZES:
        raise InputError(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    if args.models is not None:
        missing = [n for n in ("llm/config.json", "encoder/config.json", "decoder/config.yaml")
                   if not (args.models / n).is_file()]
        if not args.models.is_dir():
            raise InputError(f"--models {str(args.models)!r} is not a folder")
        if missing:
            raise InputError(f"--models {str(args.models)!r} lacks {', '.join(missing)}")
    if args.write_config is not None:
        parent = args.write_config.resolve().parent
        if not parent.is_dir():
            raise InputError(f"--write-config {str(args.write_config)!r}: folder {str(parent)!r} does not exist")
        if args.write_config.is_dir():
            raise InputError(f"--write-config {str(args.write_config)!r} is a folder")


def _gpu_bytes(text: str) -> int:
    from pipeline.capacity import parse_bytes

    try:
        return parse_bytes(text, "--gpu-memory")
    except ValueError as err:
        raise InputError(str(err)) from None


def run(args) -> dict:
    check_flags(args)
    gpu_bytes = _gpu_bytes(args.gpu_memory)
    import yaml

    from pipeline.capacity import DTYPES as TORCH_DTYPES
    from pipeline.capacity import PlanError, configs_from_models_dir, plan, serve_config, size_configs

    configs = configs_from_models_dir(args.models) if args.models else size_configs(args.size or "7B")
    try:
        placement = plan(configs, args.gpus, gpu_bytes, args.context, TORCH_DTYPES[args.dtype])
    except PlanError as err:
        raise InputError(f"refused: {err}") from None
    config = serve_config(placement, str(args.models) if args.models else None)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.write_config is not None:
        header = (f"# written by: vita-audio plan ({configs.source}, {args.gpus} x {args.gpu_memory}, context "
                  f"{args.context}, {args.dtype}); {placement.streams_per_llm_replica} streams per LLM replica\n")
        args.write_config.write_text(header + text)
    if not args.json:
        print(render(placement, configs.source, args.gpu_memory))
        print("\nServe config" + (f" (written to {args.write_config}):" if args.write_config else ":"))
        print(text)
    return {"source": configs.source, "gpus": args.gpus, "gpu_memory": args.gpu_memory, "dtype": args.dtype,
            **placement.to_dict(), "total_streams": placement.total_streams(), "serve_config": config,
            "written": str(args.write_config) if args.write_config else None}


def render(placement, source: str, gpu_memory: str) -> str:
    from pipeline.capacity import format_bytes as fb

    lines = [f"Plan for {source} on {placement.gpus} x {gpu_memory} GPU(s), context {placement.context} tokens",
             "", "| stage | parameters | weights | working memory (batch) | per stream | KV / token | KV / stream |",
             "|---|---|---|---|---|---|---|"]
    for name in ("encoder", "llm", "decoder"):
        s = placement.stages[name]
        kv_t = f"{s['kv_bytes_per_token']:,} B" if s["kv_bytes_per_token"] else "-"
        kv_s = fb(s["kv_bytes_per_stream"]) if s["kv_bytes_per_stream"] else "-"
        per = s["detail"].get("per", "request")
        lines.append(f"| {name} | {s['params'] / 1e6:,.1f} M | {fb(s['weight_bytes'])} | {fb(s['work_bytes'])} "
                     f"({s['batch']}) | {fb(s['work_bytes_per_stream'])} / {per} | {kv_t} | {kv_s} |")
    llm = placement.stages["llm"]["detail"]
    lines += ["", f"LLM: {llm['backbone_layers']} backbone layers + {llm['mtp_modules']} MCTP modules "
              f"({llm['per_mtp_module']:,} parameters each); KV per token: backbone "
              f"{llm['kv_backbone_bytes_per_token']:,} B + MCTP {llm['kv_mtp_bytes_per_token']:,} B",
              "", "| stage | replicas | GPU share each |", "|---|---|---|"]
    for name in ("encoder", "llm", "decoder"):
        lines.append(f"| {name} | {placement.replicas[name]} | {placement.num_gpus[name]:g} |")
    lines += ["", f"streams per LLM replica: {placement.streams_per_llm_replica} (KV pool "
              f"{fb(placement.llm_kv_bytes)}); all replicas: {placement.total_streams()}"]
    lines += [f"- {note}" for note in placement.notes]
    return "\n".join(lines)
