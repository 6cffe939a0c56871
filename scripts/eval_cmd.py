"""`deltakd eval`: generate with one or more models and compare ROUGE-L in one table.

deltakd eval --model RUN/final --model TEACHER --data test.jsonl --out EVAL [--sample --seeds 0 1 2]
deltakd eval ... --data hf:org/name --data-split test [--prompt-field instruction --response-field output]
"""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("eval", help="generate answers and score ROUGE-L against references")
    p.add_argument("--model", action="append", required=True, help="model folder (repeat for a comparison table)")
    p.add_argument(
        "--data",
        required=True,
        help="JSONL (prompt/response, messages, or Self-Instruct); a Parquet or Arrow file or folder, a save_to_disk "
        "folder, or hf:org/name (extra [datasets])",
    )
    p.add_argument("--data-split", help="split of a dataset with several (default: its only split, else test)")
    p.add_argument("--data-config", help="configuration (subset) of a Hub dataset")
    p.add_argument("--prompt-field", default="prompt", help="field of the prompt (text, or chat messages)")
    p.add_argument("--response-field", default="response", help="field of the reference (response, else completion)")
    p.add_argument("--messages-field", default="messages", help="field of the chat messages")
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
    from deltakd.cache.format.records import Fields
    from deltakd.runtime.checkpoints import local_checkpoint
    from deltakd.student.eval import EvalConfig, format_table, run_eval

    for m in ns.model:  # a mistyped folder fails now, not after a model hub lookup
        if not (Path(m) / "adapter_config.json").is_file():  # a LoRA export is read with its base (student/eval.py)
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
        data_split=ns.data_split,
        data_config=ns.data_config,
        fields=Fields(ns.prompt_field, ns.response_field, ns.messages_field),
    )
    print(format_table(run_eval(cfg)))
    return 0
