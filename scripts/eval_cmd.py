"""`deltakd eval`: generate with one or more models and compare ROUGE-L in one table.

deltakd eval --model RUN/final --model TEACHER --data test.jsonl --out EVAL [--sample --seeds 0 1 2]
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("eval", help="generate answers and score ROUGE-L against references")
    p.add_argument("--model", action="append", required=True, help="model folder (repeat for a comparison table)")
    p.add_argument("--data", required=True, help="JSONL: prompt/response, messages, or Self-Instruct")
    p.add_argument("--out", required=True, help="folder for per-example JSONL and summary.json")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-examples", type=int)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_eval)


def _eval(ns) -> int:
    from deltakd.runtime.checkpoints import local_checkpoint
    from deltakd.student.eval import EvalConfig, format_table, run_eval

    for m in ns.model:  # a mistyped folder fails now, not after a model hub lookup
        local_checkpoint(m, "--model")
    cfg = EvalConfig(
        models=tuple(ns.model),
        data=ns.data,
        out=ns.out,
        max_new_tokens=ns.max_new_tokens,
        batch_size=ns.batch_size,
        max_examples=ns.max_examples,
        max_prompt_tokens=ns.max_prompt_tokens,
        sample=ns.sample,
        temperature=ns.temperature,
        top_p=ns.top_p,
        seeds=tuple(ns.seeds),
        device=ns.device,
    )
    print(format_table(run_eval(cfg)))
    return 0
