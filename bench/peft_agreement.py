"""Does a run dir give the same answers without mathtune? AutoPeftModelForCausalLM vs mathtune.load.

    .venv/bin/python bench/peft_agreement.py                  # trains a 20-step LoRA run on the bundled model
    .venv/bin/python bench/peft_agreement.py --run runs/x     # an existing run dir

The PEFT side runs in a separate ``python -I`` process where importing mathtune raises, offline:
``AutoPeftModelForCausalLM.from_pretrained(run)`` finds the base through adapter_config.json alone,
formats each question with the saved chat template and decodes greedily in fp32, one question at a
time. The mathtune side is ``mathtune.load(run, precision="fp32").generate`` on the same questions
(unit-conversion eval split). Prints how many outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

PEFT_ALONE = r"""
import json, sys

class RefuseMathtune:
    def find_spec(self, name, path=None, target=None):
        if name == "mathtune" or name.startswith("mathtune."):
            raise ImportError("mathtune is blocked in this process")
        return None

sys.meta_path.insert(0, RefuseMathtune())
try:
    import mathtune  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("mathtune was importable: the check would prove nothing")

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

torch.set_num_threads(1)
run, new_tokens, eot_token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
questions = json.loads(sys.stdin.read())
model = AutoPeftModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(run)
eot = tokenizer.convert_tokens_to_ids(eot_token)
texts = []
for question in questions:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    ids = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t != eot]
    texts.append(tokenizer.decode(ids, skip_special_tokens=True))
print(json.dumps({"base": model.peft_config["default"].base_model_name_or_path, "texts": texts}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a LoRA run dir (default: train a short one on the bundled model)")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    import mathtune
    from mathtune.data import end_of_turn_token
    from mathtune.tasks import get_task

    run = args.run
    if run is None:
        from mathtune.config import TrainConfig, build_config
        from mathtune.training import train

        run = str(Path(tempfile.mkdtemp(prefix="peft-agreement-")) / "run")
        train(build_config(TrainConfig, None, dict(
            model="smollm2-135m", task="unit-conversion", max_samples=160, max_steps=20, learning_rate=2e-3,
            eval_samples=0, wandb=False, seed=0, output_dir=run)))
    questions = [e.question for e in get_task("unit-conversion").examples("eval")[: args.questions]]
    model = mathtune.load(run, device="cpu", precision="fp32", max_new_tokens=args.max_new_tokens, loop_stop=False,
                          calculator=False)
    ours = [model.generate(q) for q in questions]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "-c", PEFT_ALONE, run, str(args.max_new_tokens),
                           end_of_turn_token(model.tokenizer)], input=json.dumps(questions), capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    peft_side = json.loads(proc.stdout.strip().splitlines()[-1])
    same = sum(a == b for a, b in zip(ours, peft_side["texts"]))
    print(f"run {run}; base in adapter_config.json: {peft_side['base']}")
    print(f"AutoPeftModelForCausalLM (mathtune not importable) vs mathtune.load, fp32 greedy, "
          f"{args.max_new_tokens} new tokens: {same}/{len(questions)} identical outputs")
    return 0 if same == len(questions) else 1


if __name__ == "__main__":
    sys.exit(main())
