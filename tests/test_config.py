from pathlib import Path

import pytest
import yaml

from selective_lm.config import DEFAULT_PRESET, VALID_KEYS, Config, load_config, preset_names
from selective_lm.errors import UserError


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name: str) -> None:
    cfg = load_config(name)
    assert cfg.preset == name
    # A preset round-trips through its YAML dump.
    assert Config.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_presets_shipped() -> None:
    assert {"smoke", "champ-smollm2", "champ-smollm2-gpu", "tinyllama-owm"} <= set(preset_names())
    assert DEFAULT_PRESET == "champ-smollm2"


def test_gpu_preset_is_the_default_study_at_gpu_scale() -> None:
    """Same model, corpus (with CHAMP's annotated wrong steps) and reference as the default; the full grid, of
    which the default's is a part; whole splits, ~3 epochs, 3 seeds, champ_answer."""
    cpu, gpu = load_config("champ-smollm2"), load_config("champ-smollm2-gpu")
    assert gpu.model == cpu.model and gpu.reference == cpu.reference and gpu.data == cpu.data
    assert cpu.data.annotated_share == 0.25
    assert set(cpu.grid.methods) < set(gpu.grid.methods) and set(cpu.grid.ratios) < set(gpu.grid.ratios)
    assert gpu.grid.methods == ["topk", "random", "stochastic", "bottomk", "distill"] and gpu.grid.seeds == 3
    assert len(gpu.grid_runs(has_noise=True)) == 33  # CLM, the oracle, 4 methods x 2 ratios, distillation; x 3
    assert gpu.train.batch_size == cpu.train.batch_size  # the selection unit is the study's
    epochs = gpu.train.steps * gpu.train.batch_size * gpu.train.grad_accum / 2343  # the train split's blocks
    assert 2.5 < epochs < 3.5
    assert gpu.scoring.blocks == "all" and gpu.eval.max_tokens is None and gpu.eval.tasks == ["champ_answer"]
    assert (gpu.train.micro_batch_size, gpu.train.compile) == ("auto", "auto")


def test_tinyllama_preset_is_the_replication_setting() -> None:
    cfg = load_config("tinyllama-owm")
    assert "TinyLlama-1.1B" in cfg.model.name
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout) == (16, 32, 0.05)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum, cfg.data.block_len) == (1e-4, 4, 4, 128)
    assert len(cfg.model.lora_targets) == 7


def test_overrides_are_typed_and_dotted() -> None:
    cfg = load_config("smoke", overrides=["train.ratio=0.5", "model.lora=false", "data.max_tokens.train=123",
                                         "grid.ratios=[0.7, 0.4]", "train.name=my-run"])
    assert cfg.train.ratio == 0.5 and cfg.model.lora is False
    assert cfg.data.max_tokens == {"reference": 8000, "train": 123, "default": 4000}
    assert cfg.grid.ratios == [0.7, 0.4] and cfg.train.name == "my-run"


def test_config_file_layers_over_its_preset(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\ntrain:\n  steps: 3\n")
    cfg = load_config(config_file=f, overrides=["train.lr=0.01"])
    assert cfg.preset == "smoke" and cfg.train.steps == 3 and cfg.train.lr == 0.01
    assert cfg.model.name == "random:tiny-llama"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.ratoi=0.5"], "did you mean 'train.ratio'"),
        (["model.lora_rank=4"], "did you mean 'model.lora_r'"),
        (["train.ratio=0"], "train.ratio"),
        (["train.ratio=1.5"], "(0, 1]"),
        (["train.ratio=nan"], "train.ratio"),
        (["train.method=topkk"], "'topk'"),
        (["train.scope=rows"], "'sequence'"),
        (["data.block_len=1"], "data.block_len"),
        (["train.steps=many"], "train.steps"),
        (["reference.mode=path"], "reference.path"),
        (["data.noise_kinds={spam: 1}"], "unknown noise kind"),
        (["grid.ratios=[0.5, 2]"], "grid.ratios"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(UserError, match=None) as err:
        load_config("smoke", overrides=overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="did you mean 'smoke'"):
        load_config("smok")
    with pytest.raises(UserError, match="cannot read config file"):
        load_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(config_file=bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(config_file=scalar)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  steps: 3\n")
    with pytest.raises(UserError, match="unknown config key 'trian'"):
        load_config(config_file=unknown)


def test_keys_that_docs_rely_on_exist() -> None:
    for key in ["model.name", "model.lora", "model.lora_r", "model.lora_alpha", "model.lora_dropout",
                "model.lora_targets", "data.block_len", "data.noise_rate", "data.max_tokens",
                "data.reference_mix", "reference.mode", "reference.path", "scoring.mode", "train.method",
                "train.score", "train.ratio", "train.scope", "train.steps", "train.batch_size",
                "train.grad_accum", "train.lr", "train.seed", "grid.methods", "grid.ratios", "grid.seeds"]:
        assert key in VALID_KEYS


def test_methods_map_to_strategy_score_and_ratio() -> None:
    def eff(*overrides: str) -> tuple[str, str, float, float | None]:
        return load_config("smoke", overrides=list(overrides)).train.selection_rule()

    assert eff("train.method=clm", "train.ratio=0.5") == ("topk", "none", 1.0, None)
    assert eff("train.method=oracle") == ("topk", "none", 1.0, None)
    assert eff("train.method=random", "train.ratio=0.3") == ("random", "none", 0.3, None)
    assert eff("train.method=topk", "train.ratio=0.6") == ("topk", "excess", 0.6, None)
    assert eff("train.method=stochastic", "train.ratio=0.5", "train.score=loss") == ("stochastic", "loss", 0.5, None)
    assert eff("train.method=stochastic", "train.stochastic=positive", "train.ratio=0.5") == (
        "stochastic_positive", "excess", 0.5, None)
    # Threshold rules: the count is the threshold's (ratio 1), and a random control counts by the score too.
    assert eff("train.method=topk", "train.rule=positive") == ("topk", "excess", 1.0, 0.0)
    assert eff("train.method=random", "train.rule=positive") == ("random", "excess", 1.0, 0.0)
    assert eff("train.method=topk", "train.rule=threshold", "train.threshold=-0.5", "train.score=retrospective") == (
        "topk", "retrospective", 1.0, -0.5)


def test_grid_rules_name_their_runs() -> None:
    cfg = load_config("smoke", overrides=["grid.rules=[topk,positive,threshold]", "train.threshold=0.25",
                                          "grid.methods=[topk,random]", "grid.ratios=[0.5]"])
    runs = cfg.grid_runs(has_noise=True)
    assert list(runs) == ["clm", "oracle", "topk-r0.5", "random-r0.5", "topk-pos", "random-pos", "topk-t0.25",
                          "random-t0.25"]
    assert runs["random-t0.25"].train.selection_rule() == ("random", "excess", 1.0, 0.25)
    assert runs["topk-pos"].train.threshold is None  # read by the threshold rule only
    with pytest.raises(UserError, match="train.rule=threshold needs train.threshold"):
        load_config("smoke", overrides=["grid.rules=[threshold]"]).grid_runs(has_noise=True)


def test_a_fixed_ratio_gets_its_random_control_and_no_other() -> None:
    """The 80/20 rule selects 20 % whatever grid.ratios say: random runs at 0.2 too (the count-matched control the
    report sets beside it), bottom-k (a control of the excess score, not of entropy) and top-k do not."""
    cfg = load_config("smoke", overrides=["grid.methods=[topk,random,bottomk,entropy_topk]", "grid.ratios=[0.5]"])
    assert list(cfg.grid_runs(has_noise=True)) == ["clm", "oracle", "topk-r0.5", "random-r0.5", "random-r0.2",
                                                   "bottomk-r0.5", "entropy_topk-r0.2"]
    plain = load_config("smoke", overrides=["grid.methods=[topk,random]", "grid.ratios=[0.5,0.2]"])
    assert list(plain.grid_runs(has_noise=True)) == ["clm", "oracle", "topk-r0.5", "topk-r0.2", "random-r0.5",
                                                     "random-r0.2"]  # no fixed ratio: the grid's ratios alone


def test_grid_controls_distill_and_bottomk() -> None:
    """distill runs once (every token), bottomk at every ratio; names carry the KL weight and temperature
    away from 1; the kd settings enter the hash of distill runs only."""
    cfg = load_config("smoke", overrides=["grid.methods=[topk,bottomk,distill]", "grid.ratios=[0.5,0.3]"])
    runs = cfg.grid_runs(has_noise=True)
    assert list(runs) == ["clm", "oracle", "distill", "topk-r0.5", "topk-r0.3", "bottomk-r0.5", "bottomk-r0.3"]
    assert runs["distill"].train.selection_rule() == ("topk", "none", 1.0, None)
    assert runs["bottomk-r0.3"].train.selection_rule() == ("bottomk", "excess", 0.3, None)
    assert runs["distill"].train.needs_reference() is False  # it reads the reference model, not the scores
    named = load_config("smoke", overrides=["grid.methods=[distill]", "objectives.distill.weight=0.5",
                                            "objectives.distill.temperature=2"]).grid_runs(has_noise=False)
    assert list(named) == ["clm", "distill-w0.5-T2"]
    # The run hash holds the objective's keys away from their defaults (Trainer._config_hash): distill's only.
    assert named["distill-w0.5-T2"].objective_params().model_dump(exclude_defaults=True) == {
        "weight": 0.5, "temperature": 2.0}
    assert named["clm"].objective_params() is None
    at_default = load_config("smoke", overrides=["train.method=distill", "objectives.distill.weight=1"])
    assert at_default.objectives == {}  # the default weight: no key, the hash of before
    with pytest.raises(UserError, match="grid run bottomk .positive.*takes a ratio"):
        load_config("smoke", overrides=["grid.methods=[bottomk]", "grid.rules=[positive]"]).grid_runs(True)
    with pytest.raises(UserError, match="distill needs a reference model.s next-token distribution"):
        load_config("smoke", overrides=["grid.methods=[distill]", "reference.mode=checkpoint"])


def test_fields_added_later_keep_old_fingerprints() -> None:
    """New fields at their defaults are left out of `hashed()`: stores and runs made before them stay valid."""
    cfg = load_config("smoke")
    assert "rule" not in cfg.train.hashed() and "threshold" not in cfg.train.hashed()
    assert cfg.train.hashed() == cfg.train.model_dump(exclude={"rule", "threshold"})
    changed = load_config("smoke", overrides=["train.method=topk", "train.rule=positive"]).train.hashed()
    assert changed["rule"] == "positive"
    for section in ("data", "reference"):
        later = set(getattr(cfg, section).LATER_FIELDS) - {"annotated_share"}
        assert later and not later & set(getattr(cfg, section).hashed())
    # CHAMP's stores changed with the wrong-step labels: annotated_share stays in its hash, not in a custom one's
    assert cfg.data.hashed()["annotated_share"] == cfg.data.annotated_share
    assert load_config("champ-smollm2").data.hashed()["annotated_share"] == 0.25
    custom = load_config("smoke", overrides=["data.corpus=custom", "data.sources={train: x.jsonl}"])
    assert "annotated_share" not in custom.data.hashed()


def test_choices_are_the_registries() -> None:
    """train.method/score/scope and grid.methods accept what the registries hold (method/registry.py), and
    nothing else: a method or score kind registered later (a plugin's) needs no change in the config."""
    from typing import get_args

    from selective_lm.config import TrainConfig
    from selective_lm.method.registry import METHODS, SCORE_KINDS
    from selective_lm.method.selection import SCOPES

    assert get_args(TrainConfig.model_fields["scope"].annotation) == SCOPES
    for name, method in METHODS.items():  # a ratio where the method takes one (not a fixed share, not every token)
        ratio = ["train.ratio=0.5"] if method.selects and method.ratio is None else []
        cfg = load_config("smoke", overrides=[f"train.method={name}", *ratio, f"grid.methods=[{name}]"])
        assert cfg.train.method == name and cfg.grid.methods == [name]
    for kind in set(SCORE_KINDS) - {"none"}:  # none with topk would select by position (refused elsewhere)
        assert load_config("smoke", overrides=["train.method=topk", f"train.score={kind}"]).train.score == kind
    for key in ("train.method", "train.score", "grid.methods"):
        with pytest.raises(UserError, match=key):
            load_config("smoke", overrides=[f"{key}={'[nope]' if key == 'grid.methods' else 'nope'}"])


def test_unknown_corpus_names_the_registered_ones() -> None:
    from selective_lm.data.corpora import CORPORA

    with pytest.raises(UserError, match="data.corpus") as err:
        load_config("smoke", overrides=["data.corpus=nope"])
    assert "'nope'" in str(err.value)
    for name in CORPORA:
        assert name in str(err.value)
