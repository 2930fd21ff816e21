"""The architecture matrix: tiny random models of the architectures people fine-tune, each with its dropout rates
set > 0 in the config, loaded and trained by sapo. For each: it loads; step 1's DPO loss is log 2 with rewards 0
while the policy is in train mode (dropout is really off); a 2-step train() writes a final/ that transformers loads
back with the trained policy's logits. (The speed-ups against the plain path, per architecture: test_speedups.py.)

    pytest tests/test_architectures.py -q -s      # -s also shows the table: architecture, head-only, shared-prefix
"""
import copy
import json
import math

import pytest
import torch

import sapo
import sapo_utils.checkpoints
import sapo_utils.models
from conftest import write_jsonl
from tiny_models import CASES, IDS, hand_tuples, load

# ---------------------------------------------------------------------------------------------------
# Loading, and dropout really off
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_loads_and_dropout_is_off_in_train_mode(arch, chat, arch_dirs):
    path = arch_dirs(arch, chat)
    model, tok = load(path)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert bool(tok.chat_template) == chat
    saved = json.loads((path / "config.json").read_text())
    rates = {k: v for k, v in saved.items() if "drop" in k and isinstance(v, float) and v > 0}
    assert rates, f"{arch}: the test config should carry dropout rates > 0"
    model.train()
    ids = torch.tensor([[5, 9, 17, 33, 60, 101, 7, 250]]) % model.config.vocab_size
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    assert torch.equal(a, b), f"{arch}: two train-mode forwards differ: dropout is still on"
    model.eval()
    assert torch.allclose(model(input_ids=ids).logits, a, atol=1e-6)   # train mode == eval mode


# ---------------------------------------------------------------------------------------------------
# Step 1: policy == reference, policy in train mode => DPO loss log 2, rewards 0
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_step1_dpo_loss_is_log2_in_train_mode(arch, chat, arch_dirs):
    model, tok = load(arch_dirs(arch, chat))
    policy = model.train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    batch = hand_tuples(model.config.vocab_size, tok.eos_token_id)
    cfg = sapo.Config(beta=0.1)
    for _ in range(2):   # twice: a dropout mask drawn anew would show up as a different loss
        loss, m = sapo.batch_loss("dpo", cfg, policy, ref, batch, tok.pad_token_id, "cpu",
                                 sapo.ops_for(cfg, "cpu"))
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert abs(m["rewards/chosen"]) < 1e-6 and abs(m["rewards/rejected"]) < 1e-6 and abs(m["rewards/margins"]) < 1e-6
        loss.backward()      # and it is differentiable through whichever path was chosen
    assert any(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in policy.parameters())


# ---------------------------------------------------------------------------------------------------
# A real 2-step run: metrics line 1 is log 2 with rewards 0; final/ loads back with the trained logits
# ---------------------------------------------------------------------------------------------------


def rows(n=12):
    return [{"prompt": f"Explain tea number {i}.", "chosen": f"Tea {i} is brewed by pouring hot water over leaves."}
            for i in range(n)]


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_two_step_run_and_final_loads_back(arch, chat, arch_dirs, tmp_path):
    from transformers import AutoModelForCausalLM
    path = arch_dirs(arch, chat)
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    out = tmp_path / "out"
    seen = {}
    cfg = sapo.Config(model=str(path), dataset=str(data), output_dir=str(out), max_steps=2, batch_size=2, segment_len=4,
                      max_length=64, max_prompt_length=40, save_steps=0, eval_size=2, lr=1e-3, log_every=100)
    sapo.train(cfg, on_step=lambda step, policy, metrics: seen.update(policy=policy))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics[0]["rewards/chosen"]) < 1e-6 and abs(metrics[0]["rewards/rejected"]) < 1e-6
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    policy = seen["policy"].eval()
    start = AutoModelForCausalLM.from_pretrained(path)
    trained = dict(policy.named_parameters())
    assert sum(not torch.equal(p, trained[n]) for n, p in start.named_parameters()) > 0     # the run moved weights
    ids = torch.tensor([[5, 9, 17, 33, 60, 101, 7]]) % final.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(final(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)
    # the saved model is the user's model: its config still carries the dropout rates it came with
    rates = {k: v for k, v in start.config.to_dict().items() if "drop" in k}
    assert rates and all(final.config.to_dict()[k] == v for k, v in rates.items())
    assert sapo_utils.checkpoints.latest_checkpoint(out / "checkpoints").name == "step-00000002"     # present, and its manifest verifies
