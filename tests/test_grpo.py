"""mathtune grpo on the tiny random model: the sampler is on-policy, forced tokens stay out of TRL's loss,
the CLI writes a run dir, --max-time stops, SIGTERM checkpoints and --resume auto continues, and each RL
guard fires (the failure zoo of reinforcement learning).

The tiny model never writes an end-of-turn token nor a right answer, so rewards are scripted where a test
needs a learning signal (``scripted_reward``: the trainer's reward function replaced, the rest real).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mathtune.config import build_config
from mathtune.errors import TrainingHalted
from mathtune.grpo_config import GRPOSettings
from mathtune.run_dir import RunDir
from mathtune.training import grpo

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
REPO_ROOT = Path(__file__).resolve().parents[1]


def grpo_config(model_dir, out, **overrides) -> GRPOSettings:
    settings = dict(model=str(model_dir), task="unit-conversion", max_samples=16, num_generations=4, batch_size=4,
                    max_steps=2, max_completion_length=12, learning_rate=1e-2, output_dir=str(out), precision="fp32",
                    device="cpu", guards=False, seed=0, sample_every=0, max_new_tokens=4)
    settings.update(overrides)
    return build_config(GRPOSettings, None, settings)


def scripted_reward(session, rewards_for):
    """Replace the trainer's correctness reward by ``rewards_for(n_completions, step) -> list[float]``,
    still recording the step's figures for the guards and metrics."""
    trainer = session.trainer

    def scripted(prompts, completions, completion_ids, **kwargs):
        rewards = rewards_for(len(completions), trainer.state.global_step + 1)
        session.rl_stats.record_scores(rewards, [len(c) for c in completion_ids], kwargs.get("stop_reason"), 0.0)
        return rewards

    trainer.reward_funcs[0] = scripted


def alternating(n, step):
    return [float(i % 2) for i in range(n)]


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- the sampler


def test_sampler_logprobs_equal_the_current_policy_after_an_update(tiny_model_dir, tmp_path, one_thread):
    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run", max_steps=1, temperature=0.7))
    assert session.sampler == "mathtune"
    scripted_reward(session, alternating)
    model, trainer = session.model, session.trainer
    before = trainable(model)
    trainer.train()
    after = trainable(model)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4  # the step moved the weights

    sampler = trainer.rollout_func
    ids = [sampler.encode("How many metres are 3 km?")] * 4 + [sampler.encode("Convert 2 hours to minutes.")] * 4
    rollout = sampler.sample(model, ids, step=11)
    assert len(set(map(tuple, rollout.completion_ids))) > 1  # sampled, not greedy copies
    worst_forward = worst_trl = worst_entropy = 0.0
    model.eval()
    for prompt, completion, logps, entropies, mask in zip(rollout.prompt_ids, rollout.completion_ids,
                                                          rollout.logprobs, rollout.entropies, rollout.env_mask):
        x = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, len(prompt) - 1:-1].float()
            reference = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
            # what TRL's loss scores: its fused LM head, temperature included
            scored, entropy, _ = trainer._get_per_token_logps_and_entropies(model, x, torch.ones_like(x),
                                                                            len(completion), compute_entropy=True)
        chosen = torch.tensor(mask, dtype=torch.bool)
        sampled = torch.tensor(logps)
        worst_forward = max(worst_forward, float((sampled - reference)[chosen].abs().max()))
        worst_trl = max(worst_trl, float((sampled - scored[0])[chosen].abs().max()))
        # the entropies the trainer takes for groups without signal instead of rerunning them
        worst_entropy = max(worst_entropy, float((torch.tensor(entropies) - entropy[0])[chosen].abs().max()))
    assert worst_forward <= 1e-4 and worst_trl <= 1e-4 and worst_entropy <= 1e-4, (worst_forward, worst_trl,
                                                                                   worst_entropy)


class SeesLoraMerged:
    """A logits processor that records, at each decode step, whether the model's LoRA is merged."""

    def __init__(self, layers):
        self.layers, self.seen = layers, []

    def __call__(self, input_ids, scores):
        self.seen.append(all(layer.merged for layer in self.layers))
        return scores


def test_a_lora_policy_samples_merged_the_tokens_and_logprobs_of_its_unmerged_adapter(tiny_model_dir, tmp_path,
                                                                                       one_thread):
    """The sampler folds the LoRA into the base weights while it decodes and takes it out after: the same
    draws and log-probabilities as the unmerged adapter, the base weights back to float32 rounding."""
    from peft.tuners.lora import LoraLayer

    from mathtune.generation.rollout import RolloutSampler

    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run", temperature=0.7))
    model, sampler = session.model, session.trainer.rollout_func
    assert "LoRA merged while sampling" in grpo.start_summary(session)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B is zero at the start, which would make merging a no-op
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0, 0.5)
    base = {id(layer): layer.get_base_layer().weight.detach().clone() for layer in layers}
    ids = [sampler.encode("How many metres are 3 km?")] * 4 + [sampler.encode("Convert 2 hours to minutes.")] * 4

    rollouts, seen = {}, {}
    for merge in (True, False):
        watch = SeesLoraMerged(layers)
        twin = RolloutSampler(sampler.tokenizer, sampler.settings, seed=0, logits_processors=[watch],
                              merge_lora=merge)
        rollouts[merge], seen[merge] = twin.sample(model, ids, step=3), set(watch.seen)
        assert not any(layer.merged for layer in layers)
    assert seen == {True: {True}, False: {False}}
    assert rollouts[True].completion_ids == rollouts[False].completion_ids
    assert len(set(map(tuple, rollouts[True].completion_ids))) > 1
    worst = max(abs(a - b) for merged, plain in zip(rollouts[True].logprobs, rollouts[False].logprobs)
                for a, b in zip(merged, plain))
    assert worst <= 1e-5, worst
    # unmerging subtracted the delta it added: float32 rounding of the merged weight, nothing more
    for layer in layers:
        before, after = base[id(layer)], layer.get_base_layer().weight.detach()
        delta = layer.get_delta_weight("default")
        assert float(delta.abs().max()) > 1e-3
        assert float((after - before).abs().max()) <= 2 ** -23 * float((before.abs() + delta.abs()).max())


def test_lora_merged_leaves_a_bf16_base_alone_and_unmerges_on_an_error(tiny_model):
    from peft.tuners.lora import LoraLayer

    from mathtune.models.load import apply_lora, lora_merge_blocker, lora_merged

    assert lora_merge_blocker(tiny_model) == "no LoRA adapter"
    bf16 = apply_lora(build_tiny_copy(tiny_model, torch.bfloat16), r=2, alpha=4, dropout=0.0)
    with lora_merged(bf16) as why_not:
        assert "bfloat16" in why_not and "float32 only" in why_not
        assert not any(m.merged for m in bf16.modules() if isinstance(m, LoraLayer))

    fp32 = apply_lora(tiny_model, r=2, alpha=4, dropout=0.0)
    layers = [m for m in fp32.modules() if isinstance(m, LoraLayer)]
    with pytest.raises(RuntimeError, match="mid-rollout"):
        with lora_merged(fp32) as why_not:
            assert why_not is None and all(layer.merged for layer in layers)
            raise RuntimeError("mid-rollout")
    assert not any(layer.merged for layer in layers)


def build_tiny_copy(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def test_sampler_stops_on_nonfinite_logits(tiny_model_dir, tmp_path, one_thread):
    """A NaN in the weights reaches every logit of a row; the sampler finds it from the chosen tokens'
    log-probabilities and stops with the cause, instead of sampling from garbage."""
    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run"))
    sampler, model = session.trainer.rollout_func, session.model
    ids = [sampler.encode("How many metres are 3 km?")] * 4
    assert len(sampler.sample(model, ids, step=0).completion_ids) == 4
    with torch.no_grad():
        model.get_base_model().model.norm.weight[3] = float("nan")
    with pytest.raises(TrainingHalted) as exc:
        sampler.sample(model, ids, step=1)
    assert exc.value.check == "nonfinite_logits" and "lower --learning-rate" in str(exc.value)


class WriteCalculation:
    """A logits processor that makes every row write ``<<2*3=`` first (a large bias, not a forcing), so
    the calculator then forces ``6>>``."""

    def __init__(self, tokenizer):
        self.script = tokenizer.encode("<<2*3=", add_special_tokens=False)
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None or input_ids.shape[1] <= self.start:
            self.start = input_ids.shape[1]  # a new batch
        written = input_ids.shape[1] - self.start
        if written < len(self.script):
            scores[:, self.script[written]] += 1e4
        return scores


class BanToken:
    """A logits processor that bans one token with -inf, as a bad-words list does (no forcing)."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = float("-inf")
        return scores


def test_env_mask_holds_exactly_the_calculators_tokens_beside_a_processor_that_writes_minus_inf(
        tiny_model_dir, tmp_path, one_thread):
    """A forced token is one the calculator forced, not any row with a -inf logit: a processor that bans a
    token leaves every other token the model chose in the loss (env_mask 1)."""
    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run", calculator=True))
    sampler, tokenizer = session.trainer.rollout_func, session.tokenizer
    sampler.logits_processors += [WriteCalculation(tokenizer), BanToken(tokenizer.encode("!", add_special_tokens=False)[0])]
    rollout = sampler.sample(session.model, [sampler.encode("How many metres are 3 km?")] * 4, step=0)
    for tokens, mask in zip(rollout.completion_ids, rollout.env_mask):
        masked = [token for token, keep in zip(tokens, mask) if not keep]
        assert tokenizer.decode(masked) in ("6>>", "6>>" + tokenizer.eos_token), (tokenizer.decode(tokens), mask)
        assert sum(mask) == len(tokens) - len(masked) >= len(tokenizer.encode("<<2*3=", add_special_tokens=False))


def test_calculator_tokens_are_masked_and_do_not_change_trls_loss(tiny_model_dir, tmp_path, one_thread):
    # TRL's per-row pass: the hook below perturbs its layout (the shared-prompt pass is tied to it below)
    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run", calculator=True, shared_prompt=False))
    trainer, model, tokenizer = session.trainer, session.model, session.tokenizer
    trainer.rollout_func.logits_processors.append(WriteCalculation(tokenizer))
    scripted_reward(session, alternating)  # advantages +-1: the loss depends on every unmasked token
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the loss normaliser reads it
    batch = [dict(trainer.train_dataset[0]) for _ in range(4)]
    inputs = trainer._prepare_inputs(batch)  # rollout_func -> rewards -> advantages, TRL's own pipeline
    mask = inputs["tool_mask"] * inputs["completion_mask"]
    forced = (inputs["tool_mask"] == 0).nonzero().tolist()
    assert forced, "the calculator forced nothing"
    for row in range(mask.shape[0]):
        tokens = inputs["completion_ids"][row][inputs["tool_mask"][row] == 0].tolist()
        assert tokenizer.decode(tokens) == "6>>"  # exactly the calculator's tokens are masked
    prompt_width = inputs["prompt_ids"].shape[1]
    norm = model.get_base_model().model.norm

    def loss_and_gradient(positions):
        """TRL's loss and its gradient over the trainable weights, with the final hidden state (so every logit)
        shifted by noise at the position that predicts each completion token in ``positions`` [(row, index)].
        (On-policy the loss value is -mean advantage whatever the logits, so the gradient is what can move.)"""
        def hook(module, args, output):
            output = output.clone()
            for row, t in positions:
                output[row, prompt_width + t - 1] += 5.0 * torch.randn_like(output[row, prompt_width + t - 1])
            return output

        handle = norm.register_forward_hook(hook)
        model.zero_grad(set_to_none=True)
        try:
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
        finally:
            handle.remove()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
        return float(loss), grads

    base_loss, base_grad = loss_and_gradient([])
    assert float(base_grad.abs().max()) > 1e-6  # a gradient that could move
    loss, grad = loss_and_gradient(forced)
    assert abs(loss - base_loss) <= 1e-6 and float((grad - base_grad).abs().max()) <= 1e-6
    chosen = [(row, t) for row, t in (mask == 1).nonzero().tolist()][:4]
    _, grad = loss_and_gradient(chosen)
    assert float((grad - base_grad).abs().max()) > 1e-4  # the control: unmasked tokens do move it


def mixed_then_equal(n, step):
    """The first question's group gets rewards 0, 1, 0, 1 (a signal), the second's all 1 (zero advantages)."""
    return [float(i % 2) for i in range(n // 2)] + [1.0] * (n - n // 2)


def two_question_batch(session, rewards_for):
    """One micro-batch through TRL's own pipeline (rollout_func -> rewards -> advantages): two questions,
    G 4 each, the calculator forcing tokens on every row (so env_mask holes are in it too)."""
    trainer, model = session.trainer, session.model
    trainer.rollout_func.logits_processors.append(WriteCalculation(session.tokenizer))
    scripted_reward(session, rewards_for)
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train(); the loss normaliser reads it
    batch = [dict(trainer.train_dataset[0]) for _ in range(4)] + [dict(trainer.train_dataset[1]) for _ in range(4)]
    return trainer._prepare_inputs(batch)


def loss_and_gradient(trainer, model, inputs, shared_prompt: bool):
    trainer.shared_prompt = shared_prompt
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                       for p in model.parameters() if p.requires_grad])
    return float(loss), grads


def test_shared_prompt_pass_gives_trls_scores_loss_and_gradient(tiny_model_dir, tmp_path, one_thread):
    from mathtune import compat

    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run", calculator=True, batch_size=8))
    trainer, model = session.trainer, session.model
    assert trainer.shared_prompt and trainer.shared_prompt_problem is None
    assert "one prompt pass per question group" in grpo.scoring_mode(session)
    inputs = two_question_batch(session, mixed_then_equal)
    assert (inputs["tool_mask"] == 0).any() and inputs["prompt_ids"].shape[0] == 8
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    scored = inputs["completion_mask"].bool()
    with torch.no_grad():  # per-token log-probabilities and entropies: TRL's per-row pass vs one prompt pass per group
        theirs = compat.call_trl_scoring(trainer, __import__("trl").GRPOTrainer, model, ids, mask, width,
                                         compute_entropy=True)
        ours = trainer._get_per_token_logps_and_entropies(model, ids, mask, width, compute_entropy=True)
    assert float((theirs[0] - ours[0])[scored].abs().max()) <= 1e-5
    assert float((theirs[1] - ours[1])[scored].abs().max()) <= 1e-5
    # the second question's rows (shuffled among the first's by TRL) have all-zero advantages: they need no
    # backward graph, and no forward pass either: the sampler's log-probabilities and entropies stand in
    groups = grpo.prompt_groups(inputs["prompt_ids"], inputs["prompt_mask"])
    trainer.loss_inputs = inputs
    rows_run = []
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, output: rows_run.append(args[0].shape[0]))
    try:
        with torch.enable_grad():
            frozen = grpo._frozen_groups(trainer, groups, 8)
            skipped = grpo._recorded_scores(trainer, ids, mask, width, groups, frozen)
            logps, entropies, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, width,
                                                                             compute_entropy=True)
    finally:
        hook.remove()
        trainer.loss_inputs = None
    assert sorted(map(len, groups)) == [4, 4] and len(frozen) == 1 and set(skipped) == frozen
    idle = groups[next(iter(frozen))]
    assert float(inputs["advantages"][idle].abs().max()) == 0.0
    assert rows_run == [1, 4]  # one group's prompt pass and its 4 rows; the frozen group never ran
    assert float((logps - theirs[0])[scored].abs().max()) <= 1e-4
    assert float((entropies - theirs[1])[scored].abs().max()) <= 1e-4
    trl_loss, trl_grad = loss_and_gradient(trainer, model, inputs, shared_prompt=False)
    loss, grad = loss_and_gradient(trainer, model, inputs, shared_prompt=True)
    assert float(trl_grad.abs().max()) > 1e-6  # a gradient that could move
    assert abs(loss - trl_loss) <= 1e-6
    assert float((grad - trl_grad).abs().max()) <= 1e-5 * float(trl_grad.abs().max())


def test_a_micro_batch_without_signal_trains_to_zero_gradient_without_a_backward_graph(tiny_model_dir, tmp_path,
                                                                                       one_thread):
    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run", batch_size=8))
    trainer, model = session.trainer, session.model
    inputs = two_question_batch(session, lambda n, step: [1.0] * n)
    assert float(inputs["advantages"].abs().max()) == 0.0
    trl_loss, trl_grad = loss_and_gradient(trainer, model, inputs, shared_prompt=False)
    loss, grad = loss_and_gradient(trainer, model, inputs, shared_prompt=True)
    assert loss == trl_loss == 0.0
    assert float(grad.abs().max()) == float(trl_grad.abs().max()) == 0.0


def test_shared_prompt_falls_back_to_trls_pass_where_it_cannot_apply(tiny_model_dir, tmp_path):
    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "a", shared_prompt=False))
    assert grpo.scoring_mode(session) == "TRL's per-row pass (--no-shared-prompt)"
    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "b", gradient_checkpointing=True))
    assert grpo.scoring_mode(session) == "TRL's per-row pass (--gradient-checkpointing)"


# --------------------------------------------------------------------------- the command


def run_cli(*args, env_extra=None, hooked=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    code = HOOKED_CLI if hooked else "import sys; from mathtune.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


TINY_FLAGS = ("--task", "unit-conversion", "--max-samples", 16, "--num-generations", 4, "--batch-size", 4,
              "--max-completion-length", 8, "--precision", "fp32", "--device", "cpu", "--sample-every", 0,
              "--max-new-tokens", 4, "--learning-rate", 1e-2)


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tmp_path_factory):
    """One 5-step ``mathtune grpo`` CLI run, straight through (its tests only read it): the run dir test
    checks it, and the SIGTERM test compares its interrupted-and-resumed run's weights with it."""
    out = tmp_path_factory.mktemp("grpo-cli") / "run"
    proc = run_cli("grpo", "--model", tiny_model_dir, *TINY_FLAGS, "--max_steps", 5, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_cli_trains_and_writes_the_run_dir(cli_run):
    proc, out = cli_run
    assert "sampler: mathtune" in proc.stdout and "G=4 samples per question" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / RunDir.TRAINER_STATE).is_file()
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    for key in ("loss", "reward", "pass_rate", "zero_signal_share", "completion_length", "sample_seconds",
                "score_seconds", "train_seconds"):
        assert lines[0][key] is not None, key
    saved = (out / RunDir.CONFIG).read_text()
    assert "num_generations: 4" in saved and "loss_type: dapo" in saved


def test_bad_grpo_settings_are_usage_errors(tiny_model_dir, tmp_path, capsys):
    from mathtune.cli import main  # in-process: the exit code and message are main()'s, as the CLI's

    code = main(["grpo", "--model", str(tiny_model_dir), "--num-generations", "3", "--batch-size", "4",
                 "--temperature", "0", "--no-signal-steps", "0", "--output-dir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "not a multiple of --num-generations 3" in stderr and "--temperature must be > 0" in stderr
    assert "--no-signal-steps must be a whole number >= 1 (got 0)" in stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_max_time_stops_and_saves(tiny_model_dir, tmp_path, one_thread):
    config = grpo_config(tiny_model_dir, tmp_path / "run", max_steps=500, max_time=4.0)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        result = grpo.train(config)
    # TRL's scoring pass asks transformers' deprecated is_gradient_checkpointing: library noise, hidden
    assert not [w for w in shown if "is_gradient_checkpointing" in str(w.message)]
    assert result.stopped_reason == "max_time" and 1 <= result.steps < 500
    assert (result.run_dir / "adapter_model.safetensors").is_file()
    assert metric_lines(result.run_dir)[-1]["seconds"] <= 4.0 + 5.0  # the step in flight finishes, no more


HOOKED_CLI = r"""
import os, signal, sys
from mathtune import training
at = int(os.environ["T_AT"])
def on_step_begin(self, args, state, control, **kwargs):
    if state.global_step == at:
        os.kill(os.getpid(), signal.SIGTERM)
training.StepCallback.on_step_begin = on_step_begin
from mathtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_checkpoints_and_resume_auto_finishes_the_run(tiny_model_dir, tmp_path, cli_run):
    def weights(path):
        from safetensors.torch import load_file

        return load_file(str(path / "adapter_model.safetensors"))

    flags = ("grpo", "--model", tiny_model_dir, *TINY_FLAGS, "--max-steps", 5)
    straight = cli_run[1]  # the same flags, run straight through

    out = tmp_path / "run"
    proc = run_cli(*flags, "--output-dir", out, env_extra={"T_AT": "2"}, hooked=True)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert [p.name for p in RunDir(out).complete_checkpoints()] == ["checkpoint-3"]
    assert "continue with: mathtune grpo" in proc.stderr and "--resume auto" in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()

    resumed = run_cli(*flags, "--output-dir", out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert [line["step"] for line in metric_lines(out)] == [1, 2, 3, 4, 5]
    a, b = weights(out), weights(straight)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6  # the same samples, the same updates


# --------------------------------------------------------------------------- guards (the RL failure zoo)


def guarded(tiny_model_dir, tmp_path, **overrides):
    # short completions: the guards judge shares and means, which 6 tokens show as well as 12
    return grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run", guards=True,
                                  **{"max_completion_length": 6, **overrides}))


def signal_guard(session):
    from mathtune.training.grpo_guards import RLSignalGuard

    return session.callbacks.guard(RLSignalGuard)


def test_no_learning_signal_fires_after_ten_steps(tiny_model_dir, tmp_path, one_thread):
    # the real correctness reward: the random model solves nothing, so every group is all zeros
    session = guarded(tiny_model_dir, tmp_path, max_steps=30)
    with pytest.raises(TrainingHalted) as exc:
        grpo.run(session)
    assert exc.value.check == "no_signal" and exc.value.step == 10
    assert "solves none of the sampled questions" in str(exc.value) and "start from an SFT run" in str(exc.value)
    assert not (session.run_dir / "adapter_model.safetensors").exists()


def test_no_signal_window_is_a_setting(tiny_model_dir, tmp_path, one_thread):
    session = guarded(tiny_model_dir, tmp_path, max_steps=30, no_signal_steps=3)
    with pytest.raises(TrainingHalted) as exc:
        grpo.run(session)
    assert exc.value.check == "no_signal" and exc.value.step == 3
    assert "over the last 3 steps" in str(exc.value) and "raise --no-signal-steps" in str(exc.value)


def test_runaway_length_fires(tiny_model_dir, tmp_path, one_thread):
    # a learning signal, but the random model never ends a sample: every completion runs to the limit
    session = guarded(tiny_model_dir, tmp_path, max_steps=30)
    scripted_reward(session, alternating)
    with pytest.raises(TrainingHalted) as exc:
        grpo.run(session)
    assert exc.value.check == "runaway_length" and exc.value.step == 10
    assert "100% of completions ran to --max-completion-length 6" in str(exc.value)


def test_reward_collapse_fires(tiny_model_dir, tmp_path, one_thread):
    session = guarded(tiny_model_dir, tmp_path, max_steps=30)
    guard = signal_guard(session)
    guard.collapse_window, guard.runaway_steps = 5, 10**6  # a 5-step window keeps the test short
    # half the samples right for 5 steps, then none (the no-signal guard needs 10 steps to judge that)
    scripted_reward(session, lambda n, step: alternating(n, step) if step <= 5 else [0.0] * n)
    with pytest.raises(TrainingHalted) as exc:
        grpo.run(session)
    # 5-step means: 0.5 (the best, step 5), 0.4, 0.3, then 0.2 < 0.25 at step 8
    assert exc.value.check == "reward_collapse" and exc.value.step == 8
    assert "below half of its best 0.500" in str(exc.value)


def test_nonfinite_loss_is_stopped_before_the_update(tiny_model_dir, tmp_path, one_thread):
    session = guarded(tiny_model_dir, tmp_path, max_steps=4, save_steps=1, save_total_limit=None)
    scripted_reward(session, alternating)
    trainer = session.trainer
    mlp = session.model.get_base_model().model.layers[0].mlp

    def poison(module, args, output):  # training forwards of step 3 only (the sampler runs in eval mode)
        return output * float("nan") if module.training and trainer.state.global_step == 2 else output

    mlp.register_forward_hook(poison)
    with pytest.raises(TrainingHalted) as exc:
        grpo.run(session)
    assert exc.value.check == "nonfinite_loss" and exc.value.step == 3
    assert "lower --learning-rate" in str(exc.value)
    assert trainer.state.global_step == 2
    assert sorted(p.name for p in session.run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all(torch.isfinite(p).all() for p in session.model.parameters())


# --------------------------------------------------------------------------- settings


def test_settings_take_trl_names_in_flags_and_yaml(tmp_path):
    from mathtune.cli import build_parser
    from mathtune.config import config_from_args
    from mathtune.errors import ConfigError

    recipe = tmp_path / "grpo.yaml"
    recipe.write_text("num_generations: 4\nmax-completion-length: 64\nper_device_train_batch_size: 8\n"
                      "loss_type: dr_grpo\nbeta: 0.04\n")
    args = build_parser(only="grpo").parse_args(["grpo", "--config", str(recipe), "--num_generations", "2",
                                                 "--temperature", "0.7", "--scale_rewards", "none"])
    config = config_from_args(GRPOSettings, args)
    assert (config.num_generations, config.max_completion_length, config.batch_size) == (2, 64, 8)  # flag wins
    assert (config.loss_type, config.beta, config.sampling.temperature, config.scale_rewards) == ("dr_grpo", 0.04, 0.7, "none")
    assert config.questions_per_step == 4
    recipe.write_text("loss_type: ppo\nshared_prefix: false\n")
    with pytest.raises(ConfigError) as exc:
        build_config(GRPOSettings, recipe, {})
    problems = " | ".join(exc.value.problems)
    assert "--loss-type 'ppo' is not one of dapo" in problems
    assert "shared_prefix: False is a `mathtune train` setting that GRPO does not use" in problems


# --------------------------------------------------------------------------- MATH-style answers (issue 32)
MATH_ROWS = [  # MATH's columns; golds: a number in LaTeX (the numeric rule) and expressions (math-verify)
    {"problem": "What is half of $1$?", "solution": "Half of one is $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Simplify $\\sqrt{20}$.", "solution": "$\\sqrt{20} = \\sqrt{4 \\cdot 5} = \\boxed{2\\sqrt{5}}$."},
    {"problem": "Compute $\\cos 45^\\circ$.", "solution": "It is $\\boxed{\\frac{\\sqrt{2}}{2}}$."},
    {"problem": "Expand $(x+1)^2 - 2x$.", "solution": "We get $\\boxed{x^2 + 1}$."},
]


@pytest.fixture
def math_file(tmp_path):
    path = tmp_path / "math-train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MATH_ROWS))
    return path


def test_correctness_reward_judges_latex_answers_in_other_forms(math_file):
    from mathtune.tasks import get_task

    # golds as grpo's dataset carries them: the math task's reading of the file, as JSON text
    golds = [json.dumps(example.gold) for example in get_task("math", train_file=math_file).examples("train")]
    right = ["So the answer is $\\boxed{0.5}$.", "$\\boxed{\\sqrt{20}}$", "$\\boxed{\\frac{1}{\\sqrt{2}}}$",
             "$\\boxed{1 + x^2}$"]
    wrong = ["So the answer is $\\boxed{\\frac{1}{3}}$.", "$\\boxed{2\\sqrt{3}}$", "$\\boxed{\\frac{\\sqrt{3}}{2}}$",
             "$\\boxed{x^2 - 1}$"]
    stats = grpo.RLStats(num_generations=4, max_completion_length=16)
    reward = grpo.correctness_reward("exact", stats)
    prompts = [row["problem"] for row in MATH_ROWS]
    for completions, expected in ((right, 1.0), (wrong, 0.0)):
        ids = [[1] * 3 for _ in completions]
        assert reward(prompts, completions, ids, gold=golds) == [expected] * 4, completions
    assert stats.window[-1]["pass_rate"] == 0.0 and stats.window[-2]["pass_rate"] == 1.0  # what metrics.jsonl logs


def test_cli_trains_on_a_math_style_file(tiny_model_dir, math_file, tmp_path):
    out = tmp_path / "run"
    flags = TINY_FLAGS[4:]  # past --task unit-conversion --max-samples 16
    proc = run_cli("grpo", "--model", tiny_model_dir, *flags, "--task", "math", "--train-file", math_file,
                   "--max-samples", -1,
                   "--max-steps", 2, "--max-completion-length", 6, "--output-dir", out,
                   env_extra={"MATHTUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "task: math (reward: judge exact" in proc.stdout and f"{len(MATH_ROWS)} questions" in proc.stdout
    lines = metric_lines(out)
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["reward"] is not None and line["pass_rate"] is not None for line in lines)
    assert (out / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- the report of a GRPO run


def test_report_shows_reward_and_pass_rate_and_the_learning_curve_takes_grpo_checkpoints(tiny_model_dir, tmp_path,
                                                                                          one_thread):
    from mathtune.learning_curve import collect
    from mathtune.report import read_metrics, write_report
    from test_learning_curve import run_eval
    from test_report import png_size

    session = grpo.setup(grpo_config(tiny_model_dir, tmp_path / "run", max_steps=3, save_steps=2,
                                     save_total_limit=None))
    # a pass rate that moves: 1 of 4 right at step 1, 2 at step 2, 3 at step 3
    scripted_reward(session, lambda n, step: [float(i % 4 < step) for i in range(n)])
    grpo.run(session)
    RunDir(session.run_dir).unlock()
    run = session.run_dir
    for spec in (run / "checkpoint-2", run, tiny_model_dir):  # real greedy evals, as a user would run them
        run_eval(spec, run / "eval" / "curve")

    report = write_report(run).read_text()
    for name in ("reward", "pass_rate", "learning_curve"):
        assert png_size(run / "plots" / f"{name}.png")[0] > 0, name
    assert "![GRPO reward](plots/reward.png)" in report and "![GRPO pass rate](plots/pass_rate.png)" in report
    assert "| pass rate | first 0.25 (step 1) → last 0.75 (step 3), best 0.75 (step 3)" in report
    for label in ("| reward | first", "| zero-signal share | first 0 (step 1)", "| completion length | first",
                  "| seconds per step | sampling "):
        assert label in report, label
    assert "![learning curve](plots/learning_curve.png)" in report
    settings = __import__("yaml").safe_load((run / RunDir.CONFIG).read_text())
    (group,) = collect(run, read_metrics(run), settings).groups
    assert [(p.role, p.step) for p in group.points] == [("base", 0), ("checkpoint", 2), ("final", 3)]
    assert group.points[1].seconds is not None and group.points[2].seconds >= group.points[1].seconds
