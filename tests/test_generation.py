"""Batched generation on the tiny model: same tokens as one-at-a-time generate(), stops, order, seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model
from mathtune.data import encode_prompt, format_prompt
from mathtune.errors import MathtuneError
from mathtune.generation.engine import Generator
from mathtune.config import GenerationArgs
from mathtune.generation.settings import Generations

# Different lengths, deliberately not sorted: batching sorts by length and must restore this order.
QUESTIONS = [
    "A farmer has 17 sheep and buys 5 more at the market on Tuesday. How many sheep does he have now?",
    "What is 2+3?",
    "Convert 3.5 km to m.",
    "Tom reads 12 pages a day for 9 days and then 4 pages more. How many pages did he read?",
    "Hi",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def varied_model(smol_tokenizer):
    """The tiny model with larger random weights, in float64.

    Larger weights: its greedy output differs from prompt to prompt (at the default init scale every
    prompt decodes to the same repeated token). float64: batching, the shared-prefix prefill and the
    decode attention change the float rounding (rotary angles alone are computed in float32), and a
    random model has near-tied logits; in float32 a 1e-7 difference can flip one argmax. In float64 a
    tie that close is vanishingly rare, so exact token equality tests the code, not the rounding.
    """
    model = build_tiny_model(smol_tokenizer, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.to(torch.float64)


def reference(model, tokenizer, question: str, max_new_tokens: int, eot: int | None = None) -> list[int]:
    """Plain one-question generate(): no padding, no batching, no chunks."""
    ids = torch.tensor([encode_prompt(tokenizer, format_prompt(tokenizer, question))])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eot, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[: new.index(eot) + 1] if eot is not None and eot in new else new


def test_batched_greedy_matches_one_at_a_time(varied_model, smol_tokenizer):
    refs = [reference(varied_model, smol_tokenizer, q, 12) for q in QUESTIONS]
    assert len({tuple(r) for r in refs}) == len(QUESTIONS)  # the prompts really decode differently
    gen = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=12, batch_size=3), chunk_tokens=5)
    out = gen(QUESTIONS)
    assert isinstance(out, Generations) and len(out) == len(QUESTIONS)
    for question, samples, counts, ref in zip(QUESTIONS, out, out.token_counts, refs):
        assert samples == [smol_tokenizer.decode(ref, skip_special_tokens=True)], question
        assert counts == [12]
    assert out.tokens_generated == 12 * len(QUESTIONS)
    # batch size 1 (no padding at all) gives the same texts
    assert list(Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=12, batch_size=1))(QUESTIONS)) == list(out)


@pytest.mark.parametrize("fast", [True, False])
def test_fast_and_plain_paths_match_the_reference(varied_model, smol_tokenizer, fast):
    """Both decoding paths, on a batch whose prompts all have the same length (no padding: transformers
    then passes no attention mask at all) and on one prompt alone (everything but its last token is
    the 'shared prefix')."""
    same_length = ["Tom has 12 apples and eats 3. How many are left?", "Amy has 15 pears and sells 7. How many left?"]
    lengths = {len(encode_prompt(smol_tokenizer, format_prompt(smol_tokenizer, q))) for q in same_length}
    assert len(lengths) == 1
    original = varied_model.config._attn_implementation
    for questions in (same_length, QUESTIONS[:1]):
        gen = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=10), fast=fast, chunk_tokens=4)
        expected = [[smol_tokenizer.decode(reference(varied_model, smol_tokenizer, q, 10), skip_special_tokens=True)]
                    for q in questions]
        assert list(gen(questions)) == expected
    assert varied_model.config._attn_implementation == original  # the fast path switches back


def test_identical_prompts_share_their_whole_prefix(varied_model, smol_tokenizer):
    """Several samples of one prompt in a batch: the prefix is the whole prompt but its last token."""
    gen = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=6, temperature=1e-4, num_samples=3))
    ref = smol_tokenizer.decode(reference(varied_model, smol_tokenizer, QUESTIONS[1], 6), skip_special_tokens=True)
    assert gen(QUESTIONS[1:2])[0] == [ref] * 3  # a tiny temperature samples the greedy token


def test_rows_stop_at_end_of_turn_at_different_steps(varied_model, smol_tokenizer):
    """Pretend a token the model emits early for one prompt is the end-of-turn token: that row stops
    there (and leaves the batch between chunks) while the others go on to max_new_tokens."""
    free = [reference(varied_model, smol_tokenizer, q, 16) for q in QUESTIONS]
    stop_token = free[1][2]
    stop_after = [r.index(stop_token) + 1 if stop_token in r else 16 for r in free]
    assert stop_after[1] <= 3 and max(stop_after) == 16  # one row stops early, another runs to the cap
    gen = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=16, batch_size=5), chunk_tokens=4)
    gen.stop_ids = [stop_token]
    out = gen(QUESTIONS)
    assert [c[0] for c in out.token_counts] == stop_after
    for samples, ref, n in zip(out, free, stop_after):
        kept = ref[: n - 1] if n < 16 or ref[15] == stop_token else ref  # the stop token itself is not in the text
        assert samples[0] == smol_tokenizer.decode(kept, skip_special_tokens=True)


def test_stop_string_truncates_output(varied_model, smol_tokenizer):
    question = QUESTIONS[0]
    full_ids = reference(varied_model, smol_tokenizer, question, 20)
    full = smol_tokenizer.decode(full_ids, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.find(stop)
    assert 0 < cut < len(full) - 3
    gen = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=20, stop=[stop]))
    out = gen([question, QUESTIONS[1]])
    assert out[0] == [full[:cut]]
    assert out.token_counts[0][0] < 20  # generation itself stopped, not just the text
    # a stop string that never appears changes nothing
    assert gen([question], stop=["\u2603never\u2603"])[0] == [full]


def test_sampling_is_seeded_and_gives_num_samples(varied_model, smol_tokenizer):
    gen = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=8, temperature=1.0, num_samples=3), seed=7)
    a, b = gen(QUESTIONS[:2]), gen(QUESTIONS[:2])
    assert [len(s) for s in a] == [3, 3]
    assert list(a) == list(b)
    assert len(set(a[0])) > 1  # three samples of one prompt differ
    assert list(gen(QUESTIONS[:2], seed=8)) != list(a)
    # sampling does not disturb the caller's random stream
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    gen(QUESTIONS[:1])
    assert torch.equal(torch.rand(1), expected)


def test_top_p_near_zero_is_greedy(varied_model, smol_tokenizer):
    greedy = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=8))(QUESTIONS[:2])
    nucleus = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=8, temperature=1.0, top_p=1e-6))(QUESTIONS[:2])
    assert list(nucleus) == list(greedy)


@pytest.mark.parametrize("changes, flag", [
    (dict(num_samples=2), "--num-samples"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
    (dict(batch_size=-1), "--batch-size"),
    (dict(temperature=-0.5), "--temperature"),
    (dict(top_p=0.0, temperature=1.0), "--top-p"),
    (dict(stop=[""]), "--stop"),
])
def test_bad_settings_name_the_flag(changes, flag):
    with pytest.raises(MathtuneError, match=flag):
        GenerationArgs(**changes).validate()


def test_unknown_override_and_string_input_are_errors(tiny_model, smol_tokenizer):
    gen = Generator(tiny_model, smol_tokenizer)
    with pytest.raises(MathtuneError, match="unknown generation setting"):
        gen(["q"], max_tokens=5)
    with pytest.raises(MathtuneError, match="list of questions"):
        gen("one string")
    assert list(gen([])) == []


def test_frozen_head_gets_a_contiguous_input_and_the_hook_is_removed(smol_tokenizer):
    # A frozen head fed generate()'s strided last-position view would take torch's batched-matmul
    # path that copies the head weight once per row; the Generator hands it a contiguous input.
    model = build_tiny_model(smol_tokenizer).requires_grad_(False)
    head = model.get_output_embeddings()
    seen = []
    spy = head.register_forward_hook(lambda module, args, output: seen.append(args[0].is_contiguous()))
    plain = Generator(model, smol_tokenizer, GenerationArgs(max_new_tokens=4), fast=False)(QUESTIONS)
    spy.remove()
    assert seen and all(seen)
    assert not head._forward_pre_hooks  # nothing left on the caller's model
    # and it only changes memory layout: the same tokens as a reference generate()
    expected = [[smol_tokenizer.decode(reference(model, smol_tokenizer, q, 4), skip_special_tokens=True)] for q in QUESTIONS]
    assert list(plain) == expected


# --------------------------------------------------------------------------- issue #10 regressions


@pytest.mark.parametrize("fast", [True, False])
def test_generation_raises_no_deprecation_warning(varied_model, smol_tokenizer, fast):
    """Defect: generation passed the deprecated ``past_key_values=`` kwarg (transformers 5.24:
    FutureWarning, removed in 5.40) and read ``out.past_key_values``. Any FutureWarning or
    DeprecationWarning raised from our calls is an error here."""
    import warnings

    settings = GenerationArgs(max_new_tokens=40, batch_size=2, calculator=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        # chunks of 8 tokens and batches of 2: the cache is handed between generate() calls and rows drop
        out = Generator(varied_model, smol_tokenizer, settings, fast=fast, chunk_tokens=8)(QUESTIONS)
    assert len(out) == len(QUESTIONS)


def test_eval_path_raises_no_deprecation_warning(tiny_model_dir, tmp_path, monkeypatch):
    """The same for ``mathtune eval``'s whole path: load, generate (fast path), judge, write."""
    import warnings

    from mathtune.config import EvalConfig
    from mathtune.evaluation import evaluate_model

    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "eval.jsonl"
    data.write_text('{"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\\n#### 5"}\n'
                    '{"question": "What is 10/4?", "answer": "#### 2.5"}\n')
    config = EvalConfig.from_flat(model=str(tiny_model_dir), task="gsm8k", eval_file=str(data), max_new_tokens=16, max_samples=-1,
                        device="cpu", precision="fp32", no_cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        summary, records = evaluate_model(str(tiny_model_dir), config, tmp_path / "out", verbose=False, progress=False)
    assert summary["generation"]["calculator"] is True  # gsm8k: on by default
    assert len(records) == 2 and all("loop" in r and "calculator_calls" in r for r in records)


def test_buffer_attention_masks_the_unwritten_slots_of_whole_buffers():
    """The decode loop passes whole buffers (contiguous: bmm reads them in place) whose slots past
    `filled` are not written yet: with the mask hiding those, the result is SDPA's over the filled
    slots, and a padding mask applies on top."""
    from mathtune.generation.cpu import _buffer_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, dim, capacity, filled = 3, 4, 2, 8, 20, 11
    keys_t = torch.randn(batch, kv_heads, dim, capacity) * 100  # garbage past `filled`
    values = torch.randn(batch, kv_heads, capacity, dim) * 100
    query = torch.randn(batch, heads, 1, dim)
    # merging rows and kv heads of the whole buffers copies nothing
    assert keys_t.reshape(batch * kv_heads, dim, capacity).data_ptr() == keys_t.data_ptr()
    assert values.reshape(batch * kv_heads, capacity, dim).data_ptr() == values.data_ptr()
    rep = heads // kv_heads
    k_full = keys_t[:, :, :, :filled].transpose(2, 3).repeat_interleave(rep, dim=1)
    v_full = values[:, :, :filled].repeat_interleave(rep, dim=1)
    # values are ~1e1 (garbage x100): bmm and SDPA round differently per CPU, while covering the
    # garbage slots would be off by ~1e1
    close = dict(rtol=1e-5, atol=1e-4)
    written = torch.arange(capacity) < filled
    out, _ = _buffer_attention(query, keys_t, values, written.expand(batch, 1, 1, capacity), dim**-0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(query, k_full, v_full).transpose(1, 2)
    torch.testing.assert_close(out, expected, **close)
    mask = written.repeat(batch, 1, 1, 1)
    mask[0, :, :, 0] = False  # row 0 may not see slot 0
    masked, _ = _buffer_attention(query, keys_t, values, mask, dim**-0.5)
    expected_masked = torch.nn.functional.scaled_dot_product_attention(
        query, k_full, v_full, attn_mask=mask[..., :filled]).transpose(1, 2)
    torch.testing.assert_close(masked, expected_masked, **close)
    assert not torch.allclose(masked[0], out[0])
    # prompt tokens (q > 1, the prefill) under a causal mask with a padding slot in one row
    q_len = 4
    prompt_query = torch.randn(batch, heads, q_len, dim)
    query_slots = filled - q_len + torch.arange(q_len)
    causal = (torch.arange(filled)[None, :] <= query_slots[:, None]).repeat(batch, 1, 1, 1)
    causal[1, :, :, 2] = False
    prompt_out, _ = _buffer_attention(prompt_query, keys_t[..., :filled], values[:, :, :filled], causal, dim**-0.5)
    expected_prompt = torch.nn.functional.scaled_dot_product_attention(
        prompt_query, k_full, v_full, attn_mask=causal).transpose(1, 2)
    assert prompt_out.shape == (batch, q_len, heads, dim)
    # scores here reach ~1e2 (keys x100): SDPA's blockwise
    # softmax rounds ~4e-5 apart; covering a masked slot would be off by ~1e1
    torch.testing.assert_close(prompt_out, expected_prompt, rtol=1e-4, atol=1e-3)


def test_decoder_reserves_tight_buffers_per_chunk_and_cuts_selected_rows(varied_model, smol_tokenizer):
    """Before each chunk the KV buffers are laid out anew: the filled slots plus the chunk's steps,
    contiguous, holding only the rows kept by select; within a chunk they are not copied again."""
    from mathtune.generation.cpu import FastDecoder, greedy_tokens, register_attention

    ids = [encode_prompt(smol_tokenizer, format_prompt(smol_tokenizer, q)) for q in QUESTIONS[:3]]
    original = varied_model.config._attn_implementation
    varied_model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            decoder = FastDecoder(varied_model, ids, 8, smol_tokenizer.pad_token_id, {}, torch.device("cpu"))
            decoder.prefill()
            prompt_slots, state = decoder.filled, decoder.state
            assert state.capacity == prompt_slots == state.keys[0].shape[-1]
            written = state.keys[0][..., :prompt_slots].clone()

            def feed():
                tokens = greedy_tokens(decoder.step(decoder.sequences[:, -1]))
                decoder.sequences = torch.cat([decoder.sequences, tokens[:, None]], dim=1)

            decoder.reserve(3)
            buffers = [state.keys[0], state.values[0]]
            assert state.capacity == prompt_slots + 3 and all(b.is_contiguous() for b in buffers)
            assert buffers[0].shape[-1] == buffers[1].shape[-2] == prompt_slots + 3
            for _ in range(3):
                feed()
            assert state.keys[0] is buffers[0] and state.values[0] is buffers[1]  # written in place
            assert torch.equal(state.keys[0][..., :prompt_slots], written)
            assert state.keys[0][..., prompt_slots:].abs().sum(dim=(1, 2)).gt(0).all()  # 3 slots written
            filled = decoder.filled
            decoder.select([0, 2])
            decoder.reserve(2)
            assert state.rows == 2 and state.keys[0].shape[0] == 2 and state.capacity == filled + 2
            assert torch.equal(state.keys[0][..., :filled], buffers[0][[0, 2]])
            assert torch.equal(state.values[0][:, :, :filled], buffers[1][[0, 2]])
            assert not state.keys[0][..., filled:].any()  # room for the chunk, zero-filled
            feed()
            feed()
            feed()  # past the reserved room: the decoder makes room itself
            assert decoder.filled == filled + 3 == state.capacity
    finally:
        varied_model.set_attn_implementation(original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49152, 151936, 1000])  # SmolLM2: blocks of 1024, Qwen2: of 128; none
def test_greedy_tokens_is_argmax_with_its_ties_and_nan(vocab, dtype):
    """The blocked argmax of the decode loop picks exactly torch.argmax's index, ties and NaN included."""
    from mathtune.generation.cpu import greedy_tokens

    torch.manual_seed(0)
    scores = torch.randn(9, vocab).to(dtype)
    scores[1, 7] = scores[1, vocab - 3] = 50.0  # a tie in different blocks: the first wins
    scores[2, 10] = scores[2, 11] = 50.0  # a tie inside one block
    scores[3] = 0.0  # all equal: index 0
    scores[4, vocab // 2] = float("nan")  # NaN is argmax's maximum
    scores[5, 3] = scores[5, vocab - 1] = float("nan")
    scores[6] = float("-inf")
    scores[7, vocab - 1] = float("inf")
    expected = scores.argmax(dim=-1)
    assert expected[1] == 7 and expected[2] == 10 and expected[4] == vocab // 2  # the cases are what they say
    assert torch.equal(greedy_tokens(scores), expected)
    # the decode loop argmaxes bf16 logits without generate()'s float32 copy: the same index
    assert torch.equal(greedy_tokens(scores), scores.float().argmax(dim=-1))
    assert torch.equal(greedy_tokens(scores[:, : vocab - 1].contiguous()), scores[:, : vocab - 1].argmax(dim=-1))


def test_sampled_tokens_draw_from_the_softmax_and_never_a_masked_token():
    """The inverse-CDF draw of the decode loops has multinomial's distribution: frequencies over 200k
    draws within 4 standard errors of softmax(scores) (a wrong cumulative sum, an off-by-one index or a
    fp32 sum would shift them), -inf tokens never drawn, the first and last tokens reachable, a one-hot
    row always gives its token."""
    from mathtune.generation.cpu import sampled_tokens

    torch.manual_seed(0)
    probs = torch.tensor([0.05, 0.0, 0.15, 0.3, 0.0, 0.2, 0.3])
    scores = probs.log().repeat(200_000, 1)
    counts = torch.bincount(sampled_tokens(scores), minlength=len(probs)).double()
    frequencies = counts / counts.sum()
    standard_error = (probs.double() * (1 - probs.double()) / counts.sum()).sqrt()
    assert counts[1] == 0 and counts[4] == 0
    assert ((frequencies - probs.double()).abs() <= 4 * standard_error + 1e-12).all(), frequencies
    # a vocabulary-sized row of random scores: drawn tokens follow softmax too (the top token's share)
    wide = torch.randn(1, 49152) * 4
    wide[0, 0], wide[0, -1] = 12.0, 12.0  # two tokens at the edges hold most of the mass
    drawn = sampled_tokens(wide.repeat(20_000, 1))
    share = torch.softmax(wide[0].double(), dim=-1)
    for index in (0, 49151):
        observed = (drawn == index).double().mean()
        assert abs(observed - share[index]) < 4 * (share[index] * (1 - share[index]) / 20_000).sqrt()
    forced = torch.full((3, 49152), float("-inf"))
    forced[0, 0], forced[1, 49151], forced[2, 777] = 0.0, 0.0, 0.0
    assert sampled_tokens(forced).tolist() == [0, 49151, 777]


def load_bench(name: str):
    """bench/NAME.py as a module (the benches are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench

def test_sampling_kernel_bench_runs_and_reports_a_ratio(capsys):
    bench = load_bench("sampling_kernel")
    assert bench.main(["--rows", "3", "--vocab", "64", "--repeats", "2", "--rounds", "1",
                       "--check-draws", "20000"]) == 0
    out = capsys.readouterr().out
    gap = float(out.split("draws: ")[1].split(" standard")[0])
    assert gap < 5.0 and "speed-up: " in out and "multinomial" in out


def test_fast_path_is_active_only_while_generating(varied_model, smol_tokenizer):
    """The registered attention (transformers offers no public way to remove a name) is mathtune's
    decode attention only inside mathtune's loop: the model runs it while generating, gets its own
    attention back afterwards, and the name resolves to plain SDPA outside the loop."""
    from transformers import AttentionInterface

    from mathtune.generation.cpu import ATTENTION_NAME, decoding_active

    seen = []
    hook = varied_model.model.layers[0].self_attn.register_forward_hook(
        lambda *a: seen.append((decoding_active(), varied_model.config._attn_implementation)))
    original = varied_model.config._attn_implementation
    try:
        assert not decoding_active()
        Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=3), fast=True)(QUESTIONS[:2])
    finally:
        hook.remove()
    assert seen and all(active and name == ATTENTION_NAME for active, name in seen)
    assert not decoding_active() and varied_model.config._attn_implementation == original
    # outside the loop the registered name is plain SDPA: the same logits as the model's own attention
    ids = torch.tensor([encode_prompt(smol_tokenizer, format_prompt(smol_tokenizer, QUESTIONS[0]))])
    with torch.no_grad():
        own = varied_model(input_ids=ids).logits
        varied_model.set_attn_implementation(ATTENTION_NAME)
        try:
            lingering = varied_model(input_ids=ids).logits
        finally:
            varied_model.set_attn_implementation(original)
    assert ATTENTION_NAME in AttentionInterface()
    torch.testing.assert_close(lingering, own)


def _family_model(family: str, tokenizer):
    """A tiny random model of another architecture (hidden 64, 2 layers) on the SmolLM2 tokenizer."""
    import transformers

    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }[family]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id,
                          attn_implementation="eager" if family == "gemma2" else "sdpa")  # Gemma2 has no SDPA
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.to(torch.float64)


@pytest.mark.parametrize("family, fast_path", [("qwen2", True), ("gemma2", False)])
def test_other_families_run_the_fast_path_or_fall_back_with_a_notice(smol_tokenizer, capsys, family, fast_path):
    """Qwen2 runs the fast path; Gemma2 soft-caps its attention logits, which the fast path does not
    implement, so it falls back to plain generate with one line on stderr: Qwen2's tokens are those of
    one-at-a-time generate(), Gemma2's those of the plain path (fast=False)."""
    from mathtune.generation.cpu import decoding_active

    model = _family_model(family, smol_tokenizer)
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *a: seen.append(decoding_active()))
    try:
        out = Generator(model, smol_tokenizer, GenerationArgs(max_new_tokens=10, batch_size=3), fast=True,
                        chunk_tokens=4)(QUESTIONS)
    finally:
        hook.remove()
    if fast_path:
        expected = [[smol_tokenizer.decode(reference(model, smol_tokenizer, q, 10), skip_special_tokens=True)]
                    for q in QUESTIONS]
    else:
        expected = list(Generator(model, smol_tokenizer, GenerationArgs(max_new_tokens=10, batch_size=3), fast=False,
                                  chunk_tokens=4)(QUESTIONS))
    assert list(out) == expected
    notices = [line for line in capsys.readouterr().err.splitlines() if "fast generation path off" in line]
    if fast_path:
        assert all(seen) and not notices
    else:
        assert len(notices) == 1 and "soft-capping" in notices[0]  # once, for all batches
    assert model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")


def test_stop_reasons_say_why_each_row_ended(varied_model, smol_tokenizer):
    """end_of_turn / stop_string / max_new_tokens, per row, on the fast and the plain path alike."""
    free = [reference(varied_model, smol_tokenizer, q, 12) for q in QUESTIONS[:3]]
    stop_token = free[0][3]
    text = smol_tokenizer.decode(free[1], skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    for fast in (True, False):
        gen = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=12, stop=[stop]), fast=fast,
                        chunk_tokens=5)
        gen.stop_ids = [stop_token]
        out = gen(QUESTIONS[:3])
        assert out.stop_reasons[0] == ["end_of_turn"]
        assert out.stop_reasons[1] == ["stop_string"]
        expected_last = "end_of_turn" if stop_token in free[2] else (
            "stop_string" if stop in smol_tokenizer.decode(free[2], skip_special_tokens=True) else "max_new_tokens")
        assert out.stop_reasons[2] == [expected_last]


def test_model_generation_config_does_not_leak_into_greedy_output(varied_model, smol_tokenizer):
    """Defect: generate() fills every setting we leave unset from the model's generation_config, so
    a checkpoint recommending a repetition penalty (or min_p, no_repeat_ngram_size, ...) changed
    what eval measures. The same greedy outputs with and without such a config, which is restored."""
    settings = GenerationArgs(max_new_tokens=24)
    clean = Generator(varied_model, smol_tokenizer, settings)(QUESTIONS)
    original = varied_model.generation_config
    # suppress_tokens: the first greedy token of every question, so raw generate() must differ
    firsts = [reference(varied_model, smol_tokenizer, q, 1)[0] for q in QUESTIONS]
    leaky = original.__class__(repetition_penalty=1.8, no_repeat_ngram_size=2, min_new_tokens=20,
                               suppress_tokens=firsts, min_p=0.5, typical_p=0.5, top_k=3, temperature=0.3)
    varied_model.generation_config = leaky
    try:
        polluted = Generator(varied_model, smol_tokenizer, settings)(QUESTIONS)
        assert varied_model.generation_config is leaky
        # the config does change raw generate() (so the test can fail)
        ids = torch.tensor([encode_prompt(smol_tokenizer, format_prompt(smol_tokenizer, QUESTIONS[0]))])
        with torch.no_grad():
            raw = varied_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                        do_sample=False, pad_token_id=smol_tokenizer.pad_token_id)
    finally:
        varied_model.generation_config = original
    assert list(polluted) == list(clean)
    assert raw[0, ids.shape[1]:].tolist() != reference(varied_model, smol_tokenizer, QUESTIONS[0], 24)


def test_generations_select_and_merge_keep_every_per_item_field(varied_model, smol_tokenizer):
    """Sharding and caching go through select / merge / to_dict: split a real run (calculator on) into
    two interleaved shards, round-trip them through plain data, merge: every field equals the run's."""
    import dataclasses

    out = Generator(varied_model, smol_tokenizer, GenerationArgs(max_new_tokens=6, calculator=True))(QUESTIONS)
    out.loops[2] = [True]  # a looping row and a calculator call must travel like every other field
    out.calculator_calls[3] = [[{"expr": "2*3", "value": "6"}]]
    plan = [[0, 2, 4], [1, 3]]
    parts = [(indices, Generations.from_dict(out.select(indices).to_dict())) for indices in plan]
    merged = Generations.merge(parts, len(QUESTIONS))
    for f in dataclasses.fields(Generations):
        assert getattr(merged, f.name) == getattr(out, f.name), f.name
    with pytest.raises(MathtuneError, match="item 1"):
        Generations.merge(parts[:1], len(QUESTIONS))


def test_lora_merge_bench_samples_both_ways_the_same_tokens_and_prints_a_speed_up(tiny_model_dir, capsys):
    bench = load_bench("rollout_lora_merge")
    assert bench.main(["--model", str(tiny_model_dir), "--data", "unit-conversion", "--questions", "2",
                       "--per-call", "1", "--samples", "2", "--max-new-tokens", "4", "--threads", "1",
                       "--rounds", "1", "--lora-r", "2"]) == 0
    out = capsys.readouterr().out
    rounds = [line.split() for line in out.splitlines() if line.startswith("round 1")]
    assert [r[2] for r in rounds] == ["unmerged", "merged"] and rounds[0][3] == rounds[1][3]  # same tokens
    assert "merge + unmerge:" in out and out.strip().splitlines()[-1].startswith("speed-up: ")

def test_rollout_batch_bench_samples_every_size_and_reports_ratios(tiny_model_dir, capsys):
    bench = load_bench("rollout_batch")
    assert bench.main(["--model", str(tiny_model_dir), "--data", "unit-conversion", "--questions", "2",
                       "--per-call", "1", "2", "--samples", "2", "--max-new-tokens", "4", "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "questions a call" in line]
    assert [line.split()[0] for line in lines] == ["1", "2"]
    assert "1.00× of 1 a call" in lines[0] and "× of 1 a call" in lines[1]
    with pytest.raises(SystemExit):  # a size that does not divide the questions would sample others
        bench.main(["--model", str(tiny_model_dir), "--data", "unit-conversion", "--questions", "3",
                    "--per-call", "2"])
