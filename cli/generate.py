"""`vita-audio generate`: decode from token ids with the LLM + MCTP engine (pipeline.generate).

    vita-audio generate --prompt-ids 1,2,3 --mode boost --max-new-tokens 64 --greedy --json
    vita-audio generate --llm DIR --prompt-ids 1,2,3 --mode 1,10,4,10 --exact --json

The last stdout line (with --json) is {"ids": [...], "backbone_forwards": n, "mtp_forwards": m, ...}.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from actors.errors import InputError
from cli import checks


def add_arguments(p, name: str) -> None:
    p.add_argument("--llm", type=Path, default=None, help="LLM folder (default: the tiny set's llm/)")
    p.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--mode", default=None, help="vanilla | balance | boost | turbo | exact | a list like 1,10,4,10 "
                   "(default: the checkpoint's generation_config mtp_inference_mode)")
    p.add_argument("--max-new-tokens", type=checks.positive_int, default=256)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (else sampling)")
    # sampling values are checked by the one request policy (actors.requests), as on every front end
    p.add_argument("--temperature", type=float, default=1.0, help="in (0, 2]; ignored with --greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--exact", action="store_true", help="verify MCTP drafts with the backbone (lossless)")
    p.add_argument("--constraint", choices=["text", "interleaved"], default=None)
    p.add_argument("--stop-ids", default=None, help="comma-separated stop ids (default: the eos ids)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--json", action="store_true")


def parse_ids(text: str, name: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]; ValueError naming the flag otherwise."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None


def _positions(llm_dir: Path) -> int:
    path = llm_dir / "config.json"
    try:
        return int(json.loads(path.read_text())["max_position_embeddings"])
    except FileNotFoundError:
        raise InputError(f"{path}: missing (is {llm_dir} an LLM folder?)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a valid model config ({type(err).__name__}: {err})") from None


def run(args) -> dict:
    from actors.requests import build_sampling, parse_mode
    from cli.speech import FLAG_NAMES

    # mode and sampling by the one request policy (the messages of every front end, naming the flags)
    mode = parse_mode(args.mode, FLAG_NAMES["mode"])
    sampling = build_sampling(None if args.greedy else args.temperature, args.top_k, args.top_p,
                              args.repetition_penalty, args.seed, names=FLAG_NAMES)
    prompt = parse_ids(args.prompt_ids, "--prompt-ids")
    if not prompt:
        raise InputError("--prompt-ids is empty")
    stop_ids = parse_ids(args.stop_ids, "--stop-ids") if args.stop_ids is not None else None
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", args.device):
        raise InputError(f"--device {args.device!r}: use cpu, cuda, cuda:N or mps")
    from actors.models import check_mode_for_model, check_model_folder, resolve_models_dir

    if args.llm is None:
        llm_dir = resolve_models_dir(None) / "llm"
    else:
        llm_dir = check_model_folder(args.llm, "llm", "--llm", tokenizer=False)  # an LLM folder, before torch loads it
    positions = _positions(Path(llm_dir))
    if args.mode is not None or args.exact:
        check_mode_for_model(args.mode or "exact", args.mode or "(--exact)", llm_dir)
    if len(prompt) + args.max_new_tokens > positions:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} plus {len(prompt)} prompt ids exceed the model's "
                       f"{positions} positions ({Path(llm_dir) / 'config.json'})")

    import torch

    from pipeline.engine.generate import generate
    from pipeline.llm import load_llm

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available on this machine")
    if args.device == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: MPS is not available on this machine")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_llm(llm_dir, device=device, dtype=dtype)
    mode = mode if mode is not None or not args.exact else "exact"
    t0 = time.perf_counter()
    result = generate(
        model, prompt, mode=mode, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=stop_ids,
        constraint=args.constraint, verify=args.exact,
    )
    seconds = time.perf_counter() - t0
    out = {
        "ids": result.ids,
        "backbone_forwards": result.backbone_forwards,
        "mtp_forwards": result.mtp_forwards,
        "end_reason": result.end_reason,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(len(result.ids) / seconds, 2) if seconds > 0 else None,
        "usage": result.usage,
    }
    if not args.json:
        print(" ".join(map(str, result.ids)))
        print(f"{len(result.ids)} tokens ({result.end_reason}), {result.backbone_forwards} backbone + "
              f"{result.mtp_forwards} MCTP forwards, {seconds:.2f} s")
    return out
