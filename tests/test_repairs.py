"""The repairs for small-edit pairs (DPOP, DPO + NLL, suffix-free negatives) and the region measure that shows
where y+'s likelihood goes: each against a value computed by hand in its docstring."""
import math
import random

import pytest
import torch

import sapo
import sapo_utils.models

WEIGHTS = dict(beta=0.1, orpo_lambda=0.05)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model, tok = sapo_utils.models.load_model_and_tokenizer(str(tiny_llama_dir))
    return model.eval(), tok


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_dpop_penalty_by_hand():
    """pi(y+) = -10, ref(y+) = -8: y+ fell 2 nats below the reference; pi(y-) = -12, ref(y-) = -11; beta 0.1,
    lambda 50 (Pal et al. 2024). r+ = 0.1 * -2 = -0.2, r- = 0.1 * -1 = -0.1,
    margin = r+ - r- - beta * lambda * max(0, -8 - -10) = -0.1 - 0.1 * 50 * 2 = -10.1,
    loss = -log sigmoid(-10.1) = 10.1 + log(1 + e^-10.1) = 10.100041.
    d loss / d pi(y+) = -sigmoid(10.1) * (beta + beta * lambda) = -0.999959 * 5.1 = -5.099791."""
    pi_pos = t(-10.0).requires_grad_()
    loss, r_pos, r_neg = sapo.dpo_loss(pi_pos, t(-12.0), t(-8.0), t(-11.0), beta=0.1, dpop_lambda=50.0)
    assert loss.item() == pytest.approx(10.1 + math.log1p(math.exp(-10.1)), abs=1e-5)
    assert loss.item() == pytest.approx(10.100041, abs=1e-5)
    assert r_pos.item() == pytest.approx(-0.2) and r_neg.item() == pytest.approx(-0.1)   # rewards: plain DPO's
    loss.backward()
    assert pi_pos.grad.item() == pytest.approx(-5.099791, abs=1e-4)


def test_dpop_is_dpo_while_y_pos_holds():
    """pi(y+) = -10 above ref(y+) = -11: max(0, -11 - -10) = 0, so DPOP = DPO: -log sigmoid(0.2) = 0.598139
    (a penalty without the max(0, .) would add +1 nat, loss 0.0055)."""
    args = (t(-10.0), t(-12.0), t(-11.0), t(-11.0))
    dpop, _, _ = sapo.dpo_loss(*args, beta=0.1, dpop_lambda=50.0)
    dpo, _, _ = sapo.dpo_loss(*args, beta=0.1)
    assert dpop.item() == dpo.item() == pytest.approx(0.598139, abs=1e-6)


def test_rpo_alpha_adds_the_token_mean_nll_by_hand():
    """Two tuples, the policy equal to the reference (DPO term log 2 = 0.693147). y+ sums -4 over 2 tokens and
    -6 over 4: NLL(y+) as a token mean over the batch = 10 / 6 = 1.666667 (the mean of per-sequence means would
    be 1.75). rpo_alpha 1 (Pang et al. 2024): 0.693147 + 1.666667 = 2.359814; rpo_alpha 0.5: 1.526480."""
    pi_pos, pi_neg, n_pos, n_neg = t(-4.0, -6.0), t(-5.0, -7.0), t(2, 4), t(2, 4)
    ref = (pi_pos.clone(), pi_neg.clone())
    for alpha, expected in ((1.0, 2.359814), (0.5, 1.526480), (0.0, math.log(2))):
        loss, m = sapo.preference_loss("dpo", pi_pos, pi_neg, n_pos, n_neg, *ref, rpo_alpha=alpha, **WEIGHTS)
        assert loss.item() == pytest.approx(expected, abs=1e-5)
        assert ("nll_loss" in m) == (alpha > 0)
    loss, m = sapo.preference_loss("dpo", pi_pos, pi_neg, n_pos, n_neg, *ref, rpo_alpha=1.0, nll=t(3.0)[0],
                                   **WEIGHTS)
    assert loss.item() == pytest.approx(math.log(2) + 3.0, abs=1e-5)     # a given NLL (scale/'s global one) wins
    assert m["nll_loss"] == pytest.approx(3.0)


def test_preference_loss_orpo_matches_orpo_loss():
    """ORPO through preference_loss: orpo_loss on the length-averaged log-probs with the batch's token-mean NLL."""
    pi_pos, pi_neg, n_pos, n_neg = t(-4.0, -6.0), t(-9.0, -7.0), t(2, 4), t(3, 4)
    loss, m = sapo.preference_loss("orpo", pi_pos, pi_neg, n_pos, n_neg, **WEIGHTS)
    direct, log_odds, _, _ = sapo.orpo_loss(pi_pos / n_pos, pi_neg / n_neg, t(10 / 6)[0], 0.05)
    assert loss.item() == pytest.approx(direct.item(), abs=1e-6)
    assert m["nll_loss"] == pytest.approx(10 / 6) and m["log_odds_chosen"] == pytest.approx(log_odds.mean().item())


def test_suffix_free_splice_by_hand():
    """y+ = 100..109, t = 2, G = 3, segment 1 2 3: y- = y+[:2] + [1, 2, 3] with no suffix. A stop token in the
    segment ends y- there, as without suffix_free."""
    y_pos = list(range(100, 110))
    y_neg, kept = sapo.splice_negative(y_pos, 2, 3, [1, 2, 3, 4], stop_ids=[0], suffix_free=True)
    assert y_neg == [100, 101, 1, 2, 3] and kept == 3
    y_neg, kept = sapo.splice_negative(y_pos, 2, 3, [1, 0, 3], stop_ids=[0], suffix_free=True)
    assert y_neg == [100, 101, 1, 0] and kept == 2


def fake_generate(model, contexts, max_new_tokens, pad_id, stop_ids, sampling):
    """Writes 7 7 7 ... : a segment that differs from every y+ below."""
    return [[7] * n for n in max_new_tokens]


@pytest.mark.parametrize("suffix_free", [False, True])
def test_make_negatives_suffix_free_cuts_y_pos_at_the_segment_end(suffix_free):
    """Both sides end where the segment ends (Step-DPO's pair): y+[:t+G] against y+[:t] + segment. The shared
    prefix is y+[:t] on both sides, so with summed log-probs the pair differs only in the span."""
    rng = random.Random(0)
    examples = [sapo.Example([5, 6], list(range(100, 100 + n)) + [2]) for n in (3, 12, 30, 40)]
    tuples = sapo.make_negatives(None, examples, 4, 128, rng, 0, [2], {}, generate=fake_generate,
                                 suffix_free=suffix_free)
    for e, tpl in zip(examples, tuples):
        t0, G = tpl["t"], min(4, len(e.chosen_ids))
        assert tpl["rejected_ids"][:t0] == e.chosen_ids[:t0]
        if suffix_free:
            assert tpl["chosen_ids"] == e.chosen_ids[: t0 + G]
            assert tpl["rejected_ids"] == e.chosen_ids[:t0] + [7] * G
        else:
            assert tpl["chosen_ids"] == e.chosen_ids
            assert tpl["rejected_ids"] == e.chosen_ids[:t0] + [7] * G + e.chosen_ids[t0 + G:]


def test_truncation_point_keeps_a_short_suffix_when_y_pos_is_just_longer_than_G():
    """TAIL = 3: with G = 8 and |y+| = 10 the bound |y+| - 3 - G is -1, so t = 0 and the first 8 tokens are
    rewritten before a kept suffix of 2 (not the whole answer); with |y+| = 8 the whole answer is rewritten."""
    rng = random.Random(0)
    assert sapo.truncation_point(10, 5, 8, 100, rng) == (0, 8)
    assert sapo.truncation_point(8, 5, 8, 100, rng) == (0, 8)
    assert {sapo.truncation_point(14, 5, 8, 100, rng)[0] for _ in range(200)} == {0, 1, 2, 3}


def token_id_logps(model, input_ids, attention_mask, at, targets):
    """A stand-in forward whose log-prob of each target token is minus its id, so region sums are sums of ids."""
    return -targets.float()


def test_region_logps_by_hand():
    """Tuple 1: y+ = 1 2 | 3 4 5 | 6 7, t = 2, G = 3; y- = 1 2 | 30 31 32 | 6 7. Sums of -id: chosen prefix -3,
    span -12, suffix -13; rejected span -93, suffix -13.
    Tuple 2: t = 0, y+ = 1 2 3 4 with G = min(3, 4) = 3: prefix 0, span -6, suffix -4; y- = 9 99 stopped at its
    EOS 99 (segment_len 2): span -108, suffix 0."""
    tuples = [sapo.preference_tuple([50, 51], [1, 2, 3, 4, 5, 6, 7], [1, 2, 30, 31, 32, 6, 7], t=2, segment_len=3),
              sapo.preference_tuple([50], [1, 2, 3, 4], [9, 99], t=0, segment_len=2)]
    r = sapo.region_logps(None, tuples, 3, 0, "cpu", logps_at=token_id_logps)
    assert r["chosen_prefix"].tolist() == [-3, 0]
    assert r["chosen_span"].tolist() == [-12, -6]
    assert r["chosen_suffix"].tolist() == [-13, -4]
    assert r["rejected_span"].tolist() == [-93, -108]
    assert r["rejected_suffix"].tolist() == [-13, 0]


def test_region_logps_add_up_to_the_sequence_on_a_model(llama):
    """On a real model: prefix + span + suffix = log pi(y+) (sapo.preference_logps), and y-'s regions with its own
    prefix (equal to y+'s: same context) add up to log pi(y-)."""
    model, tok = llama
    stop = sapo_utils.models.stop_token_ids(model, tok)
    examples = [sapo.Example([5, 6, 7][: 1 + i % 3], [20 + (j * 7 + i) % 300 for j in range(n)] + [tok.eos_token_id])
                for i, n in enumerate([3, 12, 30, 45])]
    torch.manual_seed(0)
    tuples = sapo.make_negatives(model, examples, 6, 256, random.Random(1), tok.pad_token_id, stop,
                                 sapo.segment_sampling(1.5, 50, 0.95))
    r = sapo.region_logps(model, tuples, 6, tok.pad_token_id, "cpu")
    pos, neg, _, _ = sapo.preference_logps(model, tuples, tok.pad_token_id, "cpu")
    total_pos = r["chosen_prefix"] + r["chosen_span"] + r["chosen_suffix"]
    assert torch.allclose(total_pos, pos.detach(), atol=1e-4)
    assert torch.allclose(r["chosen_prefix"] + r["rejected_span"] + r["rejected_suffix"], neg.detach(), atol=1e-4)


def test_evaluate_reports_regions_only_with_a_segment_length(llama):
    model, tok = llama
    tuples = [sapo.preference_tuple([5, 6], [20, 21, 22, 23, tok.eos_token_id], [20, 40, 41, 23, tok.eos_token_id],
                                    t=1, segment_len=2)]
    with_regions = sapo.evaluate(model, tuples, tok.pad_token_id, "cpu", 0.1, segment_len=2)
    assert with_regions["eval/logps/chosen_span"] < 0 and "eval/logps/rejected_suffix" in with_regions
    assert not any(k.startswith("eval/logps/") for k in sapo.evaluate(model, tuples, tok.pad_token_id, "cpu", 0.1))


def test_repair_flags_reach_the_loss_and_the_negatives(tiny_llama_dir, small_jsonl, tmp_path):
    """--rpo-alpha logs the NLL term; --suffix-free trains on pairs that end where the segment ends."""
    import json
    out = tmp_path / "run"
    code = sapo.main(["--model", str(tiny_llama_dir), "--dataset", str(small_jsonl), "--output-dir", str(out),
                      "--max-steps", "2", "--batch-size", "2", "--segment-len", "3", "--rpo-alpha", "1.0",
                      "--dpop-lambda", "50", "--suffix-free", "--eval-size", "2", "--task", "none",
                      "--num-samples", "4", "--save-steps", "-1", "--max-length", "128",
                      "--max-prompt-length", "64"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("nll_loss" in r for r in rows if "loss" in r)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(len(s["rejected_marked"].split("]]")[1]) == 0 for s in samples)   # nothing after y-'s span


# ----------------------------------------------------------------------------- the second protocol's rules


def test_sweep_extends_past_an_edge_until_the_best_is_interior():
    """bench/repairs.py: the first grid, then one ladder step past the edge the best sits on, then none."""
    from bench import repairs
    P = repairs.FULL
    scores = {"start": 0.50}
    assert repairs.next_sweep_runs(P, scores, "sapo-dpo") == [(1e-5, 100), (3e-5, 100), (1e-4, 100)]
    scores.update({1e-5: {100: 0.40}, 3e-5: {100: 0.30}, 1e-4: {100: 0.10}})
    assert repairs.next_sweep_runs(P, scores, "sapo-dpo") == [(3e-6, 100)]        # best at the low edge
    scores[3e-6] = {100: 0.44}
    assert repairs.next_sweep_runs(P, scores, "sapo-dpo") == [(1e-6, 100)]
    scores[1e-6] = {100: 0.49}       # the ladder ends: the best is its smallest lr
    assert repairs.next_sweep_runs(P, scores, "sapo-dpo") == []
    assert repairs.chosen_lr(P, scores) == 1e-6
    top = {"start": 0.50, 1e-4: {100: 0.80}, 3e-4: {100: 0.85}, 1e-3: {100: 0.90}}
    assert repairs.next_sweep_runs(P, top, "sft") == [(3e-3, 100)]                # best at the high edge


def test_sweep_breaks_close_calls_with_more_seeds():
    """The best two closer than 3 points: both rerun at sweep seeds 101 and 102; the mean decides, ties smaller."""
    from bench import repairs
    P = repairs.FULL
    scores = {"start": 0.50, 1e-4: {100: 0.80}, 3e-4: {100: 0.82}, 1e-3: {100: 0.70}}
    assert sorted(repairs.next_sweep_runs(P, scores, "sft")) == [(1e-4, 101), (1e-4, 102), (3e-4, 101), (3e-4, 102)]
    scores[1e-4].update({101: 0.84, 102: 0.83})
    scores[3e-4].update({101: 0.80, 102: 0.79})
    assert repairs.next_sweep_runs(P, scores, "sft") == []
    assert repairs.chosen_lr(P, scores) == 1e-4          # 0.823 over three seeds beats 0.803
    scores[1e-4] = {100: 0.80, 101: 0.82, 102: 0.82}
    scores[3e-4] = {100: 0.82, 101: 0.80, 102: 0.82}     # the same mean: the tie goes to the smaller lr
    assert repairs.chosen_lr(P, scores) == 1e-4
    scores[3e-4][101] = 0.83
    assert repairs.chosen_lr(P, scores) == 3e-4


def test_finished_means_the_last_evaluations_stopped_rising():
    from bench import repairs
    rising = [{"exact_match": v} for v in (0.3, 0.5, 0.7, 0.8, 0.85, 0.9)]
    flat = [{"exact_match": v} for v in (0.3, 0.5, 0.9, 0.905, 0.9, 0.91)]
    assert not repairs.finished(rising, 0.01, 3) and repairs.finished(flat, 0.01, 3)
    assert not repairs.finished(flat[:3], 0.01, 3)      # too few points to tell


def test_repairs_quick_runs(tmp_path):
    """bench/repairs.py --quick end to end: both starts (the finished one through its doubling rule), every arm from
    each, the regions measured at every curve point, the tables with their intervals, the report rebuilt by
    --report-only from the same runs."""
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ROOT / "bench" / "repairs.py"), "--quick", "--out", str(tmp_path / "out"),
            "--work-dir", str(tmp_path / "work")]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "repairs.json").read_text())
    from bench import repairs
    assert set(result["tables"]) == {"start51", "finished"}
    assert result["starts"]["finished"]["info"]["steps"] > result["protocol"]["starts"]["finished"]["steps"] or \
        result["starts"]["finished"]["info"]["finished"]
    for start, rows in result["tables"].items():
        assert [r["method"] for r in rows] == list(repairs.ARMS)
        for row in rows:
            assert all(v is not None for v in row["regions_moved"].values())
            if row["method"] != "sft":
                lo, hi = row["vs_sft"]["ci95"]
                assert lo <= row["vs_sft"]["diff"] <= hi
    for run in result["runs"]:
        assert set(run["curve"][0]["regions"]) == set(repairs.REGIONS)
        assert run["curve"][-1]["step"] == result["protocol"]["steps"]
    assert (tmp_path / "out" / "repairs.png").stat().st_size > 10_000
    table = (tmp_path / "out" / "repairs.md").read_text()
    proc = subprocess.run(args + ["--report-only"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = (tmp_path / "out" / "repairs.md").read_text()
    assert rebuilt.split("\n", 1)[1] == table.split("\n", 1)[1]       # the same tables, from the same runs
