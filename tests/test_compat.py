"""mathtune.compat's shims against the installed libraries: each one does what its callers rely on.

Runs on both CI legs (Makefile LATEST_TESTS): a library release that moves the private API a shim
uses fails here, naming the shim, before it fails somewhere deep in training or data loading.
"""

from __future__ import annotations

import socket

import pytest
import torch

from mathtune.compat import attention_implementation, hub_offline


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_attention_implementation_reads_what_the_public_setter_set(tiny_model, wrap):
    model = tiny_model
    if wrap == "peft":
        from mathtune.models.load import apply_lora

        model = apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    base = model.get_base_model() if wrap == "peft" else model
    for kernel in ("sdpa", "eager", "sdpa"):
        base.set_attn_implementation(kernel)
        assert attention_implementation(model) == kernel
    # the value is the one the layers run: only eager attention returns attention weights
    base.set_attn_implementation("eager")
    ids = tiny_model.config.bos_token_id
    out = base(input_ids=torch.tensor([[ids, ids]]), output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape[-1] == 2


def test_attention_implementation_of_something_without_a_config_is_none():
    assert attention_implementation(object()) is None


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused (the loaders may catch what is raised)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network connection attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_hub_offline_stops_datasets_and_the_hub_client_from_any_request(no_network, tmp_path):
    import datasets
    import datasets.config
    from huggingface_hub import is_offline_mode

    before = (datasets.config.HF_HUB_OFFLINE, is_offline_mode())
    with hub_offline(True):
        assert is_offline_mode()
        with pytest.raises(Exception) as excinfo:
            datasets.load_dataset("nobody-xyz/not-a-dataset-123", cache_dir=str(tmp_path))
    assert no_network == [], f"{len(no_network)} connection attempts under hub_offline ({excinfo.value!r})"
    assert (datasets.config.HF_HUB_OFFLINE, is_offline_mode()) == before  # restored

    with hub_offline(False):  # False: the libraries as they are
        assert is_offline_mode() == before[1]


def test_hub_offline_restores_the_settings_after_an_error():
    import datasets.config
    from huggingface_hub import is_offline_mode

    before = (datasets.config.HF_HUB_OFFLINE, is_offline_mode())
    with pytest.raises(KeyError):
        with hub_offline(True):
            raise KeyError("inside")
    assert (datasets.config.HF_HUB_OFFLINE, is_offline_mode()) == before


class NetworkUsed(BaseException):
    """Not an Exception: the libraries' retry loops do not catch it, so the first attempt ends the call."""


def test_without_hub_offline_datasets_would_go_to_the_network(monkeypatch, tmp_path):
    """The control for the test above: the shim is what keeps datasets off the network."""
    import datasets
    import datasets.config

    if datasets.config.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was set when datasets was imported: it is offline without the shim")

    def refuse(*args, **kwargs):
        raise NetworkUsed()

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(NetworkUsed):
        datasets.load_dataset("nobody-xyz/not-a-dataset-123", cache_dir=str(tmp_path))


def test_grpo_scoring_shim_fits_the_installed_trl_and_names_what_is_missing():
    import trl

    from mathtune.compat import grpo_scoring_problem, install_grpo_scoring

    # the installed TRL's GRPOTrainer has the private scoring method with the parameters mathtune's pass takes
    assert grpo_scoring_problem(trl.GRPOTrainer) is None

    class Renamed:  # a TRL that moved or renamed it: the shim says so and installs nothing
        def score(self, model, input_ids):
            return None

    problem = install_grpo_scoring(Renamed, lambda *a, **k: None)
    assert problem is not None and "has no _get_per_token_logps_and_entropies" in problem
    assert not hasattr(Renamed, "_get_per_token_logps_and_entropies")

    class Narrower:
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep):
            return None

    assert "lacks batch_size, compute_entropy, compute_aux_loss" in grpo_scoring_problem(Narrower)
